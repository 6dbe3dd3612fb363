"""Hostile requests, built by hand the way an attacker would (no pickle, never trusted).

Each case builds the bytes of a request and hands them to `attack`, which does what a server does
with them: load within limits, check against the model, run untrusted, serialize the results. It
returns the error raised and every change to the model and torch's global state (`ModelState`).
`tests/backends/test_untrusted.py` runs each case in a capped child process (`capped.Worker`) and
checks the exact error class and that nothing changed (or exactly what a case says it changes).
"""

from __future__ import annotations

import json
import os
import struct
import threading

import safetensors.torch
import torch
import transformers
import zstandard

import interlace
from interlace.backends.state import ModelState
from interlace.backends.limits import Limits
from interlace.backends.serialize import deserialize_request, serialize_graph, serialize_request, serialize_results
from interlace.graph import Graph, Ref, Request
from helpers import check_without_refusing, tiny_tokenizer

_LM = None


def model() -> interlace.LanguageModel:
    """A tiny Llama with tied embeddings (lm_head.weight is embed_tokens.weight) and rotary buffers."""
    global _LM
    if _LM is None:
        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=100, max_position_embeddings=64, tie_word_embeddings=True, pad_token_id=0, eos_token_id=None)
        _LM = interlace.LanguageModel(transformers.AutoModelForCausalLM.from_config(config).eval(),
                                      tokenizer=tiny_tokenizer())
    return _LM


def prepare() -> None:
    """Build the model and run one request, so forked children start warm (imports done once)."""
    g = Builder()
    g.save(g.out())
    assert attack(g.bytes())["error"] is None


PROMPT = [(("w5 w6 w7",), {})]
HERE = ("attacker.py", 1)


class Builder:
    """Nodes by hand: each method appends one node and returns a Ref to it."""

    def __init__(self):
        self.graph = Graph()

    def add(self, op, target=None, args=(), kwargs=None, **extra) -> Ref:
        return Ref(self.graph.add(op, target, tuple(args), kwargs or {}, extra.pop("location", HERE), **extra).index)

    def out(self, path="model.layers.0", call=0) -> Ref:
        return self.add("module_value", path, kwargs={"kind": "output", "call": call, "invoke": None})

    def call(self, target, *args, **kwargs) -> Ref:
        return self.add("call", target, args, kwargs)

    def method(self, name, *args, **kwargs) -> Ref:
        return self.add("call_method", name, args, kwargs)

    def param(self, name) -> Ref:
        return self.add("parameter", name)

    def save(self, ref: Ref) -> Ref:
        self.graph[ref.index].saved = True
        return ref

    def bytes(self, invokes=PROMPT, **options) -> bytes:
        return serialize_graph(self.graph, invokes, options=options)


def raw(nodes, traces=None, tensors=None, *, count=None, compress=False, version=1, flags=0, patch=None,
        repeats=None) -> bytes:
    """A frame written by hand: the JSON header (with `patch`: (old, new) replaced in its text) and tensors.
    With `repeats`, a version 2 frame whose count includes the copies."""
    header = {"version": 1, "nodes": nodes}
    if repeats is not None:
        header["version"], header["repeats"] = 2, repeats
        total = len(nodes) + sum(len(r["copies"]) * (r["end"] - r["start"]) for r in repeats)
        version, count = (2 if version == 1 else version), (total if count is None else count)
    if traces is None:
        traces = [{"start": 0, "end": len(nodes) if count is None else count, "invokes": [{"args": ["w5 w6"]}]}]
    header = json.dumps({**header, "traces": traces}).encode()
    if patch:
        header = header.replace(*patch)
    section = safetensors.torch.save(tensors) if tensors else b""
    body = struct.pack("<Q", len(header)) + header + section
    if compress:
        body, flags = zstandard.ZstdCompressor().compress(body), flags | 1
    return b"ILG" + bytes([version, flags]) + struct.pack("<I", len(nodes) if count is None else count) + body


def attack(data: bytes, limits: Limits | None = None, cancel=None, run=None) -> dict:
    """What a server does with `data`; returns {"error", "message", "changes"}.
    run: a hosted model's `execute_many`, to run it as that does (else the model's own run)."""
    lm = model()
    limits = limits or Limits()
    state = ModelState(lm.module)
    error = None
    try:
        # (as a server's front reads it: the copies of repeated blocks are made by the run, see Graph.add_copy_later)
        request = deserialize_request(data, limits=limits, make_copies=False)
        if run is not None:
            [answer] = run([request], limits=limits, cancels=[cancel or threading.Event()])
            if isinstance(answer, Exception):
                raise answer
        else:
            outcome = lm.run(request, untrusted=True, limits=limits, cancel=cancel)
            serialize_results(outcome.results, outcome.logs, graph=request.graph, limits=limits)
    except Exception as raised:  # noqa: BLE001 - the class is what the test checks
        error = raised
    return {
        "error": type(error).__name__ if error else None,
        "interlace": isinstance(error, interlace.InterlaceError),
        "message": str(error)[:3000],
        "changes": state.diff(),
    }


# -- the cases: name -> (expected error class, pattern in its message, builder returning attack(...),
#    the changes it leaves on the model: none, but where the run fails because it could not prevent them) --
CASES: dict[str, tuple] = {}


def case(error, pattern, changes=()):
    def register(fn):
        CASES[fn.__name__] = (error, pattern, fn, list(changes))
        return fn
    return register


def run_case(name: str) -> dict:
    return CASES[name][2]()


# code execution ---------------------------------------------------------------------------------------
@case("GraphError", "'Tensor.__repr__' is not an allowed operation")
def eval_through_globals():
    nodes = [{"index": 0, "op": "call", "target": "torch.zeros", "args": [1]},
             {"index": 1, "op": "call", "target": "Tensor.__repr__", "args": [{"ref": 0}]},
             {"index": 2, "op": "call", "target": "builtins.getattr", "args": [{"ref": 1}, "__func__"]},
             {"index": 3, "op": "call", "target": "builtins.getattr", "args": [{"ref": 2}, "__globals__"]},
             {"index": 4, "op": "call", "target": "operator.getitem", "args": [{"ref": 3}, "__builtins__"]},
             {"index": 5, "op": "call", "target": "operator.getitem", "args": [{"ref": 4}, "eval"]},
             {"index": 6, "op": "call", "target": "Tensor.__torch_function__", "args": [{"ref": 5}]}]
    return attack(raw(nodes))


@case("GraphError", "method '__getattribute__' is not an allowed method")
def getattribute_method():
    return attack(raw([{"index": 0, "op": "call", "target": "torch.zeros", "args": [1]},
                       {"index": 1, "op": "call_method", "target": "__getattribute__", "args": [{"ref": 0}, "__class__"]}]))


@case("GraphError", "getattr of '__class__' is refused")
def getattr_dunder():
    return attack(raw([{"index": 0, "op": "call", "target": "torch.zeros", "args": [1]},
                       {"index": 1, "op": "call", "target": "builtins.getattr", "args": [{"ref": 0}, "__class__"]}]))


@case("RefusedError", "reading attribute 'grad_fn' of a Tensor is not allowed")
def getattr_callable_attribute():
    g = Builder()
    g.save(g.call("builtins.getattr", g.out(), "grad_fn"))
    return attack(g.bytes())


@case("RefusedError", "reading attribute 'register_hook' of a Parameter is not allowed")
def getattr_bound_method_of_a_weight():
    g = Builder()
    g.call("builtins.getattr", g.param("lm_head.weight"), "register_hook")
    return attack(g.bytes())


@case("GraphError", "getattr of %0 is refused")
def getattr_with_a_computed_name():
    return attack(raw([{"index": 0, "op": "call", "target": "operator.add", "args": ["__cl", "ass__"]},
                       {"index": 1, "op": "call", "target": "builtins.getattr", "args": [{"ref": 0}, {"ref": 0}]}]))


@case("GraphError", "'builtins.sorted' is not an allowed operation")
def sorted_with_a_key_callable():
    return attack(raw([{"index": 0, "op": "parameter", "target": "lm_head.weight"},
                       {"index": 1, "op": "call", "target": "builtins.sorted", "args": [{"list": [1, 2]}],
                        "kwargs": {"key": {"ref": 0}}}]))


@case("GraphError", "'torch.vmap' is not an allowed operation")
def functorch_transform():
    return attack(raw([{"index": 0, "op": "call", "target": "torch.vmap", "args": [1]}]))


@case("GraphError", "'builtins.range' is not an allowed operation")
def python_loop_over_a_range():
    return attack(raw([{"index": 0, "op": "call", "target": "builtins.range", "args": [10**13]},
                       {"index": 1, "op": "call", "target": "builtins.sum", "args": [{"ref": 0}]}]))


@case("GraphError", "method 'register_hook' is not an allowed method")
def tensor_hook_on_a_weight():
    return attack(raw([{"index": 0, "op": "parameter", "target": "lm_head.weight"},
                       {"index": 1, "op": "call_method", "target": "register_hook", "args": [{"ref": 0}, 1]}]))


def _repo_that_runs_code() -> tuple[str, str]:
    """A folder transformers would import `custom_generate/generate.py` from; it leaves a marker file if run."""
    import tempfile

    folder = tempfile.mkdtemp()
    marker = os.path.join(folder, "ran")
    os.makedirs(os.path.join(folder, "custom_generate"))
    with open(os.path.join(folder, "custom_generate", "generate.py"), "w") as code:
        code.write(f"open({marker!r}, 'w').write('ran')\ndef generate(model, *args, **kwargs):\n    return 0\n")
    return folder, marker


@case("GraphError", "'generator' is not a module of the model's own tree")
def module_call_of_the_generator_with_custom_generate():
    folder, marker = _repo_that_runs_code()
    g = Builder()
    ids = g.call("torch.tensor", [[1, 2, 3]])
    g.save(g.add("module_call", "generator", (), {"input_ids": ids, "custom_generate": folder,
                                                   "trust_remote_code": True, "max_new_tokens": 1}))
    result = attack(g.bytes())
    assert not os.path.exists(marker), "the attacker's code ran"
    return result


@case("RefusedError", r"calling the model with keyword 'custom_generate' = a str is not allowed here")
def module_call_of_the_root_with_a_path():
    folder, marker = _repo_that_runs_code()
    g = Builder()
    g.save(g.add("module_call", "", (g.call("torch.tensor", [[1, 2]]),), {"custom_generate": folder,
                                                                          "trust_remote_code": True}))
    result = attack(g.bytes())
    assert not os.path.exists(marker), "the attacker's code ran"
    return result


@case("RefusedError", r"calling model with keyword 'config' = a dict is not allowed here")
def module_call_with_a_config_dict():
    g = Builder()
    g.save(g.add("module_call", "model", (g.call("torch.tensor", [[1, 2]]),), {"config": {"use_cache": True}}))
    return attack(g.bytes())


@case("RefusedError", r"calling model.layers.1 with keyword 'cache' = a DynamicCache is not allowed")
def module_call_handing_a_layer_the_cache_object():
    g = Builder()
    inputs = g.add("module_value", "model.layers.0", kwargs={"kind": "inputs", "call": 0, "invoke": None})
    kwargs = g.call("operator.getitem", inputs, 1)
    cache = g.call("operator.getitem", kwargs, "cache")
    hidden = g.call("operator.getitem", g.call("operator.getitem", inputs, 0), 0)
    g.save(g.add("module_call", "model.layers.1", (hidden,), {"cache": cache}))
    return attack(g.bytes())


@case(None, "")
def module_call_of_a_layer_with_tensors_and_numbers():
    g = Builder()
    hidden = g.out("model.layers.0")
    g.save(g.add("module_call", "model.norm", (hidden,)))
    g.save(g.add("module_call", "lm_head", (g.call("operator.mul", hidden, 2),)))
    return attack(g.bytes())


@case("RefusedError", "calling model.norm with keyword 'invoke' = a str is not allowed here")
def module_call_with_an_invoke_keyword_that_is_not_a_number():
    g = Builder()
    g.save(g.add("module_call", "model.norm", (g.out("model.layers.0"),), {"invoke": "__class__"}))
    return attack(g.bytes())


@case("SerializationError", "holds pickled Python functions")
def pickled_function():
    g = Builder()
    g.add("apply", os.getcwd, ())
    return attack(serialize_graph(g.graph, PROMPT, trusted=True))


@case("GraphError", "interlace.apply runs your own Python function")
def apply_by_name():
    return attack(raw([{"index": 0, "op": "apply", "target": "posix.system", "args": ["id"]}]))


@case("RefusedError", "tensors have no allowed method 'append'")
def list_method_on_a_tensor():
    g = Builder()
    g.method("append", g.out(), 1)
    return attack(g.bytes())


@case("RefusedError", "method 'keys' is not allowed on a DynamicCache")
def method_on_an_opaque_object():
    g = Builder()
    g.method("keys", g.call("operator.getitem", g.out(""), "cache"))
    return attack(g.bytes())


@case("RefusedError", "string formatting with % is not allowed")
def percent_format_bomb():
    g = Builder()
    g.save(g.call("operator.mod", "%999999999d", 1))
    return attack(g.bytes())


# changing the shared model for good -----------------------------------------------------------------
@case("RefusedError", "would change a weight of the shared model")
def zero_a_weight():
    g = Builder()
    g.method("zero_", g.param("model.layers.0.mlp.up_proj.weight"))
    return attack(g.bytes())


@case("RefusedError", "would change a weight of the shared model")
def setitem_on_a_buffer():
    g = Builder()
    g.call("operator.setitem", g.param("model.rotary_emb.inv_freq"), slice(None), 0.0)
    return attack(g.bytes())


@case("RefusedError", "would change a weight of the shared model")
def iadd_on_a_tied_weight():
    g = Builder()
    g.call("operator.iadd", g.param("lm_head.weight"), 1.0)
    return attack(g.bytes())


@case("RefusedError", "would change a weight of the shared model")
def requires_grad_off():
    g = Builder()
    g.method("requires_grad_", g.param("lm_head.weight"), False)
    return attack(g.bytes())


@case("RefusedError", "would change a weight of the shared model")
def write_through_a_view():
    g = Builder()
    view = g.call("operator.getitem", g.call("builtins.getattr", g.param("model.norm.weight"), "T"), 0)
    g.method("mul_", g.call("builtins.getattr", view, "data"), 0.0)
    return attack(g.bytes())


@case("RefusedError", "would change a weight of the shared model")
def copy_into_a_weight_found_through_embed_output():
    g = Builder()
    g.method("copy_", g.call("builtins.getattr", g.param("model.embed_tokens.weight"), "data"),
             g.call("torch.zeros", 100, 32))
    return attack(g.bytes())


@case("RefusedError", "`out=` is not allowed")
def out_argument_into_a_weight():
    g = Builder()
    weight = g.param("model.norm.weight")
    g.call("torch.add", weight, 1.0, out=weight)
    return attack(g.bytes())


@case("RefusedError", r"relu \(through aten.relu_.default, which writes its argument 'self'\) would change a weight")
def inplace_keyword():
    g = Builder()
    g.call("torch.nn.functional.relu", g.param("model.norm.weight"), inplace=True)
    return attack(g.bytes())


# writes through positional arguments: decided from the aten operator's schema, whatever the Python name
@case("RefusedError", r"relu \(through aten.relu_.default, which writes its argument 'self'\) would change a weight")
def relu_in_place_by_position():
    g = Builder()
    g.call("torch.nn.functional.relu", g.param("model.norm.weight"), True)
    return attack(g.bytes())


@case("RefusedError", r"leaky_relu \(through aten.leaky_relu_.default.*would change a weight")
def leaky_relu_in_place_by_position_on_a_view():
    g = Builder()
    view = g.call("operator.getitem", g.param("model.layers.0.mlp.up_proj.weight"), 0)
    g.call("torch.nn.functional.leaky_relu", view, 0.5, True)
    return attack(g.bytes())


@case("RefusedError", r"normalize \(through aten.div.out, which writes its argument 'out'\) would change a weight")
def normalize_into_a_weight_by_position():
    g = Builder()
    g.call("torch.nn.functional.normalize", g.call("torch.ones", 1, 32), 2.0, 1, 1e-12, g.param("model.norm.weight"))
    return attack(g.bytes())


@case("RefusedError", r"torch.norm \(through aten.linalg_vector_norm.out, .*'out'\) would change a weight")
def norm_resizing_a_weight_to_a_scalar():
    g = Builder()
    g.call("torch.norm", g.call("torch.ones", 32), "fro", None, False, g.param("model.norm.weight"))
    return attack(g.bytes())


@case("RefusedError", r"embedding \(through aten.embedding_renorm_.default, .*'self'\) would change a weight")
def embedding_max_norm_renormalizes_the_table():
    g = Builder()
    ids = g.call("torch.tensor", [1, 2, 3])
    g.call("torch.nn.functional.embedding", ids, g.param("model.embed_tokens.weight"), None, 1e-3)
    return attack(g.bytes())


@case("RefusedError", r"embedding \(through aten.embedding_renorm_.default.*would change a weight")
def embedding_max_norm_through_data_of_the_tied_head():
    g = Builder()
    table = g.call("builtins.getattr", g.param("lm_head.weight"), "data")
    g.call("torch.nn.functional.embedding", g.call("torch.tensor", [4]), table, None, 0.5, 1.0)
    return attack(g.bytes())


@case("RefusedError", r"would write its result into a tensor it was given \(argument 'out'")
def norm_resizing_an_activation_through_out():
    g = Builder()
    g.call("torch.norm", g.call("torch.ones", 32), "fro", None, False, g.out())
    return attack(g.bytes())


@case(None, "")
def in_place_on_ones_own_values_is_allowed():
    g = Builder()
    own = g.method("clone", g.param("model.norm.weight"))
    g.call("torch.nn.functional.relu", own, True)
    g.call("torch.nn.functional.relu", g.out(), True)  # the model's activation, this run's own
    g.save(g.call("torch.nn.functional.normalize", own, 2.0, 0))
    return attack(g.bytes())


@case("WeightsChangedError", r"changed weight\(s\) model.norm.weight of the shared model in a write no "
      r"operator's schema declared.*The weights stay changed: the server must reload the model",
      changes=["model.norm.weight: values changed"])
def version_counters_catch_a_write_the_schema_check_missed():
    """Nothing was copied to put back: the hosted model that ran it refuses every job after it."""
    from interlace.backends import writes
    from interlace.server.hosting import HostedModel

    writes.WriteCheck._check = check_without_refusing  # this child only: the first line refuses nothing
    g = Builder()
    g.call("torch.nn.functional.relu", g.call("operator.neg", g.param("model.norm.weight")), True)  # harmless
    g.call("torch.nn.functional.hardtanh", g.param("model.norm.weight"), 0.0, 0.5, True)  # its ones become 0.5
    hosted = HostedModel(model(), name="tiny", limits=Limits())
    result = attack(g.bytes(), run=hosted.execute_many)
    clean = Builder()
    clean.save(clean.out())
    refused = attack(clean.bytes(), run=hosted.execute_many)
    assert hosted.broken == ["model.norm.weight"], hosted.broken
    assert (refused["error"], refused["changes"]) == ("ServiceError", []), refused
    assert "model.norm.weight" in refused["message"] and "restart" in refused["message"], refused["message"]
    return result


def _steering(g: Builder, constant=0.5) -> None:
    """`model.layers.0.output[:, 0] += constant`, as the tracer records it (the module's hook does it itself)."""
    out, key = g.out(), (slice(None), 0)
    view = g.call("operator.getitem", out, key)
    g.call("operator.setitem", out, key, g.call("operator.iadd", view, constant))


@case("LimitError", r"^the run would create more than 100 elements in all \(max_total_elements\)")
def a_steering_edit_done_by_the_hook_counts_in_the_runs_budget():
    """getitem counts the output's 96 elements, the += its row's 32: over 100, stopped at the +=."""
    g = Builder()
    _steering(g)
    g.save(g.out("model.norm"))
    result = attack(g.bytes(), Limits(max_total_elements=100))
    assert attack(g.bytes(), Limits(max_total_elements=128))["error"] is None  # (its own count, and no more)
    return result


@case(None, "")
def a_hosted_models_steered_jobs_carry_its_checks_reads_and_leave_nothing():
    """A hosted model is held: its second job starts from what the first job's end checks read; each steers."""
    from interlace.server.hosting import HostedModel

    hosted = HostedModel(model(), name="tiny", limits=Limits())
    g = Builder()
    _steering(g, 3.0)
    g.save(g.call("operator.getitem", g.out(""), "logits"))
    first = attack(g.bytes(), run=hosted.execute_many)
    assert first["error"] is None and first["changes"] == [], first
    return attack(g.bytes(), run=hosted.execute_many)


@case(None, "")
def output_attentions_leaves_no_hooks_on_the_layers():
    g = Builder()
    g.save(g.call("operator.getitem", g.out(""), "logits"))
    return attack(g.bytes(kwargs={"output_attentions": True}))


@case(None, "")
def gradients_do_not_stay_on_the_weights():
    g = Builder()
    weight = g.param("model.norm.weight")
    g.save(g.add("grad", None, (weight,)))
    g.add("swap", None, (g.add("grad", None, (g.out("model.layers.1"),)), g.call("torch.zeros", 1, 3, 32)))
    g.method("backward", g.method("sum", g.call("builtins.getattr", g.out(""), "logits")))
    return attack(g.bytes())


# reading the server's files ---------------------------------------------------------------------------
def _failing_at(location) -> bytes:
    g = Builder()
    g.save(g.add("call", "operator.getitem", (g.out(), (0, 0, 0, 0, 0)), location=location))
    return g.bytes()


@case("ExecutionError", "^/proc/self/environ:1\n")
def location_naming_the_environment():
    result = attack(_failing_at(("/proc/self/environ", 1)))
    assert os.environ.get("PATH", "PATH") not in result["message"]
    return result


@case("ExecutionError", "^/etc/passwd:1\n")
def location_naming_passwd():
    result = attack(_failing_at(("/etc/passwd", 1)))
    assert "root:" not in result["message"]
    return result


@case("ExecutionError", "^/dev/zero:1\n")
def location_naming_an_endless_file():
    return attack(_failing_at(("/dev/zero", 1)))


@case("GraphError", "the model has no module '../../etc/passwd'")
def module_path_outside_the_model():
    g = Builder()
    g.save(g.out("../../etc/passwd"))
    return attack(g.bytes())


# killing or stalling the process ------------------------------------------------------------------------
@case("LimitError", r"the header is \d+ bytes, over the limit of 33554432 \(max_header_bytes\)")
def zstd_header_bomb():
    length = 300 << 20
    compressor = zstandard.ZstdCompressor().compressobj()
    parts = [compressor.compress(struct.pack("<Q", length) + b'{"version":1,"nodes":[],"pad":"')]
    parts += [compressor.compress(b" " * (1 << 20)) for _ in range(300)]
    body = b"".join(parts) + compressor.flush()
    assert len(body) < 100_000  # streamed: the 300 MB never exist, here or in the loader
    return attack(b"ILG\x01\x01" + struct.pack("<I", 0) + body)


@case("LimitError", r"the tensor section is over the limit of 268435456 bytes \(max_tensor_bytes\)")
def tensor_section_bomb():
    size = 900 << 20
    meta = json.dumps({"x": {"dtype": "F32", "shape": [size // 4], "data_offsets": [0, size]}}).encode()
    header = json.dumps({"version": 1, "nodes": [{"index": 0, "op": "stop"}],
                         "traces": [{"start": 0, "end": 1}]}).encode()
    compressor = zstandard.ZstdCompressor().compressobj()
    parts = [compressor.compress(struct.pack("<Q", len(header)) + header + struct.pack("<Q", len(meta)) + meta)]
    parts += [compressor.compress(bytes(1 << 20)) for _ in range(900)]
    body = b"".join(parts) + compressor.flush()
    assert len(body) < 200_000
    return attack(b"ILG\x01\x01" + struct.pack("<I", 1) + body)


@case("SerializationError", r"holds 1 tensor\(s\) the header never refers to")
def unreferenced_tensor():
    return attack(raw([{"index": 0, "op": "stop"}], tensors={"x": torch.zeros(10)}))


@case("LimitError", r"torch.ones would create 536870912 elements, over the limit of 268435456")
def ones_two_to_the_29():
    g = Builder()
    g.save(g.call("torch.ones", 2**29))
    return attack(g.bytes())


@case("LimitError", "torch.zeros would create 1099511627776 elements")
def zeros_of_a_terabyte():
    g = Builder()
    g.call("torch.zeros", (2**20, 2**20))
    return attack(g.bytes())


@case("LimitError", "torch.arange would create 1000000000000 elements")
def arange_to_a_trillion():
    g = Builder()
    g.call("torch.arange", 1e12)
    return attack(g.bytes())


@case("LimitError", r"tolist\(\) would make 33554432 Python numbers")
def tolist_of_32m_elements():
    g = Builder()
    g.method("tolist", g.call("torch.zeros", 2**25))
    return attack(g.bytes())


@case("LimitError", r"operator.lshift would make an int of about 34359738369 bits")
def four_gib_int_by_shift():
    g = Builder()
    g.call("operator.lshift", 1, 2**35)
    return attack(g.bytes())


@case("LimitError", r"operator.pow would make an int of about 103079215104 bits")
def four_gib_int_by_power():
    g = Builder()
    g.call("operator.pow", 4, 2**35)
    return attack(g.bytes())


@case("LimitError", r"an int of \d+ bits is over the limit of 256")
def int_squaring_chain():
    g = Builder()
    value = g.call("operator.add", 2**60, 0)
    for _ in range(40):
        value = g.call("operator.mul", value, value)
    return attack(g.bytes())


@case("LimitError", r"an int literal at byte \d+ of the header has more than 79 digits")
def huge_int_literal():
    return attack(raw([{"index": 0, "op": "call", "target": "operator.add", "args": [1, 0]}],
                      patch=(b'"args": [1, 0]', b'"args": [' + b"9" * 5000 + b", 0]")))


@case("LimitError", r"an int literal at byte \d+ of the header has more than 79 digits")
def big_int_literal():
    return attack(raw([{"index": 0, "op": "call", "target": "operator.add", "args": [10**300, 0]}]))


@case("LimitError", r"a Python value would hold 1000000000 items")
def list_repetition():
    g = Builder()
    g.call("operator.mul", [0], 10**9)
    return attack(g.bytes())


@case("LimitError", r"a Python value would hold 1000000000 items")
def string_repetition():
    g = Builder()
    g.call("operator.mul", "a", 10**9)
    return attack(g.bytes())


@case("LimitError", r"a Python value would hold 1000000000 items")
def list_repeated_by_a_zero_d_tensor():  # (Python repeats by the count `__index__` gives: 8 GB of references)
    g = Builder()
    g.call("operator.mul", [0], g.call("torch.tensor", 10**9))
    return attack(g.bytes())


@case("LimitError", r"a Python value would hold 2000000000 items")
def string_repeated_by_a_zero_d_tensor_on_the_left():
    g = Builder()
    g.call("operator.mul", g.call("torch.tensor", 10**9), "ab")
    return attack(g.bytes())


@case("LimitError", r"a Python value would hold \d+ items, over the limit of 1000000")
def list_doubling():
    g = Builder()
    value = g.call("builtins.list", [0, 1])
    for _ in range(40):
        value = g.call("operator.add", value, value)
    return attack(g.bytes())


@case("LimitError", "operator.mul would create 1099511627776 elements")
def outer_product_by_broadcasting():
    g = Builder()
    x = g.call("torch.zeros", 2**20)
    g.call("operator.mul", g.call("operator.getitem", x, (slice(None), None)),
           g.call("operator.getitem", x, (None, slice(None))))
    return attack(g.bytes())


@case("LimitError", "Tensor.expand would create 1099511627776 elements")
def expand_then_copy():
    g = Builder()
    view = g.method("expand", g.call("torch.zeros", 1, 2**20), 2**20, 2**20)
    g.method("contiguous", view)
    return attack(g.bytes())


@case("LimitError", "Tensor.repeat would create")
def repeat_bomb():
    g = Builder()
    g.method("repeat", g.out(), 10**4, 10**4, 1)
    return attack(g.bytes())


@case("LimitError", r"split would make 1048576 tensors, over the limit of 10000 \(max_pieces\)")
def split_into_a_million_views():
    g = Builder()
    g.method("split", g.call("torch.zeros", 2**20), 1)
    return attack(g.bytes())


@case("LimitError", "calling lm_head would create 200000000 elements")
def module_call_on_a_huge_input():
    g = Builder()
    g.save(g.add("module_call", "lm_head", (g.call("torch.zeros", 2_000_000, 32),)))
    return attack(g.bytes(), Limits(max_elements=100_000_000))


@case("LimitError", "a replacement may not be larger than the value it replaces")
def swap_in_a_bigger_batch():
    g = Builder()
    g.add("swap", None, (g.out(), g.call("torch.zeros", 1000, 3, 32)))
    return attack(g.bytes())


@case("LimitError", r"max_new_tokens must be an int from 0 to 1024")
def too_many_new_tokens():
    g = Builder()
    g.save(g.out("generator"))
    return attack(g.bytes(mode="generate", kwargs={"max_new_tokens": 10**6}))


@case("RefusedError", "option\\(s\\) custom_generate are not allowed for generate")
def generate_option_that_loads_code():
    g = Builder()
    g.save(g.out("generator"))
    return attack(g.bytes(mode="generate", kwargs={"max_new_tokens": 2, "custom_generate": "someone/repo"}))


@case("RefusedError", r"eos_token_id must be a token id \(an int from 0\) or a list of at most 64 of them, not \[-1\]")
def end_of_sequence_token_that_is_no_token():
    g = Builder()
    g.save(g.out("generator"))
    return attack(g.bytes(mode="generate", kwargs={"max_new_tokens": 2, "eos_token_id": [-1]}))


@case("RefusedError", r"eos_token_id must be a token id .* or a list of at most 64 of them, not \[0, 0, 0")
def too_many_end_of_sequence_tokens():
    g = Builder()
    g.save(g.out("generator"))
    return attack(g.bytes(mode="generate", kwargs={"max_new_tokens": 2, "eos_token_id": [0] * 1000}))


@case("LimitError", r"are over the limit of 100 token positions \(max_tokens\)")
def too_many_tokens():
    g = Builder()
    g.save(g.out())
    return attack(g.bytes(invokes=[((" ".join(["w3"] * 60),), {}), (("w4 w5",), {})]), Limits(max_tokens=100))


@case("LimitError", r"nested more than 32 levels deep \(max_depth\)")
def deeply_nested_value():
    value = 1
    for _ in range(60):
        value = {"list": [value]}
    return attack(raw([{"index": 0, "op": "log", "args": [value]}]))


@case("LimitError", r"a string of 20000000 characters is over the limit of 10000")
def huge_string():
    return attack(raw([{"index": 0, "op": "log", "args": ["x" * 20_000_000]}]))


@case("LimitError", r"trace 0: a string of 20000002 characters is over the limit of 1000000 \(max_prompt_length\)")
def huge_prompt():
    g = Builder()
    g.save(g.out())
    return attack(g.bytes(invokes=[(("w3 " * 6_666_666 + "w4 w",), {})]))


@case(None, "")
def a_prompt_longer_than_a_graph_string_runs():
    """A prompt is bounded by max_prompt_length and its tokens by max_tokens, not by max_string_length (10,000
    characters, about 2,500 tokens of English: a long document would be refused)."""
    g = Builder()
    g.save(g.out())
    return attack(g.bytes(invokes=[(("w3 " * 5_000,), {})]))


@case("LimitError", r"the graph has 1000000 nodes, over the limit of 100000 \(max_nodes\)")
def a_million_nodes():
    nodes = b",".join([b'{"index":0,"op":"stop"}'] * 1_000_000)
    body = b'{"version":1,"nodes":[' + nodes + b'],"traces":[]}'
    return attack(b"ILG\x01\x00" + struct.pack("<I", 1_000_000) + struct.pack("<Q", len(body)) + body)


@case("SerializationError", "the prefix says 1 nodes but the header holds 2")
def node_count_that_lies():
    return attack(raw([{"index": 0, "op": "stop"}, {"index": 1, "op": "stop"}], count=1))


@case(None, "")
def sixteen_thousand_stops_plan_linearly():
    g = Builder()
    g.save(g.out())
    for _ in range(16_000):
        g.add("stop")
    return attack(g.bytes())


@case(None, "")
def twenty_thousand_in_place_ops_on_a_view_chain():
    g = Builder()
    value = g.out()
    for _ in range(20_000):
        value = g.call("operator.getitem", value, slice(None))
        g.call("operator.iadd", value, 0.0)
    g.save(g.out("model.norm"))
    return attack(g.bytes())


@case("LimitError", r"the run took longer than its limit of 0.05 s \(max_seconds\)")
def past_the_deadline():
    g = Builder()
    value = g.call("torch.zeros", 64, 64)
    for _ in range(50_000):
        value = g.call("operator.add", value, 1.0)
    return attack(g.bytes(), Limits(max_seconds=0.05))


@case("CancelledError", "the run was cancelled")
def cancelled_while_running():
    cancel = threading.Event()
    cancel.set()
    g = Builder()
    g.save(g.out())
    return attack(g.bytes(), cancel=cancel)


@case("LimitError", r"the results hold \d+ bytes of tensors, over the limit of 1000 \(max_result_bytes\)")
def results_too_large():
    g = Builder()
    g.save(g.out())
    g.save(g.call("torch.zeros", 1000))
    return attack(g.bytes(), Limits(max_result_bytes=1000))


# costs that depend on more than tensor shapes -----------------------------------------------------------
@case("LimitError", r"torch.zeros would create 1099511627776 elements")
def zeros_sized_by_a_zero_d_tensor():
    g = Builder()
    g.call("torch.zeros", g.call("torch.tensor", 2**40))
    return attack(g.bytes())


@case("LimitError", r"Tensor.new_ones would create 1099511627776 elements")
def new_ones_sized_by_sums_of_tensors():
    g = Builder()
    side = g.call("operator.add", g.method("sum", g.call("torch.zeros", 2, dtype=torch.int64)), 2**20)
    g.method("new_ones", g.out(), [side, side])
    return attack(g.bytes())


@case("LimitError", r"torch.eye would create 1099511627776 elements")
def eye_with_a_tensor_for_its_columns():
    g = Builder()
    g.call("torch.eye", 1, g.call("torch.tensor", 2**40))
    return attack(g.bytes())


@case("LimitError", r"the run would create more than 10000000 elements in all \(max_total_elements\)")
def a_list_of_a_tensors_rows_costs_its_python_objects():
    g = Builder()
    rows = g.call("torch.zeros", 200_000)
    g.call("builtins.list", rows)  # 200k 0-d tensors: ~80 MB of Python objects from 800 kB of data
    return attack(g.bytes(), Limits(max_total_elements=10**7))


@case("LimitError", r"the run would create more than 10000000 elements in all \(max_total_elements\)")
def tolist_twice_costs_python_numbers():
    g = Builder()
    data = g.call("torch.zeros", 1_000_000)
    g.method("tolist", data)
    g.method("tolist", data)
    return attack(g.bytes(), Limits(max_total_elements=10**7))


@case("LimitError", r"torch.einsum would create 1600000000 elements")
def einsum_through_a_huge_intermediate():
    g = Builder()
    x = g.call("torch.zeros", 200, 200)
    g.save(g.call("torch.einsum", "ab,cd,bd->ac", x, x, x))  # ab x cd: an outer product of 1.6e9 first
    return attack(g.bytes())


@case("LimitError", r"operator.matmul would do 1.37e\+11 floating point operations.*past the run's deadline")
def one_matmul_longer_than_the_deadline():
    g = Builder()
    x = g.call("torch.zeros", 4096, 4096)
    g.save(g.call("operator.matmul", x, x))
    return attack(g.bytes(), Limits(max_seconds=1))


@case("LimitError", r"the reply would be over 1000000 bytes \(max_result_bytes\), counting each value once per place")
def a_list_repeated_by_reference_in_the_reply():
    g = Builder()
    numbers = g.method("tolist", g.call("torch.zeros", 1000))
    g.save(g.call("operator.mul", g.call("builtins.list", [numbers]), 100_000))  # 1e8 numbers to write
    return attack(g.bytes(), Limits(max_result_bytes=10**6))


@case("LimitError", r"its log line: the results hold 4000 bytes of tensors, over the limit of 1000")
def logs_count_in_the_reply():
    g = Builder()
    g.add("log", None, (g.call("torch.zeros", 1000),))
    return attack(g.bytes(), Limits(max_result_bytes=1000))


@case("LimitError", r"the results hold 536870912 bytes of tensors, over the limit of 1000")
def saving_an_expanded_view_is_counted_before_it_is_copied():
    g = Builder()
    g.save(g.method("expand", g.call("torch.zeros", 1), 2**27))  # a view of 4 bytes; 512 MiB once written
    return attack(g.bytes(), Limits(max_result_bytes=1000))


@case("LimitError", r"the prompts hold more than 100 tokens, over the limit of token positions \(max_tokens\)")
def prompts_refused_while_tokenizing():
    g = Builder()
    g.save(g.out())
    return attack(g.bytes(invokes=[(([" ".join(["w3"] * 60)] * 1000,), {})]), Limits(max_tokens=100))


# raw exceptions, and what must be allowed ---------------------------------------------------------------
@case("SerializationError", r"trace 0: trace option 'kwargs' must be a dict, not 5")
def trace_option_of_the_wrong_type():
    nodes = [{"index": 0, "op": "stop"}]
    return attack(raw(nodes, traces=[{"start": 0, "end": 1, "invokes": [{"args": ["w5"]}], "options": {"kwargs": 5}}]))


@case("SerializationError", r"trace option 'mode' must be a str, not \['trace'\]")
def trace_mode_as_a_list():
    nodes = [{"index": 0, "op": "stop"}]
    options = {"mode": {"list": ["trace"]}}
    return attack(raw(nodes, traces=[{"start": 0, "end": 1, "invokes": [{"args": ["w5"]}], "options": options}]))


@case(None, "")
def a_deep_list_in_a_log():
    g = Builder()
    value = g.call("torch.zeros", 1)
    for _ in range(3000):
        value = g.call("builtins.list", [value])
    g.add("log", None, (value,))
    return attack(g.bytes())


@case(None, "")
def skip_of_a_module_whose_output_is_larger_than_its_input():
    g = Builder()
    g.add("skip", "model.embed_tokens", (g.call("torch.zeros", 1, 3, 32),), {"call": 0, "invoke": None})
    g.save(g.out("model.norm"))
    return attack(g.bytes())


# malformed structure ------------------------------------------------------------------------------------
@case("GraphError", "a module value takes no args and the kwargs kind, call, invoke")
def module_value_without_call():
    return attack(raw([{"index": 0, "op": "module_value", "target": "lm_head", "kwargs": {"kind": "output"}}]))


@case("GraphError", "its first argument must refer to an earlier module value or grad node")
def swap_of_a_literal():
    return attack(raw([{"index": 0, "op": "swap", "args": [1, 2]}]))


@case("GraphError", "a skip takes")
def skip_without_invoke():
    return attack(raw([{"index": 0, "op": "skip", "target": "lm_head", "args": [1], "kwargs": {"call": 0}}]))


@case("GraphError", r"invoke 3 does not exist: this run has 1 invoke")
def invoke_out_of_range():
    return attack(raw([{"index": 0, "op": "module_value", "target": "lm_head",
                        "kwargs": {"kind": "output", "call": 0, "invoke": 3}, "saved": True}]))


@case("GraphError", "the model has no module 'model.layer.0'; did you mean 'model.layers.0'")
def misspelled_module_path():
    g = Builder()
    g.save(g.out("model.layer.0"))
    return attack(g.bytes())


@case("GraphError", "the model has no parameter or buffer 'lm_head.weights'; did you mean 'lm_head.weight'")
def misspelled_parameter():
    g = Builder()
    g.save(g.param("lm_head.weights"))
    return attack(g.bytes())


@case("GraphError", "grad takes a reference to a tensor node")
def grad_of_a_literal():
    return attack(raw([{"index": 0, "op": "grad", "args": [1]}]))


@case("GraphError", "operator.add takes 2 arguments, got 3")
def wrong_arity():
    return attack(raw([{"index": 0, "op": "call", "target": "operator.add", "args": [1, 2, 3]}]))


@case("GraphError", "guard %1 is not an earlier cond node")
def guard_pointing_forward():
    return attack(raw([{"index": 0, "op": "stop", "guard": 1}, {"index": 1, "op": "cond", "args": [True]}]))


@case("GraphError", "unknown op kind 'exec'")
def unknown_op():
    return attack(raw([{"index": 0, "op": "exec", "args": ["id"]}]))


@case("SerializationError", "does not follow the previous trace")
def overlapping_traces():
    nodes = [{"index": 0, "op": "stop"}, {"index": 1, "op": "stop"}]
    return attack(raw(nodes, traces=[{"start": 0, "end": 2}, {"start": 1, "end": 2}]))


@case("LimitError", r"the request has 100 traces, over the limit of 64 \(max_traces\)")
def too_many_traces():
    return attack(raw([], traces=[{"start": 0, "end": 0} for _ in range(100)]))


@case("VersionError", "uses wire format version 3, but this interlace reads version 1 or 2")
def newer_wire_version():
    return attack(raw([{"index": 0, "op": "stop"}], version=3))


def _step_block(copies, count=None, **change):
    """A block of three nodes (its step, a layer's output, that times 2) and its copies, by hand."""
    nodes = [{"index": 0, "op": "call", "target": "builtins.int", "args": [0]},
             {"index": 1, "op": "module_value", "target": "model.layers.0",
              "kwargs": {"kind": "output", "call": 0, "invoke": None}},
             {"index": 2, "op": "call", "target": "operator.mul", "args": [{"ref": 1}, 2], "saved": True}]
    return raw(nodes, repeats=[{"start": 0, "end": 3, "copies": copies, **change}], count=count)


@case(None, "")
def repeated_block_copied_by_the_reader():
    return attack(_step_block([[3, 0, 0], [6, 0, 0]]))


@case("GraphError", r"moves module calls by -1; a shift is 0 to 1024 \(max_new_tokens\)")
def repeated_block_with_a_negative_call_shift():
    return attack(_step_block([[3, -1, 0]]))


@case("GraphError", r"copy at node 4 overlaps its template or the copy before it")
def repeated_block_with_overlapping_copies():
    return attack(_step_block([[3, 0, 0], [4, 0, 0]]))


@case("LimitError", r"the repeated blocks make the graph over 100000 nodes \(max_nodes\)")
def repeated_block_copied_past_max_nodes():  # (the prefix's count says 10: the copies are counted before any is made)
    return attack(_step_block([[3 * n, 0, 0] for n in range(1, 40_000)], count=10))


@case("GraphError", r"copy at node 0 overlaps its template")
def repeated_block_whose_template_is_out_of_bounds():
    return attack(_step_block([[0, 0, 0]], start=5, end=8))


@case("SerializationError", r"value of node %1 \(call at attacker.py:1\): a DynamicCache \(the model's key/value cache\) cannot be sent")
def saving_an_object_that_is_not_data():
    g = Builder()
    g.save(g.call("operator.getitem", g.out(""), "cache"))
    return attack(g.bytes())


@case("ExecutionError", "IndexError")
def runtime_index_error_is_an_execution_error():
    g = Builder()
    g.save(g.call("operator.getitem", g.out(), (0, 99)))
    return attack(g.bytes())


# -- what sessions and model outputs added to the wire format ------------------------------------------------
@case("SerializationError", r"trace 0: ref 1 does not point to an earlier node \(there is none here\)")
def an_invoke_input_that_refers_to_a_node_of_its_own_trace():
    return attack(raw([{"index": 0, "op": "module_value", "target": "model.layers.0",
                        "kwargs": {"kind": "output", "call": 0, "invoke": None}, "saved": True},
                       {"index": 1, "op": "call", "target": "operator.neg", "args": [{"ref": 0}]}],
                      traces=[{"start": 0, "end": 2, "invokes": [{"args": [{"ref": 1}]}]}]))


@case("GraphError", r"stop takes no arguments, or a session's: \{session: true, skip_to: a later node or null\}")
def a_session_stop_that_jumps_backwards():
    return attack(raw([{"index": 0, "op": "stop", "kwargs": {"session": True, "skip_to": 0}}]))


@case("GraphError", r"stop takes no arguments, or a session's")
def a_session_stop_with_an_extra_keyword():
    return attack(raw([{"index": 0, "op": "stop", "kwargs": {"session": True, "skip_to": None, "callback": "os.system"}}]))


@case("LimitError", "max_depth")
def a_model_output_nested_past_max_depth():
    value = {"tensor": "0"}
    for _ in range(40):  # (within the JSON parser's own nesting limit)
        value = {"output": ["CausalLMOutputWithPast", [["logits", value]]]}
    return attack(raw([{"index": 0, "op": "call", "target": "operator.neg", "args": [value]}],
                      tensors={"0": torch.zeros(1)}))


def decode_a_long_error_message(length: int) -> dict:
    """A client reading a server's error whose message is one long run of path characters (a hostile or
    broken server): the locations it names are looked for word by word, never from every position."""
    import httpx

    from interlace.backends.remote import _error

    answers = {}
    for name, message in (("dashes", "-" * length), ("no file", "a" * length + ".py"),
                          ("a location", f"x/{'a' * length}.py:3 is at fault")):
        error = _error(httpx.Response(422, json={"code": "ExecutionError", "message": message}))
        answers[name] = [type(error).__name__, len(str(error))]
    return answers


# -- fuzzing ----------------------------------------------------------------------------------------------
def _seed_frames() -> list[bytes]:
    """Valid requests that run: traces recorded the usual way and a few built by hand."""
    lm = model()
    frames = []
    with lm.trace("w5 w6 w7") as tracer:
        hidden = lm.model.layers[0].output
        lm.model.layers[1].output[:, -1] = hidden[:, -1] * 2
        with tracer.cond(hidden.sum() > 0):
            lm.model.norm.output[:] = 0
        tracer.log("h", hidden[0, 0, :2])
        lm.lm_head(lm.model.norm.output).softmax(-1).save()
        lm.output.logits.argmax(-1).save()
    frames.append(serialize_graph(tracer.graph, tracer.invokes, options=tracer.spec(0).options))
    with lm.generate("w5 w6", max_new_tokens=3) as tracer:
        with tracer.all():
            lm.model.layers[0].output[:, -1] += 1.0
        lm.generator.output.save()
    request = Request(tracer.graph, [tracer.spec(len(tracer.graph))])
    frames += [serialize_request(request), serialize_request(request, version=1)]  # the block sent once, and copied
    g = Builder()
    weight = g.param("lm_head.weight")
    g.save(g.call("torch.matmul", g.out("model.norm"), g.method("t", weight)))
    g.add("skip", "model.layers.1", (g.out("model.layers.0"),), {"call": 0, "invoke": None})
    g.save(g.call("operator.getitem", g.out(""), "logits"))
    frames.append(g.bytes())
    return frames


_VALUES = [0, 1, -1, 2**31, 10**30, 0.5, float("nan"), "", "x", "__class__", "logits", True, None,
           {"ref": 0}, {"ref": 1}, {"ref": 10**6}, {"tuple": [1, {"ref": 0}]}, {"list": []}, {"slice": [None, None, -1]},
           {"tensor": "0"}, {"dtype": "float16"}, {"device": "meta"}, {"size": [10**9, 10**9]}, {"ellipsis": None},
           [1, 2], {"dict": [["a", 1]]}, "model.layers.0", "lm_head.weight", "../x", {"float": "inf"}]
_TARGETS = ["operator.add", "operator.getitem", "operator.setitem", "operator.iadd", "builtins.getattr", "torch.zeros",
            "torch.ones", "torch.arange", "torch.cat", "torch.matmul", "add_", "zero_", "copy_", "tolist", "split",
            "repeat", "expand", "append", "keys", "model.layers.0", "lm_head", "", "generator", "model.norm.weight",
            "torch.nn.functional.softmax", "builtins.list", "nonexistent", None, 7]


def _mutate(data: bytes, rng) -> bytes:
    choice = rng.random()
    if choice < 0.2:  # bytes
        corrupt = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            corrupt[rng.randrange(len(corrupt))] = rng.randrange(256)
        return bytes(corrupt)
    length = struct.unpack_from("<Q", data, 9)[0]
    header, section = json.loads(data[17 : 17 + length]), data[17 + length :]
    nodes, repeats = header["nodes"], header.get("repeats", [])
    for _ in range(rng.randint(1, 3)):
        node = rng.choice(nodes) if nodes else None
        what = rng.randrange(10 if repeats else 9)
        if what == 9:  # a repeated block's span or a copy's place, call shift or step
            repeat = rng.choice(repeats)
            if rng.random() < 0.3:
                repeat[rng.choice(["start", "end"])] += rng.choice([-2, -1, 1, 2, 10**6])
            else:
                copy = rng.choice(repeat["copies"])
                copy[rng.randrange(3)] = rng.choice([-1, 0, 1, 3, 1024, 1025, 10**6, 2**40])
        elif node is None or what == 0:
            header["traces"][0]["options"] = {"mode": rng.choice(["trace", "generate", "x"]),
                                              "kwargs": {"dict": [["max_new_tokens", rng.choice(_VALUES[:5])]]}}
        elif what == 1:
            node["op"] = rng.choice(sorted(interlace.graph.OPS))
        elif what == 2:
            node["target"] = rng.choice(_TARGETS)
        elif what == 3:
            args = node.setdefault("args", [])
            if args and rng.random() < 0.7:
                args[rng.randrange(len(args))] = rng.choice(_VALUES)
            else:
                args.append(rng.choice(_VALUES))
        elif what == 4:
            node["kwargs"] = {rng.choice(["kind", "call", "invoke", "dim", "out", "inplace", "optional"]): rng.choice(_VALUES)}
        elif what == 5:
            node["guard"] = rng.choice([0, 1, len(nodes) - 1, -1])
        elif what == 6:
            node["saved"] = not node.get("saved", False)
        elif what == 7:  # move or duplicate a node, renumbering
            nodes.insert(rng.randrange(len(nodes) + 1), dict(rng.choice(nodes)))
            for number, item in enumerate(nodes):
                item["index"] = number
            header["traces"][-1]["end"] = len(nodes)
        else:
            node["location"] = [rng.choice(["/proc/self/environ", "/dev/zero", "x.py"]), rng.choice([1, 10**9])]
    text = json.dumps(header).encode()
    count = len(nodes) + sum(len(r["copies"]) * (r["end"] - r["start"]) for r in repeats)
    return data[:5] + struct.pack("<I", min(max(count, 0), 2**32 - 1)) + struct.pack("<Q", len(text)) + text + section


def fuzz(seed: int, count: int) -> dict:
    """`count` random mutations of valid requests; every outcome must be success or an interlace error."""
    import random

    rng = random.Random(seed)
    frames = _seed_frames()
    for frame in frames:
        result = attack(frame)
        assert result["error"] is None and result["changes"] == [], result
    report = {"mutations": 0, "ran": 0, "other_errors": [], "changed": []}
    limits = Limits(max_seconds=10, max_elements=1 << 24, max_total_elements=1 << 26)
    for _ in range(count):
        mutant = _mutate(rng.choice(frames), rng)
        result = attack(mutant, limits)
        report["mutations"] += 1
        report["ran"] += result["error"] in (None, "ExecutionError", "ModelError", "OutOfOrderError", "RefusedError",
                                             "LimitError")
        if result["error"] is not None and not result["interlace"]:
            report["other_errors"].append(f"{result['error']}: {result['message'][:300]}")
        if result["changes"]:
            report["changed"].append(result["changes"])
    return report
