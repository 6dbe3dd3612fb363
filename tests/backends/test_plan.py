"""Planning a generation's per-step copies as their steps come (Plan(defer_copies=True)).

Every test runs the same generation twice, with the copies planned as their steps come and with all of them
planned before the first forward (`Interleaver.defers_copies = False`, what every run did before), and
compares tokens and values; the unit tests check which graphs are deferred and what `plan_copies` plans.
"""

import pytest
import torch

import interlace
from interlace import LanguageModel
from interlace.backends.local import Interleaver
from interlace.backends.plan import Plan, _store_back
from interlace.backends.serialize import deserialize_request, serialize_request
from interlace.graph import Graph, Request, StoreBack

from helpers import same, tiny, tiny_tokenizer

PROMPT = "w5 w6 w7"


@pytest.fixture(scope="module")
def lm():
    return LanguageModel(tiny("gpt2"), tokenizer=tiny_tokenizer())


@pytest.fixture
def planned_first(monkeypatch):
    """Run the body with every copy planned before the model runs (no deferral)."""
    def planned(run):
        with monkeypatch.context() as patch:
            patch.setattr(Interleaver, "defers_copies", False)
            return run()
    return planned


def record(lm, tokens: int, *, read_after: bool = False, **options):
    """A generation steering layer 1 at every step and collecting layer 0's last position in a list (read
    again after the block when `read_after`): (tracer, the list, the block's last value, the tokens, extra)."""
    with lm.generate(PROMPT, max_new_tokens=tokens, **options) as tracer:
        hidden = interlace.list().save()
        with tracer.all() as step:
            lm.transformer.h[1].output[:, -1] += 0.5
            last = lm.transformer.h[0].output[:, -1].save()
            hidden.append(last * step)
        extra = hidden[1].save() if read_after else None
        out = lm.generator.output.save()
    return tracer, hidden, last, out, extra


def run_pair(lm, planned_first, **options):
    return record(lm, **options), planned_first(lambda: record(lm, **options))


def by_hand(lm, tokens: int):
    """The same steered generation with hand-written hooks: (tokens, layer 0's last positions times the step)."""
    seen = []

    def steer(module, args, output):
        output = output.clone()
        output[:, -1] += 0.5
        return output

    handles = [lm.module.transformer.h[1].register_forward_hook(steer),
               lm.module.transformer.h[0].register_forward_hook(lambda m, a, o: seen.append(o[:, -1].clone()))]
    try:
        ids = lm.tokenizer(PROMPT, return_tensors="pt")
        out = lm.module.generate(**ids, max_new_tokens=tokens, do_sample=False, pad_token_id=0)
    finally:
        for handle in handles:
            handle.remove()
    return out, [value * step for step, value in enumerate(seen)]


def test_a_deferred_generation_equals_the_one_planned_first_and_hand_written_hooks(lm, planned_first):
    (tracer, hidden, last, out, _), (_, e_hidden, e_last, e_out, _) = run_pair(lm, planned_first, tokens=7)
    want_out, want_hidden = by_hand(lm, 7)
    assert torch.equal(out, want_out) and torch.equal(e_out, want_out)
    assert len(hidden) == len(e_hidden) == 7
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(hidden, e_hidden, want_hidden))
    assert torch.equal(last, e_last) and torch.equal(last * 6, want_hidden[-1])  # the last step's value
    assert tracer.missing == {}


def test_a_value_read_after_the_block_from_what_it_changes_plans_every_copy_first(lm, planned_first):
    # `hidden[1]` after the block waits for the block's appends: its copies are not deferred, and it reads step 1
    (_, hidden, _, out, second), (_, e_hidden, _, e_out, e_second) = run_pair(lm, planned_first, tokens=4,
                                                                             read_after=True)
    assert torch.equal(out, e_out) and torch.equal(second, e_second) and torch.equal(second, hidden[1])
    assert all(torch.equal(a, b) for a, b in zip(hidden, e_hidden))


def test_a_generation_that_ends_early_leaves_its_last_copies_unplanned_and_reports_as_before(lm, planned_first):
    steps = 8
    _, _, _, full, _ = record(lm, tokens=steps)
    made = full[0, -steps:].tolist()
    last = next(step for step in range(2, steps - 1) if made[step] not in made[:step])  # its token ends it there
    (tracer, hidden, _, out, _), (e_tracer, e_hidden, _, e_out, _) = run_pair(lm, planned_first, tokens=steps,
                                                                             eos_token_id=made[last])
    assert out.shape[1] == full.shape[1] - steps + last + 1 and torch.equal(out, e_out)
    assert len(hidden) == len(e_hidden) == last + 1 and all(torch.equal(a, b) for a, b in zip(hidden, e_hidden))
    assert tracer.missing == e_tracer.missing


def first_forward_last(lm):
    """Layer 0's last position in a plain forward of the prompt (a hand-written hook): a generation's step 0."""
    seen = []
    handle = lm.module.transformer.h[0].register_forward_hook(lambda m, a, o: seen.append(o[:, -1]))
    try:
        lm.module(lm.tokenizer(PROMPT, return_tensors="pt")["input_ids"])
    finally:
        handle.remove()
    return seen[0]


def graph_of(lm, tokens: int, **options):
    tracer = record(lm, tokens, **options)[0]
    return tracer.graph


def test_plan_defers_each_copy_until_its_first_module_call(lm):
    graph = graph_of(lm, 5)
    plan = Plan(graph, 0, len(graph), defer_copies=True)
    eager = Plan(graph, 0, len(graph))
    assert [copy[0] for copy in plan.deferred] == [1, 2, 3, 4]
    first, stop = plan.deferred[0][1:3]
    assert not any(key[2] > 0 for key in plan.sources) and any(key[2] == 4 for key in eager.sources)
    done = bytearray(len(graph))
    ready = plan.plan_copies(2, done)  # copies of steps 1 and 2: each one's step number needs nothing
    assert ready == [first, stop] and [copy[0] for copy in plan.deferred] == [3, 4]
    assert {key for key in plan.sources if key[2] <= 2} == {key for key in eager.sources if key[2] <= 2}
    for index in range(first, stop):  # the copy waits for what it waited for planned first
        assert plan.users[index] == eager.users[index] and plan.waiting[index] == eager.waiting[index]
    plan.plan_copies(10, done)
    assert not plan.deferred and plan.remaining == eager.remaining and plan.users == eager.users
    assert plan.kept == eager.kept and plan.plain_calls == eager.plain_calls


def test_plan_does_not_defer_a_block_whose_changes_are_read_after_it_or_a_stop_after_it(lm):
    graph = graph_of(lm, 4, read_after=True)
    assert not Plan(graph, 0, len(graph), defer_copies=True).deferred
    with lm.generate(PROMPT, max_new_tokens=4) as tracer:
        with tracer.all():
            lm.transformer.h[0].output.save()
        lm.transformer.h[1].output.save()
        tracer.stop()
    assert not Plan(tracer.graph, 0, len(tracer.graph), defer_copies=True).deferred


def test_plan_does_not_defer_a_block_whose_steps_a_later_block_reads_and_the_run_equals_hooks(lm, planned_first):
    def run():
        with lm.generate(PROMPT, max_new_tokens=4) as tracer:
            doubled = interlace.list().save()
            with tracer.all():
                state = lm.transformer.h[0].output[:, -1]
            with tracer.all():  # its copies read the first block's copies, step by step
                doubled.append(state * 2)
        return tracer, doubled

    tracer, doubled = run()
    assert len(tracer.graph.repeats) == 1 and not Plan(tracer.graph, 0, len(tracer.graph), defer_copies=True).deferred
    _, e_doubled = planned_first(run)
    assert len(doubled) == len(e_doubled) == 4 and all(torch.equal(a, b) for a, b in zip(doubled, e_doubled))
    assert torch.equal(doubled[0], first_forward_last(lm) * 2) and not torch.equal(doubled[0], doubled[1])  # step 0's, then its own


def test_a_request_whose_copies_are_left_to_the_run_makes_each_as_it_plans_it(lm):
    """A server's front leaves a block's copies to the run (`Graph.add_copy_later`): the run makes a copy when
    it plans it, so a generation that ends early leaves the last ones unmade, and gives the local run's values."""
    steps = 8
    _, _, _, full, _ = record(lm, tokens=steps)
    made = full[0, -steps:].tolist()
    last = next(step for step in range(2, steps - 1) if made[step] not in made[:step])
    for options in ({}, {"eos_token_id": made[last]}):
        tracer = record(lm, tokens=steps, **options)[0]
        request = Request(tracer.graph, [tracer.spec(len(tracer.graph))])
        loaded = deserialize_request(serialize_request(request), make_copies=False)
        template = loaded.graph.repeats[0]
        assert not loaded.graph.copies_made
        outcome, want = lm.run(loaded, untrusted=True), lm.run(request)  # (a saved block value: step 0's, unbound)
        assert sorted(outcome.results) == sorted(want.results) and outcome.missing == want.missing == tracer.missing
        assert all(same(outcome.results[index], value) for index, value in want.results.items())
        unmade = [first for first, _, _ in template.copies
                  if loaded.graph.left(template.start, first)]
        assert len(unmade) == (0 if not options else steps - 1 - last)


@pytest.fixture
def made_at_once(monkeypatch):
    """Run the body with every block's copies made when the block ends (what every recording did before)."""
    def made(run):
        real = Graph.repeat
        with monkeypatch.context() as patch:
            patch.setattr(Graph, "repeat", lambda self, start, end, copies, later=False: real(self, start, end, copies))
            return run()
    return made


def test_a_blocks_copies_are_made_as_the_run_reaches_their_steps_and_read_as_recorded(lm, made_at_once):
    """Leaving a block over steps makes none of its copies (however many steps it asks for): the run makes each
    as its step comes; the graph, read in the block or after the run, holds every copy, as made at once."""
    def run(eos=None):
        with lm.generate(PROMPT, max_new_tokens=6, eos_token_id=eos) as tracer:
            hidden = interlace.list().save()
            with tracer.all():
                lm.transformer.h[1].output[:, -1] += 0.5
                hidden.append(lm.transformer.h[0].output[:, -1])
            left = [first for first, _, _ in tracer.graph.repeats[0].copies
                    if tracer.graph.left(tracer.graph.repeats[0].start, first)]
            out = lm.generator.output.save()
        return tracer, hidden, out, left

    tracer, hidden, out, left = run()
    e_tracer, e_hidden, e_out, e_left = made_at_once(run)
    assert len(left) == 5 and e_left == []
    assert tracer.graph == e_tracer.graph and tracer.graph.copies_made
    assert torch.equal(out, e_out) and all(torch.equal(a, b) for a, b in zip(hidden, e_hidden))
    made = out[0, -6:].tolist()
    last = next(step for step in range(2, 5) if made[step] not in made[:step])
    tracer, hidden, out, _ = run(eos=made[last])  # ends early: the steps it never reached are made after it
    assert len(hidden) == last + 1 and tracer.graph == e_tracer.graph
    with lm.generate(PROMPT, max_new_tokens=3) as tracer:
        with tracer.all():
            lm.transformer.h[0].output.save()
        listed = str(tracer.graph)  # (read in the block: made for it)
    assert tracer.graph.copies_made and all(f"builtins.int]({k})" in listed for k in range(3))


def test_a_blocks_node_saved_after_it_and_a_later_block_keep_the_copies_as_made_at_once(lm, made_at_once):
    """Saving a block's value after the block saves its first step's alone, also when another block over
    steps follows (whose copies are left to the run: those made already stay as they were)."""
    def run():
        with lm.generate(PROMPT, max_new_tokens=4) as tracer:
            with tracer.all():
                first = lm.transformer.h[0].output[:, -1]
            first.save()
            with tracer.all():
                lm.transformer.h[1].output[:, -1] += 0.5
            out = lm.generator.output.save()
        return tracer, first, out

    tracer, first, out = run()
    e_tracer, e_first, e_out = made_at_once(run)
    assert tracer.graph == e_tracer.graph and sorted(tracer.results) == sorted(e_tracer.results)
    assert torch.equal(first, e_first) and torch.equal(out, e_out)
    assert torch.equal(first, first_forward_last(lm))  # the first step's



def test_a_sessions_graph_holds_every_copy_after_a_generation_that_ended_early(lm):
    """The copies of steps a generation never reached are made once it has run: the graph reads as recorded
    (each node at its own index), in a session too."""
    made = record(lm, tokens=6)[3][0, -6:].tolist()
    last = next(step for step in range(2, 5) if made[step] not in made[:step])
    with lm.session() as session:
        with lm.generate(PROMPT, max_new_tokens=6, eos_token_id=made[last]) as tracer:
            hidden = interlace.list().save()
            with tracer.all():
                hidden.append(lm.transformer.h[0].output[:, -1])
    assert len(hidden) == last + 1
    assert session.graph.copies_made and [node.index for node in session.graph.nodes] == list(range(len(session.graph)))


# -- `x[k] op= c` planned three nodes at once (Plan._add_edit) ----------------------------------------------
def _worked_out(plan: Plan) -> dict:
    """Everything `plan` worked out (a node's reads as a tuple, whether listed or not), but which nodes `_add_edit`
    planned (`units`)."""
    fields = {name: getattr(plan, name) for name in Plan.__slots__
              if hasattr(plan, name) and name not in ("graph", "nodes", "units")}
    fields["reads"] = [tuple(reads) for reads in plan.reads]
    return fields


def test_edits_planned_three_nodes_at_once_are_planned_as_node_by_node(mlp, x, monkeypatch):
    """Every kind of `x[k] op= c` and its neighbours: those `_add_edit` plans at once (a module's value or any other
    value edited by a constant, saved on the way or not, the same module edited twice) and those it leaves to the
    general path (a value changed before, of an earlier trace, read by a guard, edited by a value of the graph, an
    int or tensor index): every field of each plan a session's run made equals the plan made node by node."""
    spans, plan = [], Plan.__init__
    net = interlace.Model(mlp)
    with monkeypatch.context() as patch, net.session():
        patch.setattr(Plan, "__init__", lambda self, graph, start, end, **options: spans.append(
            (graph, start, end)) or plan(self, graph, start, end, **options))
        with net.trace(x) as tracer:
            net.layers[0].output[:, 1:] *= 0.5
            net.layers[1].output[:, 0] += 1.0
            net.layers[1].output[:, 1] -= torch.ones(2)
            twice = net.layers[2].output
            twice[:, 0] += 1.0
            twice[:, 1] += 2.0  # (changed before: node by node)
            view = twice[:, 2]
            view *= 3.0
            twice[:, 2] = view
            view.save()
            doubled = net.layers[3].output * 2
            doubled[..., None, 1] /= 4.0
            doubled[0] += 1.0  # (an int index)
            doubled[torch.tensor([1])] += 1.0  # (a tensor index)
            with tracer.cond(doubled.sum() > 0):
                net.layers[3].output[:, 0] += 1.0
            net.embed.output[:, 0] += net.embed.output[:, 1]
            early = doubled.save()
            out = net.output.save()
        with net.trace(x):
            early[:, 0] += 1.0  # (a value of the earlier trace)
            net.layers[0].output[:, :2] += 1.0
            later = net.output.save()
    assert len(spans) == 2 and spans[1][1] > 0
    assert out.shape == later.shape == (2, 5)
    units, add_edit = [], Plan._add_edit
    monkeypatch.setattr(Plan, "_add_edit", lambda self, read, stop: units.append(add_edit(self, read, stop)) or units[-1])
    at_once = [_worked_out(Plan(graph, start, end)) for graph, start, end in spans]
    assert units.count(True) == 6  # layers 0, 1 (twice), 2 (first), the saved view, the doubled value; layer 0 later
    monkeypatch.setattr(Plan, "_add_edit", lambda self, read, stop: False)
    assert [_worked_out(Plan(graph, start, end)) for graph, start, end in spans] == at_once


def test_the_recorder_marks_only_store_backs_and_a_decoded_graph_plans_as_the_recorded_one(mlp, x):
    """`x[k] op= y` with a basic index is recorded as a `StoreBack` setitem (the plan then takes the recorder's word that
    `_store_back` holds); the same three nodes written by hand (another key object), an advanced index, a `y` whose
    getitem is recorded between and a plain setitem are plain nodes. Each mark is where `_store_back` holds; a graph decoded from bytes has none, plans the
    same, and runs to the same values."""
    net = interlace.Model(mlp)
    with net.trace(x) as tracer:
        embedded = net.embed.output
        net.layers[0].output[:, 1:] *= 0.5  # marked
        second = net.layers[1].output
        second[0] += 1.0  # marked (an int is a basic index; _add_edit leaves it to the general path itself)
        second[torch.tensor([1])] += 1.0  # an advanced index: not marked
        view = second[:, 2]
        view *= 3.0
        second[:, 2] = view  # by hand: not marked, though _store_back holds
        second[:, 3] = 0.0  # a plain setitem
        second[:, 4] += embedded[:, 1]  # not marked: the getitem of `embedded` is recorded between
        with tracer.cond(second.sum() > 0):
            net.layers[2].output[:, 0] += 1.0  # marked (under a guard)
        out = net.output.save()
    nodes = tracer.graph.nodes
    setitems = [node.index for node in nodes if node.target == "operator.setitem"]
    marked = [index for index in setitems if type(nodes[index]) is StoreBack]
    assert len(setitems) == 7 and marked == [setitems[0], setitems[1], setitems[6]]
    assert all(_store_back(nodes, index) for index in marked)
    assert [_store_back(nodes, index) for index in setitems if index not in marked] == [False, True, False, False]
    request = Request(tracer.graph, [tracer.spec(len(nodes))])
    loaded = deserialize_request(serialize_request(request))
    assert not any(type(node) is StoreBack for node in loaded.graph.nodes)
    assert _worked_out(Plan(loaded.graph, 0, len(nodes))) == _worked_out(Plan(tracer.graph, 0, len(nodes)))

    seen = {}

    def by_hand(name):  # the same edits, by hand, as hooks
        def hook(module, args, output):
            output = output.clone()
            if name == "embed":
                seen["embed"] = output
            elif name == "0":
                output[:, 1:] *= 0.5
            elif name == "1":
                output[0] += 1.0
                output[1] += 1.0
                output[:, 2] *= 3.0
                output[:, 3] = 0.0
                output[:, 4] += seen["embed"][:, 1]
                seen["1"] = output
            elif seen["1"].sum() > 0:
                output[:, 0] += 1.0
            return output
        return hook

    handles = [module.register_forward_hook(by_hand(name)) for name, module in
               (("embed", mlp.embed), ("0", mlp.layers[0]), ("1", mlp.layers[1]), ("2", mlp.layers[2]))]
    try:
        want = mlp(x)
    finally:
        for handle in handles:
            handle.remove()
    (saved,) = [node.index for node in nodes if node.saved]
    assert torch.allclose(out, want) and torch.allclose(net.run(loaded).results[saved], want)
