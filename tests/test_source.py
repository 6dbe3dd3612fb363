"""`.source`: every call site inside a forward as a named point, read and changed like a module.

References are computed another way: attention scores by hand from the module's own weights and
inputs (caught with a plain PyTorch hook), patched forwards by patching the function the forward
calls, skipped points by a forward hook on the module they call.
"""

import functools
import inspect
import math
import re

import pytest
import torch
import transformers

import interlace
from helpers import FAMILIES, assert_clean, tiny, tiny_tokenizer
from interlace.backends.validate import check_against_model
from interlace.errors import GraphError, ModulePathError, SourceError
from interlace.source import Source, source_of

IDS = torch.tensor([[3, 14, 15, 92, 65, 35], [8, 97, 93, 23, 84, 62]])
FAMILIES = {**FAMILIES, "mixtral": lambda: transformers.MixtralConfig(
    num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=100, max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=2)}
ATTENTION = {"gpt2": "transformer.h.{}.attn"}  # the others: model.layers.{}.self_attn


def model_of(family: str, attention: str | None = "eager") -> torch.nn.Module:
    """A tiny random model of `family` with that attention implementation (None: the family's default)."""
    torch.manual_seed(0)
    config = FAMILIES[family]()
    if attention:
        config._attn_implementation = attention
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def attention_path(family: str, layer: int) -> str:
    return ATTENTION.get(family, "model.layers.{}.self_attn").format(layer)


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def scores_by_hand(family: str, attention: torch.nn.Module, args, kwargs) -> torch.Tensor:
    """Attention probabilities from the attention module's weights and the inputs it was called with."""
    hidden = args[0] if args else kwargs["hidden_states"]
    batch, length, _ = hidden.shape
    d = attention.head_dim
    if family == "gpt2":
        q, k, _ = attention.c_attn(hidden).split(attention.split_size, dim=2)
    else:
        q, k = attention.q_proj(hidden), attention.k_proj(hidden)
    q = q.view(batch, length, -1, d).transpose(1, 2)
    k = k.view(batch, length, -1, d).transpose(1, 2)
    if family != "gpt2":
        cos, sin = (part.unsqueeze(1) for part in kwargs["position_embeddings"])
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = q @ k.transpose(-1, -2) * attention.scaling
    cap = getattr(attention.config, "attn_logit_softcapping", None)
    if cap:
        scores = torch.tanh(scores / cap) * cap
    if kwargs.get("attention_mask") is not None:
        scores = scores + kwargs["attention_mask"]
    return torch.softmax(scores.float(), dim=-1)


@pytest.mark.parametrize("wrapper", ["Model", "standardized", "standardized, probabilities"])
@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "gemma2", "mixtral"])
def test_attention_scores_read_through_source_equal_hand_computed(family, wrapper):
    """Also under a StandardizedTransformer, whose own attention function calls the family's eager one."""
    model = model_of(family)
    attention = model.get_submodule(attention_path(family, 1))
    seen = []
    handle = attention.register_forward_pre_hook(lambda m, args, kwargs: seen.append((args, kwargs)), with_kwargs=True)
    with torch.no_grad():
        model(IDS)
    handle.remove()
    want = scores_by_hand(family, attention, *seen[0])

    net = interlace.Model(model) if wrapper == "Model" else interlace.StandardizedTransformer(
        model, enable_attention_probs=wrapper.endswith("probabilities"))
    point = net.get(attention_path(family, 1)).source.attention_interface_0
    with net.trace(IDS):
        probabilities = point.source.softmax_0.output.save()
        weights = point.output[1].save()  # what the attention function returns
    torch.testing.assert_close(probabilities, want)
    assert torch.equal(weights, probabilities.to(weights.dtype))
    assert_clean(model)


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "gemma2", "mixtral"])
def test_rewriting_every_forward_changes_no_number(family):
    model = model_of(family, None)
    with torch.no_grad():
        want = model(IDS).logits
    net = interlace.Model(model)
    rewritten = 0
    for envoy in list(net.modules()):
        try:
            envoy.source
            rewritten += 1
        except SourceError:
            pass  # a module without Python source of its own
    attention = model.get_submodule(attention_path(family, 0))
    assert rewritten > 10 and isinstance(source_of(attention), Source)
    assert inspect.signature(attention.forward) == inspect.signature(type(attention).forward.__get__(attention))
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, want)
    with net.trace(IDS):
        logits = net.output.logits.save()
    assert torch.equal(logits, want)
    assert_clean(model)


def test_printing_a_source_shows_each_point_beside_its_line():
    net = interlace.Model(tiny("llama"))
    attention = net.module.model.layers[0].self_attn
    assert "forward" not in attention.__dict__  # rewritten lazily, on first use of .source
    text = str(net.model.layers[0].self_attn.source)
    line = next(row for row in text.splitlines() if "apply_rotary_pos_emb(query_states" in row)
    assert line.lstrip().startswith("apply_rotary_pos_emb_0")
    assert "LlamaAttention.forward" in text.splitlines()[0]
    row = next(row for row in text.splitlines() if "self.q_proj(hidden_states)" in row)
    assert row.split()[:3] == ["q_proj_0,", "view_0,", "transpose_0"]
    assert source_of(net.module.model.layers[1].self_attn) is None and "forward" in attention.__dict__
    assert "(source)" not in repr(net.module) and "points" in repr(source_of(net.module.model.layers[0].self_attn))


def test_changing_the_rotary_output_equals_a_hand_patched_forward(monkeypatch):
    model = tiny("llama")
    net = interlace.Model(model)
    attention = net.model.layers[0].self_attn
    with net.trace(IDS):
        rotated = attention.source.apply_rotary_pos_emb_0.output
        attention.source.apply_rotary_pos_emb_0.output = (rotated[0] * 2, rotated[1])
        changed = net.output.logits.save()
    with net.trace(IDS):
        attention.source.apply_rotary_pos_emb_0.output[1][:, :, -1] = 0  # in place: the last key
        in_place = net.output.logits.save()

    from transformers.models.llama import modeling_llama

    original = modeling_llama.apply_rotary_pos_emb

    def patched(edit):
        calls = []

        def apply(*args, **kwargs):
            query, key = original(*args, **kwargs)
            calls.append(1)
            return edit(query, key) if len(calls) == 1 else (query, key)  # layer 0 only

        return apply

    fresh = tiny("llama")
    with torch.no_grad():
        monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", patched(lambda q, k: (q * 2, k)))
        want = fresh(IDS).logits
        monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", patched(lambda q, k: (q, k.index_fill(2, torch.tensor([k.shape[2] - 1]), 0))))
        want_in_place = fresh(IDS).logits
    assert torch.equal(changed, want) and torch.equal(in_place, want_in_place)
    assert not torch.equal(changed, in_place)


def test_invokes_each_see_their_rows_and_steps_see_each_call():
    lm = interlace.LanguageModel(tiny("llama"), tokenizer=tiny_tokenizer())
    point = lm.model.layers[1].self_attn.source.q_proj_0

    def two_invokes(edit: bool):
        with lm.trace() as tracer:
            with tracer.invoke("w5 w6 w7"):
                first = point.output.save()
                first_module = lm.model.layers[1].self_attn.q_proj.output.save()
                first_layer = lm.model.layers[1].output.save()
            with tracer.invoke("w9 w10 w11 w12"):
                second = point.output.save()
                if edit:
                    point.output = point.output * 0  # only this invoke's rows
                second_layer = lm.model.layers[1].output.save()
        assert first.shape[0] == 1 and second.shape[0] == 1 and torch.equal(first, first_module)
        return first_layer, second_layer

    edited, plain = two_invokes(True), two_invokes(False)
    assert torch.equal(edited[0], plain[0]) and not torch.equal(edited[1], plain[1])

    with lm.generate("w5 w6 w7", max_new_tokens=3) as tracer:
        steps, module_steps = interlace.list().save(), interlace.list().save()
        with tracer.all():
            steps.append(point.output)
            module_steps.append(lm.model.layers[1].self_attn.q_proj.output)
    assert [s.shape[1] for s in steps] == [3, 1, 1]
    assert all(torch.equal(a, b) for a, b in zip(steps, module_steps))
    assert_clean(lm.module)


def test_scan_cache_grad_and_skip_work_on_points():
    lm = interlace.LanguageModel(tiny("llama"), tokenizer=tiny_tokenizer())
    attention = lm.model.layers[0].self_attn
    with lm.trace("w5 w6 w7", scan=True) as tracer:
        shape = attention.source.q_proj_0.output.shape  # known while recording
        cache = tracer.cache([attention.source.o_proj_0, attention.o_proj])
        assert shape == torch.Size([1, 3, 32])
    assert torch.equal(cache["model.layers.0.self_attn.source.o_proj_0"], cache["model.layers.0.self_attn.o_proj"])

    with lm.trace("w5 w6 w7"):
        query = attention.source.q_proj_0.output
        query_grad = query.grad.save()
        lm.output.logits.sum().backward()
    reference = {}
    module = lm.module.model.layers[0].self_attn.q_proj

    def keep_gradient(module, args, output):
        output.register_hook(lambda grad: reference.setdefault("grad", grad))

    handle = module.register_forward_hook(keep_gradient)
    lm.module(**lm.tokenizer("w5 w6 w7", return_tensors="pt")).logits.sum().backward()
    handle.remove()
    lm.module.zero_grad()
    torch.testing.assert_close(query_grad, reference["grad"])

    with lm.trace("w5 w6 w7"):
        attention.source.o_proj_0.skip(torch.zeros(1, 3, 32))
        skipped = lm.output.logits.save()
    handle = lm.module.model.layers[0].self_attn.o_proj.register_forward_hook(lambda m, a, out: torch.zeros_like(out))
    with torch.no_grad():
        want = lm.module(**lm.tokenizer("w5 w6 w7", return_tensors="pt")).logits
    handle.remove()
    assert torch.equal(skipped, want)
    assert_clean(lm.module)


def test_point_inputs_chosen_steps_and_a_set_gradient_equal_module_hooks():
    lm = interlace.LanguageModel(tiny("llama"), tokenizer=tiny_tokenizer())
    attention = lm.model.layers[0].self_attn
    point, module = attention.source.o_proj_0, lm.module.model.layers[0].self_attn.o_proj
    seen = {}
    handle = module.register_forward_pre_hook(lambda m, args, kwargs: seen.setdefault("in", (args, kwargs)),
                                              with_kwargs=True)
    with torch.no_grad():
        lm.module(**lm.tokenizer("w5 w6 w7", return_tensors="pt"))
    handle.remove()
    with lm.trace("w5 w6 w7"):
        first = point.input.save()
        inputs = point.inputs.save()
    args, kwargs = inputs
    assert torch.equal(first, seen["in"][0][0]) and torch.equal(args[0], first) and kwargs == seen["in"][1]

    with lm.generate("w5 w6 w7", max_new_tokens=4) as tracer:
        chosen = interlace.list().save()
        with tracer.iter[1:3]:
            chosen.append(point.output)
            point.output = point.output * 0  # steps 1 and 2 only
        tokens = lm.generator.output.save()
    calls = []
    handle = module.register_forward_hook(
        lambda m, a, out: (calls.append(out.clone()), out * 0 if len(calls) in (2, 3) else out)[1])
    with torch.no_grad():
        want = lm.module.generate(**lm.tokenizer("w5 w6 w7", return_tensors="pt"), max_new_tokens=4,
                                  do_sample=False)
    handle.remove()
    assert len(chosen) == 2 and all(torch.equal(a, b) for a, b in zip(chosen, calls[1:3]))
    assert torch.equal(tokens, want)

    with lm.trace("w5 w6 w7"):
        point.output.grad = point.output.grad * 0  # no gradient flows back through the attention's output
        embedded = lm.model.embed_tokens.output.grad.save()
        lm.output.logits.sum().backward()
    handle = module.register_forward_hook(lambda m, a, out: out.register_hook(torch.zeros_like) and None)
    embeddings = {}
    handle_embed = lm.module.model.embed_tokens.register_forward_hook(
        lambda m, a, out: out.register_hook(lambda g: embeddings.setdefault("grad", g)) and None)
    lm.module(**lm.tokenizer("w5 w6 w7", return_tensors="pt")).logits.sum().backward()
    handle.remove()
    handle_embed.remove()
    lm.module.zero_grad()
    torch.testing.assert_close(embedded, embeddings["grad"])
    assert_clean(lm.module)


def test_an_unknown_point_is_an_error_naming_the_closest_points():
    net = interlace.Model(model_of("llama"))
    with pytest.raises(ModulePathError) as error:
        net.model.layers[0].self_attn.source.q_prj_0
    assert "'q_prj_0'" in str(error.value) and "closest to 'q_prj_0': q_proj_0" in str(error.value)

    # a graph naming a point is checked against a model that was never rewritten (a server's): the
    # forward is rewritten then, and an unknown point named with its closest names, before running
    with net.trace(IDS) as tracer:
        net.model.layers[0].self_attn.source.attention_interface_0.source.softmax_0.output.save()
    fresh = tiny("llama")
    check_against_model(tracer.graph, fresh, {}, 1)
    point = source_of(fresh.model.layers[0].self_attn).attention_interface_0
    assert list(source_of(point)._modules)[4] == "softmax_0"  # rewritten, one level in
    bad = tracer.graph.nodes[0]
    bad.target = bad.target.replace("softmax_0", "softmax_1")
    with pytest.raises(GraphError, match=r"has no call site 'softmax_1'; did you mean 'softmax_0'"):
        check_against_model(tracer.graph, tiny("llama"), {}, 1)


class Base(torch.nn.Module):
    def forward(self, x):
        return x + 1


def twice(function):
    @functools.wraps(function)
    def wrapper(self, x, *args, **kwargs):
        return function(self, x, *args, **kwargs) * 2

    return wrapper


def make_child(offset):
    class Child(Base):
        @twice
        def forward(self, x, scale=3.0):
            y = super().forward(x)  # needs the __class__ cell
            return torch.relu(y * scale + offset) + self.__class__.bonus

        bonus = 0.5

    return Child


def test_decorators_super_class_cells_defaults_and_closures_survive():
    child = make_child(offset=-1.0)()
    x = torch.linspace(-2, 2, 5)
    want = child(x)
    net = interlace.Model(child)
    assert [point.path for point in net.source] == ["source.forward_0", "source.relu_0"]
    assert torch.equal(child(x), want)
    assert inspect.signature(child.forward) == inspect.signature(type(child).forward.__get__(child))
    with net.trace(x):
        inner = net.source.forward_0.output.save()  # super().forward(x)
        net.source.relu_0.output = net.source.relu_0.output * 0
        out = net.output.save()
    assert torch.equal(inner, x + 1) and torch.equal(out, torch.full_like(x, 1.0))


class Private(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.__scale = 2.0  # stored as _Private__scale

    def forward(self, x):
        return x * self.__scale


def test_unrewritable_code_gets_a_clear_error_naming_the_module():
    net = interlace.Model(torch.nn.Sequential(torch.jit.script(torch.nn.Linear(2, 2)), torch.nn.Linear(2, 2)))
    with pytest.raises(SourceError, match=r"cannot rewrite the forward of 0 \(RecursiveScriptModule\).*compiled"):
        net[0].source
    namespace = {}
    exec("def forward(self, x):\n    return x * 2\n", namespace)
    dynamic = type("Dynamic", (torch.nn.Module,), {"forward": namespace["forward"]})()
    with pytest.raises(SourceError, match=r"cannot rewrite 1.dynamic: the source of forward is not available"):
        net[1].dynamic = dynamic
        net[1].dynamic.source
    with pytest.raises(SourceError, match=r"linear_0 calls `F.linear`.*not a Python function"):
        net[1].source.linear_0.source
    private = interlace.Model(Private())
    with pytest.raises(SourceError, match=r"cannot rewrite the model: Private.forward uses class-private names"):
        private.source
    llama = interlace.Model(tiny("llama"))
    with pytest.raises(SourceError, match=r"q_proj_0 calls the module `self.q_proj` \(Linear\)"):
        llama.model.layers[0].self_attn.source.q_proj_0.source


def test_smollm2_attention_scores_equal_hand_computed(smollm2):
    module = smollm2.module
    before = module.config._attn_implementation
    module.set_attn_implementation("eager")
    try:
        attention = module.model.layers[3].self_attn
        seen = []
        handle = attention.register_forward_pre_hook(lambda m, a, k: seen.append((a, k)), with_kwargs=True)
        with torch.no_grad():
            module(**smollm2.tokenizer("The capital of France is", return_tensors="pt"))
        handle.remove()
        want = scores_by_hand("llama", attention, *seen[0])
        with smollm2.trace("The capital of France is"):
            point = smollm2.model.layers[3].self_attn.source.attention_interface_0
            probabilities = point.source.softmax_0.output.save()
            logits = smollm2.output.logits.save()
        torch.testing.assert_close(probabilities, want)
        assert smollm2.tokenizer.decode(logits[0, -1].argmax()) == " Paris"
    finally:
        module.set_attn_implementation(before)
    assert not math.isnan(probabilities.sum().item())


def test_points_named_before_the_weights_load_work_after(tmp_path):
    tiny("llama").save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    lm = interlace.LanguageModel(str(tmp_path))  # on the meta device until it runs
    attention = lm.model.layers[0].self_attn
    assert "apply_rotary_pos_emb_0" in str(attention.source)
    with lm.trace("w5 w6 w7"):
        query = attention.source.q_proj_0.output.save()
        module = attention.q_proj.output.save()
    assert lm.dispatched and not query.is_meta and torch.equal(query, module)
    assert_clean(lm.module)


def _fast_path(forward):
    """As transformers' implementation switches (experts, attention): the wrapper may run other code."""
    @functools.wraps(forward)
    def dispatch(self, x):
        return x * 2 if self.fast else forward(self, x)
    return dispatch


class _Switching(torch.nn.Module):
    def __init__(self, fast: bool):
        super().__init__()
        self.fast = fast

    @_fast_path
    def forward(self, x):
        if x.sum() > 1e9:  # (never, here)
            x = torch.relu(x)
        return torch.mul(x, 2)


def test_the_source_of_a_container_without_a_forward_is_an_error_naming_where_to_look():
    lm = interlace.LanguageModel(model_of("llama"))
    with pytest.raises(interlace.SourceError, match=re.escape(
            "model.layers (ModuleList) has no forward of its own to rewrite: it holds modules that its parent calls. "
            "Use the `.source` of its parent, or of one of the modules it holds (model.layers[0].source)")):
        print(lm.model.layers.source)
    assert "LlamaDecoderLayer.forward" in str(lm.model.layers[0].source)
    assert_clean(lm.module)


def test_a_call_site_inside_an_attention_function_the_model_did_not_call_names_the_one_it_called():
    """`.source` of the attention call shows the eager function; under sdpa the model calls another one, so the
    eager function's call sites never run: the error says which function ran instead, and how to get the eager."""
    lm = interlace.LanguageModel(model_of("llama", "sdpa"))
    inner = "model.layers.0.self_attn.source.attention_interface_0"
    with pytest.raises(interlace.OutOfOrderError) as caught:
        with lm.trace([[5, 6, 7]]):
            lm.model.layers[0].self_attn.source.attention_interface_0.source.softmax_0.output.save()
    message = str(caught.value)
    assert f"the forward of {inner} did not make that call in this run" in message
    assert f"{inner} last called sdpa_attention_forward, not eager_attention_forward, whose code its `.source` " \
           "shows" in message and 'attn_implementation="eager"' in message
    assert_clean(lm.module)
    lm.module.set_attn_implementation("eager")  # then the call sites run
    with lm.trace([[5, 6, 7]]):
        probabilities = lm.model.layers[0].self_attn.source.attention_interface_0.source.softmax_0.output.save()
    assert probabilities.shape == (1, 4, 3, 3)
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(1, 4, 3))


@pytest.mark.parametrize("fast", [False, True])
def test_a_call_site_its_forward_never_makes_names_the_module_and_a_wrapper_that_runs_other_code(fast):
    """The point's owner is the module (it named 'layer.source'); a forward wrapped by an implementation
    switch is said to be, with the way to the code `.source` shows."""
    net = interlace.Model(torch.nn.Sequential(_Switching(fast)))
    point = "relu_0" if not fast else "mul_0"
    with pytest.raises(interlace.OutOfOrderError) as caught:
        with net.trace(torch.ones(2, 3)):
            getattr(net[0].source, point).output.save()
    message = str(caught.value)
    assert f"0.source.{point}.output was never reached: the forward of 0 did not make that call" in message
    assert "print the `.source` of 0 to see its calls" in message
    assert ("Its forward is wrapped (_Switching.forward)" in message) and "_experts_implementation" in message
    with net.trace(torch.ones(2, 3)):
        doubled = net[0].source.mul_0.output.save() if not fast else net[0].output.save()
    assert torch.equal(doubled, torch.full((2, 3), 2.0))


def test_a_block_over_steps_changes_a_source_points_nth_call_in_place_as_documented():
    """`.source` points count calls, not steps (docs/features/generation.md): the block's copy for step n changes
    the point's call n, wherever it falls, as a hook on the layers that counts their calls does."""
    model = tiny("llama")
    lm = interlace.LanguageModel(model, tokenizer=tiny_tokenizer())
    with lm.generate("w5 w6 w7", max_new_tokens=3) as tracer:
        with tracer.all():
            lm.model.source.decoder_layer_0.output[:, -1] *= -4.0
        tokens = lm.generator.output.save()
    with lm.generate("w5 w6 w7", max_new_tokens=3):
        plain = lm.generator.output.save()

    calls = []

    def scale(module, args, output):
        calls.append(module)
        if len(calls) <= 3:  # calls 0, 1, 2 of the loop's call site: steps 0, 1 and 2's copies
            output = output.clone()
            output[:, -1] *= -4.0
            return output

    handles = [layer.register_forward_hook(scale) for layer in model.model.layers]
    try:
        with torch.no_grad():
            want = model.generate(lm.tokenizer("w5 w6 w7", return_tensors="pt").input_ids, max_new_tokens=3,
                                  do_sample=False, pad_token_id=0)
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(tokens, want) and not torch.equal(tokens, plain)
