"""A job's life on a real server, whatever its graph does: its deadline and DELETE stop it between
generation steps, and the model runs the next job at once; revoking a key ends its jobs and streams; jobs
outlive the process (SIGTERM drains, a restart keeps results and runs queued jobs)."""

import json
import re
import signal
import threading
import time

import httpx
import pytest

import interlace
from hostile import Builder
from interlace.errors import ServiceError
from interlace.server import app as app_module
from interlace.server.config import ServerConfig
from interlace.server.keys import KeyStore
from serving import Server
from test_bad_input import _submit, _until, get, post

PROMPT = [(("w5 w6",), {})]


def generation(tokens: int) -> bytes:
    """A generation that hooks no per-step module: it saves only the generated ids."""
    g = Builder()
    g.save(g.add("module_value", "generator", kwargs={"kind": "output", "call": 0, "invoke": None}))
    return g.bytes(PROMPT, mode="generate", kwargs={"max_new_tokens": tokens})


def small() -> bytes:
    g = Builder()
    g.save(g.out("model.layers.1"))
    return g.bytes(PROMPT)


def test_a_deadline_stops_a_long_generation_between_steps(generating, setup):
    key = setup["keys"]["user0"]
    started = time.monotonic()
    response = post(generating, key, generation(2000), timeout=0.5)
    answered = time.monotonic() - started
    body = response.json()
    assert (response.status_code, body["code"]) == (504, "LimitError"), body
    assert "max_seconds" in body["message"]
    assert answered < 1.0, f"answered after {answered:.2f} s"  # 2,000 tokens take 20 s here
    assert post(generating, key, small()).status_code == 200  # the model is free for the next job


def test_delete_stops_a_running_generation_and_the_next_job_starts(generating, setup):
    keys = setup["keys"]
    running = _submit(generating, keys["user1"], generation(2000))
    _until(generating, keys["user1"], running, ("running",))
    waiting = _submit(generating, keys["user2"], small())
    cancelled = time.time()  # the server's clock: the same machine
    httpx.delete(f"{generating.url}/v1/jobs/{running}", headers={"Authorization": f"Bearer {keys['user1']}"})
    info = _until(generating, keys["user2"], waiting, ("running", "completed"), seconds=5)
    print(f"DELETE -> next job running: {info['started'] - cancelled:.3f} s")
    assert info["started"] - cancelled < 2.0  # the generation alone runs 20 s here
    assert get(generating, keys["user1"], f"/v1/jobs/{running}").json()["state"] == "cancelled"


def _events(server, key, job, into: list) -> None:
    """Read the job's event stream to its end into `into` as (kind, data, time)."""
    with httpx.stream("GET", f"{server.url}/v1/jobs/{job}/events", timeout=60,
                      headers={"Authorization": f"Bearer {key}"}) as response:
        assert response.status_code == 200
        kind = None
        for line in response.iter_lines():
            if line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:"):
                into.append((kind, json.loads(line[5:]), time.monotonic()))
    into.append(("closed", None, time.monotonic()))


def test_revoking_a_key_ends_its_streams_and_cancels_its_jobs(generating, setup):
    store = KeyStore(setup["db"])  # as `interlace keys revoke` does, from another connection
    key = store.create("leaving")
    running = _submit(generating, key, generation(2000))
    _until(generating, key, running, ("running",))
    queued = _submit(generating, key, small())
    streams = {job: [] for job in (running, queued)}
    readers = [threading.Thread(target=_events, args=(generating, key, job, seen)) for job, seen in streams.items()]
    for reader in readers:
        reader.start()
    deadline = time.monotonic() + 10
    while not all(streams.values()) and time.monotonic() < deadline:  # both streams are open
        time.sleep(0.05)
    revoked = time.monotonic()
    assert store.revoke("leaving") == 1
    for reader in readers:
        reader.join(10)
    for job, seen in streams.items():
        assert len(seen) >= 2, seen
        kind, data, _ = seen[-2]
        assert kind == "cancelled" and "API key that submitted this job was revoked" in data["message"], seen
        print(f"revoke -> stream closed: {seen[-1][2] - revoked:.3f} s")
        assert seen[-1][2] - revoked < 1.0, f"stream of {job} closed {seen[-1][2] - revoked:.2f} s after the revoke"
    assert "while queued" in streams[queued][-2][1]["message"]
    assert post(generating, key, small()).status_code == 401
    assert post(generating, setup["keys"]["user4"], small()).status_code == 200  # the model is free


# -- durable jobs: SIGTERM drains, a restart keeps results and queued jobs ------------------------------------
def _terminate(server) -> int:
    server.process.send_signal(signal.SIGTERM)
    return server.process.wait(60)


def test_sigterm_drains_and_a_restart_keeps_results_and_queued_jobs(setup, tmp_path):
    db = str(tmp_path / "keys.db")
    key, other = KeyStore(db).create("durable"), KeyStore(db).create("other")
    first = Server(setup["long"], db, "--max-new-tokens", "4096", "--batch-jobs", "1")
    try:
        done = post(first, key, small())
        assert done.status_code == 200
        finished = done.headers["interlace-job"]
        running = _submit(first, key, generation(150))
        _until(first, key, running, ("running",))
        queued = _submit(first, key, small())
        streamed = post(first, key, generation(3), wait=0, stream=True).headers["interlace-job"]
        events: list = []
        reader = threading.Thread(target=_events, args=(first, key, queued, events))
        reader.start()
        while not events:
            time.sleep(0.05)
        first.process.send_signal(signal.SIGTERM)
        refused = post(first, key, small())  # draining: the running generation finishes first
        assert refused.status_code == 503 and refused.json()["code"] == "shutting_down", refused.text
        assert int(refused.headers["retry-after"]) > 0
        assert get(first, key, f"/v1/jobs/{queued}").json()["state"] == "queued"  # status still answers
        assert first.process.wait(60) == 0
        reader.join(10)
        assert events[-2][0] == "end" and events[-2][1]["state"] == "queued", events
    finally:
        first.stop()

    second = Server(setup["long"], db, "--max-new-tokens", "4096", "--batch-jobs", "1")
    try:
        again = get(second, key, f"/v1/jobs/{finished}/result")
        assert again.status_code == 200 and again.content == done.content
        ran = get(second, key, f"/v1/jobs/{running}/result")
        assert ran.status_code == 200  # it finished during the drain
        assert _until(second, key, queued, ("completed",))["state"] == "completed"  # queued before, run now
        assert get(second, key, f"/v1/jobs/{queued}/result").content == post(second, key, small()).content
        steps: list = []
        _events(second, key, streamed, steps)  # queued with stream=true before the restart: it still streams
        assert [data["step"] for kind, data, _ in steps if kind == "step"] == [0, 1, 2], steps
        listed = [job["id"] for job in get(second, key, "/v1/jobs").json()]
        assert {finished, running, queued, streamed} <= set(listed) and listed == sorted(
            listed, key=lambda i: -get(second, key, f"/v1/jobs/{i}").json()["created"])
        assert get(second, other, "/v1/jobs").json() == []  # another key sees none of them
        # a job queued when the server stopped, and a server that comes back with another model under that name
        blocker = _submit(second, key, generation(150))
        _until(second, key, blocker, ("running",))
        orphan = _submit(second, key, small())
        assert _terminate(second) == 0
    finally:
        second.stop()
    third = Server(setup["folder"], db, "--name", "tiny-llama-long")
    try:
        info = get(third, key, f"/v1/jobs/{orphan}").json()
        assert info["state"] == "error" and info["error"]["code"] == "server_restarted", info
        assert "without the model 'tiny-llama-long'" in info["error"]["message"]
    finally:
        third.stop()


def test_a_database_of_an_earlier_version_gains_the_new_columns(tmp_path):
    import sqlite3

    from interlace.server.store import JobStore

    path = str(tmp_path / "old.db")
    with sqlite3.connect(path) as old:  # the jobs table as the first durable version made it
        old.execute("CREATE TABLE jobs (id TEXT PRIMARY KEY, key TEXT NOT NULL, model TEXT NOT NULL, fingerprint "
                    "TEXT NOT NULL, state TEXT NOT NULL, created REAL NOT NULL, started REAL, finished REAL, timeout "
                    "REAL, idempotency TEXT, request BLOB, result BLOB, missing TEXT, error TEXT, status INTEGER NOT "
                    "NULL DEFAULT 200)")
        old.execute("INSERT INTO jobs (id, key, model, fingerprint, state, created, request) VALUES "
                    "('j1', 'k', 'm', 'f', 'queued', 1.0, x'00')")
    [(job, fingerprint, _, data)] = JobStore(path, ttl=3600).load(loop=None)
    assert (job.id, job.state, job.stream, fingerprint, data) == ("j1", "queued", False, "f", b"\x00")


def test_an_idempotency_key_gives_back_the_same_job(generating, setup):
    key = setup["keys"]["user6"]
    headers = {"Idempotency-Key": "try-7f3a"}
    first = post(generating, key, small(), headers=headers)
    second = post(generating, key, small(), headers=headers)
    assert first.status_code == second.status_code == 200
    assert first.headers["interlace-job"] == second.headers["interlace-job"]
    other = post(generating, setup["keys"]["user7"], small(), headers=headers)  # the same header, another key
    assert other.headers["interlace-job"] != first.headers["interlace-job"]


def _ctrl_c_in_a_long_generation(lm, now) -> None:
    """A blocking remote generation of 4000 tokens, interrupted with Ctrl-C once `now()` is true (polled;
    not after a fixed time: how long the generation takes depends on the machine)."""
    done = threading.Event()

    def interrupt():
        while not done.wait(0.02):
            if now():
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
                return

    interrupter = threading.Thread(target=interrupt)
    interrupter.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            with lm.generate("w5 w6", max_new_tokens=4000, remote=True):
                lm.generator.output.save()
    finally:
        done.set()  # the block ended otherwise: no Ctrl-C may reach a later test
        interrupter.join()


def _count_follows(monkeypatch) -> list:
    """One item per time a client starts to follow a job it submitted (after its first answer)."""
    from interlace.backends.remote import RemoteBackend

    followed, follow = [], RemoteBackend._follow
    monkeypatch.setattr(RemoteBackend, "_follow", lambda *args: followed.append(1) or follow(*args))
    return followed


def test_ctrl_c_in_a_blocking_trace_says_how_to_fetch_or_cancel_the_job(generating, setup, capsys, monkeypatch):
    lm = interlace.LanguageModel("tiny-llama-long", host=generating.url, api_key=setup["keys"]["user8"])
    followed = _count_follows(monkeypatch)
    _ctrl_c_in_a_long_generation(lm, lambda: bool(followed))
    said = capsys.readouterr().err
    job_id = re.search(r"job (\S+) goes on", said).group(1)
    assert f"model.job('{job_id}').result()" in said and f"model.job('{job_id}').cancel()" in said
    assert lm.job(job_id).status()["state"] in ("queued", "running")  # it went on
    assert lm.job(job_id).cancel()["state"] == "cancelled"


def test_ctrl_c_in_the_first_second_of_a_blocking_trace_names_the_one_job_it_made(generating, setup, capsys,
                                                                                 monkeypatch):
    """The submission's answer is held up to a second for a quick result: a Ctrl-C then comes before the
    client knows the job's id, which it asks for with the submission's Idempotency-Key (no second job)."""
    key = setup["keys"]["user9"]
    lm = interlace.LanguageModel("tiny-llama-long", host=generating.url, api_key=key)
    followed = _count_follows(monkeypatch)
    _ctrl_c_in_a_long_generation(
        lm, lambda: any(job["state"] == "running" for job in get(generating, key, "/v1/jobs").json()))
    assert not followed  # it came while the submission waited for its answer
    job_id = re.search(r"job (\S+) goes on", capsys.readouterr().err).group(1)
    unfinished = [job["id"] for job in get(generating, key, "/v1/jobs").json() if job["state"] in ("queued", "running")]
    assert unfinished == [job_id]
    assert lm.job(job_id).cancel()["state"] == "cancelled"


def test_cancelled_jobs_of_a_merged_generation_stop_it_between_steps(setup):
    """Two users' generations in one batch, both cancelled mid-way: the batch ends at the next step."""
    from interlace.backends.limits import Limits
    from interlace.backends.serialize import deserialize_request

    lm = interlace.LanguageModel(setup["long"], dispatch=True)
    requests = [deserialize_request(generation(2000)) for _ in range(2)]
    assert lm.batching(requests[0])[0] == lm.batching(requests[1])[0] is not None  # they share a forward
    cancels = [threading.Event(), threading.Event()]
    stopper = threading.Timer(0.5, lambda: [cancel.set() for cancel in cancels])
    started = time.monotonic()
    stopper.start()
    answers = lm.run_many(requests, untrusted=True, limits=Limits(max_new_tokens=4096), cancels=cancels)
    assert time.monotonic() - started < 5.0  # the whole generation takes 20 s and more here
    assert [type(answer).__name__ for answer in answers] == ["CancelledError", "CancelledError"]


def test_finished_jobs_expire_after_the_ttl_in_sweeps_at_most_a_second_apart(monkeypatch):
    """A sweep walks every job, so a submission sweeps only when the last sweep is a second old: the jobs
    finished more than `ttl` seconds ago are then gone, from memory and from the database."""
    import asyncio

    from interlace.server import store as store_module
    from interlace.server.jobs import Job
    from interlace.server.store import JobStore

    now = [1000.0]
    monkeypatch.setattr(store_module.time, "time", lambda: now[0])  # the store's clock and the jobs'
    loop = asyncio.new_event_loop()
    try:
        jobs = JobStore(":memory:", ttl=60)
        make = lambda: Job(None, key="k", model="m", limits=None, loop=loop)  # noqa: E731
        old, running = make(), make()
        for job in (old, running):
            jobs.add(job, fingerprint="f", timeout=None)
        running.running()
        old.complete(b"", [], {})
        now[0] += 61  # `old` finished 61 s ago
        jobs.add(make(), fingerprint="f", timeout=None)  # the first sweep since the start
        assert jobs.get(running.id, "k") is running
        with pytest.raises(ServiceError, match="unknown, another key's, or expired"):
            jobs.get(old.id, "k")
        assert [row[0] for row in jobs._db.execute("SELECT id FROM jobs WHERE id = ?", (old.id,))] == []
        running.complete(b"", [], {})
        now[0] += 61
        later = make()
        jobs.add(later, fingerprint="f", timeout=None)  # a sweep: `running` finished 61 s ago
        with pytest.raises(ServiceError):
            jobs.get(running.id, "k")
        later.complete(b"", [], {})
        now[0] += 59.8
        jobs.add(make(), fingerprint="f", timeout=None)  # a sweep: `later` finished 59.8 s ago, it stays
        now[0] += 0.5
        jobs.add(make(), fingerprint="f", timeout=None)  # half a second after that sweep: none
        assert jobs.get(later.id, "k") is later
        now[0] += 0.6
        jobs.add(make(), fingerprint="f", timeout=None)  # 1.1 s after it: a sweep
        with pytest.raises(ServiceError):
            jobs.get(later.id, "k")
    finally:
        loop.close()


def test_a_result_past_its_ttl_is_gone_though_nobody_submits(monkeypatch):
    """Reading a job (its status, result or the key's list) sweeps too: on a server that takes no new jobs a
    result does not stay readable past `--result-ttl`."""
    import asyncio

    from interlace.server import store as store_module
    from interlace.server.jobs import Job
    from interlace.server.store import JobStore

    now = [1000.0]
    monkeypatch.setattr(store_module.time, "time", lambda: now[0])
    loop = asyncio.new_event_loop()
    try:
        jobs = JobStore(":memory:", ttl=60)
        job = Job(None, key="k", model="m", limits=None, loop=loop)
        jobs.add(job, fingerprint="f", timeout=None, idempotency="once")
        job.complete(b"", [], {})
        now[0] += 59
        assert jobs.get(job.id, "k") is job and jobs.of_key("k") == [job]
        now[0] += 2  # finished 61 s ago; no submission since
        assert jobs.of_key("k") == [] and jobs.idempotent("k", "once") is None
        with pytest.raises(ServiceError, match="unknown, another key's, or expired"):
            jobs.get(job.id, "k")
    finally:
        loop.close()


def test_a_drain_waits_for_the_waits_and_streams_still_open_and_for_nothing_else(tmp_path, monkeypatch):
    """SIGTERM sets `closing`; each wait and event stream sees it within STREAM_CHECK and ends with its
    final answer. The drain waits for those open, not a fixed STREAM_CHECK (which every stop paid)."""
    service = app_module.Service([], KeyStore(str(tmp_path / "keys.db")), ServerConfig())
    slept = []

    def sleep(seconds):
        slept.append(seconds)
        if len(slept) == 3:  # the stream has sent its final event
            listening.__exit__(None, None, None)

    monkeypatch.setattr(app_module.time, "sleep", sleep)
    service.wait_for_listeners()
    assert slept == []  # nothing open
    listening = service.listening()
    listening.__enter__()
    assert service.listeners == 1
    service.wait_for_listeners()
    assert len(slept) == 3 and service.listeners == 0


def test_a_stream_waiting_when_the_server_drains_says_to_submit_it_again(setup, tmp_path):
    db = str(tmp_path / "keys.db")
    key = KeyStore(db).create("streamer")
    server = Server(setup["long"], db, "--max-new-tokens", "4096", "--batch-jobs", "1")
    try:
        remote = interlace.LanguageModel("tiny-llama-long", host=server.url, api_key=key)
        blocker = _submit(server, key, generation(150))
        _until(server, key, blocker, ("running",))
        with remote.generate("w5 w6", max_new_tokens=3, remote=True, stream=True) as tracer:
            remote.generator.output.save()
        steps = tracer.stream()
        server.process.send_signal(signal.SIGTERM)  # the generation before it finishes; it stays queued
        with pytest.raises(ServiceError, match="submit it again once the server is back") as raised:
            next(steps)
        assert (raised.value.status, raised.value.code) == (503, "shutting_down")
        assert server.process.wait(60) == 0
    finally:
        server.stop()
    again = Server(setup["long"], db)  # the reader gave the job up: it was cancelled, and never ran
    try:
        status = get(again, key, f"/v1/jobs/{tracer.job.id}").json()
        assert status["state"] == "cancelled" and status["started"] is None, status
        assert get(again, key, f"/v1/jobs/{tracer.job.id}/result").json()["message"] == \
            "the job was cancelled while queued"
    finally:
        again.stop()
