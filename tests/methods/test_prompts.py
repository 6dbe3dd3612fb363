"""Prompts with targets, run_prompts and the nnterp getters, on a tiny random Llama."""

import pytest
import torch

import interlace
from interlace import StandardizedTransformer
from interlace import methods
from interlace.methods import Prompt, get_first_tokens, logit_lens, run_prompts

from helpers import tiny, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return StandardizedTransformer(tiny("llama"), tokenizer=tiny_tokenizer())


def test_first_tokens_of_words_are_tracked_once(model):
    assert get_first_tokens(["w5", "w6 w7", "w5"], model.tokenizer) == [5, 6]
    prompt = Prompt.from_strings("w2 w3", {"target": "w5", "traps": ["w6", "w7"]}, model)
    assert prompt.target_tokens == {"target": [5], "traps": [6, 7]}
    assert Prompt.from_strings("w2", "w5", model.tokenizer).target_tokens == {"target": [5]}
    assert prompt.has_no_collisions()
    assert not Prompt.from_strings("w2", {"a": "w5", "b": ["w5", "w6"]}, model.tokenizer).has_no_collisions()


def test_run_prompts_sums_the_target_probabilities(model):
    prompts = [Prompt.from_strings(text, {"target": ["w5", "w6"], "other": "w7"}, model.tokenizer)
               for text in ["w2 w3 w4", "w8 w9", "w20"]]
    results = run_prompts(model, prompts, batch_size=2, tqdm=None)
    with model.trace([p.prompt for p in prompts]):
        probs = model.next_token_probs.save()
    assert results["target"].shape == (3, 1)
    torch.testing.assert_close(results["target"][:, 0], probs[:, 5] + probs[:, 6], atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(results["other"][:, 0], probs[:, 7], atol=1e-6, rtol=1e-4)
    by_layer = run_prompts(model, prompts, get_probs_func=logit_lens, tqdm=None)
    lens = logit_lens(model, [p.prompt for p in prompts])
    assert by_layer["other"].shape == (3, 2)
    torch.testing.assert_close(by_layer["other"], lens[:, :, 7])
    with model.session():  # (its traces run when it ends)
        in_session = run_prompts(model, prompts, get_probs_func=logit_lens, tqdm=None)
    assert torch.equal(in_session["other"], by_layer["other"])
    with pytest.raises(ValueError, match="same categories"):
        run_prompts(model, [prompts[0], Prompt.from_strings("w2", {"x": "w5"}, model.tokenizer)])
    with pytest.raises(TypeError, match="run_prompts takes Prompt objects, which say which tokens to track, not str: "
                                        "build them with Prompt.from_strings"):
        run_prompts(model, ["w2 w3", "w8"], get_probs_func=logit_lens)  # as nnterp's README writes it


def test_getters_are_the_standardized_names(model):
    with model.trace(["w5 w6 w7"]):
        pairs = [
            (methods.get_layer_input(model, 1), model.layers_input[1]),
            (methods.get_layer_output(model, 0), model.layers_output[0]),
            (methods.get_attention_output(model, 1), model.attentions_output[1]),
            (methods.get_mlp_output(model, 1), model.mlps_output[1]),
            (methods.get_logits(model), model.logits),
            (methods.get_next_token_probs(model), model.next_token_probs),
        ]
        saved = [(a.save(), b.save()) for a, b in pairs]
    for ours, theirs in saved:
        assert torch.equal(ours, theirs)
    assert methods.get_num_layers(model) == 2 and methods.get_layer(model, 1) is not None
    assert methods.get_attention(model, 0).path == "model.layers.0.self_attn"
    assert methods.get_unembed_norm(model).path == "model.norm" and methods.get_unembed(model).path == "lm_head"
    probs = methods.compute_next_token_probs(model, ["w5 w6 w7"])
    torch.testing.assert_close(probs, saved[-1][0])


def test_set_layer_output_replaces_it(model):
    with model.trace(["w5 w6 w7"]):
        methods.set_layer_output(model, 0, methods.get_layer_output(model, 0) * 0)
        entering = model.layers_input[1].save()
    assert torch.equal(entering, torch.zeros_like(entering))


def test_methods_need_the_standardized_names():
    lm = interlace.LanguageModel(tiny("llama"), tokenizer=tiny_tokenizer())
    with pytest.raises(interlace.InterlaceError, match="StandardizedTransformer"):
        logit_lens(lm, ["w5"])
