"""A job's life on a real server, whatever its graph does: its deadline and DELETE stop it between
generation steps, and the model runs the next job at once; revoking a key ends its jobs and streams."""

import json
import threading
import time

import httpx

from hostile import Builder
from interlace.server.keys import KeyStore
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
