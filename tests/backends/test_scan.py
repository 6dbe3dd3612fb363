"""Scanning: shapes during recording and errors at the user's line before the model runs."""

import copy

import pytest
import torch

import transformers

import interlace
from interlace import LanguageModel, Model

from helpers import assert_clean, tiny


def test_shape_is_real_while_scanning(mlp, x):
    net = Model(mlp)
    with net.trace(x, scan=True):
        h = net.layers[1].output.save()
        assert h.shape == torch.Size([2, 8])
        assert (h[:, :3] * 2).shape == (2, 3)
        width = h.shape[-1]  # a real int: usable in Python control flow
        parts = [h[:, i].save() for i in range(width)]
    assert len(parts) == 8 and torch.equal(parts[3], h[:, 3])


def test_a_tuple_unpacks_and_has_a_length_while_scanning():
    lm = LanguageModel(tiny("llama"))
    attention = lm.model.layers[0].self_attn
    with lm.trace([[5, 6, 7]], scan=True):
        hidden, weights = attention.output  # nnsight code unpacks the attention's (output, weights)
        pair = len(attention.output)
        hidden = hidden.save()
    with lm.trace([[5, 6, 7]]):
        want = attention.output[0].save()
    assert pair == 2 and torch.equal(hidden, want)
    with pytest.raises(interlace.ProxyValueError, match="index it"):  # without scanning the length is unknown
        with lm.trace([[5, 6, 7]]):
            hidden, weights = attention.output
    assert_clean(lm.module)


def test_shape_error_is_raised_at_the_line_before_the_model_runs(mlp, x):
    ran = []  # whether each call of the model got real tensors
    handle = mlp.register_forward_pre_hook(lambda m, args: ran.append(type(args[0]) is torch.Tensor))
    net = Model(mlp)
    weights = [p.clone() for p in mlp.parameters()]
    with pytest.raises(interlace.ExecutionError) as info:
        with net.trace(x, validate=True):
            h = net.layers[1].output
            net.layers[2].output[:] = h @ torch.ones(3, 3)  # bad shapes
    handle.remove()
    message = str(info.value)
    assert "test_scan.py" in message and "torch.ones(3, 3)" in message and "before the model ran" in message
    assert ran == [False]  # only the scan's call, on fake tensors: the real model never ran
    assert all(torch.equal(a, b) for a, b in zip(weights, mlp.parameters()))
    assert_clean(mlp)


@pytest.mark.parametrize("replacement, said", [
    (lambda out: out[:, :2], "shape [1, 2, 32] where it gave [1, 3, 32]"),
    (lambda out: out.double(), "dtype torch.float64 where it gave torch.float32 (cast it: value.to(torch.float32))"),
])
def test_a_replacement_unlike_the_value_it_replaces_is_an_error_at_its_line(replacement, said):
    """The fake run does not see a replacement, so the scan checks it against what the module gave: the
    modules after it expect that shape and dtype. Without scan, the model's own error names the line."""
    model = tiny("llama")
    lm = LanguageModel(model)
    with pytest.raises(interlace.ExecutionError) as info:
        with lm.trace([[5, 6, 7]], scan=True):
            lm.model.layers[0].output = replacement(lm.model.layers[0].output)  # replaced here
            lm.output.logits.save()
    message = str(info.value)
    assert "= replacement(lm.model.layers[0].output)  # replaced here" in message and said in message
    assert "before the model ran" in message
    with pytest.raises(interlace.ModelError) as info:
        with lm.trace([[5, 6, 7]]):
            lm.model.layers[0].output = replacement(lm.model.layers[0].output)  # replaced here
            lm.output.logits.save()
    message = str(info.value)
    assert "model.layers.0.output was replaced (" in message and "# replaced here) by a value of " + said in message
    assert_clean(model)


def test_a_plain_value_in_place_of_a_tensor_runs_where_the_model_takes_it_and_names_its_line_where_not():
    """`mlp.output = 0` is `residual + 0` to a Llama layer: it runs, with or without scan, as a hook returning zeros.
    `layer.output = 0` breaks the next layer: the model's error names the assignment and how to set values."""
    model = tiny("llama")
    lm = LanguageModel(model)
    handle = model.model.layers[0].mlp.register_forward_hook(lambda m, a, out: torch.zeros_like(out))
    try:
        with torch.no_grad():
            want = model(torch.tensor([[5, 6, 7]])).logits
    finally:
        handle.remove()
    for scan in (False, True):
        with lm.trace([[5, 6, 7]], scan=scan):
            lm.model.layers[0].mlp.output = 0
            logits = lm.output.logits.save()
        torch.testing.assert_close(logits, want)
    with pytest.raises(interlace.ModelError) as info:
        with lm.trace([[5, 6, 7]]):
            lm.model.layers[0].output = 0  # meant: set its values
            lm.output.logits.save()
    message = str(info.value)
    assert "model.layers.0.output was replaced (" in message and "# meant: set its values) by a value of type int (0) " \
        "where it gave a tensor of shape [1, 3, 32]: the modules after it expect what it gave (to set the tensor's " \
        "values instead, assign into it: `.output[:] = value`)" in message
    with pytest.raises(interlace.ModelError) as info:  # an attention's output is a tuple
        with lm.trace([[5, 6, 7]]):
            lm.model.layers[0].self_attn.output = torch.zeros(1, 3, 32)  # meant: its first item
            lm.output.logits.save()
    assert "model.layers.0.self_attn.output was replaced (" in str(info.value) and "# meant: its first item) by a " \
        "value of type Tensor (shape [1, 3, 32]) where it gave a tuple of 2 (to replace one of its items, assign " \
        "into that item: `.output[0][:] = value`)" in str(info.value)
    assert_clean(model)


def test_scan_with_invokes_and_language_model():
    model = tiny("llama")
    lm = LanguageModel(model)
    with lm.trace(scan=True) as tracer:
        with tracer.invoke([5, 6, 7]):
            assert lm.model.layers[0].output.shape == (1, 3, 32)
        with tracer.invoke([[1, 2], [3, 4]]):
            logits = lm.output.logits
            assert logits.shape == (2, 2, 100)
            logits = logits.save()
    assert logits.shape == (2, 3, 100)  # the real batch is padded to the longest invoke


def test_scan_on_meta_model(tmp_path):
    from helpers import tiny_tokenizer

    tiny("gpt2").save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    lm = LanguageModel(str(tmp_path))
    with pytest.raises(interlace.ExecutionError, match="before the model ran"):
        with lm.trace("w1 w2 w3", scan=True):
            assert lm.transformer.h[0].output.shape == (1, 3, 32)
            lm.transformer.h[0].output[:, :, :5] = torch.zeros(4)
    assert not lm.dispatched  # nothing was loaded to find the error


def test_scan_accepts_gradient_code(mlp, x):
    net = Model(mlp)
    with net.trace(x, scan=True):
        h = net.layers[1].output.save()
        h.retain_grad()
        grad = h.grad.save()
        net.output.sum().backward()
    assert grad.shape == h.shape == (2, 8) and torch.equal(h.grad, grad)


def test_scan_on_an_invoke_and_on_generate():
    model = tiny("llama")
    lm = LanguageModel(model)
    with pytest.raises(interlace.ExecutionError, match="found while scanning"):
        with lm.trace() as tracer:
            with tracer.invoke([5, 6, 7]):
                lm.model.layers[0].output.save()
            with tracer.invoke([1, 2], validate=True):
                assert lm.model.layers[0].output.shape == (1, 2, 32)  # scanning from this invoke on
                lm.model.layers[0].output @ torch.ones(3, 3)
    with lm.generate([5, 6], max_new_tokens=2, validate=True):
        assert lm.model.layers[0].output.shape == (1, 2, 32)
        tokens = lm.generator.output.save()
    assert tokens.shape == (1, 4)


def test_scan_on_a_mixture_of_experts_model():
    """torch has no fake grouped_mm for float32: the experts run batched_mm while scanning."""
    config = transformers.MixtralConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=100, num_local_experts=4, num_experts_per_tok=2)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    lm = LanguageModel(model)
    before = model.get_experts_implementation()
    with lm.trace([[1, 2, 3]], scan=True):
        assert lm.model.layers[0].output.shape == (1, 3, 32)
        logits = lm.output.logits.save()
    with torch.no_grad():
        torch.testing.assert_close(logits, model(torch.tensor([[1, 2, 3]])).logits)
    assert model.get_experts_implementation() == before


def test_a_scan_that_cannot_run_the_model_leaves_it_ready_for_the_next_trace(mlp, x):
    net = Model(mlp)
    for opening in (lambda: net.trace(torch.randn(2, 7), scan=True), lambda: net.edit(torch.randn(2, 7))):
        with pytest.raises(interlace.InterlaceError, match="scanning could not run the model on fake tensors"):
            with opening():  # the wrong input width: the fake run fails before the block opens
                pass
        assert net._tracer is None
        with net.trace(x):
            out = net.output.save()
        with torch.no_grad():
            assert torch.equal(out, mlp(x))
    assert_clean(mlp)


def test_a_scan_writes_no_buffer_of_the_model():
    """The fake run must not count as a run: a BatchNorm in training mode updates its statistics in place."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.ReLU()).train()
    reference = copy.deepcopy(model)
    x = torch.randn(5, 3)
    net = Model(model)
    with net.trace(x, scan=True):
        out = net.output.save()
    with torch.no_grad():
        assert torch.equal(out, reference(x))  # one real forward, as the trace ran one
    for (name, mine), (_, want) in zip(model.named_buffers(), reference.named_buffers()):
        assert torch.equal(mine, want), name
    assert int(model[1].num_batches_tracked) == 1


@pytest.mark.parametrize("scan", [False, True])
def test_a_skip_with_a_value_unlike_the_modules_output_names_the_skip(mlp, x, scan):
    net = Model(mlp)
    with pytest.raises(interlace.InterlaceError) as caught:
        with net.trace(x, scan=scan):
            net.layers[1].skip(torch.zeros(2, 9))  # the layers give [2, 8]
            net.output.save()
    message = str(caught.value)
    assert "net.layers[1].skip(torch.zeros(2, 9))  # the layers give [2, 8]" in message
    if scan:  # before the model runs, against the module's own output
        assert isinstance(caught.value, interlace.ExecutionError)
        assert "layers.1 is skipped and gives a value of shape [2, 9] where it gave [2, 8]" in message
    else:  # the model fails after it: its error names the skip
        assert isinstance(caught.value, interlace.ModelError)
        assert "layers.1 is skipped (" in message and "gives a value of shape [2, 9] in its place" in message
    assert_clean(mlp)
