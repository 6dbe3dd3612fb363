"""Remote streaming against a real server: each step's tokens, text and values equal the local stream and
the remote run without streaming; a reader that leaves cancels the job and frees the server; streamed
jobs batched with other users' jobs each stream their own rows."""

import gc
import threading

import httpx
import pytest
import torch

import interlace
from helpers import assert_clean, same
from interlace.backends import remote as remote_backend
from interlace.backends.serialize import serialize_request
from interlace.graph import Request
from test_batching import USERS, batch_sizes, batching  # noqa: F401 - the batching server fixture

PROMPT = "w5 w6 w7 w8"
NEW = 6


def generation(lm, *, remote, stream, sample=True, stop=False):
    """Seeded sampling (or greedy), two invokes (one steered every step), an optional stop at step 3."""
    sampling = {"do_sample": True, "seed": 11} if sample else {}
    with lm.generate(max_new_tokens=NEW, remote=remote, stream=stream, **sampling) as tracer:
        if stop:
            with tracer.iter[3]:
                lm.transformer.h[0].output
                tracer.stop()
        with tracer.invoke(PROMPT):
            hidden = interlace.list().save()
            with tracer.all():
                lm.transformer.h[1].output[:, -1] += 2.0
                hidden.append(lm.transformer.h[0].output[:, -1])
        with tracer.invoke(["w9 w10", "w11 w12 w13 w14 w15"]):
            with tracer.all():
                logits = lm.lm_head.output[:, -1].save()
        out = lm.generator.output.save()
    steps = None
    if stream:
        steps = [(step.index, step.tokens, step.text, step[hidden], step[logits]) for step in tracer.stream()]
    return {"hidden": hidden, "logits": logits, "out": out, "steps": steps, "missing": tracer.missing}


@pytest.mark.parametrize("sample, stop", [(False, False), (True, False), (True, True)])
def test_remote_steps_equal_the_local_stream_and_the_run_without_streaming(local, remote, sample, stop):
    here = generation(local, remote=False, stream=True, sample=sample, stop=stop)
    there = generation(remote, remote=True, stream=True, sample=sample, stop=stop)
    plain = generation(remote, remote=True, stream=False, sample=sample, stop=stop)
    assert_clean(local.module)
    assert [s[0] for s in there["steps"]] == list(range(3 if stop else NEW))
    for mine, theirs in zip(here["steps"], there["steps"], strict=True):
        assert same(list(mine), list(theirs))
    for key in ("hidden", "logits") if stop else ("hidden", "logits", "out"):
        assert same(there[key], here[key]) and same(plain[key], here[key])
    if stop:  # generate never returned
        assert all(isinstance(run["out"], interlace.Proxy) for run in (here, there, plain))
    assert there["missing"] == plain["missing"] == here["missing"]
    if not stop:
        assert isinstance(there["out"], torch.Tensor) and there["out"].shape[0] == 3
        length = there["out"].shape[1] - NEW
        for index, tokens, text, hidden, logits in there["steps"]:
            assert torch.equal(tokens, there["out"][:, length + index])
            assert same(hidden, [there["hidden"][index]])
            words = [remote.tokenizer.decode(int(t), skip_special_tokens=True) for t in tokens]
            assert text == [" " + word if word else "" for word in words]  # w0, w1 are special: no text


def slow_generation(lm, tracer):
    """Every step also multiplies two 1500 x 1500 matrices on the server: steps take tens of milliseconds."""
    with tracer.all():
        scale = lm.transformer.h[0].output[0, -1, 0]
        square = scale.expand(1500, 1500) * 1.0  # made on the server
        lm.transformer.h[1].output[:, -1] += (square @ square).mean() * 0


def test_a_single_forward_streams_one_step_holding_every_value_as_locally(local, remote):
    runs = {}
    for lm, where in ((local, "local"), (remote, "remote")):
        with lm.trace(PROMPT, remote=where == "remote", stream=True) as tracer:
            hidden = lm.transformer.h[0].output[:, -1].save()
            items = interlace.list().save()
            items.append(lm.transformer.h[1].output[:, -1])
        runs[where] = [(step.index, step.tokens, step[hidden], step[items]) for step in tracer.stream()], hidden
    (here, hidden_here), (there, hidden_there) = runs["local"], runs["remote"]
    assert len(here) == len(there) == 1 and here[0][0] == there[0][0] == 0 and there[0][1] is None
    assert same(list(there[0][2:]), list(here[0][2:])) and same(hidden_there, hidden_here)
    assert same(there[0][2], hidden_there)  # the step holds what binds


def test_a_reader_that_leaves_cancels_the_job_at_its_next_step_and_frees_the_server(server, setup, remote):
    with remote.generate(PROMPT, max_new_tokens=16, remote=True, stream=True) as tracer:
        slow_generation(remote, tracer)
        out = remote.generator.output.save()
    for step in tracer.stream():
        assert step.index == 0
        break  # the reader leaves
    assert isinstance(out, interlace.Proxy)
    with pytest.raises(interlace.NotSavedError, match="ended before the last step, which stopped the run"):
        print(out)
    job_id = tracer.job.id

    headers = {"Authorization": f"Bearer {setup['keys']['alice']}"}
    with httpx.stream("GET", f"{server.url}/v1/jobs/{job_id}/events", headers=headers, timeout=60) as response:
        kinds = [kind for kind, _ in remote_backend._events(response.iter_lines()) if kind]
    assert kinds[-1] == "cancelled" and kinds.count("step") < 16  # it stopped before its last step

    with remote.generate(PROMPT, max_new_tokens=4, remote=True) as tracer:  # the next job runs
        after = remote.generator.output.save()
    assert after.shape == (1, 8)
    health = server.health()
    assert health["model_changes"] == [] and health["running"] == {"tiny-gpt2": 0}  # as before, and free


def test_a_reader_whose_connection_drops_cancels_the_job(server, setup, local, remote):
    """A client that dies mid-stream sends no cancel: the server sees its connection close and cancels
    the job, so the next user does not wait for a generation nobody reads."""
    with local.generate(PROMPT, max_new_tokens=16) as tracer:  # (recorded here, sent by hand below)
        slow_generation(local, tracer)
        local.generator.output.save()
    body = remote._remote._encode(Request(tracer.graph, [tracer.spec(len(tracer.graph))]))
    headers = {"Authorization": f"Bearer {setup['keys']['alice']}", "Accept": "text/event-stream"}
    params = {"model": "tiny-gpt2", "wait": 0, "stream": "true"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as client:
        with client.stream("POST", "/v1/jobs", params=params, content=body) as response:
            job_id = response.headers["interlace-job"]
            kinds = remote_backend._events(response.iter_lines())
            assert next(kind for kind, _ in kinds if kind == "step") == "step"
        # the connection closes here, with no DELETE, as when the client's process is killed
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as client:
        with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
            events = list(remote_backend._events(response.iter_lines()))
    kind, data = events[-1]
    assert kind == "cancelled" and "its reader went away" in data["message"]
    assert sum(kind == "step" for kind, _ in events) < 16
    with remote.generate(PROMPT, max_new_tokens=4, remote=True) as tracer:  # the next job runs
        after = remote.generator.output.save()
    assert after.shape == (1, 8) and server.health()["running"] == {"tiny-gpt2": 0}


def test_streamed_jobs_batched_with_other_users_each_stream_their_own_rows(batching, setup, local):  # noqa: F811
    jobs_before, batches_before = batch_sizes(batching)
    prompts = ["w20 w21 w22", "w30 w31 w32", "w40 w41 w42", "w50 w51 w52"]
    started = []
    for number, prompt in enumerate(prompts):
        lm = interlace.LanguageModel("tiny-gpt2", host=batching.url, api_key=setup["keys"][USERS[number]])
        streamed = number % 2 == 0
        with lm.generate(prompt, max_new_tokens=NEW, remote=True, stream=streamed, blocking=streamed) as tracer:
            hidden = interlace.list().save()
            with tracer.all():
                lm.transformer.h[1].output[:, -1] += float(number)
                hidden.append(lm.transformer.h[0].output[:, -1])
            out = lm.generator.output.save()
        started.append((tracer, hidden, out))
    results = [None] * len(prompts)

    def read(number):
        tracer, hidden, out = started[number]
        if number % 2:  # a job that did not ask to stream, batched with those that did
            results[number] = (None, tracer.job.result())
            return
        steps = [(step.tokens, step[hidden]) for step in tracer.stream()]
        results[number] = (steps, (hidden, out))

    threads = [threading.Thread(target=read, args=(n,)) for n in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    jobs, batches = batch_sizes(batching)
    assert jobs - jobs_before == len(prompts) and batches - batches_before < len(prompts)  # they shared forwards

    for number, prompt in enumerate(prompts[::2]):
        steps, (hidden, out) = results[number * 2]
        with local.generate(prompt, max_new_tokens=NEW) as tracer:  # the same job alone, here
            alone = interlace.list().save()
            with tracer.all():
                local.transformer.h[1].output[:, -1] += float(number * 2)
                alone.append(local.transformer.h[0].output[:, -1])
            want = local.generator.output.save()
        assert torch.equal(out, want)  # greedy tokens of its own rows
        assert len(steps) == NEW
        for index, (tokens, step_hidden) in enumerate(steps):
            assert tokens.shape == (1,) and torch.equal(tokens, out[:, 3 + index])
            assert same(step_hidden, [hidden[index]])
            torch.testing.assert_close(step_hidden[0], alone[index], rtol=1e-5, atol=1e-6)


def test_a_stream_whose_steps_add_up_past_the_result_limit_fails_with_a_clear_error(remote):
    with remote.generate(PROMPT, max_new_tokens=8, remote=True, stream=True) as tracer:
        with tracer.all():  # 128 kB a step; the server's max_result_bytes is 200 kB
            big = remote.transformer.h[0].output[:, -1].repeat(1000, 1).save()
    read = []
    with pytest.raises(interlace.LimitError, match=r"values saved per step add up to more than the limit of 200000 "
                                                   r"bytes \(max_result_bytes\) by step 1"):
        for step in tracer.stream():
            read.append(step[big].shape)
    assert read == [(1000, 32)]
    assert isinstance(big, interlace.Proxy)


def test_a_streamed_submission_answers_with_the_jobs_events_the_same_as_its_events_endpoint(server, setup, local):
    with local.generate(PROMPT, max_new_tokens=3) as tracer:
        tracer.execute = lambda *args, **kwargs: None  # recorded here, run on the server
        with tracer.all():
            local.transformer.h[0].output[:, -1].save()
    data = serialize_request(Request(tracer.graph, [tracer.spec(len(tracer.graph))]))
    headers = {"Authorization": f"Bearer {setup['keys']['bob']}"}
    url = f"{server.url}/v1/jobs?stream=true"
    with httpx.stream("POST", url, content=data, headers={**headers, "Accept": "text/event-stream"},
                      timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        job = response.headers["interlace-job"]
        events = [(kind, data) for kind, data in remote_backend._events(response.iter_lines()) if kind]
    assert [kind for kind, _ in events] == ["queued", "running", "step", "step", "step", "completed"]
    assert [data["step"] for kind, data in events if kind == "step"] == [0, 1, 2]
    with httpx.stream("GET", f"{server.url}/v1/jobs/{job}/events", headers=headers, timeout=60) as response:
        assert [(kind, data) for kind, data in remote_backend._events(response.iter_lines()) if kind] == events
    answered = httpx.post(url, content=data, headers=headers, timeout=60)  # without the Accept header: as before
    assert answered.status_code == 202 and answered.json()["id"] == answered.headers["interlace-job"]


def test_a_client_streams_from_a_server_that_answers_a_streamed_submission_with_202(remote):
    """A server older than events in the submission's answer ignores the Accept header: the client then
    reads the job's events endpoint, with the same steps."""
    client = remote._remote._client
    sent = []

    def as_an_older_server_is_asked(request):
        sent.append((request.method, request.url.path))
        if request.method == "POST":
            del request.headers["accept"]

    expected = generation(remote, remote=True, stream=True, sample=False)
    client.event_hooks["request"].append(as_an_older_server_is_asked)
    try:
        got = generation(remote, remote=True, stream=True, sample=False)
    finally:
        client.event_hooks["request"].remove(as_an_older_server_is_asked)
    assert sent[0] == ("POST", "/v1/jobs") and sent[1][0] == "GET" and sent[1][1].endswith("/events")
    assert same(got["steps"], expected["steps"]) and same(got["hidden"], expected["hidden"])


def test_a_stream_nobody_reads_gives_its_connection_back_and_its_job_is_cancelled(remote):
    """Dropped unread, a stream closes its connection, and the server cancels the job as for any reader that
    leaves (its steps are slow here, so the job is still running when the server sees it go)."""
    pool = remote._remote._client._transport._pool
    with remote.generate(PROMPT, max_new_tokens=16, remote=True, stream=True) as tracer:
        slow_generation(remote, tracer)
        remote.generator.output.save()
    assert any(not connection.is_idle() for connection in pool.connections)  # its events are open
    job = tracer.job
    del tracer
    gc.collect()
    assert all(connection.is_idle() or connection.is_closed() for connection in pool.connections)
    with pytest.raises(interlace.errors.CancelledError, match="its reader went away"):
        job.result()


def test_streams_read_to_the_end_leave_their_connection_for_the_next_request(remote):
    """The client reads a job's events to their end (right after the final event), so one connection
    serves the submission with its events, the result and the next job: no new connection per stream."""
    pool = remote._remote._client._transport._pool
    seen = []
    for _ in range(3):
        with remote.generate(PROMPT, max_new_tokens=2, remote=True, stream=True) as tracer:
            out = remote.generator.output.save()
        assert len(list(tracer.stream())) == 2 and out.shape == (1, 6)
        seen.append({id(connection) for connection in pool.connections})
    assert seen[0] == seen[1] == seen[2] and len(seen[0]) == 1


def test_a_list_that_gains_nothing_in_a_step_gives_that_step_no_items_as_locally(local, remote):
    def items(lm, is_remote):
        with lm.generate(PROMPT, max_new_tokens=4, remote=is_remote, stream=True) as tracer:
            marks = interlace.list().save()
            with tracer.iter[1:3] as step:
                marks.append(step)
        return [step[marks] for step in tracer.stream()], marks

    assert items(remote, True) == items(local, False) == ([[], [1], [2], []], [1, 2])
