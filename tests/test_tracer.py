"""Recording and binding: saved values become real values; proxies refuse to be Python values."""

import linecache
import pickle
import threading

import pytest
import torch

import interlace
from interlace import Model, ProxyValueError

from helpers import assert_clean


def capture(module, x, submodule):
    """What a hand-written forward hook sees."""
    seen = {}
    handle = submodule.register_forward_hook(lambda m, a, o: seen.setdefault("out", o.detach().clone()))
    with torch.no_grad():
        module(x)
    handle.remove()
    return seen["out"]


def test_saved_value_is_real_tensor_equal_to_hook(mlp, x):
    net = Model(mlp)
    with net.trace(x):
        h = net.layers[1].output.save()
    assert isinstance(h, torch.Tensor)
    assert torch.equal(h, capture(mlp, x, mlp.layers[1]))
    assert_clean(mlp)


def test_saved_values_in_function_locals_lists_and_dicts(mlp, x):
    def run():
        net = Model(mlp)
        found = {}
        outs = []
        with net.trace(x):
            for i in range(4):
                outs.append(net.layers[i].output.save())
            found["head"] = net.head.output.save()
            pair = (net.embed.output.save(), 1)
            local = net.layers[0].input.save()
        return outs, found, pair, local

    outs, found, pair, local = run()
    assert all(isinstance(o, torch.Tensor) for o in outs)
    assert torch.equal(outs[2], capture(mlp, x, mlp.layers[2]))
    assert torch.equal(found["head"], mlp(x).detach())
    assert isinstance(pair[0], torch.Tensor) and pair[1] == 1
    assert torch.equal(local, pair[0])


def test_interlace_save_keeps_a_value_or_the_values_in_a_container_as_nnsight_save_does(mlp, x):
    net = Model(mlp)
    with net.trace(x):
        h = interlace.save(net.layers[1].output)
        pair = interlace.save({"first": net.layers[0].output, "scaled": [net.head.output * 2, 3]})
        unsaved = net.layers[2].output
    assert torch.equal(h, capture(mlp, x, mlp.layers[1]))
    assert torch.equal(pair["first"], capture(mlp, x, mlp.layers[0]))
    assert torch.equal(pair["scaled"][0], mlp(x).detach() * 2) and pair["scaled"][1] == 3
    with pytest.raises(interlace.NotSavedError):
        unsaved.value


def test_unsaved_value_is_not_available_after_trace(mlp, x):
    """The error quotes the line that recorded the value: among several unsaved ones it says which."""
    net = Model(mlp)
    with net.trace(x):
        h = net.layers[0].output
        doubled = h * 2  # the line the error quotes
    with pytest.raises(interlace.NotSavedError, match="save"):
        h.value
    with pytest.raises(interlace.NotSavedError, match=r"test_tracer\.py:\d+: doubled = h \* 2 .*operator.mul\(...\) "
                                                        r"was not saved.*Call .save\(\)"):
        doubled.value


def test_saved_proxy_held_elsewhere_behaves_like_value(mlp, x):
    net = Model(mlp)
    holder = type("Holder", (), {})()
    with net.trace(x) as tracer:
        holder.h = net.layers[0].output.save()
    assert isinstance(holder.h, interlace.Proxy)
    assert torch.equal(holder.h.value, capture(mlp, x, mlp.layers[0]))
    assert torch.equal(holder.h.sum(), capture(mlp, x, mlp.layers[0]).sum())
    assert len(tracer.graph) == 1 and tracer.graph[0].saved  # saving marks the node


@pytest.mark.parametrize(
    "use, advice",
    [
        (lambda p: bool(p), "tracer.cond"),
        (lambda p: int(p), "interlace.apply"),
        (lambda p: len(p), r"shape\[0\]"),
        (lambda p: [a for a in p], "index it"),
        (lambda p: range(10)[p], "interlace.apply"),
        (lambda p: range(p.shape[0]), r"for a size .* trace with scan=True"),
    ],
)
def test_proxy_used_as_python_value_says_what_to_use(mlp, x, use, advice):
    net = Model(mlp)
    with pytest.raises(ProxyValueError, match=advice):
        with net.trace(x):
            use(net.layers[0].output.sum(0))
    assert_clean(mlp)


def test_a_size_used_as_a_python_int_works_with_scan_as_the_error_says(mlp, x):
    net = Model(mlp)
    with net.trace(x, scan=True):
        h = net.layers[0].output
        columns = [h[:, column].sum().save() for column in range(h.shape[1])]
        whole = h.sum().save()
    assert len(columns) == mlp.layers[0].linear.out_features
    torch.testing.assert_close(sum(columns), whole)


def test_graph_records_user_line(mlp, x):
    net = Model(mlp)
    with net.trace(x) as tracer:
        net.layers[0].output.save()
    node = tracer.graph[0]
    assert node.location[0] == __file__
    assert "test_tracer.py" in str(tracer.graph)


def test_an_invoke_after_its_trace_ended_is_refused(mlp, x):
    net = Model(mlp)
    with net.trace() as tracer:
        with tracer.invoke(x):
            out = net.output.save()
    with pytest.raises(interlace.InterlaceError, match="this trace has ended .* open tracer.invoke\\(...\\) inside"):
        with tracer.invoke(x):
            pass
    assert len(tracer.invokes) == 1 and out.shape == (2, 5)


def test_nested_invokes_are_refused(mlp, x):
    net = Model(mlp)
    with pytest.raises(interlace.InterlaceError, match="nested"):
        with net.trace() as tracer:
            with tracer.invoke(x):
                with tracer.invoke(x):
                    pass


def test_envoy_values_outside_trace_are_an_error(mlp):
    net = Model(mlp)
    with pytest.raises(interlace.InterlaceError, match="inside `with model.trace"):
        net.layers[0].output


def test_unknown_module_path_names_children(mlp, x):
    net = Model(mlp)
    with pytest.raises(interlace.ModulePathError, match="embed, layers, head"):
        with net.trace(x):
            net.layer.output.save()
    with pytest.raises(interlace.ModulePathError, match="out of range"):
        net.layers[7]


def test_cond_node_records_the_user_line(mlp, x):
    net = Model(mlp)
    with net.trace(x) as tracer:
        with tracer.cond(net.layers[0].output.sum() > 0):
            net.layers[0].output[:] = 0
    cond = next(node for node in tracer.graph if node.op == "cond")
    assert cond.location[0] == __file__


def test_saved_values_that_were_never_computed_say_why(mlp, x):
    net = Model(mlp)
    with net.trace(x) as tracer:
        with tracer.cond(net.layers[0].output.sum() > 1e9):
            skipped = net.layers[1].output.save()
        tracer.stop()
        unreached = net.layers[2].output.save()
    with pytest.raises(ValueError, match="layers.1.output was saved but has no value: its condition"):
        skipped.value
    with pytest.raises(interlace.NotSavedError, match="the trace stopped"):
        unreached + 1


def test_printing_or_converting_a_value_without_one_says_why(mlp, x):
    """After the trace a name still bound to a proxy has no value: str(), print(), int(), bool(),
    iteration and its attributes raise the NotSavedError that says why (repr shows it, and never raises)."""
    net = Model(mlp)
    with net.trace(x) as tracer:
        total = net.layers[0].output.sum()
        kept = total.save()
        with tracer.cond(total > 1e9):
            skipped = (total * 2).save()
            also = total.save()  # computed before the block: it has its value
        forgotten = net.layers[1].output.sum()
    assert torch.equal(also, kept)
    for read in (str, int, float, bool, iter, lambda value: print(value), lambda value: value.shape,
                 lambda value: value.dtype, lambda value: value.tolist()):
        with pytest.raises(interlace.NotSavedError, match="was saved but has no value: its condition"):
            read(skipped)
        with pytest.raises(interlace.NotSavedError, match="was not saved"):
            read(forgotten)
    assert repr(skipped).startswith("<Proxy operator.mul") and "its condition (tracer.cond) was false" in repr(skipped)
    with pytest.raises(AttributeError):
        skipped._repr_html_  # what notebooks probe for: no error of the value's

    with net.trace(x):
        inside = net.layers[0].output.sum()
        assert str(inside).startswith("<Proxy")  # inside the trace: the proxy itself, and how to see its value
        assert str(inside.shape).endswith(": no value while recording; tracer.log(value) prints it when the trace "
                                          "runs, trace(..., scan=True) gives shapes now>")


def test_edit_records_through_the_returned_model_too(mlp, x):
    net = Model(mlp)
    with net.edit() as edited:
        edited.layers[0].output[:] = 0  # nnsight's docs use both spellings
        net.layers[1].output[:, 0] = 1.0
    with edited.trace(x):
        out = edited.output.save()
    with torch.no_grad():
        h = mlp.layers[1](torch.zeros(2, 8))
        h[:, 0] = 1.0
        want = mlp.head(mlp.layers[3](mlp.layers[2](h)))
    assert torch.equal(out, want)
    assert edited._tracer is None and net._tracer is None


def test_an_error_at_an_edit_line_says_it_is_an_edit_and_how_to_remove_it(mlp, x):
    net = Model(mlp)
    with net.edit(inplace=True):
        net.layers[0].output[:, 0] += torch.zeros(3)  # the wrong width: fails in every later trace
    for _ in range(2):
        with pytest.raises(interlace.ExecutionError, match=r"model\.edit\(\).*clear_edits\(\)"):
            with net.trace(x):
                net.layers[1].output.save()
    net.clear_edits()
    with pytest.raises(interlace.ExecutionError) as caught:
        with net.trace(x):
            (net.layers[0].output[:, 0] + torch.zeros(3)).save()  # the trace's own line: no word of edits
    assert "clear_edits" not in str(caught.value)
    assert_clean(mlp)


def test_a_save_in_an_edit_is_refused_as_it_would_never_have_a_value(mlp, x):
    net = Model(mlp)
    with pytest.raises(interlace.InterlaceError, match="Save it in the trace"):
        with net.edit(inplace=True):
            net.layers[0].output[:] = 0
            net.layers[0].output.save()
    assert net._edits == [] and net._tracer is None  # the failed edit left nothing behind
    with net.trace(x):
        out = net.output.save()
    with torch.no_grad():
        assert torch.equal(out, mlp(x))
    assert_clean(mlp)


def test_a_session_replays_edits_at_each_trace(mlp, x):
    net = Model(mlp)
    with net.edit() as edited:
        edited.layers[0].output[:] = edited.layers[0].output * 0
    with edited.session():
        with edited.trace(x):
            first = edited.output.save()
        with edited.trace(x):
            second = edited.output.save()
    assert torch.equal(first, second)
    with torch.no_grad():
        assert torch.equal(first, mlp.head(mlp.layers[3](mlp.layers[2](mlp.layers[1](torch.zeros(2, 8))))))


def test_interlace_keywords_are_interlace_s(mlp, x):
    net = Model(mlp)
    with pytest.raises(interlace.InterlaceError, match="remote=True needs a server"):
        net.trace(x, remote=True)
    with pytest.raises(interlace.InterlaceError, match="remote=True needs a server"):
        net.session(remote=True, timeout=300)


def test_traces_open_in_two_threads_each_record_their_own_apply_and_lists(x):
    """interlace.apply and interlace.list record into the calling thread's open trace, not another's."""
    torch.manual_seed(0)
    nets = {name: Model(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())) for name in "ab"}
    both_open, results, errors = threading.Barrier(2, timeout=30), {}, []

    def run(name):
        try:
            net = nets[name]
            with net.trace(x):
                both_open.wait()  # the other thread's trace is open too
                items = interlace.list().save()
                items.append(interlace.apply(torch.sum, net[0].output))
                both_open.wait()
            results[name] = items
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(name,)) for name in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    with torch.no_grad():
        for name, net in nets.items():
            assert torch.equal(results[name][0], net.module[0](x).sum())


def test_a_value_of_a_trace_still_open_used_in_another_says_so(x):
    torch.manual_seed(0)
    outer = Model(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU()))
    inner = Model(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU()))
    with pytest.raises(interlace.NotSavedError, match="is a value of a trace that is still open"):
        with outer.trace(x):
            hidden = outer[0].output.save()
            with inner.trace(x):
                inner[0].output = hidden  # the outer model has not run yet
    for net in (outer, inner):
        assert net._tracer is None
        with net.trace(x):
            out = net.output.save()
        assert out.shape == (2, 4)


def test_the_refs_a_recorder_finds_while_recording_are_those_node_refs_computes(mlp, x):
    # record() hands each node the nodes its arguments read (Node.refs), found while making the Refs; a node
    # built from the same fields computes them from its arguments: both must agree, for every shape of argument
    net = Model(mlp)
    with net.session() as session:
        with net.trace(x) as tracer:
            i = net.layers[0].output.sum().long().clamp(0, 3)
            h = net.layers[1].output
            with tracer.cond(h.sum() > -1e9):
                h[:, 0] = i  # a guard, and a Ref as the value
                h[:, i:] += 1  # a Ref inside a slice inside the index
                parts = torch.cat([h, h * 2], dim=-1)  # a list of Refs, and a keyword
                torch.where(h > 0, h, other=0.5)  # a Ref as a keyword
                pair = net.layers[2].output[(0, i)]  # a Ref inside a tuple
                net.layers[3].output[:] = pair.sum() + parts.mean()
            first = net.layers[3].output.save()
        with net.trace(x):
            net.layers[0].output.add(first).save()  # a value of an earlier trace (no Ref), beside a Ref
    nodes = list(session.graph)
    assert len(nodes) > 20
    for node in nodes:
        fresh = interlace.graph.Node(node.index, node.op, node.target, node.args, node.kwargs, None, node.guard)
        assert node.refs() == fresh.refs(), node
        assert not node._shallow or fresh._shallow, node  # (shallow binds each argument itself: must be true)


def _fields(graph) -> list[tuple]:
    """Every recorded field of every node but its line (and what refs() finds)."""
    return [(node.index, node.op, node.target, node.args, node.kwargs, node.guard, node.saved, node.refs(),
             node._shallow) for node in graph]


def test_basic_indexing_and_the_write_back_of_x_k_op_y_are_recorded_as_record_would_record_them(mlp, x, monkeypatch):
    """`Recorder.item` makes the getitem of a basic index itself, and `Recorder.store` the setitem of `x[k] op= y`
    (a steering edit's first and third nodes): for the same lines, with and without a guard, spelled out, or not
    such a key or write-back (a bool, list or tensor key, a plain `x[k] = c`, another key, a key or a value made in
    the graph), the graph equals the one `record` makes for every getitem and setitem."""
    steer = torch.full((2,), 0.5)

    def lines():
        net = Model(mlp)
        with net.trace(x) as tracer:
            out = net.layers[0].output
            out[:, -1] += steer
            out[0, 1:3] *= 2.0
            key = (slice(None), 2)
            view = out[key]
            view -= 1.0
            out[key] = view  # (spelled out: the same key object, so the same write-back)
            view = out[:, 3]
            view -= 1.0
            out[:, 3] = view  # (an equal key, another object: the general way)
            out[:, 4] = 0.5
            where = net.embed.output.sum().long().clamp(0, 3)
            out[:, where] += 1.0  # (a key holding a value of the graph)
            with tracer.cond(out.sum() > -1e9):
                net.layers[2].output[:, :2] /= steer
            net.layers[3].output[:, 0] += net.layers[2].output[:, 0]
            net.layers[3].output[..., None, 1:-1:2].save()
            net.layers[3].output[True].save()  # (a bool: a mask)
            net.layers[3].output[[0, 1]].save()
            net.layers[3].output[torch.tensor([1])].save()
            last = net.output.save()
        return tracer.graph, last

    fast, fast_last = lines()
    written = [node.index for node in fast if node.target == "operator.setitem" and node.args[1] is fast[node.index - 2].args[1]]
    monkeypatch.setattr(interlace.proxy.Proxy, "__setitem__",
                        lambda self, key, value: self._tracer.record("call", "operator.setitem", (self, key, value)))
    monkeypatch.setattr(interlace.proxy.Proxy, "__getitem__",
                        lambda self, key: self._tracer.record("call", "operator.getitem", (self, key)))
    general, general_last = lines()
    assert [linecache.getline(*fast[index].location).strip() for index in written] == [
        "out[:, -1] += steer", "out[0, 1:3] *= 2.0", "out[key] = view  # (spelled out: the same key object, so the "
        "same write-back)", "net.layers[2].output[:, :2] /= steer"]
    # (the general way's getitems and setitems name the patch's line, the rest their own)
    indexing = ("operator.getitem", "operator.setitem")
    assert [node.location for node in fast if node.target not in indexing] == [
        node.location for node in general if node.target not in indexing]
    assert all(linecache.getline(*node.location).strip().startswith(("out", "view", "net.", "where"))
               for node in fast if node.target in indexing)
    assert _fields(fast) == _fields(general)
    assert torch.equal(fast_last, general_last)


def test_each_node_names_its_line_late_in_a_long_source(mlp, x):
    """A node keeps where its line's call was and finds the line number when asked: the same line as the
    frame's own `f_lineno`, also 3,000 lines into a source, in a statement over several lines, in a helper
    function between lines of the experiment (lines of two code objects, asked for in turn), in a copy of the
    graph made by pickling and in the request's bytes."""
    from interlace.backends.serialize import deserialize_graph, serialize_graph

    filler = "".join(f"    unused_{n} = {n}\n" for n in range(3000))
    source = ("def helper(h, lines, sys):\n"
              "    lines.append(sys._getframe().f_lineno + 1)\n"
              "    return h - 1\n"
              "def experiment(net, x, sys):\n" + filler +
              "    lines = []\n"
              "    with net.trace(x) as tracer:\n"
              "        hidden = net.layers[0].output; lines.append(sys._getframe().f_lineno)\n"
              "        total = (hidden\n"
              "                 * 2); lines.append(sys._getframe().f_lineno - 1)\n"
              "        total = helper(total, lines, sys)\n"
              "        total.sum().save(); lines.append(sys._getframe().f_lineno)\n"
              "    return tracer.graph, lines\n")
    scope = {}
    exec(compile(source, "long_experiment.py", "exec"), scope)
    graph, lines = scope["experiment"](Model(mlp), x, __import__("sys"))
    expected = [("long_experiment.py", line) for line in lines]
    assert lines == [3007, 3008, 3, 3011]  # (the product starts on its statement's first line, as Python says)
    assert [node.location for node in graph.nodes] == expected
    assert "long_experiment.py:3007" in str(graph)
    copied = pickle.loads(pickle.dumps(graph))
    decoded, _ = deserialize_graph(serialize_graph(graph, [((x,), {})]))
    assert [node.location for node in copied.nodes] == [node.location for node in decoded.nodes] == expected


def test_saved_values_are_bound_among_a_notebooks_many_names_and_long_result_lists(mlp, x):
    """A module scope like a long notebook's: thousands of other names, and lists and dicts of earlier results
    (passed over by type, in C). Saved proxies in it are bound wherever the search reaches: a name, the end of a
    long list, a list in a dict, a tuple, an attribute read (`.T`); a list longer than the search's limit keeps
    its proxy, which still gives its value."""
    scope = {"net": Model(mlp), "x": x, "torch": torch}
    scope.update({f"_i{n}": f"cell {n}" for n in range(3000)})
    source = ("acts = [torch.zeros(2) for _ in range(1000)]\n"
              "by_prompt = {p: [torch.zeros(2)] * 30 for p in range(100)}\n"
              "huge = [0] * 2000\n"
              "with net.trace(x):\n"
              "    h = net.layers[0].output.save()\n"
              "    acts.append(net.layers[1].output.save())\n"
              "    by_prompt[99].append(net.layers[2].output.save())\n"
              "    pair = (1, net.head.output.save())\n"
              "    flipped = net.layers[0].output.T.save()\n"
              "    huge.append(net.layers[3].output.save())\n")
    exec(compile(source, "notebook_cell.py", "exec"), scope)
    expected = [capture(mlp, x, mlp.layers[i]) for i in range(4)]
    assert torch.equal(scope["h"], expected[0]) and torch.equal(scope["acts"][-1], expected[1])
    assert torch.equal(scope["by_prompt"][99][-1], expected[2]) and len(scope["by_prompt"][99]) == 31
    assert torch.equal(scope["pair"][1], mlp(x).detach()) and scope["pair"][0] == 1
    assert type(scope["flipped"]) is torch.Tensor and torch.equal(scope["flipped"], expected[0].T)
    assert isinstance(scope["huge"][-1], interlace.Proxy) and torch.equal(scope["huge"][-1].value, expected[3])
    assert all(type(item) is torch.Tensor for item in scope["acts"])  # (nothing else in them changed)
