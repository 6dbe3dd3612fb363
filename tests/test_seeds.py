"""The nnsight examples of the seed documents (000 and 002), ported to interlace.

What changed from the documents: the import; module paths of the models we have (a random GPT-2
saved to a folder, and SmolLM2, whose layers are `model.model.layers`); and, because transformers 5
decoder layers return the hidden states themselves where the documents' releases returned a tuple,
`layer.output[0]` is `layer.output` (the verbatim `[0]` is batch row 0, and warns: see the last test).
`model.output` is the model's output object, so its logits are `model.output.logits`. Each example
is checked against the same computation done with hand-written PyTorch hooks.
"""

import warnings

import pytest
import tokenizers
import torch
import transformers

import interlace
from interlace import LanguageModel

from helpers import assert_clean

WORDS = ("<pad> The Eiffel Tower is in Colosseum capital of France cat sat on the dog ran through quick brown fox "
         "jumps Paris Rome Hello world prompt").split()


@pytest.fixture(scope="module")
def gpt2_path(tmp_path_factory):
    """A random 12-layer GPT-2 and a word-level tokenizer, saved as a model folder."""
    path = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=12, n_embd=64, n_head=4, vocab_size=len(WORDS), n_positions=64,
                                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(path)
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<pad>").save_pretrained(path)
    return str(path)


def hooked(module, fn):
    """Register `fn(output) -> output or None` as a forward hook; returns the handle."""
    return module.register_forward_hook(lambda m, a, out: fn(out))


def run(lm, prompt, **hooks):
    """The plain model on `prompt`, with hand-written hooks {module path: fn}."""
    handles = [hooked(lm.module.get_submodule(path), fn) for path, fn in hooks.items()]
    try:
        with torch.no_grad():
            return lm.module(**lm.tokenizer(prompt, return_tensors="pt"))
    finally:
        for handle in handles:
            handle.remove()


# -- 000: reading, intervening ---------------------------------------------------------------------------
def test_reading_a_hidden_state_and_attention_weights(gpt2_path):
    # the documents' GPT-2 calls attn_dropout only in its reordered, upcast eager attention
    model = LanguageModel(gpt2_path, reorder_and_upcast_attn=True, attn_implementation="eager")
    with model.trace("The Eiffel Tower is in"):
        hidden = model.transformer.h[5].output.save()
        attn = model.transformer.h[8].attn.attn_dropout.input.save()
    print(hidden.shape)
    assert hidden.shape == (1, 5, 64)
    seen = {}
    run(model, "The Eiffel Tower is in", **{"transformer.h.5": lambda out: seen.setdefault("h", out)})
    assert torch.equal(hidden, seen["h"])
    assert attn.shape == (1, 4, 5, 5)
    torch.testing.assert_close(attn.sum(-1), torch.ones(1, 4, 5))  # probabilities after the softmax
    assert torch.all(attn[0, :, 0, 1:] == 0)  # causal: the first token sees only itself


def test_interventions_zero_and_steer(gpt2_path):
    model = LanguageModel(gpt2_path)
    steering_vector = torch.randn(64)
    with model.trace("The Eiffel Tower is in"):
        model.transformer.h[5].output[:] = 0
        model.transformer.h[7].output[:, -1, :] += steering_vector
        logits = model.output.save()

    def steer(out):
        out[:, -1, :] += steering_vector

    want = run(model, "The Eiffel Tower is in",
               **{"transformer.h.5": lambda out: torch.zeros_like(out), "transformer.h.7": steer})
    assert torch.equal(logits.logits, want.logits)
    assert_clean(model.module)


# -- 002: the five workflows ----------------------------------------------------------------------------------
def test_workflow_1_activation_analysis(gpt2_path):
    model = LanguageModel(gpt2_path, reorder_and_upcast_attn=True, attn_implementation="eager")
    prompt = "The capital of France is"
    with model.trace(prompt) as tracer:
        layer_outputs = []
        for i in range(12):
            layer_out = model.transformer.h[i].output.save()
            layer_outputs.append(layer_out)
        attn_patterns = []
        for i in range(12):
            attn = model.transformer.h[i].attn.attn_dropout.input.save()
            attn_patterns.append(attn)
        logits = model.output.logits.save()
    for i, layer_out in enumerate(layer_outputs):
        assert layer_out.shape == (1, 5, 64) and layer_out.norm().item() > 0
    assert all(pattern.shape == (1, 4, 5, 5) for pattern in attn_patterns)
    probs = torch.softmax(logits[0, -1], dim=-1)
    top_tokens = probs.topk(5)
    words = [model.tokenizer.decode(token) for token in top_tokens.indices]
    want = torch.softmax(run(model, prompt).logits[0, -1], -1).topk(5)
    assert torch.equal(top_tokens.indices, want.indices) and len(words) == 5
    hidden_states = run(model, prompt, **{}).logits  # the plain forward, no hooks
    assert torch.equal(logits, hidden_states)


def test_workflow_2_activation_patching(gpt2_path):
    model = LanguageModel(gpt2_path)
    clean_prompt = "The Eiffel Tower is in"
    corrupted_prompt = "The Colosseum is in capital"  # as many tokens as the clean prompt
    with model.trace(clean_prompt) as tracer:
        clean_hidden = model.transformer.h[8].output.save()
        clean_logits = model.output.logits.save()
    with model.trace(corrupted_prompt) as tracer:
        model.transformer.h[8].output[:] = clean_hidden
        patched_logits = model.output.logits.save()
    # the whole residual stream after layer 8 is the clean run's: so is everything after it
    assert torch.equal(patched_logits, clean_logits)
    paris_token = model.tokenizer.encode(" Paris")[0]
    patched_probs = torch.softmax(patched_logits[0, -1], dim=-1)
    assert 0 < patched_probs[paris_token].item() < 1

    def patch_layer_position(layer, position, clean_cache, corrupted_prompt):
        with model.trace(corrupted_prompt) as tracer:
            current = model.transformer.h[layer].output
            current[:, position, :] = clean_cache[layer][:, position, :]
            logits = model.output.logits.save()
        return logits

    with model.trace(clean_prompt):
        clean_cache = [model.transformer.h[i].output.save() for i in range(12)]
    results = torch.zeros(12, 5)
    for layer in range(12):
        for pos in range(5):
            logits = patch_layer_position(layer, pos, clean_cache, corrupted_prompt)
            results[layer, pos] = logits[0, -1, paris_token]

    def patch(out, layer, pos):
        out[:, pos] = clean_cache[layer][:, pos]

    for layer, pos in ((0, 0), (5, 4), (11, 2)):
        want = run(model, corrupted_prompt, **{f"transformer.h.{layer}": lambda out: patch(out, layer, pos)})
        assert results[layer, pos] == want.logits[0, -1, paris_token]


def test_workflow_3_remote_needs_a_server(gpt2_path):
    model = LanguageModel(gpt2_path)
    with pytest.raises(interlace.InterlaceError, match="remote=True needs a server"):
        with model.trace("The meaning of life is", remote=True) as tracer:
            model.transformer.h[4].output.save()
    with pytest.raises(interlace.InterlaceError, match="remote=True needs a server"):
        with model.trace("prompt", remote=True, timeout=300) as tracer:
            pass


def test_workflow_4_cross_prompt_sharing(gpt2_path):
    model = LanguageModel(gpt2_path)
    with model.trace() as tracer:
        with tracer.invoke("The cat sat on the"):
            cat_hidden = model.transformer.h[6].output.save()
            cat_logits = model.output.logits.save()
        with tracer.invoke("The dog ran through the"):
            model.transformer.h[6].output[:] = cat_hidden
            dog_with_cat = model.output.logits.save()
    torch.testing.assert_close(dog_with_cat, cat_logits)  # the dog prompt now computes what the cat's does


def test_workflow_5_gradients(gpt2_path):
    model = LanguageModel(gpt2_path)
    with model.trace("The quick brown fox") as tracer:
        hidden = model.transformer.h[5].output.save()
        hidden.retain_grad()
        logits = model.output.logits
        target_token = model.tokenizer.encode(" jumps")[0]
        loss = -logits[0, -1, target_token]
        loss.backward()
    grad = hidden.grad
    assert grad.shape == (1, 4, 64) and grad.norm().item() > 0
    seen = {}
    handle = hooked(model.module.transformer.h[5], lambda out: seen.setdefault("h", out))
    out = model.module(**model.tokenizer("The quick brown fox", return_tensors="pt"))
    handle.remove()
    want = torch.autograd.grad(-out.logits[0, -1, target_token], seen["h"])[0]
    torch.testing.assert_close(grad, want)
    assert all(p.grad is None for p in model.module.parameters())


def test_common_issues(gpt2_path):
    model = LanguageModel(gpt2_path)
    assert "GPT2LMHeadModel" in repr(model._model)
    with model.trace("Hello"):
        hidden = model.transformer.h[5].output  # not saved
    with pytest.raises(interlace.NotSavedError, match="Call .save\\(\\) on it inside the trace"):
        hidden + 1
    with model.trace("Hello"):
        hidden = model.transformer.h[5].output.save()
    assert isinstance(hidden, torch.Tensor)
    with pytest.raises(interlace.ModulePathError, match="has 12 children; index 12 is out of range"):
        with model.trace("prompt"):
            for i in range(100):
                model.transformer.h[i].output.save()


def test_the_verbatim_output_zero_warns_and_is_batch_row_zero(gpt2_path):
    model = LanguageModel(gpt2_path)
    interlace.backends.local._warned_paths.clear()
    with pytest.warns(interlace.BatchIndexWarning, match="transformer.h.5.output is a tensor of shape"):
        with model.trace("The Eiffel Tower is in"):
            hidden = model.transformer.h[5].output[0].save()
    assert hidden.shape == (5, 64)  # the documents' [1, 6, 768] is `.output` in transformers 5


# -- the same on the real SmolLM2 (its layers are model.model.layers) -------------------------------------------
def test_smollm2_patching_moves_the_answer_towards_paris(smollm2):
    model = smollm2
    paris, rome = model.tokenizer.encode(" Paris")[0], model.tokenizer.encode(" Rome")[0]
    with model.trace("The Eiffel Tower is in the city of"):
        clean = [model.model.layers[i].output.save() for i in (8, 24)]
        clean_logits = model.output.logits.save()
    with model.trace("The Colosseum is in the city of"):
        corrupted_logits = model.output.logits.save()
    with model.trace("The Colosseum is in the city of"):  # the whole residual stream at layer 8
        model.model.layers[8].output[:] = clean[0]
        patched_all = model.output.logits.save()
    assert torch.equal(patched_all, clean_logits)
    with model.trace("The Colosseum is in the city of"):  # only the last position, late
        model.model.layers[24].output[:, -1, :] = clean[1][:, -1, :]
        patched_last = model.output.logits.save()

    def difference(logits):
        return (logits[0, -1, paris] - logits[0, -1, rome]).item()

    clean, corrupted = difference(clean_logits), difference(corrupted_logits)
    assert clean > 0 > corrupted
    assert difference(patched_last) - corrupted > 0.5 * (clean - corrupted)  # most of the way to Paris


def test_smollm2_steering_and_gradients(smollm2):
    model = smollm2
    torch.manual_seed(0)
    steering_vector = torch.randn(576)
    with model.trace("The capital of France is"):
        hidden = model.model.layers[5].output.save()
        model.model.layers[10].output[:, -1, :] += steering_vector
        logits = model.output.logits.save()

    def steer(out):
        out[:, -1, :] += steering_vector

    want = run(model, "The capital of France is", **{"model.layers.10": steer})
    assert torch.equal(logits, want.logits) and hidden.shape == (1, 5, 576)
    with model.trace("The quick brown fox") as tracer:
        hidden = model.model.layers[5].output.save()
        hidden.retain_grad()
        loss = -model.output.logits[0, -1, model.tokenizer.encode(" jumps")[0]]
        loss.backward()
    assert hidden.grad.shape == (1, 4, 576) and torch.isfinite(hidden.grad).all()
    assert all(p.grad is None for p in model.module.parameters())
    assert_clean(model.module)
