"""Remote equals local: the same user code, run on a real server and here, gives bit-identical values."""

import re

import pytest
import torch

import interlace
from helpers import assert_clean, same
from interlace.backends import remote as remote_backend
from interlace.backends.serialize import serialize_request
from interlace.errors import ExecutionError, VersionError

PROMPT = "w5 w6 w7 w8"


def on_both(local, remote, work):
    """`work(model, remote=...)` run here and on the server; both results."""
    here = work(local, False)
    there = work(remote, True)
    assert_clean(local.module)
    return here, there


def test_the_client_builds_the_model_from_the_manifest_without_weights(local, remote):
    assert repr(remote) == repr(local)
    assert all(p.is_meta for p in remote.module.parameters())
    assert remote.tokenizer("w5 w6")["input_ids"] == local.tokenizer("w5 w6")["input_ids"]
    assert remote.transformer.h[1].mlp.path == "transformer.h.1.mlp"


def test_saving_in_place_and_replacing(local, remote):
    def work(lm, remote):
        with lm.trace(PROMPT, remote=remote):
            first = lm.transformer.h[0].output[:, -1].save()
            lm.transformer.h[0].output[:, -1] += 2.0  # in place
            lm.transformer.h[1].mlp.output = lm.transformer.h[1].mlp.output * 0.5  # replaced
            logits = lm.output.logits[:, -1].save()
        return first, logits

    here, there = on_both(local, remote, work)
    assert isinstance(there[0], torch.Tensor) and same(here, there)


def test_several_invokes_with_values_flowing_between_them(local, remote):
    def work(lm, remote):
        with lm.trace(remote=remote) as tracer:
            with tracer.invoke("w9 w8 w7"):
                source = lm.transformer.h[0].output[:, -1].save()
            with tracer.invoke(["w1 w2 w3", "w4 w5 w6"]):
                lm.transformer.h[0].output[:, -1] = source
                patched = lm.output.logits.save()
        return source, patched

    here, there = on_both(local, remote, work)
    assert there[1].shape[0] == 2 and same(here, there)


def test_generation_with_per_step_steering(local, remote):
    def work(lm, remote):
        with lm.generate("w3 w4", max_new_tokens=4, remote=remote) as tracer:
            steps = interlace.list().save()
            with tracer.all():
                lm.transformer.h[1].output[:, -1] += 1.5
                steps.append(lm.lm_head.output[:, -1].argmax(-1))
            with tracer.iter[1:3]:
                lm.transformer.h[0].output[:, -1] *= 0.0
            tokens = lm.generator.output.save()
        return steps, tokens

    here, there = on_both(local, remote, work)
    assert len(there[0]) == 4 and there[1].shape == (1, 6) and same(here, there)


def test_a_session_is_one_request(local, remote, monkeypatch):
    sent = []
    original = remote_backend.RemoteBackend.run
    monkeypatch.setattr(remote_backend.RemoteBackend, "run", lambda self, request, **kw: sent.append(request) or original(self, request, **kw))

    def work(lm, remote):
        with lm.session(remote=remote):
            with lm.trace("w10 w11 w12"):
                hidden = lm.transformer.h[1].output[:, -1]
            with lm.trace("w20 w21 w22"):
                lm.transformer.h[1].output[:, -1] = hidden
                patched = lm.output.logits[0, -1].save()
        return patched

    here, there = on_both(local, remote, work)
    assert same(here, there) and len(sent) == 1 and len(sent[0].traces) == 2


def test_a_session_with_its_own_nodes_between_traces_is_admitted(local, remote):
    def work(lm, remote):
        with lm.session(remote=remote):
            with lm.trace("w10 w11 w12"):
                hidden = lm.transformer.h[1].output[:, -1]
            doubled = hidden * 2  # the session's own node, between its traces
            with lm.trace("w20 w21 w22"):
                lm.transformer.h[1].output[:, -1] = doubled
                patched = lm.output.logits[0, -1].save()
        return patched

    here, there = on_both(local, remote, work)
    assert same(here, there)


def test_a_session_loop_over_prompts_with_a_stop_runs_remotely(local, remote):
    """session.iter's value as a trace's prompt (an input that is a node's value) and a session.stop()
    under a session.cond travel in one request and give what the local session gives."""
    def work(lm, remote):
        with lm.session(remote=remote) as session:
            tops = interlace.list().save()
            with session.iter(["w5 w6", "w7 w8 w9", "w10 w11"]) as prompt:
                with lm.trace(prompt):
                    top = lm.output.logits[0, -1].argmax()
                    tops.append(top)
                with session.cond(prompt == "w7 w8 w9"):
                    session.stop()
        return tops

    here, there = on_both(local, remote, work)
    assert len(here) == 2 and same(here, there)


def test_scan_cache_and_gradients(local, remote):
    def work(lm, remote):
        with lm.trace(PROMPT, remote=remote, scan=True) as tracer:
            shape = lm.transformer.h[0].output.shape  # known while recording: scanned on the client
            cache = tracer.cache([lm.transformer.h[0], lm.transformer.ln_f])
        with lm.trace(PROMPT, remote=remote):
            hidden = lm.transformer.h[0].output
            grad = hidden.grad.save()
            lm.output.logits[:, -1].sum().backward()
        return tuple(shape), cache, grad

    here, there = on_both(local, remote, work)
    assert there[0] == (1, 4, 32) and list(there[1]) == ["transformer.h.0", "transformer.ln_f"]
    assert same(here, there)


def test_a_saved_model_output_comes_back_as_its_class_without_its_cache(local, remote):
    """`lm.output.save()` and the default `tracer.cache()` save Hugging Face outputs: they come back as the
    same output class with the same tensors; the key/value cache is not sent (None)."""
    def work(lm, remote):
        with lm.trace(PROMPT, remote=remote) as tracer:
            out = lm.output.save()
            cache = tracer.cache()
        return out, cache

    (out, cache), (there, there_cache) = on_both(local, remote, work)
    assert type(there) is type(out) and there.past_key_values is None and out.past_key_values is not None
    assert torch.equal(there.logits, out.logits)
    assert list(there_cache) == list(cache)
    inner = cache["transformer"]
    assert type(there_cache["transformer"]) is type(inner)
    assert torch.equal(there_cache["transformer"].last_hidden_state, inner.last_hidden_state)
    assert same(there_cache["transformer.h.1"], cache["transformer.h.1"])


def test_log_prints_on_the_client(remote, capsys):
    with remote.trace(PROMPT, remote=True) as tracer:
        tracer.log("layer 0 shape", remote.transformer.h[0].output.shape)
    assert "layer 0 shape torch.Size([1, 4, 32])" in capsys.readouterr().out


def test_an_error_names_the_users_own_line(remote):
    with pytest.raises(ExecutionError) as raised:
        with remote.trace(PROMPT, remote=True):
            remote.transformer.h[0].output[:, 99].save()  # out of range
    message = str(raised.value)
    assert re.search(r"test_remote\.py:\d+: remote\.transformer\.h\[0\]\.output\[:, 99\]\.save\(\)", message), message
    assert "IndexError" in message and raised.value.node["op"] == "call"


def test_a_job_handle_when_not_blocking(local, remote):
    with local.trace(PROMPT):
        expected = local.output.logits.save()
    with remote.trace(PROMPT, remote=True, blocking=False) as tracer:
        logits = remote.output.logits.save()
    job = tracer.job
    with pytest.raises(interlace.NotSavedError, match=f"job {job.id} is not finished .*tracer.job.result()"):
        logits.value  # noqa: B018 - read before the result was fetched
    assert job.status()["state"] in ("queued", "running", "completed")
    outcome = job.result(timeout=60)
    assert same(logits, expected)  # bound into this scope when the result was read
    assert job.status()["state"] == "completed" and job.cancel()["state"] == "completed"
    assert list(outcome.results.values())[0] is logits


def test_a_local_trace_of_a_served_model_says_to_use_remote(remote):
    with pytest.raises(interlace.InterlaceError, match="remote=True"):
        with remote.trace(PROMPT):
            remote.output.save()


def test_a_client_of_another_wire_version_is_told_both(server, setup, monkeypatch):
    monkeypatch.setattr(remote_backend, "SUPPORTED_VERSIONS", (3,))
    with pytest.raises(VersionError, match=r"reads wire format version 1, 2 .*this client writes 3"):
        interlace.LanguageModel("tiny-gpt2", host=server.url, api_key=setup["keys"]["bob"])


def test_a_client_that_writes_only_version_1_still_runs_a_generation(server, setup, monkeypatch):
    """The manifest's `wire_version` stays 1 (what a client before version 2 checks for); such a client
    sends a repeated block node by node and gets the same values as a client that writes version 2."""
    def steered(lm):
        with lm.generate("The capital of France is", max_new_tokens=4, do_sample=False, remote=True) as tracer:
            hidden = interlace.list().save()
            with tracer.all():
                lm.transformer.h[1].output[:, -1] += 0.5
                hidden.append(lm.transformer.h[1].output[:, -1])
            ids = tracer.result.save()
        return hidden, ids

    new_hidden, new_ids = steered(interlace.LanguageModel("tiny-gpt2", host=server.url, api_key=setup["keys"]["bob"]))
    monkeypatch.setattr(remote_backend, "SUPPORTED_VERSIONS", (1,))
    old = interlace.LanguageModel("tiny-gpt2", host=server.url, api_key=setup["keys"]["bob"])
    sent = []
    monkeypatch.setattr(remote_backend, "serialize_request",
                        lambda request, **options: sent.append(options["version"]) or serialize_request(request, **options))
    old_hidden, old_ids = steered(old)
    assert sent == [1] and old._remote._wire_version == 1
    assert torch.equal(old_ids, new_ids) and len(old_hidden) == len(new_hidden) == 4
    assert all(torch.equal(a, b) for a, b in zip(old_hidden, new_hidden))


def test_host_and_key_come_from_the_environment(server, setup, monkeypatch, local):
    monkeypatch.setenv("INTERLACE_HOST", server.url)
    monkeypatch.setenv("INTERLACE_API_KEY", setup["keys"]["bob"])
    lm = interlace.LanguageModel("tiny-gpt2")
    with lm.trace(PROMPT, remote=True):
        there = lm.output.logits.save()
    with local.trace(PROMPT):
        here = local.output.logits.save()
    assert same(here, there)


def test_the_model_is_unchanged_after_every_job(server):
    health = server.health()
    assert health["checked_jobs"] > 0 and health["model_changes"] == []


def test_the_status_line_stays_off_a_stderr_that_is_not_a_terminal(monkeypatch):
    """A log file or a pipe gets no status line (tqdm's carriage returns would run into the next print)."""
    import io

    written = io.StringIO()
    monkeypatch.setattr("sys.stderr", written)
    status = remote_backend._Status("0123456789", enabled=True)
    status.show("queued", {"position": 1})
    status.show("running", {})
    status.close()
    assert written.getvalue() == ""


def test_a_generation_ends_early_at_the_end_of_sequence_token_it_names(local, remote):
    sampled = {"do_sample": True, "seed": 1}  # (greedy, the tiny model says one token again and again)
    with local.generate("w3 w4", max_new_tokens=4, **sampled):
        full = local.generator.output.save()
    new = full[0, -4:].tolist()
    ran = next(k for k in range(1, 4) if new[k] not in new[:k]) + 1  # its first token not made earlier ends it
    end, prompt_length = new[ran - 1], full.shape[1] - 4

    def work(lm, remote):
        with lm.generate("w3 w4", max_new_tokens=4, eos_token_id=[end], remote=remote, **sampled) as tracer:
            steps = interlace.list().save()
            with tracer.all() as step:
                steps.append(step)
            tokens = lm.generator.output.save()
        return steps, tokens

    here, there = on_both(local, remote, work)
    assert same(here, there) and there[0] == list(range(ran)) and there[1].shape[1] == prompt_length + ran
    assert int(there[1][0, -1]) == end
