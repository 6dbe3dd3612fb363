"""Cross-user batching in the server: queued jobs that can share a forward run as one batch, and each
job still gets what it would get alone (the executor's side is in tests/backends/test_merge.py)."""

import re
import threading
import time

import httpx
import pytest
import torch

import interlace
from helpers import assert_close_in_batch
from interlace.backends.remote import RemoteBackend
from interlace.graph import Request
from interlace.server.jobs import Job, JobQueue, model_groups
from serving import Server

USERS = [f"user{i}" for i in range(10)]


@pytest.fixture(scope="module")
def batching(setup):
    """A server whose jobs wait up to 1 s for companions: jobs sent together run together."""
    server = Server(setup["folder"], setup["db"], "--check-weights", "--batch-wait", "1.0", "--batch-jobs", "8")
    yield server
    server.stop()


def recorded(model, record, **options) -> tuple[Request, interlace.tracer.Tracer]:
    """A request recorded (and run) here; the tracer holds the local results."""
    with (model.generate(**options) if options else model.trace()) as tracer:
        record(tracer)
    return Request(tracer.graph, [tracer.spec(len(tracer.graph))]), tracer


def batch_sizes(server) -> tuple[float, float]:
    """(jobs, batches) the server has run so far, from its metrics."""
    text = httpx.get(f"{server.url}/metrics").text
    found = [re.search(rf'interlace_batch_jobs_{name}{{model="tiny-gpt2"}} (\S+)', text) for name in ("sum", "count")]
    return tuple(float(match.group(1)) if match else 0.0 for match in found)  # no line before the first batch


def submit_together(server, setup, requests) -> list:
    backends = [RemoteBackend(server.url, setup["keys"][USERS[i % len(USERS)]], model="tiny-gpt2", progress=False)
                for i in range(len(requests))]
    return [backend.run(request, blocking=False) for backend, request in zip(backends, requests)]


def test_jobs_sent_together_run_as_one_batch_and_each_equals_running_alone(batching, setup, local):
    def steer(prompt, amount):
        def record(tracer):
            with tracer.invoke(prompt):
                local.transformer.h[0].output[:, -1] += amount
                local.transformer.h[1].output.save()
                local.output.logits[:, -1].save()
        return record

    def two_invokes(tracer):  # values flow from one of its invokes to the other, inside the batch
        with tracer.invoke("w20 w21 w22"):
            hidden = local.transformer.h[0].output[:, -1]
        with tracer.invoke("w30 w31 w32"):
            local.transformer.h[0].output[:, -1] = hidden
            local.output.logits.save()

    def stops(tracer):
        with tracer.invoke("w40 w41 w42"):
            local.transformer.h[0].output.save()
            tracer.stop()

    recordings = [recorded(local, steer(f"w{n} w{n + 1} w{n + 2}", n / 10)) for n in range(2, 12, 2)]
    recordings += [recorded(local, two_invokes), recorded(local, stops),
                   recorded(local, steer("w50 w51", 1.0))]  # two tokens: a batch of its own
    jobs_before, batches_before = batch_sizes(batching)
    jobs = submit_together(batching, setup, [request for request, _ in recordings])
    for job, (_, tracer) in zip(jobs, recordings):
        outcome = job.result(timeout=60)
        assert outcome.results.keys() == tracer.results.keys()
        for index, value in tracer.results.items():
            assert_close_in_batch(outcome.results[index], value)
    jobs_after, batches_after = batch_sizes(batching)
    assert jobs_after - jobs_before == len(recordings)
    assert batches_after - batches_before <= 3  # seven jobs of three tokens together; the short one alone
    assert batching.health()["model_changes"] == []


def test_a_failing_job_fails_alone_in_its_batch(batching, setup, local):
    def good(amount):
        def record(tracer):
            with tracer.invoke("w5 w6 w7"):
                local.transformer.h[0].output[:, -1] += amount
                local.output.logits.save()
        return record

    def broken(tracer):
        with tracer.invoke("w8 w9 w10"):
            local.transformer.h[0].output[:, 0, 999].save()  # index out of range, found when it runs

    first, second = recorded(local, good(1.0)), recorded(local, good(-2.0))
    tracer = local.trace()
    with pytest.raises(interlace.ExecutionError):
        with tracer:
            broken(tracer)
    bad = Request(tracer.graph, [tracer.spec(len(tracer.graph))])
    jobs = submit_together(batching, setup, [first[0], bad, second[0]])
    with pytest.raises(interlace.ExecutionError, match="IndexError"):
        jobs[1].result(timeout=60)
    for job, (_, alone) in ((jobs[0], first), (jobs[2], second)):
        outcome = job.result(timeout=60)
        assert_close_in_batch(outcome.results[max(alone.results)], alone.results[max(alone.results)])


def test_generations_with_the_same_settings_batch_with_identical_tokens(batching, setup, local):
    def steered(prompt, scale):
        def record(tracer):
            with tracer.invoke(prompt):
                with tracer.all():
                    local.transformer.h[0].output[:, -1] *= scale
                local.generator.output.save()
        return record

    recordings = [recorded(local, steered(prompt, scale), max_new_tokens=5)
                  for prompt, scale in (("w5 w6", 2.0), ("w7 w8", 0.5), ("w10 w11", 1.5), ("w12 w13", -1.0))]
    jobs_before, batches_before = batch_sizes(batching)
    jobs = submit_together(batching, setup, [request for request, _ in recordings])
    for job, (_, tracer) in zip(jobs, recordings):
        tokens = job.result(timeout=60).results[max(tracer.results)]
        assert torch.equal(tokens, tracer.results[max(tracer.results)])
    jobs_after, batches_after = batch_sizes(batching)
    assert jobs_after - jobs_before == 4 and batches_after - batches_before < 4


def test_a_generation_that_ends_at_its_end_token_in_a_batch_ends_as_alone(batching, setup, local):
    def record(prompt):
        def steps(tracer):
            with tracer.invoke(prompt):
                made = interlace.list().save()
                with tracer.all():
                    made.append(local.lm_head.output[:, -1].argmax(-1))
                local.generator.output.save()
        return steps

    # greedy, "w9 w2 w7" makes 7, 7, 7, 95: it ends at step 3 while "w1 w2 w3" never makes a 95
    recordings = [recorded(local, record(prompt), max_new_tokens=5, eos_token_id=95)
                  for prompt in ("w9 w2 w7", "w1 w2 w3")]
    jobs_before, batches_before = batch_sizes(batching)
    jobs = submit_together(batching, setup, [request for request, _ in recordings])
    for job, (_, tracer) in zip(jobs, recordings):
        outcome = job.result(timeout=60)
        for index, value in tracer.results.items():
            assert same_tokens(outcome.results[index], value)
    assert [len(tracer.results[min(tracer.results)]) for _, tracer in recordings] == [4, 5]
    jobs_after, batches_after = batch_sizes(batching)
    assert jobs_after - jobs_before == 2 and batches_after - batches_before == 1


def test_a_job_whose_generation_ends_first_is_answered_before_its_batch_ends(batching, setup, local):
    answered_before_its_batch_ends(batching, setup, local)


def answered_before_its_batch_ends(server, setup, local) -> None:
    """A 3-step generation batched with a streamed 48-step one is completed while the long one streams, and
    both equal their local runs (the worker process's runner and Ray's, tests/server/test_ray.py)."""
    def record(prompt):
        def tokens(tracer):
            with tracer.invoke(prompt):
                local.generator.output.save()
        return tokens

    # greedy, "w9 w2 w7" makes 7, 7, 7, 95 and ends at step 3; "w1 w2 w3" makes no 95 in 48 steps
    (short, short_alone), (long, long_alone) = [recorded(local, record(prompt), max_new_tokens=48, eos_token_id=95)
                                                for prompt in ("w9 w2 w7", "w1 w2 w3")]
    assert [tracer.results[0].shape[1] for tracer in (short_alone, long_alone)] == [3 + 4, 3 + 48]
    backends = [RemoteBackend(server.url, setup["keys"][user], model="tiny-gpt2", progress=False)
                for user in USERS[:2]]
    jobs_before, batches_before = batch_sizes(server)
    short_job = backends[0].run(short, blocking=False)
    long_job, steps = backends[1].stream(long)
    states = {}
    try:
        while True:
            step = next(steps)
            if step.index == 8:  # the short job's answer went out at its step 3, before the batch's step 4
                states[step.index] = short_job.status()["state"]
    except StopIteration as end:
        long_outcome = end.value
    assert states == {8: "completed"}  # (without early answers: "running", until step 47)
    assert torch.equal(short_job.result(timeout=60).results[0], short_alone.results[0])
    assert torch.equal(long_outcome.results[0], long_alone.results[0])
    jobs_after, batches_after = batch_sizes(server)
    assert jobs_after - jobs_before == 2 and batches_after - batches_before == 1


def same_tokens(a, b) -> bool:
    """Equal token ids (tensors, or lists of them)."""
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(same_tokens, a, b))
    return torch.equal(a, b)


# -- the queue's choice of a batch, without a server ------------------------------------------------

def queued(queue, group, size=1, asked=None) -> Job:
    """A job of `group` and `size` put in `queue`; `asked` (a list) gets the job each time its batching is asked."""
    def batching():
        if asked is not None:
            asked.append(job)
        return group, size

    job = Job(None, key="k", model="m", limits=None, loop=_Loop(), batching=batching)
    queue.put(job)
    return job


class _Loop:
    def call_soon_threadsafe(self, callback):  # events are not watched here
        pass


def test_the_queue_batches_one_group_in_order_within_the_bounds():
    queue = JobQueue(depth=16)
    a1, b1, a2, alone, a3, a4 = (queued(queue, "a"), queued(queue, "b"), queued(queue, "a"), queued(queue, None),
                                 queued(queue, "a", size=5), queued(queue, "a"))
    assert queue.take(jobs=8, size=4) == [a1, a2, a4]  # a3 would pass the size bound: it waits
    assert queue.take(jobs=8, size=4) == [b1]
    assert queue.take(jobs=8, size=4) == [alone]  # no group: always alone
    assert queue.take(jobs=8, size=4) == [a3]  # the first job of a batch goes even when over the bound
    assert [queued(queue, "a") for _ in range(3)] and len(queue.take(jobs=2, size=10)) == 2


def test_a_job_alone_is_taken_without_its_batching_being_asked():
    """Finding a job's group tokenizes its prompts: done only once a batch could hold another job beside it, so
    a job alone in the queue goes to the model without it (and without it on the way to its first token)."""
    queue, asked = JobQueue(depth=16), []
    alone = queued(queue, "a", asked=asked)
    assert queue.take(jobs=8, size=4) == [alone] and asked == []
    assert model_groups([alone]) == [None] and asked == []
    first, second, other = (queued(queue, (group, "limits"), asked=asked) for group in ("a", "a", "b"))
    assert queue.take(jobs=8, size=4) == [first, second]
    assert sorted(map(id, asked)) == sorted(map(id, [first, second, other]))  # each asked once
    assert model_groups([first, second]) == ["a", "a"] and len(asked) == 3
    assert queue.take(jobs=1, size=4) == [other] and len(asked) == 3


def test_a_job_whose_batching_fails_runs_alone():
    def failing():
        raise RuntimeError("no tokenizer")

    queue = JobQueue(depth=16)
    first = queued(queue, "a")
    broken = Job(None, key="k", model="m", limits=None, loop=_Loop(), batching=failing)
    queue.put(broken)
    assert queue.take(jobs=8, size=4) == [first]
    assert queue.take(jobs=8, size=4) == [broken] and broken.group is None


def test_the_queue_waits_for_companions_only_when_told():
    queue = JobQueue(depth=16)
    first = queued(queue, "a")
    started = time.monotonic()
    assert queue.take(jobs=4, size=10, wait=0.0) == [first]  # the default: no waiting
    assert time.monotonic() - started < 0.5
    first = queued(queue, "a")
    late = threading.Timer(0.2, lambda: queued(queue, "a"))
    late.start()
    batch = queue.take(jobs=2, size=10, wait=5.0)
    late.join()
    assert len(batch) == 2 and batch[0] is first  # it waited for the second, and no longer
    assert time.monotonic() - started < 4.0


def test_a_worker_fails_jobs_cancelled_while_queued_and_runs_the_rest_together():
    from interlace.server.errors import status_of
    from interlace.server.jobs import Worker

    queue, batches = JobQueue(depth=16), []
    jobs = [queued(queue, "a") for _ in range(4)]
    jobs[1].cancel.set()
    worker = Worker(queue, lambda batch, started, finish: batches.append(batch) or [(b"", [], {})] * len(batch), name="m",
                    status_of=status_of, batch=(8, 10, 0.0))
    worker.start()
    deadline = time.monotonic() + 10
    while any(job.state not in ("completed", "cancelled") for job in jobs) and time.monotonic() < deadline:
        time.sleep(0.01)
    queue.close()
    worker.join(5)
    assert [job.state for job in jobs] == ["completed", "cancelled", "completed", "completed"]
    assert jobs[1].status == 410 and batches == [[jobs[0], jobs[2], jobs[3]]]  # one batch, without it
