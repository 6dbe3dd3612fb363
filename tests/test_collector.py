"""The garbage collector pauses while a trace records and runs, and comes back as it was."""

import gc
import subprocess
import sys
import threading
import types
import weakref

import pytest
import torch

import interlace
from interlace import LanguageModel, Model, collector

from helpers import MLP, tiny, tiny_tokenizer


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Model(MLP().eval())


@pytest.fixture(autouse=True)
def collector_on():
    was = gc.isenabled()
    gc.enable()
    yield
    (gc.enable if was else gc.disable)()


def _watch(module, seen: list):
    """A hand-written hook that notes whether the collector runs while `module` does."""
    return module.register_forward_hook(lambda m, args, out: seen.append(gc.isenabled()))


def test_the_collector_is_paused_while_a_trace_records_and_runs_and_back_after(net, x):
    seen = []
    handle = _watch(net.module.layers[1], seen)
    try:
        with net.trace(x):
            recording = gc.isenabled()
            out = net.layers[1].output.save()
    finally:
        handle.remove()
    assert (recording, seen) == (False, [False])
    assert gc.isenabled()
    assert torch.equal(out, net.module.layers[1](net.module.layers[0](net.module.embed(x))))


def test_an_error_in_the_block_or_the_run_resumes_the_collector(net, x):
    with pytest.raises(ZeroDivisionError):
        with net.trace(x):
            net.layers[1].output.save()
            1 / 0
    assert gc.isenabled()
    with pytest.raises(Exception, match="shape"):
        with net.trace(x):
            net.layers[1].output[:, :5] = torch.zeros(3, 3)
    assert gc.isenabled()


def test_a_collector_the_user_turned_off_stays_off(net, x):
    gc.disable()
    with net.trace(x):
        net.output.save()
    assert not gc.isenabled()


def test_an_edit_block_resumes_the_collector(net, x):
    with net.edit() as edited:
        edited.layers[1].output[:] = 0
    assert gc.isenabled()
    with edited.trace(x):
        out = edited.output.save()
    layers = net.module.layers
    assert torch.equal(out, net.module.head(layers[3](layers[2](torch.zeros(2, 8)))))


def test_a_remote_trace_waits_for_its_server_with_the_collector_on(net, x, monkeypatch):
    during = []

    def run_remote(request, **options):
        during.append(gc.isenabled())
        raise ConnectionError("no server here")

    monkeypatch.setattr(net, "run_remote", run_remote)
    with pytest.raises(ConnectionError):
        with net.trace(x, backend=types.SimpleNamespace(run=lambda request, **options: None)):  # (never reached)
            net.output.save()
    assert during == [True] and gc.isenabled()


def test_a_trace_leaves_no_cycles_for_the_collector(net, x):
    """Why the pause frees nothing later: what a trace makes goes by reference counting alone."""
    steer = torch.ones(2)
    gc.collect()
    gc.disable()  # (else a collection that runs by itself once the trace ends could find its cycles first)
    with net.trace(x):
        hidden = net.layers[0].output.save()
        net.layers[1].output[:, 0] += steer
        out = net.output.save()
    del hidden, out
    assert gc.collect() == 0


def test_a_steered_generation_leaves_no_cycles_for_the_collector():
    """A generation can be long and runs paused too: it must leave nothing for the collector either."""
    lm = LanguageModel(tiny("llama"), tokenizer=tiny_tokenizer())
    gc.collect()
    gc.disable()  # (as above)
    with lm.generate("w5 w6", max_new_tokens=6) as tracer:
        hidden = interlace.list().save()
        with tracer.all():
            lm.model.layers[0].output[:, -1] += 0.5
            hidden.append(lm.model.layers[0].output[:, -1])
        out = lm.generator.output.save()
    assert len(hidden) == 6 and out.shape[-1] >= 6
    del hidden, out, tracer
    assert gc.collect() == 0


def test_a_generation_records_paused_and_runs_with_the_collector_on():
    """A generation takes long: other threads' cycles must not wait for it, and per token a walk costs little."""
    lm = LanguageModel(tiny("llama"), tokenizer=tiny_tokenizer())
    seen = []
    handle = lm.module.model.layers[0].register_forward_hook(lambda m, args, out: seen.append(gc.isenabled()))
    try:
        with lm.generate("w5 w6", max_new_tokens=3):
            recording = gc.isenabled()
            out = lm.generator.output.save()
    finally:
        handle.remove()
    assert recording is False and seen == [True] * 3 and gc.isenabled()
    assert out.shape[-1] >= 3


class _Cyclic:
    def __init__(self):
        self.me = self


def _overlapping_pauses_with_a_cycle_made_between(monkeypatch, longest: float) -> bool:
    """Whether a cycle made while one pause holds is still there once a second, overlapping one begins."""
    monkeypatch.setattr(collector, "LONGEST", longest)
    collector.pause()
    try:
        cycle = _Cyclic()
        alive = weakref.ref(cycle)
        del cycle
        collector.pause()
        collector.resume()
        return alive() is not None
    finally:
        collector.resume()


def test_pauses_that_overlap_for_long_collect_the_young_generation_meanwhile(monkeypatch):
    """Threads tracing without a break would keep the collector off for good: past LONGEST seconds of
    overlapping pauses, starting or ending one collects the young objects (where others' cycles are)."""
    assert _overlapping_pauses_with_a_cycle_made_between(monkeypatch, longest=3600.0)
    assert not _overlapping_pauses_with_a_cycle_made_between(monkeypatch, longest=0.0)
    assert gc.isenabled()


def test_pauses_overlap_across_threads_and_the_last_to_end_resumes():
    first_paused, second_done = threading.Event(), threading.Event()
    states = []

    def second():
        first_paused.wait()
        with collector.paused():
            states.append(gc.isenabled())
        states.append(gc.isenabled())  # the first pause still holds
        second_done.set()

    thread = threading.Thread(target=second)
    thread.start()
    with collector.paused():
        first_paused.set()
        second_done.wait(10)
    thread.join(10)
    assert states == [False, False] and gc.isenabled()


SETTLE = """
import gc, sys
sys.path.insert(0, "tests")
from helpers import tiny
from interlace import collector
model = tiny("gpt2")  # torch, transformers and a model: what a server's process keeps
loaded = len(gc.get_objects())
collector.settle()
walked, frozen = len(gc.get_objects()), gc.get_freeze_count()
cycle = []
cycle.append(cycle)  # made afterwards: still found and freed
del cycle
print(loaded, walked, frozen, gc.collect())
"""


def test_settle_leaves_what_a_process_loaded_out_of_the_collectors_walks_and_still_frees_later_cycles():
    """What `interlace serve`'s front and worker process call once loaded (in a process of its own here:
    frozen objects stay out of this one's collections)."""
    done = subprocess.run([sys.executable, "-c", SETTLE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded, walked, frozen, freed = map(int, done.stdout.split()[-4:])
    assert loaded > 100_000  # (a full pass walked these before)
    assert walked < 100 and frozen >= loaded * 0.9
    assert freed >= 1
