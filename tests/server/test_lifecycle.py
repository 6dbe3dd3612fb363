"""A job's life on a real server, whatever its graph does: its deadline and DELETE stop it between
generation steps, and the model runs the next job at once."""

import time

import httpx

from hostile import Builder
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
    cancelled = time.monotonic()
    httpx.delete(f"{generating.url}/v1/jobs/{running}", headers={"Authorization": f"Bearer {keys['user1']}"})
    info = _until(generating, keys["user2"], waiting, ("running", "completed"), seconds=5)
    assert time.monotonic() - cancelled < 1.0
    assert get(generating, keys["user1"], f"/v1/jobs/{running}").json()["state"] == "cancelled"
    assert info["started"] is not None
