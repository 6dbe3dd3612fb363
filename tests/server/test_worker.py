"""The model in a worker process (`interlace serve`'s default, `server/worker.py`): the front keeps answering
while one long operation runs, a deadline or a cancel stops even that (the worker is killed and started
again), a worker that dies fails only its batch, and no worker outlives its server."""

import gc
import os
import pickle
import signal
import statistics
import time

import httpx
import pytest
import torch

import interlace

from hostile import Builder
from interlace.errors import ExecutionError
from interlace.server.replica import ModelReplica, decode_answer
from interlace.server.worker import _pickled
from serving import Server
from test_bad_input import _result, _submit, _until, get, good, post
from test_ray import descendants, run_here, values

PATH = "transformer.h.0"
# the server's assumption of the machine's speed is far too high here, so that a product the executor
# would refuse as too slow for the time left runs: what slips through the checks before an operation
FLAGS = ("--check-weights", "--flops-per-second", "1e15", "--batch-jobs", "1")


def one_long_operation(size: int = 8192) -> bytes:
    """One matrix product of `size` x `size` matrices: seconds inside one operation (8192: ~12 s on one core)."""
    g = Builder()
    x = g.call("operator.truediv", g.method("new_ones", g.out(PATH), [size, size]), float(size))
    g.save(g.call("torch.sum", g.call("operator.matmul", x, x)))
    return g.bytes([(("w5 w6",), {})])


def workers(server) -> list[int]:
    """The server's worker processes (not multiprocessing's resource tracker)."""
    found = []
    for pid in descendants(server.process.pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as file:
                if b"spawn_main" in file.read():
                    found.append(pid)
        except OSError:
            pass
    return found


@pytest.fixture(scope="module")
def isolated(setup):
    server = Server(setup["folder"], setup["db"], *FLAGS)
    yield server
    server.stop()


def test_a_deadline_stops_one_long_operation_and_health_answers_meanwhile(isolated, setup, local):
    key = setup["keys"]["user3"]
    job = _submit_with(isolated, key, one_long_operation(), timeout=2)
    _until(isolated, key, job, ("running",))
    probes = []
    for _ in range(20):
        began = time.monotonic()
        assert httpx.get(f"{isolated.url}/v1/health", timeout=10).status_code == 200
        probes.append(time.monotonic() - began)
        time.sleep(0.02)
    print(f"health during one long operation: median {statistics.median(probes) * 1000:.0f} ms, "
          f"max {max(probes) * 1000:.0f} ms")
    assert max(probes) < 1.0  # in one process it waits for the product to end (seconds)
    answer = _result(isolated, key, job)
    info = get(isolated, key, f"/v1/jobs/{job}").json()
    body = answer.json()
    assert (answer.status_code, body["code"]) == (504, "LimitError"), body
    assert "inside one operation" in body["message"] and "restarted" in body["message"]
    late = info["finished"] - info["started"] - 2
    print(f"deadline -> 504: {late:.2f} s")
    assert late < 1.5  # the product alone runs ~12 s
    # the next job runs on a fresh worker; its result is the local one and the model is unchanged
    data = good()
    response = post(isolated, key, data)
    assert response.status_code == 200, response.text
    there, here = values(response.content), run_here(local, data)
    assert there.keys() == here.keys() and all((there[k] == here[k]).all() for k in here)
    health = isolated.health()
    assert health["checked_jobs"] >= 1 and health["model_changes"] == []


def test_cancelling_one_long_operation_frees_the_model(isolated, setup):
    key = setup["keys"]["user4"]
    running = _submit(isolated, key, one_long_operation())
    _until(isolated, key, running, ("running",))
    waiting = _submit(isolated, key, good())
    time.sleep(0.5)  # inside the product by now
    began = time.monotonic()
    httpx.delete(f"{isolated.url}/v1/jobs/{running}", headers={"Authorization": f"Bearer {key}"})
    assert _result(isolated, key, waiting).status_code == 200  # within 30 s, though the product runs ~12 s
    print(f"cancel -> next job done: {time.monotonic() - began:.2f} s (a new worker loads the model)")
    assert get(isolated, key, f"/v1/jobs/{running}").json()["state"] == "cancelled"


def test_a_worker_that_dies_fails_only_its_batch(isolated, setup):
    key = setup["keys"]["user5"]
    [pid] = workers(isolated)
    died = isolated.health()["worker_restarts"].get("tiny-gpt2", {}).get("died", 0)  # (earlier tests' restarts)
    job = _submit(isolated, key, one_long_operation())
    _until(isolated, key, job, ("running",))
    time.sleep(0.3)  # in the worker by now
    os.kill(pid, signal.SIGKILL)
    answer = _result(isolated, key, job)
    body = answer.json()
    assert (answer.status_code, body["code"]) == (503, "worker_failed"), body
    assert "submit the job again" in body["message"]
    # the next job waits for the new worker process to load the model: queued, not running, until it has it
    waiting = _submit(isolated, key, good())
    time.sleep(0.3)  # (taken by the front's worker thread; a process loads torch and the model in seconds)
    assert get(isolated, key, f"/v1/jobs/{waiting}").json()["state"] == "queued"
    health = isolated.health()
    assert (health["queued"], health["running"]) == ({"tiny-gpt2": 1}, {"tiny-gpt2": 0})
    assert _result(isolated, key, waiting).status_code == 200
    assert post(isolated, key, good()).status_code == 200  # the server goes on, on a new worker
    assert workers(isolated) and pid not in workers(isolated)
    assert isolated.health()["worker_restarts"]["tiny-gpt2"]["died"] == died + 1  # the operator sees it
    metrics = httpx.get(f"{isolated.url}/metrics").text
    assert f'interlace_worker_restarts_total{{model="tiny-gpt2",reason="died"}} {died + 1}.0' in metrics


def test_no_worker_outlives_its_server(setup):
    for stop in (signal.SIGKILL, signal.SIGINT):
        server = Server(setup["folder"], setup["db"])
        try:
            [pid] = workers(server)
            assert post(server, setup["keys"]["user6"], good()).status_code == 200
            server.process.send_signal(stop)
            server.process.wait(30)
            deadline = time.monotonic() + 10
            while os.path.exists(f"/proc/{pid}") and _state(pid) != "Z" and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not os.path.exists(f"/proc/{pid}") or _state(pid) == "Z", f"worker {pid} outlived {stop!r}"
        finally:
            server.stop()


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def _submit_with(server, key, data, **params) -> str:
    response = post(server, key, data, wait=0, **params)
    assert response.status_code == 202, response.text
    return response.headers["interlace-job"]


def test_in_process_keeps_the_model_in_the_server(setup, local):
    server = Server(setup["folder"], setup["db"], "--in-process", "--check-weights")
    try:
        assert workers(server) == []
        data = good()
        response = post(server, setup["keys"]["user6"], data)
        assert response.status_code == 200, response.text
        there, here = values(response.content), run_here(local, data)
        assert there.keys() == here.keys() and all((there[k] == here[k]).all() for k in here)
        assert server.health()["checked_jobs"] >= 1
        # a block over steps: the front leaves its copies to the run, here in the front's own process
        remote = interlace.LanguageModel("tiny-gpt2", host=server.url, api_key=setup["keys"]["user6"])
        steer = torch.linspace(-1, 1, local.config.hidden_size)

        def steered(lm, **options):
            with lm.generate("w5 w6", max_new_tokens=4, **options) as tracer:
                hidden = interlace.list().save()
                with tracer.all():
                    lm.transformer.h[0].output[:, -1] += steer
                    hidden.append(lm.transformer.h[1].output[:, -1])
                tokens = lm.generator.output.save()
            return hidden, tokens

        (hidden, tokens), (mine, my_tokens) = steered(remote, remote=True), steered(local)
        assert torch.equal(tokens, my_tokens) and len(hidden) == 4
        assert all(torch.equal(a, b) for a, b in zip(hidden, mine))
    finally:
        server.stop()


def test_a_write_past_the_schema_check_restarts_the_worker_on_fresh_weights(setup, local):
    """The server's schema check refuses nothing here (`unchecked_writes.py`): the version counters catch the
    write, its job fails, and the worker is restarted before the next job, which runs on weights loaded again."""
    script = os.path.join(os.path.dirname(__file__), "unchecked_writes.py")
    server = Server(setup["folder"], setup["db"], program=(script,))
    key = setup["keys"]["user7"]
    try:
        [pid] = workers(server)
        g = Builder()
        weight = g.param(f"{PATH}.ln_1.weight")
        g.call("torch.nn.functional.hardtanh", weight, 0.0, 0.5, True)  # its ones become 0.5, in place
        g.save(g.out(PATH))
        answer = post(server, key, g.bytes([(("w5 w6 w7",), {})]))
        body = answer.json()
        assert (answer.status_code, body["code"]) == (403, "WeightsChangedError"), body
        assert f"{PATH}.ln_1.weight" in body["message"] and "must reload the model" in body["message"]
        data = good()
        response = post(server, key, data)
        assert response.status_code == 200, response.text
        there, here = values(response.content), run_here(local, data)
        assert there.keys() == here.keys() and all(torch.equal(there[k], here[k]) for k in here)
        assert workers(server) and pid not in workers(server)
        health = server.health()
        assert health["status"] == "ok", health
        assert health["model_damage"] == [f"tiny-gpt2: weight(s) {PATH}.ln_1.weight changed by a job: worker restarted"]
    finally:
        server.stop()


@pytest.mark.parametrize("tensor", [torch.randn(3, 4), torch.randn(4, 3).T, torch.randn(2).to(torch.bfloat16),
                                    torch.tensor([True, False]), torch.arange(5), torch.randn(3, dtype=torch.complex64),
                                    torch.tensor(2.5), torch.empty(0, 3), torch.randn(2, requires_grad=True)],
                         ids=["float", "transposed", "bfloat16", "bool", "int64", "complex", "scalar", "empty", "grad"])
def test_a_batch_crosses_to_the_worker_with_its_tensors_equal(tensor):
    """The batch is pickled with its tensors as plain bytes (multiprocessing would share each through a file
    descriptor the child fetches back); whatever the dtype, shape or layout, they arrive equal."""
    [back] = pickle.loads(_pickled(("run", [tensor])))[1]
    assert back.dtype == tensor.dtype and back.shape == tensor.shape and back.requires_grad == tensor.requires_grad
    assert torch.equal(back, tensor.detach())


def test_a_replica_runs_its_batch_with_the_collector_paused(setup, local):
    """A replica's process runs batches and nothing else, so it pauses the garbage collector for each (see
    interlace.collector); a hand-written hook looks while the batch runs."""
    replica = ModelReplica(setup["folder"], name="tiny-gpt2", kind={}, limits={}, trusted=False, check_weights=False)
    seen = []
    handle = replica.hosted.model.module.transformer.h[0].register_forward_hook(
        lambda module, args, output: seen.append(gc.isenabled()))
    try:
        reply = replica.answer([replica.hosted.admit(good())], {})
    finally:
        handle.remove()
    [(status, result, _, _)] = reply["answers"]
    assert status == "completed" and seen == [False] and gc.isenabled()
    there, here = values(result), run_here(local, good())
    assert there.keys() == here.keys() and all(torch.equal(there[k], here[k]) for k in here)


def test_a_workers_error_is_decoded_without_reading_the_files_it_names():
    """The front decodes its worker's errors with the client's mapping, but a location in a stranger's
    graph is text there: the server never reads the line of a file it names (the client does)."""
    message = f"{__file__}:1\n  IndexError: index 9 is out of bounds (also {__file__}:2)."
    error = decode_answer(("error", 422, {"code": "ExecutionError", "message": message}))
    assert type(error) is ExecutionError and str(error) == message
