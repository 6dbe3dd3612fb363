"""Untrusted graphs: what a server does with a stranger's request, attacked the way a stranger would.

Every hostile request in `tests/hostile.py` runs in a child process capped in memory and time
(`capped.Worker`), so a bomb that got through would kill only that child and fail its test. Each
asserts the exact error class, its message, and that the model and torch's global state are exactly
as before (every parameter and buffer bit for bit, requires_grad, .grad, hooks, instance forward), but
where a case's write gets past the schema check on purpose: then the changes are the ones it names.
"""

import operator
import re
import subprocess
import sys
import threading

import pytest
import torch
import transformers

import interlace
from capped import Worker
from helpers import MLP, assert_clean, check_without_refusing, tiny_tokenizer
from hostile import CASES, Builder, model
from interlace.backends.state import ModelState
from interlace.backends.tree import ModelTree
from interlace.backends.limits import Limits
from interlace.backends.serialize import deserialize_request, serialize_graph
from interlace.backends.writes import WriteCheck
from interlace.errors import RefusedError, ServiceError, WeightsChangedError
from interlace.server.hosting import HostedModel


@pytest.fixture(scope="module")
def worker():
    worker = Worker("hostile")
    yield worker
    worker.close()


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_request(worker, name):
    error, pattern, _, changes = CASES[name]
    answer = worker.run("run_case", name, memory_mb=1536, seconds=60)
    assert "ok" in answer, answer["died"]
    result = answer["ok"]
    assert result["error"] == error, result["message"]
    if error is not None:
        assert result["interlace"], result["message"]
        assert re.search(pattern, result["message"], re.MULTILINE), result["message"]
    assert result["changes"] == changes


def test_a_client_reads_a_long_error_message_from_a_server_in_bounded_time(worker):
    answer = worker.run("decode_a_long_error_message", 1_000_000, memory_mb=1536, seconds=20)
    assert "ok" in answer, answer["died"]
    assert answer["ok"] == {"dashes": ["ExecutionError", 1_000_000], "no file": ["ExecutionError", 1_000_003],
                            "a location": ["ExecutionError", 1_000_000 + len("x/.py:3 is at fault")]}


def test_there_are_at_least_forty_hostile_cases():
    assert len(CASES) >= 40


def test_fuzzed_frames_give_only_interlace_errors_and_never_change_the_model(worker):
    answer = worker.run("fuzz", 0, 2500, memory_mb=1536, seconds=300)
    assert "ok" in answer, answer["died"]
    report = answer["ok"]
    assert report["other_errors"] == [] and report["changed"] == []
    assert report["mutations"] == 2500 and report["ran"] > 100  # many mutants got as far as running


# -- what a local user gets -----------------------------------------------------------------------------
def test_a_local_trace_may_change_a_weight_for_its_run_only():
    torch.manual_seed(0)
    mlp = MLP().eval()
    net = interlace.Model(mlp)
    x = torch.randn(2, 3)
    before = {name: p.detach().clone() for name, p in mlp.named_parameters()}
    with net.trace(x):
        net.head.weight[:] = 0  # a parameter, changed in place for this run
        net.layers[0].linear.bias.T.mul_(2.0)  # through a view
        out = net.output.save()
    assert torch.equal(out, mlp.head.bias.detach().expand(2, -1))  # the change took effect in the run
    for name, p in mlp.named_parameters():
        assert torch.equal(p, before[name]), name  # and is gone after it
    assert_clean(mlp)


def test_skip_puts_back_the_instance_forward_that_was_there():
    torch.manual_seed(0)
    mlp = MLP().eval()
    original = mlp.layers[1].forward

    def wrapped(*args, **kwargs):  # what accelerate's hooks install on a dispatched model
        return original(*args, **kwargs)

    mlp.layers[1].forward = wrapped
    net = interlace.Model(mlp)
    with net.trace(torch.randn(2, 3)):
        net.layers[1].skip(net.layers[1].input)
        out = net.output.save()
    assert mlp.layers[1].__dict__["forward"] is wrapped
    assert out.shape == (2, 5)


def test_backward_in_a_trace_leaves_existing_gradients_untouched():
    torch.manual_seed(0)
    mlp = MLP()
    x = torch.randn(2, 3)
    mlp(x).sum().backward()
    grads = {name: p.grad.clone() for name, p in mlp.named_parameters()}
    net = interlace.Model(mlp)
    with net.trace(x):
        grad = net.layers[0].output.grad.save()
        net.output.sum().backward()
    assert grad.shape == (2, 8)
    for name, p in mlp.named_parameters():
        assert torch.equal(p.grad, grads[name]), name  # not accumulated into


def test_untrusted_run_of_a_good_request_equals_the_local_trace():
    torch.manual_seed(0)
    mlp = MLP().eval()
    net = interlace.Model(mlp)
    x = torch.randn(2, 3)
    with net.trace(x) as tracer:
        net.layers[1].output[:, 0] = 0
        hidden = net.layers[2].output.save()
        tracer.log("mean", net.layers[0].output.mean())
        out = net.output.save()
    state = ModelState(mlp)
    request = deserialize_request(serialize_graph(tracer.graph, tracer.invokes, options=tracer.spec(0).options))
    outcome = net.run(request, untrusted=True, limits=Limits())
    saved = [i for i in range(len(tracer.graph)) if tracer.graph[i].saved]
    assert torch.equal(outcome.results[saved[0]], hidden) and torch.equal(outcome.results[saved[1]], out)
    assert outcome.logs[0][1][0] == "mean" and torch.equal(outcome.logs[0][1][1], mlp.layers[0](mlp.embed(x)).mean())
    assert state.diff() == []
    assert_clean(mlp)


def test_an_untrusted_runs_warning_never_reads_the_file_a_location_names(monkeypatch, tmp_path):
    """A local trace's BatchIndexWarning is the user's line's (its source line is read to show it); a stranger's
    request names files of the server's disk as its lines' locations: its warning reads none of them."""
    import linecache
    import warnings

    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2, vocab_size=50)).eval()
    net = interlace.Model(model)
    with net.trace(torch.tensor([[1, 2, 3], [4, 5, 6]])) as tracer:
        net.model.layers[0].output[0].save()
    secret = tmp_path / "secret.py"
    secret.write_text("the server's own file\n")
    for node in tracer.graph.nodes:
        node._location = (str(secret), 1)
    request = deserialize_request(serialize_graph(tracer.graph, tracer.invokes, options=tracer.spec(0).options))
    read = []
    monkeypatch.setattr(linecache, "getline", lambda filename, lineno, *rest: read.append(filename) or "")
    interlace.backends.local._warned_paths.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net.run(request, untrusted=True, limits=Limits())
        for warning in caught:
            warnings.formatwarning(warning.message, warning.category, warning.filename, warning.lineno)
    assert [w.category for w in caught] == [interlace.BatchIndexWarning]
    assert str(secret) not in read and caught[0].filename != str(secret)


class _Attaching(torch.nn.Module):
    """A forward that leaves things on its modules, as transformers' output capturing does."""

    def __init__(self, hook: bool, attribute: bool):
        super().__init__()
        self.inner, self.hook, self.attribute = torch.nn.Linear(3, 3), hook, attribute

    def forward(self, x):
        if self.hook:
            self.inner.register_forward_hook(lambda module, args, output: output * 2)
        if self.attribute:
            self.inner.captured = True
        return self.inner(x)


@pytest.mark.parametrize("hook, attribute", [(False, False), (True, False), (False, True), (True, True)])
def test_an_untrusted_run_takes_off_what_the_forward_attached_and_its_own_hooks(hook, attribute):
    torch.manual_seed(0)
    module = _Attaching(False, False)
    net = interlace.Model(module)
    x = torch.randn(2, 3)
    with net.trace(x) as tracer:  # (a local trace: what a forward attaches there stays)
        net.inner.output.save()  # (its hook runs before the one the forward adds: registered first)
        net.output.save()
    module.hook, module.attribute = hook, attribute
    request = deserialize_request(serialize_graph(tracer.graph, tracer.invokes, options=tracer.spec(0).options))
    inner, out = [i for i in range(len(tracer.graph)) if tracer.graph[i].saved]
    kept = torch.nn.Linear(3, 3)  # a hook registered on another model meanwhile is not this run's to take off
    kept.register_forward_hook(lambda *args: None)
    linear = torch.nn.functional.linear(x, module.inner.weight, module.inner.bias)
    for _ in range(2):  # the second run would double twice if the first's hook had stayed
        outcome = net.run(request, untrusted=True, limits=Limits())
        assert torch.equal(outcome.results[inner], linear)
        assert torch.equal(outcome.results[out], linear * 2 if hook else linear)
        assert not module.inner._forward_hooks and not module._forward_hooks and not module._forward_pre_hooks
        assert "captured" not in vars(module.inner)
    assert len(kept._forward_hooks) == 1


def test_an_untrusted_run_may_not_write_a_gradient_the_weights_hold():
    """The weights the write check guards are listed once per model; a gradient the graph reaches through a
    parameter node's `.grad` is guarded as the node reads it."""
    torch.manual_seed(0)
    mlp = MLP()
    net = interlace.Model(mlp)
    x = torch.randn(2, 3)
    with net.trace(x) as tracer:
        pass
    net.run(deserialize_request(serialize_graph(tracer.graph, tracer.invokes)), untrusted=True, limits=Limits())
    mlp(x).sum().backward()  # a gradient on every weight, made after the weights were listed
    grad = mlp.head.weight.grad.clone()
    g = Builder()
    g.method("add_", g.call("builtins.getattr", g.param("head.weight"), "grad"), 1)
    with pytest.raises(RefusedError, match="would change a weight"):
        net.run(deserialize_request(serialize_graph(g.graph, tracer.invokes)), untrusted=True, limits=Limits())
    assert torch.equal(mlp.head.weight.grad, grad)


def test_a_module_call_is_rehearsed_once_per_model_and_shape_in_a_bounded_cache(monkeypatch):
    """Rehearsing a module call on the meta device costs milliseconds: it is kept with the model, for later
    requests too, by the call's shapes, and at most `REHEARSALS` of them."""
    from interlace.backends import guard as guard_module

    rehearsed, rehearse = [], guard_module.rehearse
    monkeypatch.setattr(guard_module, "rehearse", lambda *args: rehearsed.append(args[2][0].shape[0]) or rehearse(*args))
    monkeypatch.setattr(guard_module, "REHEARSALS", 2)
    torch.manual_seed(0)
    mlp = MLP().eval()
    net = interlace.Model(mlp)
    for rows in (2, 2, 3, 2, 4, 2):  # a third shape pushes out the oldest
        x = torch.randn(rows, 3)
        with net.trace(x) as tracer:
            net.head(net.layers[0].output).save()  # the head called on layer 0's output
        request = deserialize_request(serialize_graph(tracer.graph, tracer.invokes, options=tracer.spec(0).options))
        [value] = net.run(request, untrusted=True, limits=Limits()).results.values()
        assert torch.equal(value, mlp.head(mlp.layers[0](mlp.embed(x))))
    assert rehearsed == [2, 3, 4, 2]


def test_a_function_call_handed_a_weight_runs_under_the_operator_check_once_per_shapes(monkeypatch):
    """A logit lens's `h @ head.weight.T`: its operators declare no write, so after its first call (under the check)
    a call of the same function on arguments of the same shapes runs as it is, in later requests too; other shapes
    are checked again. The values are the plain computation's."""
    from interlace.backends import guard as guard_module

    checks = []
    monkeypatch.setattr(guard_module, "WriteCheck", lambda *args, **kwargs: checks.append(args[1]) or WriteCheck(*args, **kwargs))
    torch.manual_seed(0)
    mlp = MLP().eval()
    net = interlace.Model(mlp)
    per_request = []
    for rows in (2, 2, 3):
        x = torch.randn(rows, 3)
        with net.trace(x) as tracer:
            (net.layers[1].output @ net.head.weight.T).argmax(-1).save()
        request = deserialize_request(serialize_graph(tracer.graph, tracer.invokes, options=tracer.spec(0).options))
        checks.clear()
        [value] = net.run(request, untrusted=True, limits=Limits()).results.values()
        per_request.append(list(checks))
        with torch.no_grad():
            assert torch.equal(value, (mlp.layers[1](mlp.layers[0](mlp.embed(x))) @ mlp.head.weight.T).argmax(-1))
    # the weight's `.T` has the same shape in every request; the product's first operand has 3 rows in the last
    assert per_request == [["builtins.getattr", "operator.matmul"], [], ["operator.matmul"]]


def test_a_function_call_that_skipped_the_operator_check_and_wrote_a_weight_fails_the_run(monkeypatch):
    """Which operators a call runs follows from its function and its arguments' shapes: were a function to write on
    its second call what its first call left alone, the weights' version counters, compared after every call that
    was handed one, fail the run. A call whose operators declared a write (here to a tensor it was handed, which
    is allowed) is never taken for one that writes nothing."""
    from interlace.backends import guard as guard_module

    checks = []
    monkeypatch.setattr(guard_module, "WriteCheck", lambda *args, **kwargs: checks.append(args[1]) or WriteCheck(*args, **kwargs))
    calls = []

    def reads_then_writes(w):
        calls.append(len(calls))
        if len(calls) == 2:
            with torch.no_grad():
                w.mul_(2)
        return w * 1

    def adds_to_what_it_is_handed(w, out):
        return out.add_(w)

    mlp = MLP().eval()
    weight, y = mlp.head.weight, torch.zeros(5, 8)
    guard = guard_module.Guard(mlp, untrusted=True)
    guard.call("reads", reads_then_writes, (weight,), {})
    with pytest.raises(WeightsChangedError, match="head.weight"):
        guard.call("reads", reads_then_writes, (weight,), {})
    assert checks == ["reads"]  # the second call ran as it is: the counters caught it
    guard = guard_module.Guard(MLP().eval(), untrusted=True)
    weight = guard.root.head.weight
    for _ in range(2):
        guard.call("adds", adds_to_what_it_is_handed, (weight, y), {})
    assert checks == ["reads", "adds", "adds"] and torch.equal(y, 2 * weight.detach())
    assert ModelTree.of(guard.root).pure_calls == {}


def test_a_pure_call_is_kept_only_under_a_small_key():
    """The keys stay with the model across requests: a call handed a long list or a long string (a stranger's
    choice) runs under the check every time rather than leave its arguments' description there."""
    from interlace.backends.guard import Guard

    mlp = MLP().eval()
    guard, weight, kept = Guard(mlp, untrusted=True), mlp.head.weight, ModelTree.of(mlp).pure_calls
    parts = guard.call("torch.cat", torch.cat, ([weight] * 40,), {})
    assert torch.equal(parts, torch.cat([weight.detach()] * 40)) and kept == {}
    guard.call("torch.einsum", torch.einsum, ("ij," * 20 + "ij->ij", *[weight] * 21), {})
    assert kept == {}
    guard.call("torch.cat", torch.cat, ([weight] * 4,), {})
    assert len(kept) == 1


class _Writes(torch.nn.Module):
    """A module with a weight whose forward is `body(module, x)`."""

    def __init__(self, body, width: int = 3):
        super().__init__()
        self.weight, self.body = torch.nn.Parameter(torch.ones(width)), body

    def forward(self, x):
        return self.body(self, x)


def _scaled_in_place(module, x):
    """Doubles its own weight (on every device), then scales by it."""
    with torch.no_grad():
        module.weight.mul_(2)
    return x * module.weight


def _scaled_in_place_off_meta(module, x):
    """Doubles its own weight where a rehearsal on the meta device cannot see it."""
    if x.device.type != "meta":
        return _scaled_in_place(module, x)
    return x * module.weight


class _Writers(torch.nn.Module):
    """An MLP with modules the forward never calls, for graphs to call: one that writes its own weight where its
    operators say so, one that writes it only off the meta device (where a rehearsal cannot see it), and an
    in-place ReLU (which writes its argument)."""

    def __init__(self):
        super().__init__()
        self.net = MLP()
        self.declared = _Writes(_scaled_in_place, 8)
        self.hidden = _Writes(_scaled_in_place_off_meta, 8)
        self.act = torch.nn.ReLU(inplace=True)

    def forward(self, x):
        return self.net(x)


def _untrusted(net, path: str, argument):
    """A graph that calls module `path` on `argument(g)` (a Builder) and saves it, run on 2 rows as a server runs
    it (untrusted): the saved value. (Written by hand: a trace would run it here first.)"""
    g = Builder()
    g.save(g.add("module_call", path, (argument(g),)))
    request = deserialize_request(g.bytes([((torch.randn(2, 3),), {})]))
    [value] = net.run(request, untrusted=True, limits=Limits()).results.values()
    return value


def test_a_module_call_whose_rehearsal_writes_nothing_outside_it_runs_without_the_operator_check(monkeypatch):
    """The head and a whole block: their operators write only what they make, so the call runs as it is
    (the dispatch mode costs ~0.2 ms a call) and equals the module called by hand."""
    from interlace.backends import guard as guard_module

    checks = []
    monkeypatch.setattr(guard_module, "WriteCheck", lambda *args, **kwargs: checks.append(args[1]) or WriteCheck(*args, **kwargs))
    torch.manual_seed(0)
    writers = _Writers().eval()
    net = interlace.Model(writers)
    x = torch.randn(2, 3)
    with net.trace(x) as tracer:
        net.net.head(net.net.layers[1](net.net.layers[0].output)).save()
        net.act(net.net.layers[0].output * 1).save()  # an in-place ReLU of a value the graph made: allowed
    request = deserialize_request(serialize_graph(tracer.graph, tracer.invokes, options=tracer.spec(0).options))
    head, act = (value for _, value in sorted(net.run(request, untrusted=True, limits=Limits()).results.items()))
    mlp = writers.net
    hidden = mlp.layers[0](mlp.embed(x))
    assert torch.equal(head, mlp.head(mlp.layers[1](hidden))) and torch.equal(act, torch.relu(hidden))
    assert checks == ["calling act"]  # the ReLU writes its argument: it runs under the check, which allows that


def _made_and_written(module, x):
    parts = [x * 1, x * 2]
    torch._foreach_mul_(parts, 2)  # (an operator that writes a list and returns nothing)
    y = parts[0] + parts[1]
    y.view(-1).add_(1)  # through a view of what the call made
    return y * module.weight


@pytest.mark.parametrize("body, writes", [
    (_made_and_written, False),
    (lambda module, x: torch._foreach_mul_([module.weight], 2) or x, True),  # its weight
    (lambda module, x: (x.view(-1)[:1].mul_(2), x)[1], True),  # its argument, through a view of it
], ids=["what_it_made", "its_weight", "its_argument"])
def test_a_rehearsal_tells_writes_to_what_the_call_made_from_writes_outside_it(body, writes):
    from interlace.backends.sizes import rehearse

    assert rehearse(_Writes(body), "m", (torch.randn(2, 3),), {})[3] is writes


def test_a_module_call_that_would_write_its_weight_or_a_weight_it_is_handed_is_refused_before_the_write():
    torch.manual_seed(0)
    writers = _Writers().eval()
    net = interlace.Model(writers)
    state = ModelState(writers)
    with pytest.raises(RefusedError, match=r"calling declared \(through aten.mul_.Tensor, which writes its argument "
                                           r"'self'\) would change a weight"):
        _untrusted(net, "declared", lambda g: g.out("net.layers.0"))
    with pytest.raises(RefusedError, match=r"calling act \(through aten.relu_.default, .*\) would change a weight"):
        _untrusted(net, "act", lambda g: g.param("net.layers.0.linear.bias"))
    assert state.diff() == []


def test_a_write_a_module_makes_only_off_the_meta_device_fails_the_run_by_the_version_counters():
    """The rehearsal cannot see it, so the call runs without the operator check; the counters of the module's
    weights are compared after the call (the second line), and the run fails naming the weight."""
    torch.manual_seed(0)
    writers = _Writers().eval()
    net = interlace.Model(writers)
    with pytest.raises(WeightsChangedError, match=r"calling hidden changed weight\(s\) hidden.weight of the shared model") as caught:
        _untrusted(net, "hidden", lambda g: g.out("net.layers.0"))
    assert caught.value.changed == ["hidden.weight"] and torch.equal(writers.hidden.weight, torch.full((8,), 2.0))


def test_a_logit_lens_copies_no_weight_and_equals_the_local_run(monkeypatch):
    """lm_head.weight handed to a call (the write check sees it) is read in place: no copy of any storage."""
    lm = model()
    g = Builder()
    head = g.call("builtins.getattr", g.param("lm_head.weight"), "T")
    g.save(g.call("torch.matmul", g.out("model.norm"), head))
    request = deserialize_request(g.bytes())
    local = lm.run(request).results
    clones = []
    clone = torch.UntypedStorage.clone
    monkeypatch.setattr(torch.UntypedStorage, "clone", lambda storage, *a, **k: clones.append(storage.nbytes())
                        or clone(storage, *a, **k))
    untrusted = lm.run(request, untrusted=True, limits=Limits()).results
    assert clones == []
    assert local.keys() == untrusted.keys() and all(torch.equal(local[k], untrusted[k]) for k in local)


def _unchecked_writes(monkeypatch):
    """The first line refuses nothing (an operator whose schema does not declare its write); the counters stay."""
    monkeypatch.setattr(WriteCheck, "_check", check_without_refusing)


def test_a_hosted_model_whose_weights_a_job_changed_runs_no_more_jobs(monkeypatch):
    torch.manual_seed(0)
    mlp = MLP().eval()
    net = interlace.Model(mlp)
    x = torch.randn(2, 3)
    g = Builder()
    g.call("torch.nn.functional.hardtanh", g.param("head.weight"), -1e-3, 1e-3, True)
    damaging = deserialize_request(g.bytes([((x,), {})]))
    g = Builder()
    g.save(g.out(""))
    good = deserialize_request(g.bytes([((x,), {})]))
    hosted = HostedModel(net, name="mlp", limits=Limits())
    _unchecked_writes(monkeypatch)
    before = mlp.head.weight.detach().clone()
    [error] = hosted.execute_many([damaging], limits=Limits(), cancels=[threading.Event()])
    assert isinstance(error, WeightsChangedError) and error.changed == ["head.weight"], error
    assert "The weights stay changed: the server must reload the model" in str(error)
    assert not torch.equal(mlp.head.weight, before)  # nothing was kept to put back
    assert hosted.broken == ["head.weight"]
    calls = []
    mlp.register_forward_pre_hook(lambda module, args: calls.append(1))
    [refused] = hosted.execute_many([good], limits=Limits(), cancels=[threading.Event()])
    assert isinstance(refused, ServiceError) and (refused.status, refused.code) == (503, "model_damaged")
    assert str(refused) == (
        "an earlier job changed weight(s) head.weight of the model 'mlp' in a way the server could not prevent or "
        "undo, so it runs no more jobs on them: the server must be restarted to load the model again (tell its "
        "operator); then submit the job again")
    assert calls == []  # refused before anything ran
    assert hosted.damage() == ["weight(s) head.weight changed by a job: the model runs no more jobs until the "
                               "server is restarted"]


def test_a_server_pays_torchs_first_dispatch_mode_when_it_starts_and_size_rules_import_nothing():
    """torch imports its compiler and sympy (seconds) on the first dispatch mode and the first
    torch.broadcast_shapes: a hosted model enters the write check once when it is made, and the size
    rules that broadcast (an add, a batched matmul, a tensor index) work shapes out themselves, so a new
    server's (or a restarted worker's) first request does not take seconds."""
    script = """
import operator, sys, torch, interlace
from interlace.backends import sizes
from interlace.backends.limits import Limits
x = torch.ones(3, 2, 4)
bounds = (sizes.RULES["broadcast"]((x, torch.ones(4)), {}, Limits(), torch.add),
          sizes.RULES["matmul"]((x, torch.ones(1, 4, 2)), {}, Limits(), torch.matmul)[0],
          sizes.RULES["index"]((x, torch.tensor([0, 2])), {}, Limits(), operator.getitem))
print(bounds, "sympy" in sys.modules)
from interlace.server.hosting import HostedModel
HostedModel(interlace.Model(torch.nn.Linear(2, 2)), name="m", limits=Limits())
print("torch._dynamo" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["(24, 12, 16) False", "True"]


def test_model_state_sees_every_kind_of_change():
    torch.manual_seed(0)
    mlp = MLP()
    state = ModelState(mlp)
    mlp.head.weight.data[0, 0] += 1
    mlp.embed.bias.requires_grad_(False)
    mlp.layers[0].register_forward_hook(lambda *a: None)
    mlp.layers[1].forward = lambda x: x
    mlp.head.bias.grad = torch.ones(5)
    mlp.embed.weight.register_hook(lambda g: g)
    mlp.head._output_capturing_hooks_installed = True  # what transformers leaves after output_attentions
    mlp.head.in_features = 9
    torch.set_default_dtype(torch.float64)
    changes = state.diff()
    assert set(changes) == {
        "head.weight: values changed", "embed.bias: requires_grad True -> False",
        "layers.0: _forward_hooks changed", "layers.1: instance forward changed", "head.bias: .grad changed",
        "embed.weight: tensor hooks changed", "torch global default_dtype: torch.float32 -> torch.float64",
        "head: instance attribute '_output_capturing_hooks_installed' added",
        "head: instance attribute 'in_features' changed",
    }
    state.restore()
    assert state.diff() == []
    assert torch.get_default_dtype() == torch.float32
    assert "_output_capturing_hooks_installed" not in mlp.head.__dict__ and mlp.head.in_features == 8


def test_a_long_prompt_leaves_a_dynamic_rope_as_it_was_for_the_next_job():
    """A dynamic RoPE's forward registers a new `inv_freq` and sets `max_seq_len_cached` for a prompt past
    its positions, and later calls use them: another user's next job must compute what it computes on a
    model that never saw that prompt."""
    def dynamic_rope():
        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=100, max_position_embeddings=16, pad_token_id=0, eos_token_id=None,
            rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
        return interlace.LanguageModel(transformers.AutoModelForCausalLM.from_config(config).eval(),
                                       tokenizer=tiny_tokenizer())

    def logits_of(lm, words):
        with lm.trace(" ".join(f"w{3 + i % 90}" for i in range(words))) as tracer:
            logits = lm.output.logits.save()
        return deserialize_request(serialize_graph(tracer.graph, tracer.invokes, options=tracer.spec(0).options)), \
            tracer.graph.saved()[0], logits

    lm, fresh, recorder = dynamic_rope(), dynamic_rope(), dynamic_rope()
    request, saved, _ = logits_of(recorder, 20)  # past the 16 positions, within what the long prompt grows it to
    long, _, _ = logits_of(recorder, 40)
    state = ModelState(lm.module)
    lm.run(long, untrusted=True)
    assert state.diff() == []
    torch.testing.assert_close(lm.run(request, untrusted=True).results[saved], logits_of(fresh, 20)[2],
                               rtol=0, atol=0)


def test_a_longrope_forward_writing_back_its_frequencies_runs_untrusted_and_other_buffer_writes_fail():
    """A LongRoPE forward copies its short frequencies into `inv_freq` in place on every call (values it
    already holds): untrusted runs of it give the local numbers, while a forward that writes a buffer other
    values still fails the run."""
    torch.manual_seed(0)
    config = transformers.Phi3Config(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=100, max_position_embeddings=64, original_max_position_embeddings=16, pad_token_id=0,
        eos_token_id=None, rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 4,
                                            "long_factor": [2.0] * 4, "original_max_position_embeddings": 16})
    lm = interlace.LanguageModel(transformers.AutoModelForCausalLM.from_config(config).eval(), tokenizer=tiny_tokenizer())
    with lm.trace("w5 w6 w7") as tracer:
        logits = lm.output.logits.save()
    request = deserialize_request(serialize_graph(tracer.graph, tracer.invokes, options=tracer.spec(0).options))
    inv_freq = lm.module.model.rotary_emb.inv_freq
    before = inv_freq._version
    for _ in range(2):
        torch.testing.assert_close(lm.run(request, untrusted=True).results[tracer.graph.saved()[0]], logits,
                                   rtol=0, atol=0)
    assert inv_freq._version > before  # (written in place, with the values it held)

    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("calls", torch.zeros(1))

        def forward(self, x):
            self.calls += 1
            return x * 2

    counting = interlace.Model(Counting())
    g = Builder()
    g.save(g.out(""))
    with pytest.raises(WeightsChangedError, match="changed weight.s. calls of the shared model"):
        counting.run(deserialize_request(g.bytes([((torch.ones(2),), {})])), untrusted=True)


class _ChangesItselfWhenAsked(torch.nn.Module):
    """A model whose own forward, for an input whose first value is negative, writes its buffer in place (a write
    no graph operation makes: only the counters read at the end of the run see it), or replaces an attribute,
    adds one and adds a hook (as a dynamic RoPE and transformers' output capture do)."""

    def __init__(self, writes: bool):
        super().__init__()
        self.linear = torch.nn.Linear(3, 3)
        self.register_buffer("scale", torch.ones(3))
        self.writes, self.limit = writes, 1.0

    def forward(self, x):
        if x[0, 0] < 0 and self.writes:
            self.scale.mul_(2.0)
        elif x[0, 0] < 0:
            self.limit, self.seen = 2.0, True
            self.linear.register_forward_hook(lambda module, args, output: output * 0)
        return self.linear(x) * self.scale * self.limit


def _output_of(x) -> "interlace.graph.Request":
    g = Builder()
    g.save(g.out(""))
    return deserialize_request(g.bytes([((x,), {})]))


def test_a_hosted_models_runs_start_from_what_the_last_run_read_and_still_catch_a_write_by_its_forward():
    torch.manual_seed(0)
    module = _ChangesItselfWhenAsked(writes=True).eval()
    hosted = HostedModel(interlace.Model(module), name="m", limits=Limits())  # (a hosted model is held)
    tree = ModelTree.of(module)
    expected = module(torch.ones(2, 3)).detach()
    for _ in range(2):
        [answer] = hosted.execute_many([_output_of(torch.ones(2, 3))], limits=Limits(), cancels=[threading.Event()])
        assert not isinstance(answer, Exception), answer
        assert tree.versions is not None and tree.copies is not None  # what the next run starts from
    [error] = hosted.execute_many([_output_of(-torch.ones(2, 3))], limits=Limits(), cancels=[threading.Event()])
    assert isinstance(error, WeightsChangedError) and error.changed == ["scale"], error
    assert hosted.broken == ["scale"] and torch.equal(module.scale, torch.full((3,), 2.0))
    assert torch.equal(module(torch.ones(2, 3)), expected * 2)  # (the write happened: nothing was kept)


def test_a_held_models_runs_put_back_what_its_forward_left_from_the_copies_the_last_run_left():
    torch.manual_seed(0)
    module = _ChangesItselfWhenAsked(writes=False).eval()
    net = interlace.Model(module)
    ModelTree.hold(module)
    ones = _output_of(torch.ones(2, 3))
    first = net.run(ones, untrusted=True).results
    assert ModelTree.of(module).copies is not None
    net.run(_output_of(-torch.ones(2, 3)), untrusted=True)
    assert (module.limit, "seen" in vars(module), len(module.linear._forward_hooks)) == (1.0, False, 0)
    again = net.run(ones, untrusted=True).results
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    ModelTree.hold(module, False)  # other code may change it again: each run reads everything
    assert ModelTree.of(module).copies is None
    net.run(ones, untrusted=True)
    assert ModelTree.of(module).copies is None and ModelTree.of(module).versions is None


def test_a_held_models_counters_are_read_again_after_interlace_put_a_weight_back():
    """A local trace that wrote a weight, and `ModelState.restore`, put weights back with `copy_`, which moves
    their counters: the next untrusted run must not take that for its own write."""
    torch.manual_seed(0)
    mlp = MLP().eval()
    net = interlace.Model(mlp)
    ModelTree.hold(mlp)
    x = torch.randn(2, 3)
    request = _output_of(x)
    expected = net.run(request, untrusted=True).results
    with net.trace(x):
        net.head.weight[:] = 0  # (copied first, put back after the trace)
    assert net.run(request, untrusted=True).results.keys() == expected.keys()
    state = ModelState(mlp)
    with torch.no_grad():
        mlp.head.weight.add_(1.0)
    state.restore()
    after = net.run(request, untrusted=True).results
    assert all(torch.equal(after[k], expected[k]) for k in expected)


def _steering_request(net, x, *, set_to=None):
    """`layers[1].output[:, 0] += 0.5` (or `= set_to`) and the output saved, recorded locally, as bytes a server reads."""
    with net.trace(x) as tracer:
        if set_to is None:
            net.layers[1].output[:, 0] += 0.5
        else:
            net.layers[1].output[:, 0] = set_to
        net.output.save()
    return deserialize_request(serialize_graph(tracer.graph, tracer.invokes, options=tracer.spec(0).options))


@pytest.mark.parametrize("set_to", [None, 2.0], ids=["x[k] += c", "x[k] = c"])
def test_an_untrusted_steering_edit_done_by_the_hook_checks_and_counts_what_its_nodes_would(monkeypatch, set_to):
    """The module's hook does `x[k] op= c` itself in an untrusted run too (`Interleaver._checked_edit`): the same
    numbers as a hand-written hook, and the same elements counted against the run's budget as the node-by-node
    path, so the same limit stops it."""
    from interlace.backends import guard as guard_module, local

    torch.manual_seed(0)
    mlp = MLP().eval()
    net = interlace.Model(mlp)
    x = torch.randn(2, 3)

    def change(module, args, output):
        output = output.clone()
        output[:, 0] = output[:, 0] + 0.5 if set_to is None else set_to
        return output

    handle = mlp.layers[1].register_forward_hook(change)
    with torch.no_grad():
        expected = mlp(x)
    handle.remove()
    request = _steering_request(net, x, set_to=set_to)
    edits, counted = [], []
    checked_edit, add = local.Interleaver._checked_edit, guard_module.Guard._add
    monkeypatch.setattr(local.Interleaver, "_checked_edit",
                        lambda self, *args: edits.append(checked_edit(self, *args)) or edits[-1])
    monkeypatch.setattr(guard_module.Guard, "_add", lambda self, count: counted.append(count) or add(self, count))
    [saved] = net.run(request, untrusted=True).results.values()
    assert edits == [True] and torch.equal(saved, expected)
    by_the_hook = sum(counted)
    monkeypatch.setattr(local.Interleaver, "_checked_edit", lambda self, *args: False)  # node by node
    counted.clear()
    [saved] = net.run(request, untrusted=True).results.values()
    assert torch.equal(saved, expected) and sum(counted) == by_the_hook > 0
    monkeypatch.setattr(local.Interleaver, "_checked_edit", checked_edit)
    with pytest.raises(interlace.errors.LimitError, match=r"max_total_elements") as caught:
        net.run(request, untrusted=True, limits=Limits(max_total_elements=by_the_hook - 1))
    assert caught.value.node is not None
    assert torch.equal(net.run(request).results[request.graph.saved()[0]], expected)  # (and the local run)


def test_an_untrusted_edit_of_a_weights_view_goes_the_way_that_refuses_it():
    from helpers import Table

    module = torch.nn.Sequential(Table(), torch.nn.Identity())
    net = interlace.Model(module)
    before = module[0].table.detach().clone()
    with net.trace(torch.zeros(2)) as tracer:
        net[0].output[:, 0] += 1.0
        net.output.save()
    request = deserialize_request(serialize_graph(tracer.graph, tracer.invokes, options=tracer.spec(0).options))
    with pytest.raises(RefusedError, match="would change a weight of the shared model"):
        net.run(request, untrusted=True)
    assert torch.equal(module[0].table, before)


def test_a_sessions_traces_share_the_requests_element_budget():
    net = interlace.Model(MLP().eval())
    session = net.session()
    with session:
        for _ in range(2):
            with net.trace(torch.randn(2, 3)):
                (net.embed.output.sum() + torch.zeros(600)).save()
    request = session.request()
    assert len(request.traces) == 2
    limits = Limits(max_total_elements=1000)  # one trace's 601 elements fit; both traces' do not
    with pytest.raises(interlace.LimitError, match="max_total_elements"):
        net.run(request, untrusted=True, limits=limits)
    one = session.request()
    one.traces = one.traces[:1]
    assert net.run(one, untrusted=True, limits=limits).results  # the same trace alone runs
    assert_clean(net.module)


def test_a_cancel_stops_a_session_before_its_next_forward():
    """A cancel that arrives during a session's first forward: none of its later forwards runs."""
    net = interlace.Model(MLP().eval())
    session = net.session()
    with session:
        for _ in range(5):
            with net.trace(torch.randn(2, 3)):
                net.layers[0].output.save()
    cancel, forwards = threading.Event(), []

    def count(module, args, output):  # a client's DELETE, arriving during the first forward
        forwards.append(1)
        cancel.set()

    handle = net.module.embed.register_forward_hook(count)
    try:
        with pytest.raises(interlace.CancelledError, match="cancelled"):
            net.run(session.request(), untrusted=True, cancel=cancel)
    finally:
        handle.remove()
    assert len(forwards) == 1
    assert_clean(net.module)


@pytest.mark.parametrize("name, value", [("max_seconds", float("nan")), ("max_seconds", float("inf")),
                                         ("max_elements", 0), ("max_nodes", -1), ("max_tokens", "10")])
def test_a_limit_that_would_switch_a_check_off_is_refused(name, value):
    with pytest.raises(interlace.InterlaceError, match=f"limit {name} must be a positive finite number"):
        Limits(**{name: value})


def test_the_write_check_runs_only_where_a_weight_is_within_reach(monkeypatch):
    from interlace.backends.guard import Guard
    from interlace.backends.writes import WriteCheck

    entered, enter = [], WriteCheck.__enter__
    monkeypatch.setattr(WriteCheck, "__enter__", lambda self: entered.append(self.what) or enter(self))
    net = torch.nn.Linear(2, 2)
    guard = Guard(net, untrusted=True)
    own = torch.ones(2, 2)
    guard.call("torch.relu", torch.relu, (own,), {})
    guard.call("operator.getitem", operator.getitem, (own, (slice(None), 0)), {})
    guard.call("builtins.int", int, (3,), {})  # a step of a block over steps
    guard.call("builtins.list", list, (), {})
    steer = torch.full((2,), 0.5)
    got = guard.call("operator.iadd", operator.iadd, (own[:, 0], steer), {})  # `h[:, 0] += steer`: operands alone
    assert got is not None and torch.equal(own[:, 0], torch.full((2,), 1.5))
    guard.call("operator.setitem", operator.setitem, (own, (slice(None), 1), steer), {})
    assert entered == []  # handed only its own tensors and plain values: nothing of the model in reach
    guard.call("operator.add", operator.add, (own, net.weight.detach()), {})
    guard.call("torch.relu", torch.relu, (torch.ones(2, requires_grad=True),), {})  # a backward reaches .grad
    guard.call("torch.add", torch.add, (own, steer), {})  # not an operator: a second tensor may be an `out`
    guard.call("operator.iadd", operator.iadd, (torch.zeros(2), torch.ones(2, requires_grad=True)), {})
    guard.call("operator.iadd", operator.iadd, (own, torch.ones(4)[::2]), {})  # (a strided view of its own: fine)
    assert entered == ["operator.add", "torch.relu", "torch.add", "operator.iadd"]
    with pytest.raises(RefusedError, match="would change a weight"):  # the weight is the operand written
        guard.call("operator.iadd", operator.iadd, (net.bias.detach(), steer), {})
    with pytest.raises(RefusedError, match="would change a weight"):
        guard.call("F.relu", torch.nn.functional.relu, (net.weight.detach()[0], True), {})  # a view of one
    with pytest.raises(RefusedError, match=r"tensor it was given \(argument 'out'"):  # a second tensor may be one
        guard.call("torch.norm", torch.norm, (own, "fro", None, False, torch.ones(2)), {})


def test_memory_a_graph_allocates_without_writing_holds_nothing_of_an_earlier_job():
    """`torch.empty`, `new_empty` and `empty_like` hand out memory as the allocator had it: without the fill,
    hundreds of an earlier job's activations came back in a stranger's empty tensors."""
    lm = model()
    victim = Builder()
    victim.save(victim.call("operator.getitem", victim.out(""), "logits"))
    victim = deserialize_request(victim.bytes(invokes=[(("w9 w10 w11 w12 w13 w14 w15 w16",), {})]))
    g = Builder()
    hidden = g.out("model.layers.0")
    for size in (256, 800, 1600, 4096, 16000):
        g.save(g.call("torch.empty", size))
        g.save(g.method("new_empty", hidden, size))
        g.save(g.call("torch.empty_like", g.call("torch.zeros", size)))
    attacker = deserialize_request(g.bytes(invokes=[(("w5",), {})]))
    computed = []  # what the victim's forward computed, seen by plain hooks (copies: the originals are freed)
    handles = [module.register_forward_hook(lambda m, i, out: computed.append(out.detach().clone().flatten())
                                            if isinstance(out, torch.Tensor) else None)
               for module in lm.module.modules()]
    try:
        lm.run(victim, untrusted=True)
    finally:
        for handle in handles:
            handle.remove()
    secrets = set(torch.cat(computed).tolist()) - {0.0}
    del computed
    results = lm.run(attacker, untrusted=True).results
    leaked = {index: sum(value in secrets for value in tensor.tolist()) for index, tensor in results.items()}
    assert leaked == dict.fromkeys(results, 0)
    assert not torch.are_deterministic_algorithms_enabled()  # the fill was the graph's, not the process's


def test_memory_stays_filled_while_any_run_holds_it_though_another_left():
    """The fill is one flag for the process, and a server runs each model in a thread: a run that leaves must not
    turn it off under another's operations (it did: each put back what it had found)."""
    from interlace.backends.state import global_state, initialized_memory, restore_global_state

    entered, left, seen = threading.Event(), threading.Event(), []

    def other_run():
        with initialized_memory:
            entered.set()
            left.wait(10)
            seen.append(torch.empty(1000, dtype=torch.float32).isnan().all().item())
            seen.append(torch.empty(1000, dtype=torch.int64).eq(torch.iinfo(torch.int64).max).all().item())

    thread = threading.Thread(target=other_run)
    with initialized_memory:  # this run enters first and leaves first, while the other is inside
        thread.start()
        assert entered.wait(10)
    left.set()
    thread.join(10)
    assert seen == [True, True]
    assert not torch.are_deterministic_algorithms_enabled()  # the last to leave put it back
    with initialized_memory:  # another run's operations, while this one takes and puts back torch's state
        state = global_state()
        restore_global_state(state)
        assert torch.empty(1000).isnan().all()
    assert state["deterministic"] == (False, False) and not torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)  # what the process had is what it gets back
    try:
        with initialized_memory:
            pass
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
