"""The figures hold the numbers they claim: checked on the figure's data, never shown."""

import pytest
import torch

from interlace import StandardizedTransformer
from interlace.display import plot_logit_lens, plot_topk_tokens, prompts_to_df
from interlace.methods import Prompt, logit_lens

from helpers import tiny, tiny_tokenizer


@pytest.fixture(scope="module")
def model():
    return StandardizedTransformer(tiny("llama"), tokenizer=tiny_tokenizer())


def test_topk_heatmap_holds_each_layers_top_tokens(model):
    probs = logit_lens(model, ["w5 w6 w7", "w8 w9"])
    fig = plot_topk_tokens(probs, model.tokenizer, k=3)
    assert len(fig.data) == 2  # one heatmap per prompt
    for heatmap, prompt_probs in zip(fig.data, probs):
        values, ids = prompt_probs.topk(3)
        torch.testing.assert_close(torch.tensor(heatmap.z), values)
        assert [list(row) for row in heatmap.text] == [[repr(model.tokenizer.decode([i])) for i in row] for row in ids.tolist()]
    single = plot_topk_tokens(probs[0], model.tokenizer, k=2, use_token_ids=True)
    assert [list(row) for row in single.data[0].text] == [[str(i) for i in row] for row in probs[0].topk(2).indices.tolist()]


def test_logit_lens_heatmap_over_layers_and_positions(model):
    fig = plot_logit_lens(model, "w5 w6 w7")
    heatmap = fig.data[0]
    assert len(heatmap.z) == 2 and len(heatmap.z[0]) == 3 and list(heatmap.x) == ["0: 'w5'", "1: 'w6'", "2: 'w7'"]
    with model.trace("w5 w6 w7"):
        hidden = model.layers_output[0].save()
    with torch.no_grad():
        probs = model.project_on_vocab(hidden[0]).softmax(-1)
    torch.testing.assert_close(torch.tensor(heatmap.z[0]), probs.max(-1).values)
    assert list(heatmap.text[0]) == [repr(model.tokenizer.decode([i])) for i in probs.argmax(-1).tolist()]


def test_prompts_to_df(model):
    prompts = [Prompt.from_strings("w2 w3", {"target": "w5", "traps": ["w6", "w7"]}, model.tokenizer),
               Prompt.from_strings("w4", {"target": "w8", "traps": ["w9"]}, model.tokenizer)]
    df = prompts_to_df(prompts, model.tokenizer)
    assert list(df.columns) == ["prompt", "target", "target_tokens", "traps", "traps_tokens"]
    assert df["prompt"].tolist() == ["w2 w3", "w4"]
    assert df["traps_tokens"].tolist() == [["w6", "w7"], ["w9"]]
    assert prompts_to_df(prompts)["target_tokens"].tolist() == [[5], [8]]
