"""The methods and the full check on the real SmolLM2-135M: actual predictions."""

import pytest
import torch

from interlace.methods import Prompt, get_first_tokens, logit_lens, run_prompts
from interlace.models.standardized.check import check_model

from helpers import assert_clean

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "The capital of France is"


def test_the_full_check_passes_on_the_real_model(smollm2_standardized):
    rows = check_model(smollm2_standardized)
    assert [r.name for r in rows if r.status == "FAIL"] == []
    assert {r.name for r in rows if r.status == "n/a"} == {"routers_output"}
    assert_clean(smollm2_standardized.module)


def test_logit_lens_ends_on_paris(smollm2_standardized):
    model = smollm2_standardized
    probs = logit_lens(model, [PROMPT, "The Eiffel Tower is in the city of"])
    assert probs.shape == (2, 30, 49152)
    assert [model.tokenizer.decode(i) for i in probs[:, -1].argmax(-1)] == [" Paris", " Paris"]
    with model.trace([PROMPT]):
        next_token = model.next_token_probs.save()
    torch.testing.assert_close(probs[0, -1], next_token[0])
    paris = model.tokenizer(" Paris")["input_ids"][0]
    assert probs[0, :10, paris].max() < 0.01 < 0.5 < probs[0, -1, paris]  # the answer appears late


def test_run_prompts_tracks_both_spellings(smollm2_standardized):
    model = smollm2_standardized
    paris = get_first_tokens("Paris", model.tokenizer)
    assert len(paris) == 2 and model.tokenizer.decode(paris[1]) == " Paris"
    prompt = Prompt.from_strings(PROMPT, {"target": "Paris", "traps": ["London", "Madrid"]}, model.tokenizer)
    results = run_prompts(model, [prompt], tqdm=None)
    assert results["target"][0, 0] > 0.5 > results["traps"][0, 0]


def test_nnterp_getters_on_the_plain_model_with_nnterp_renames(smollm2, smollm2_standardized):
    # nnterp's test_basic_utils and test_activation_collection on a raw LanguageModel of SmolLM2
    from interlace import LanguageModel
    from interlace.methods import (collect_last_token_activations_session, get_layer_output, get_mlp_output,
                                   get_num_layers, get_rename_dict, get_token_activations, project_on_vocab)

    plain = LanguageModel(smollm2.module, tokenizer=smollm2.tokenizer, rename=get_rename_dict())
    assert get_num_layers(plain) == 30 and plain.model.ln_final.path == "model.norm"
    seen = {}
    hooks = [smollm2.module.model.layers[20].register_forward_hook(lambda m, a, out: seen.__setitem__("layer", out)),
             smollm2.module.model.layers[20].mlp.register_forward_hook(lambda m, a, out: seen.__setitem__("mlp", out))]
    try:
        with torch.no_grad():
            smollm2.module(**smollm2.tokenizer(PROMPT, return_tensors="pt"))
    finally:
        for hook in hooks:
            hook.remove()
    with plain.trace(PROMPT):
        layer = get_layer_output(plain, 20).save()
        mlp = get_mlp_output(plain, 20).save()
        lens = project_on_vocab(plain, get_layer_output(plain, 29)).save()
    assert torch.equal(layer, seen["layer"]) and torch.equal(mlp, seen["mlp"])
    assert smollm2.tokenizer.decode(lens[0, -1].argmax()) == " Paris"
    prompts = [PROMPT, "The Eiffel Tower is in the city of", "Rome is the capital of"]
    session = collect_last_token_activations_session(plain, prompts, batch_size=2, layers=[5, 20])
    standardized = get_token_activations(smollm2_standardized, prompts, layers=[5, 20])
    # (batches of 2 against one of 3: other padding, so other matmul shapes; on a CPU with AVX-512 the float32
    # sums then differ by up to ~4e-5, past assert_close's 1e-5 default)
    torch.testing.assert_close(session, standardized, atol=1e-4, rtol=1e-4)
