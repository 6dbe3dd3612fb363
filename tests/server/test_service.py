"""The service around the jobs: the keys command, job events, metrics, health, and --trusted."""

import json

import httpx
import pytest
import torch

import interlace
from interlace import cli
from interlace.errors import ServiceError
from interlace.server.keys import KeyStore
from test_bad_input import _result, _submit, _until, good, post, slow


def test_keys_create_list_and_revoke(tmp_path, capsys):
    db = str(tmp_path / "keys.db")
    assert cli.main(["keys", "create", "--db", db, "--name", "carol"]) == 0
    key = capsys.readouterr().out.strip()
    assert KeyStore(db).verify(key).name == "carol"
    assert cli.main(["keys", "list", "--db", db]) == 0
    listed = capsys.readouterr().out
    assert "carol  active" in listed and key not in listed  # the key itself is shown once only
    assert cli.main(["keys", "revoke", "--db", db, "--name", "carol"]) == 0
    assert KeyStore(db).verify(key) is None
    with open(db, "rb") as file:
        assert key.split("_", 2)[2].encode() not in file.read()  # stored hashed


def test_events_tell_position_state_logs_and_the_end(tight, setup):
    keys = setup["keys"]
    running = _submit(tight, keys["tight5"], slow())
    _until(tight, keys["tight5"], running, ("running",))
    g = __import__("hostile").Builder()
    g.add("log", None, ("hello", g.out("transformer.h.0", 0)))
    waiting = _submit(tight, keys["tight6"], g.bytes([(("w5 w6",), {})]))
    httpx.delete(f"{tight.url}/v1/jobs/{running}", headers={"Authorization": f"Bearer {keys['tight5']}"})
    events = []
    with httpx.stream("GET", f"{tight.url}/v1/jobs/{waiting}/events", timeout=30,
                      headers={"Authorization": f"Bearer {keys['tight6']}"}) as response:
        kind = None
        for line in response.iter_lines():
            if line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:"):
                events.append((kind, json.loads(line[5:])))
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "queued" and events[0][1] == {"position": 1}
    assert kinds[-3:] == ["running", "log", "completed"] and events[-2][1]["text"].startswith("hello tensor(")
    assert _result(tight, keys["tight6"], waiting).status_code == 200


def test_a_streamed_submission_is_answered_while_its_job_waits_behind_another(tight, setup):
    """A streamed submission's answer waits a moment for its job to start (it would hold the interpreter
    the job's hand-over needs), but not for its turn behind a running job."""
    key = setup["keys"]["tight8"]
    headers = {"Authorization": f"Bearer {key}"}
    running = _submit(tight, key, slow())
    _until(tight, key, running, ("running",))
    g = __import__("hostile").Builder()
    g.save(g.out("transformer.h.0", 0))
    with httpx.stream("POST", f"{tight.url}/v1/jobs", params={"stream": True}, content=g.bytes([(("w5 w6",), {})]),
                      headers={**headers, "Accept": "text/event-stream"}, timeout=30) as response:
        assert response.status_code == 200
        first_state = httpx.get(f"{tight.url}/v1/jobs/{running}", headers=headers).json()["state"]
        httpx.delete(f"{tight.url}/v1/jobs/{running}", headers=headers)
        kinds = [line[6:].strip() for line in response.iter_lines() if line.startswith("event:")]
    assert first_state == "running"  # the answer came while the other job still ran
    assert kinds[0] == "queued" and kinds[-2:] == ["running", "completed"], kinds


def test_metrics_and_health(server, setup):
    assert post(server, setup["keys"]["alice"], good()).status_code == 200
    text = httpx.get(f"{server.url}/metrics").text
    assert 'interlace_jobs_finished_total{model="tiny-gpt2",state="completed"}' in text
    assert "interlace_job_run_seconds_bucket" in text and "interlace_queue_depth" in text
    health = server.health()
    assert health["status"] == "ok" and health["wire_version"] == 1 and health["wire_versions"] == [1, 2] and health["models"] == ["tiny-gpt2"]


def test_a_trusted_server_runs_user_functions(tight, setup, local):
    lm = interlace.LanguageModel("tiny-gpt2", host=tight.url, api_key=setup["keys"]["mallory"])

    def work(model, remote):
        with model.trace("w5 w6", remote=remote):
            doubled = interlace.apply(lambda x: x * 2 + 1, model.transformer.h[0].output).save()
        return doubled

    assert torch.equal(work(lm, True), work(local, False))


def test_waiting_for_a_job_handle_can_time_out_and_cancel(tight, setup):
    from interlace.backends.remote import RemoteBackend
    from interlace.backends.serialize import deserialize_request

    backend = RemoteBackend(tight.url, setup["keys"]["mallory"], model="tiny-gpt2", progress=False)
    job = backend.run(deserialize_request(slow()), blocking=False)
    with pytest.raises(interlace.LimitError, match="goes on"):
        job.result(timeout=0.2)
    assert job.cancel()["state"] in ("running", "cancelled")
    with pytest.raises(interlace.CancelledError):
        job.result(timeout=30)


def test_a_client_over_the_rate_is_told_when_to_retry(tight, setup):
    """The server's Retry-After reaches the caller, who never sees the header: in the message and as
    `retry_after`."""
    key = setup["keys"]["tight8"]
    remote = interlace.LanguageModel("tiny-gpt2", host=tight.url, api_key=key)
    for _ in range(8):  # the server's --rate
        post(tight, key, b"")  # refused as malformed, but counted
    with pytest.raises(ServiceError) as refused:
        with remote.trace("w5 w6", remote=True):
            remote.transformer.h[0].output.save()
    assert (refused.value.status, refused.value.code) == (429, "rate_limited")
    assert 1 <= refused.value.retry_after <= 61
    assert f"retry in {refused.value.retry_after} s" in str(refused.value)
