"""On a CUDA device (skipped without one): tracing, generation and untrusted runs with device_map.

CI has no GPU; these run on a machine that has one (`pytest tests/test_cuda.py`). Every value is
compared with the plain model (or a hand-written hook) on the same device.
"""

import pytest
import torch

import interlace
from interlace import LanguageModel
from interlace.backends.limits import Limits
from interlace.backends.serialize import deserialize_request, deserialize_results, serialize_graph, serialize_results
from interlace.backends.state import ModelState

from helpers import assert_clean, tiny, tiny_tokenizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    tiny("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return LanguageModel(str(path), device_map="auto", dispatch=True)


def plain(lm, prompt, hooks=()):
    handles = [lm.module.get_submodule(path).register_forward_hook(fn) for path, fn in hooks]
    try:
        with torch.no_grad():
            batch = lm.tokenizer(prompt, return_tensors="pt").to("cuda")
            return lm.module(**batch).logits
    finally:
        for handle in handles:
            handle.remove()


def test_the_model_is_on_the_gpu_and_a_trace_equals_the_plain_forward(lm):
    assert all(p.device.type == "cuda" for p in lm.module.parameters())
    with lm.trace("w5 w6 w7"):
        hidden = lm.model.layers[0].output.save()
        logits = lm.output.logits.save()
    assert hidden.device.type == "cuda"
    torch.testing.assert_close(logits, plain(lm, "w5 w6 w7"))
    assert_clean(lm.module)


def test_steering_and_batched_invokes_equal_hooks(lm):
    vector = torch.randn(32, device="cuda")
    with lm.trace() as tracer:
        with tracer.invoke("w5 w6 w7"):
            lm.model.layers[1].output[:, -1] += vector
            steered = lm.output.logits.save()
        with tracer.invoke("w8 w9 w10"):
            other = lm.output.logits.save()

    def steer(module, args, out):
        out[:, -1] += vector

    torch.testing.assert_close(steered, plain(lm, "w5 w6 w7", [("model.layers.1", steer)]), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(other, plain(lm, "w8 w9 w10"), atol=1e-5, rtol=1e-4)


def test_generation_with_steering_every_step(lm):
    vector = torch.randn(32, device="cuda")
    with lm.generate("w5 w6", max_new_tokens=4) as tracer:
        with tracer.all():
            lm.model.layers[0].output[:, -1] += vector
        tokens = lm.generator.output.save()

    def steer(module, args, out):
        out[:, -1] += vector

    handle = lm.module.model.layers[0].register_forward_hook(steer)
    try:
        ids = lm.tokenizer("w5 w6", return_tensors="pt").input_ids.to("cuda")
        want = lm.module.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    finally:
        handle.remove()
    assert torch.equal(tokens, want)


def test_untrusted_run_on_the_gpu_equals_local_and_weights_stay(lm):
    with lm.trace("w5 w6 w7") as tracer:
        lm.model.layers[1].output[:, -1] *= 2
        logits = lm.output.logits.save()
    request = deserialize_request(serialize_graph(tracer.graph, tracer.invokes, options=tracer.spec(0).options))
    state = ModelState(lm.module)
    outcome = lm.run(request, untrusted=True, limits=Limits())
    values, _ = deserialize_results(serialize_results(outcome.results, outcome.logs))
    assert torch.equal(values[tracer.graph.saved()[0]], logits.cpu())
    with lm.trace("w5 w6 w7") as tracer:
        lm.model.norm.weight[:] = 0
    request = deserialize_request(serialize_graph(tracer.graph, tracer.invokes, options=tracer.spec(0).options))
    with pytest.raises(interlace.RefusedError, match="would change a weight"):
        lm.run(request, untrusted=True, limits=Limits())
    assert state.diff() == []


def test_a_local_write_to_a_gpu_weight_is_undone(lm):
    before = lm.module.model.norm.weight.detach().clone()
    with lm.trace("w5 w6 w7"):
        lm.model.norm.weight[:] = 0
        zeroed = lm.output.logits.save()
    assert torch.equal(lm.module.model.norm.weight, before)
    assert torch.count_nonzero(zeroed) == 0 or torch.allclose(zeroed, zeroed[..., :1].expand_as(zeroed))
