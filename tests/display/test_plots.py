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


def byte_level_tokenizer():
    """A GPT-2-style byte-level BPE tokenizer built offline: ' a' is the raw token 'Ġa'."""
    import tokenizers
    import transformers

    vocab = {"a": 0, "b": 1, "Ġa": 2, "Ġb": 3, "Ġ": 4}
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[("Ġ", "a"), ("Ġ", "b")]))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend)


def test_topk_heatmap_holds_each_layers_top_tokens(model):
    probs = logit_lens(model, ["w5 w6 w7", "w8 w9"])
    fig = plot_topk_tokens(probs, model.tokenizer, k=3)
    assert len(fig.data) == 2 and fig.layout.title.text == "Top 3 Tokens Heatmap"  # one heatmap per prompt
    for heatmap, prompt_probs in zip(fig.data, probs):
        values, ids = prompt_probs.topk(3)
        torch.testing.assert_close(torch.tensor(heatmap.z), values)
        assert [list(row) for row in heatmap.text] == [[f"'w{i}'" for i in row] for row in ids.tolist()]
    single = plot_topk_tokens(probs[0], model.tokenizer, k=2, use_token_ids=True)
    assert [list(row) for row in single.data[0].text] == [[str(i) for i in row] for row in probs[0].topk(2).indices.tolist()]


def test_topk_heatmap_shows_raw_tokens_as_nnterp_and_decoded_text_on_request(tmp_path):
    tokenizer = byte_level_tokenizer()
    probs = torch.tensor([[0.1, 0.2, 0.6, 0.1, 0.0]])  # one layer: ' a' (id 2), then ' b'... 'b'
    raw = plot_topk_tokens(probs, tokenizer, k=2, file=tmp_path / "topk.html")
    assert list(raw.data[0].text[0]) == ["'Ġa'", "'b'"]
    assert (tmp_path / "topk.html").read_text().count("Heatmap") >= 1
    nicer = plot_topk_tokens(probs, tokenizer, k=2, decoded=True)
    assert list(nicer.data[0].text[0]) == ["' a'", "'b'"]


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


def test_prompts_to_df_has_one_column_per_prompt_as_nnterp():
    tokenizer = byte_level_tokenizer()
    prompts = [Prompt.from_strings("a b", {"target": "a", "traps": ["b"]}, tokenizer),
               Prompt.from_strings("b", {"target": "b", "traps": ["a"]}, tokenizer)]
    df = prompts_to_df(prompts, tokenizer)
    assert list(df.columns) == [0, 1]
    assert list(df.index) == ["prompt", "target_string", "traps_string", "target_tokens", "traps_tokens"]
    assert df[0]["prompt"] == "a b" and df[1]["traps_string"] == ["a"]
    assert df[0]["target_tokens"] == ["a", "Ġa"] and df[1]["traps_tokens"] == ["a", "Ġa"]
    assert list(prompts_to_df(prompts).index) == ["prompt", "target_string", "traps_string"]
