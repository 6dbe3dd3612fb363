"""The real SmolLM2-135M: actual predictions, and the seed guide's workflows on its module names."""

import torch

from interlace import demo

BATCHED = {"atol": 2e-4, "rtol": 1e-4}  # a row computed inside a batch rounds a little differently


def last_logits(lm, prompt, hook_module=None, hook=None):
    """Reference: a plain forward, optionally with a hand-written forward hook."""
    handle = hook_module.register_forward_hook(hook) if hook_module is not None else None
    try:
        with torch.no_grad():
            ids = lm.tokenizer(prompt, return_tensors="pt")
            return lm.module(**ids).logits[0, -1]
    finally:
        if handle is not None:
            handle.remove()


def token(lm, text):
    return lm.tokenizer(text)["input_ids"][-1]


def test_predicts_paris(smollm2):
    lm = smollm2
    with lm.trace("The capital of France is"):
        logits = lm.output.logits.save()
    assert lm.tokenizer.decode(logits[0, -1].argmax()) == " Paris"
    torch.testing.assert_close(logits[0, -1], last_logits(lm, "The capital of France is"))


def test_workflow_activation_analysis(smollm2):
    lm = smollm2
    seen = []
    handles = [layer.register_forward_hook(lambda m, a, o: seen.append(o.clone())) for layer in lm.module.model.layers]
    last_logits(lm, "The capital of France is")
    for handle in handles:
        handle.remove()
    with lm.trace("The capital of France is"):
        outputs = [layer.output.save() for layer in lm.model.layers]
        attention = lm.model.layers[5].self_attn.output[0].save()
    assert len(outputs) == 30 and outputs[0].shape == (1, 5, 576)
    assert attention.shape == (1, 5, 576)
    for ours, reference in zip(outputs, seen):
        torch.testing.assert_close(ours, reference)


def test_workflow_patching_moves_the_answer(smollm2):
    lm = smollm2
    paris, rome = token(lm, " Paris"), token(lm, " Rome")
    with lm.trace(demo.CLEAN):
        clean = lm.model.layers[23].output[:, -1].save()
    with lm.trace(demo.CORRUPTED):
        lm.model.layers[23].output[:, -1] = clean
        patched = lm.output.logits[0, -1].save()

    def hook(module, args, output):
        output[:, -1] = clean

    reference = last_logits(lm, demo.CORRUPTED, lm.module.model.layers[23], hook)
    torch.testing.assert_close(patched, reference)
    corrupted = last_logits(lm, demo.CORRUPTED)
    assert corrupted[rome] > corrupted[paris]
    assert patched[paris] - patched[rome] > corrupted[paris] - corrupted[rome] + 5


def test_workflow_cross_prompt_sharing(smollm2):
    lm = smollm2
    cat, dog = "The cat sat on the", "The dog ran into the"
    assert len(lm.tokenizer(cat)["input_ids"]) == len(lm.tokenizer(dog)["input_ids"])
    with lm.trace() as tracer:
        with tracer.invoke(cat):
            cat_hidden = lm.model.layers[6].output.save()
            cat_logits = lm.output.logits[:, -1].save()
        with tracer.invoke(dog):
            lm.model.layers[6].output = cat_hidden
            dog_logits = lm.output.logits[:, -1].save()
    # with every position of layer 6 replaced, the dog prompt computes what the cat prompt does
    torch.testing.assert_close(dog_logits, cat_logits, **BATCHED)
    torch.testing.assert_close(cat_logits[0], last_logits(lm, cat), **BATCHED)


def test_workflow_gradients(smollm2):
    lm = smollm2
    target = token(lm, " jumps")
    with lm.trace("The quick brown fox"):
        hidden = lm.model.layers[5].output
        grad = hidden.grad.save()
        loss = -lm.output.logits[0, -1, target]
        loss.backward()
    stored = {}
    handle = lm.module.model.layers[5].register_forward_hook(lambda m, a, o: stored.setdefault("h", o))
    ids = lm.tokenizer("The quick brown fox", return_tensors="pt")
    reference = torch.autograd.grad(-lm.module(**ids).logits[0, -1, target], stored["h"])[0]
    handle.remove()
    torch.testing.assert_close(grad, reference)
    assert all(p.grad is None for p in lm.module.parameters())


def test_generation_equals_transformers(smollm2):
    lm = smollm2
    with lm.generate("The capital of France is", max_new_tokens=5):
        tokens = lm.generator.output.save()
    ids = lm.tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        want = lm.module.generate(**ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(tokens, want)
    assert lm.tokenizer.decode(tokens[0, 5]) == " Paris"


def test_demo_functions(smollm2):
    rows, final = demo.logit_lens(smollm2, "The capital of France is")
    assert final == " Paris" and rows[-1][0] == " Paris" and len(rows) == 30
    diffs, clean, corrupted = demo.patching_sweep(smollm2, demo.CLEAN, demo.CORRUPTED, " Paris", " Rome")
    assert clean > 0 > corrupted
    assert abs(diffs[-1] - clean) < 1e-3  # patching the last layer's last position restores the answer
    assert diffs[0] < 0
