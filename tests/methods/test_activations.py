"""Token activation collection against hand-written hooks; it stops after the last layer it needs."""

import pytest
import torch

from interlace import ExecutionError, InterlaceError, LanguageModel, StandardizedTransformer
from interlace.methods import collect_token_activations_batched, compute_next_token_probs, get_token_activations

from helpers import tiny, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["w5 w6 w7 w8", "w9 w22", "w23 w24 w25", "w26 w27 w28 w29 w30", "w31"]


@pytest.fixture(scope="module")
def model():
    return StandardizedTransformer(tiny("llama"), tokenizer=tiny_tokenizer())


def layer_outputs(model, prompts):
    """Every layer's output for the left-padded prompts, and the padding of each row, by hooks."""
    batch = model.tokenizer(prompts, padding=True, return_tensors="pt")
    batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    seen = []
    handles = [layer.register_forward_hook(lambda m, a, out: seen.append(out.clone())) for layer in model.module.model.layers]
    with torch.no_grad():
        model.module(**batch)
    for handle in handles:
        handle.remove()
    return seen, (batch["attention_mask"] == 0).sum(-1)


def test_last_token_of_each_prompt_at_each_layer(model):
    acts = get_token_activations(model, PROMPTS)
    outputs, _ = layer_outputs(model, PROMPTS)
    assert acts.shape == (2, 5, 32) and acts.device.type == "cpu"
    torch.testing.assert_close(acts, torch.stack([out[:, -1] for out in outputs]))


def test_a_positive_index_counts_from_each_prompt_start(model):
    acts = get_token_activations(model, PROMPTS, layers=[1], idx=0)
    outputs, padding = layer_outputs(model, PROMPTS)
    torch.testing.assert_close(acts[0], outputs[1][torch.arange(5), padding])


def test_an_index_outside_a_prompt_is_an_error_naming_it(model):
    """`idx=1` exists in every prompt of PROMPTS[:3]; past the one-token prompt's end it must read nothing."""
    acts = get_token_activations(model, PROMPTS[:3], layers=[1], idx=1)
    outputs, padding = layer_outputs(model, PROMPTS[:3])
    torch.testing.assert_close(acts[0], outputs[1][torch.arange(3), padding + 1])
    for idx in (1, -2):  # before anything runs: the idx, the prompt and what would do
        with pytest.raises(InterlaceError, match=f"idx={idx} lies outside prompt 4 \\('w31'\\), which has 1 token\\(s\\): "
                                                 "pass idx from -1 to 0"):
            collect_token_activations_batched(model, PROMPTS, batch_size=2, layers=[1], idx=idx, tqdm=None)
    with pytest.raises(ExecutionError, match="out of bounds") as caught:  # recorded into a trace: when it runs
        with model.trace(PROMPTS) as tracer:
            get_token_activations(model, layers=[1], idx=1, tracer=tracer).save()  # the line named
    assert "tracer=tracer).save()  # the line named" in str(caught.value)


@pytest.mark.parametrize("side", ["left", "right"])
def test_every_way_of_padding_reads_each_prompts_own_tokens(side):
    """A plain LanguageModel may pad on the right: the methods find each prompt's tokens all the same."""
    module = tiny("llama")
    lm = LanguageModel(module, tokenizer=tiny_tokenizer(), padding_side=side)
    alone = []  # each prompt by itself: layer 1's output and the next-token distribution
    for prompt in PROMPTS:
        seen = []
        handle = module.model.layers[1].register_forward_hook(lambda m, a, out: seen.append(out[0].clone()))
        with torch.no_grad():
            logits = module(**lm.tokenizer(prompt, return_tensors="pt")).logits
        handle.remove()
        alone.append((seen[0], logits[0, -1].softmax(-1)))
    for idx in (-1, 0, -2 if side == "left" else 1):
        prompts = PROMPTS[:4] if idx in (1, -2) else PROMPTS  # (the last prompt has one token)
        acts = get_token_activations(lm, prompts, layers=[1], idx=idx)[0]
        torch.testing.assert_close(acts, torch.stack([alone[i][0][idx] for i in range(len(prompts))]),
                                   atol=1e-5, rtol=1e-4)
    probs = compute_next_token_probs(lm, PROMPTS)
    torch.testing.assert_close(probs, torch.stack([p for _, p in alone]), atol=1e-6, rtol=1e-4)


def test_stops_after_the_last_layer_needed(model):
    calls = []
    handles = [model.module.model.layers[1].register_forward_hook(lambda *a: calls.append("layer 1")),
               model.module.lm_head.register_forward_hook(lambda *a: calls.append("lm_head"))]
    try:
        acts = get_token_activations(model, PROMPTS, layers=[0])
    finally:
        for handle in handles:
            handle.remove()
    assert calls == [] and acts.shape == (1, 5, 32)


def test_batched_collection_equals_one_batch(model):
    one_batch = get_token_activations(model, PROMPTS, layers=[0, 1])
    batched = collect_token_activations_batched(model, PROMPTS, batch_size=2, layers=[0, 1], tqdm=None)
    torch.testing.assert_close(batched, one_batch, atol=1e-5, rtol=1e-4)  # padding differs per batch
    with model.session():  # (its traces run when it ends)
        in_session = collect_token_activations_batched(model, PROMPTS, batch_size=2, layers=[0, 1], tqdm=None)
    assert torch.equal(in_session, batched)


def test_records_into_an_open_trace(model):
    with model.trace(PROMPTS[:2]) as tracer:
        acts = get_token_activations(model, layers=[1], tracer=tracer).save()
    torch.testing.assert_close(acts, get_token_activations(model, PROMPTS[:2], layers=[1]))
