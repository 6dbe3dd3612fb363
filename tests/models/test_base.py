"""Model: sessions, edits, caches and renamed paths, checked against plain forwards and hooks."""

import pytest
import torch
import transformers

import interlace
from interlace import LanguageModel, Model

from helpers import MLP, assert_clean, tiny, tiny_tokenizer


def capture_all(model, x):
    seen = {}
    handles = [
        module.register_forward_hook(lambda m, a, o, name=name: seen.setdefault(name, o))
        for name, module in model.named_modules() if name
    ]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return seen


def test_session_values_flow_between_traces(mlp, x):
    net = Model(mlp)
    with net.session():
        with net.trace(x):
            clean = net.layers[1].output
            clean_out = net.output.save()
        with net.trace(x * 3):
            net.layers[1].output = clean
            patched = net.output.save()
            other = net.layers[0].output.save()
    assert torch.equal(patched, clean_out)
    with torch.no_grad():
        assert torch.equal(other, mlp.layers[0](mlp.embed(x * 3)))
    assert_clean(mlp)


def test_session_on_language_model():
    model = tiny("llama")
    lm = LanguageModel(model)
    with lm.session():
        with lm.trace([5, 6, 7]):
            h = lm.model.layers[0].output[:, -1]
        with lm.trace([9, 9, 9, 9]):
            lm.model.layers[0].output[:, -1] = h
            logits = lm.output.logits.save()

    def hook(module, args, output):
        output[:, -1] = saved["h"]

    saved = {}
    grab = model.model.layers[0].register_forward_hook(lambda m, a, o: saved.update(h=o[:, -1].clone()))
    model(torch.tensor([[5, 6, 7]]))
    grab.remove()
    handle = model.model.layers[0].register_forward_hook(hook)
    with torch.no_grad():
        want = model(torch.tensor([[9, 9, 9, 9]])).logits
    handle.remove()
    torch.testing.assert_close(logits, want)


def test_edit_applies_to_later_traces_and_clears(mlp, x):
    net = Model(mlp)
    with torch.no_grad():
        plain = mlp(x)
    with net.edit() as edited:
        net.layers[0].output[:] = 0
    with edited.trace(x):
        out = edited.output.save()
    with torch.no_grad():
        want = mlp.head(mlp.layers[3](mlp.layers[2](mlp.layers[1](torch.zeros(2, 8)))))
    assert torch.equal(out, want)
    with net.trace(x):  # the original is untouched
        original = net.output.save()
    assert torch.equal(original, plain)

    with net.edit(inplace=True) as same:
        net.layers[0].output[:] = 0
    assert same is net
    with net.trace(x):
        now = net.output.save()
    assert torch.equal(now, want)
    net.clear_edits()
    with net.trace(x):
        cleared = net.output.save()
    assert torch.equal(cleared, plain)
    assert_clean(mlp)


def test_cache_every_module_equals_hooks(mlp, x):
    net = Model(mlp)
    with net.trace(x) as tracer:
        cache = tracer.cache()
    reference = capture_all(mlp, x)
    assert set(cache) == set(reference)
    for name, value in reference.items():
        assert torch.equal(cache[name], value), name


def test_cache_chosen_modules_only(mlp, x):
    net = Model(mlp)
    with net.trace(x) as tracer:
        cache = tracer.cache([net.layers[1], "head"])
    assert list(cache) == ["layers.1", "head"]
    assert torch.equal(cache["head"], capture_all(mlp, x)["head"])


class Unused(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.used = torch.nn.Linear(2, 2)
        self.spare = torch.nn.Linear(2, 2)

    def forward(self, x):
        return self.used(x)


def test_cache_leaves_out_modules_that_did_not_run():
    net = Model(Unused())
    with net.trace(torch.ones(1, 2)) as tracer:
        cache = tracer.cache()
    assert list(cache) == ["used"]


def test_rename_aliases_resolve_to_real_paths(mlp, x):
    net = Model(mlp, rename={"layers": "blocks", "embed": "wte", "layers.3.linear": "last_linear"})
    with net.trace(x) as tracer:
        a = net.blocks[2].output.save()
        b = net.last_linear.output.save()
        c = net.get("blocks.1").output.save()
    reference = capture_all(mlp, x)
    assert torch.equal(a, reference["layers.2"])
    assert torch.equal(b, reference["layers.3.linear"])
    assert torch.equal(c, reference["layers.1"])
    assert [node.target for node in tracer.graph if node.op == "module_value"] == [
        "layers.2", "layers.3.linear", "layers.1"
    ]


def test_rename_on_gpt2_like_names():
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50)
    model = transformers.GPT2LMHeadModel(config).eval()
    lm = LanguageModel(model, rename={"transformer.h": "layers", "attn": "self_attn"})
    with lm.trace([[1, 2, 3]]):
        out = lm.layers[1].self_attn.output[0].save()
        real = lm.transformer.h[1].attn.output[0].save()
    assert torch.equal(out, real)


def test_edited_language_model_steers_generation():
    model = tiny("llama")
    lm = LanguageModel(model)
    vector = torch.randn(32) * 3
    with lm.edit() as steered:
        lm.model.layers[1].output[:, -1] += vector
    with steered.trace([5, 6, 7]):
        logits = steered.output.logits.save()

    def hook(module, args, output):
        output[:, -1] += vector

    handle = model.model.layers[1].register_forward_hook(hook)
    with torch.no_grad():
        want = model(torch.tensor([[5, 6, 7]])).logits
    handle.remove()
    torch.testing.assert_close(logits, want)


def test_a_saved_weight_is_a_copy_that_never_changes_the_model(mlp, x):
    net = Model(mlp)
    with net.trace(x):
        weight = net.head.weight.save()
        row = net.head.weight[0].save()  # a view of the weight
        transposed = net.head.weight.T.save()
        out = net.output.save()
    before = {name: p.detach().clone() for name, p in mlp.named_parameters()}
    assert weight is not mlp.head.weight and not isinstance(weight, torch.nn.Parameter)
    assert torch.equal(weight, before["head.weight"]) and torch.equal(row, before["head.weight"][0])
    weight.data.zero_()
    row.zero_()
    transposed.zero_()
    assert all(torch.equal(p, before[name]) for name, p in mlp.named_parameters())
    with torch.no_grad():
        assert torch.equal(out, mlp(x))


class _Complex(torch.nn.Module):
    """nnsight 0.4's ComplexModule: a WrapperModule inside a module attached to a layer."""

    def __init__(self):
        super().__init__()
        self.one = interlace.WrapperModule()

    def forward(self, x):
        return self.one(x)


def test_edit_with_an_attached_wrapper_and_the_original_envoys():
    # nnsight 0.4's test_editing: envoys of the original model used inside the edited copy's trace
    gpt2 = LanguageModel(tiny("gpt2"), tokenizer=tiny_tokenizer())
    prompt = "w5 w6 w7 w8"
    layer = gpt2.transformer.h[0]
    layer.attachment = _Complex()
    with gpt2.edit() as edited:
        layer.output[:] = layer.attachment(layer.output, hook=True)
    with gpt2.trace(prompt):
        original = layer.output.clone().save()
        layer.output[:] *= 0.0
        zeroed = gpt2.output.logits.save()
    with edited.trace(prompt):
        one = layer.attachment.one.output.clone().save()  # the original model's envoys
        layer.attachment.output *= 0.0
        edited_zeroed = gpt2.output.logits.save()
    assert torch.equal(original, one)
    assert torch.equal(zeroed, edited_zeroed)
    handle = gpt2.module.transformer.h[0].register_forward_hook(lambda m, a, out: out * 0)
    try:
        with torch.no_grad():
            assert torch.equal(edited_zeroed, gpt2.module(**gpt2.tokenizer(prompt, return_tensors="pt")).logits)
    finally:
        handle.remove()
    assert_clean(gpt2.module)


def test_edit_with_an_example_input_applies_to_every_row():
    # nnsight 0.4's test_batched_editing: `model.edit(single)` then a batch of two
    gpt2 = LanguageModel(tiny("gpt2"), tokenizer=tiny_tokenizer())
    layer = gpt2.transformer.h[0]
    layer.attachment = _Complex()
    with gpt2.edit("w1") as edited:
        layer.output[:] = layer.attachment(layer.output, hook=True) * 2
    with edited.trace(["w1 w2", "w3 w4"]):
        seen = layer.attachment.output.clone().save()  # the identity's output is the layer's tensor
        doubled = layer.output.save()
    assert seen.shape[0] == 2 and torch.equal(doubled, seen * 2)
    with pytest.raises(interlace.ExecutionError, match="scanning"):
        with gpt2.edit("w1"):
            layer.output[:] = layer.output[:, :, :5]  # a shape error, found while recording
    assert gpt2._edits == []


def test_a_saved_weight_is_a_copy_also_after_the_weight_was_replaced(mlp, x):
    net = Model(mlp)
    with net.trace(x):
        net.head.weight.save()  # the model's weight index is found here
    mlp.head.weight = torch.nn.Parameter(torch.ones_like(mlp.head.weight))  # found again at the next save
    with net.trace(x):
        weight = net.head.weight.save()
    weight.zero_()
    assert torch.equal(mlp.head.weight, torch.ones_like(weight))


def test_a_trace_with_no_input_says_how_to_give_one_and_the_model_takes_traces_again(mlp, x):
    net = Model(mlp)
    with pytest.raises(interlace.InterlaceError, match=r"no input: pass inputs to `model.trace\(...\)`"):
        with net.trace():
            net.layers[0].output.save()
    assert_clean(mlp)
    with net.trace(x):
        out = net.output.save()
    with torch.no_grad():
        assert torch.equal(out, mlp(x))
