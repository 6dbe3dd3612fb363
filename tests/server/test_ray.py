"""Scale-out on Ray Serve: `interlace serve MODEL --ray --replicas 2` on a local Ray instance (127.0.0.1,
the tiny GPT-2 of conftest.py). Results equal local runs, jobs spread over both replicas, keys and job
ownership hold, and a replica killed mid-run is replaced while its job ends with an error, not a hang."""

import functools
import importlib.util
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import pytest
import torch

import interlace
from helpers import assert_close_in_batch, check_without_refusing
from hostile import Builder
from interlace.backends.limits import Limits
from interlace.backends.serialize import deserialize_results, serialize_request
from interlace.cli import main
from interlace.backends.writes import WriteCheck
from interlace.errors import ExecutionError, LimitError, WeightsChangedError
from interlace.graph import Request
from interlace.server.replica import ModelReplica, decode_answer
from interlace.server.errors import status_of
from interlace.server.hosting import HostedModel, load_model
from serving import Server
from test_bad_input import _result, _submit, _until, get, good
from test_batching import answered_before_its_batch_ends, batch_sizes, recorded, submit_together
from test_remote import same
from test_stream_remote import generation

PATH = "transformer.h.0"
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="Ray Serve is an optional extra: pip install 'interlace[ray]'")


def slow(words: int, matmuls: int) -> bytes:
    """A request that runs for seconds (1500 x 1500 matrix products) on a prompt of `words` words: prompts
    of different lengths never share a batch, so each such job runs on a replica of its own."""
    g = Builder()
    x = g.call("operator.truediv", g.method("new_ones", g.out(PATH), [1500, 1500]), 1500.0)
    for _ in range(matmuls):
        x = g.call("operator.matmul", x, x)
    g.save(g.call("torch.sum", x))
    return g.bytes([((" ".join(f"w{i}" for i in range(5, 5 + words)),), {})])


def values(data: bytes) -> dict:
    return deserialize_results(data, limits=Limits())[0]


@functools.lru_cache
def run_here(local, data: bytes) -> dict:
    """The same request run in this process: what a replica's result is compared with."""
    hosted = HostedModel(local, name="here", limits=Limits())
    return values(hosted.execute_many([hosted.admit(data)], limits=Limits(), cancels=[threading.Event()])[0][0])


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Ray's own, its workers, the replicas): killed if a stop leaves them."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as file:
                parent = int(file.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@pytest.fixture(scope="module")
def cluster(setup):
    """The server on a Ray instance of its own (temp dir under /tmp, no usage stats, no dashboard), stopped
    at the end with everything Ray started."""
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray puts sockets there
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}  # never a real cluster
    env.update(RAY_TMPDIR=temp, RAY_USAGE_STATS_ENABLED="0", RAY_enable_metrics_collection="0")
    server = Server(setup["folder"], setup["db"], "--ray", "--replicas", "2", "--batch-wait", "1.0",
                    ready_within=240, env=env)
    yield server
    family = descendants(server.process.pid)
    server.stop()
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    shutil.rmtree(temp, ignore_errors=True)


def replicas(server, key) -> dict:
    """Replica id -> what the ingress knows of it (pid, node, jobs it answered)."""
    response = get(server, key, "/v1/replicas")
    assert response.status_code == 200, response.text
    return {seen["replica"]: seen for seen in response.json()["replicas"]}


def run_on_both(server, setup, local, matmuls: int) -> list[httpx.Response]:
    """Two slow jobs at once (two keys, prompts of 3 and 4 words): each on a replica of its own."""
    jobs = [(setup["keys"][name], data) for name, data in (("alice", slow(3, matmuls)), ("bob", slow(4, matmuls)))]
    ids = [_submit(server, key, data) for key, data in jobs]
    answers = [_result(server, key, job) for (key, _), job in zip(jobs, ids)]
    for (_, data), answer in zip(jobs, answers):
        assert answer.status_code == 200, answer.text
        there, here = values(answer.content), run_here(local, data)
        assert there.keys() == here.keys()
        for index in here:
            assert_close_in_batch(there[index], here[index])  # another process, maybe other torch threads
    return answers


# -- without Ray ---------------------------------------------------------------------------------------------
def test_without_ray_the_flag_says_how_to_install_it(setup):
    code = ("import sys; sys.modules['ray'] = None; from interlace.cli import main; "
            f"sys.exit(main(['serve', 'smollm2', '--ray', '--db', {setup['db']!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "pip install 'interlace[ray]'" in done.stderr


def test_replica_flags_need_ray(capsys):
    assert main(["serve", "smollm2", "--replicas", "2"]) == 2
    assert "need --ray" in capsys.readouterr().err


def test_a_replicas_answers_are_the_local_results_and_errors(setup, local):
    """The replica's side alone (no Ray): the front's admitted requests in (pickled, as the worker's pipe and
    Ray carry them), results or errors out, errors as their own class."""
    replica = ModelReplica(setup["folder"], name="tiny-gpt2", kind={}, limits={}, trusted=False, check_weights=True)
    front = HostedModel(load_model(setup["folder"], weights=False), name="tiny-gpt2", limits=Limits())

    def admitted(data: bytes):
        return pickle.loads(pickle.dumps(front.admit(data)))

    tracer = local.trace("w5 w6")
    with pytest.raises(ExecutionError):
        with tracer:
            local.transformer.h[0].output[:, 99].save()  # out of range: found when it runs
    broken = serialize_request(Request(tracer.graph, [tracer.spec(len(tracer.graph))]))
    reply = replica.answer([admitted(good()), admitted(broken)], {})
    assert reply["replica"]["pid"] == os.getpid() and reply["replica"]["changes"] == []
    result, failed = (decode_answer(answer) for answer in reply["answers"])
    assert same(values(result[0]), run_here(local, good()))
    hosted = HostedModel(local, name="here", limits=Limits())
    here = hosted.execute_many([hosted.admit(broken)], limits=Limits(), cancels=[threading.Event()])[0]
    assert type(failed) is type(here) is ExecutionError and str(failed) == str(here) and failed.node == here.node
    deadline = replica.answer([admitted(slow(3, 400))], {"max_seconds": 0.2})["answers"][0]
    error = decode_answer(deadline)
    assert isinstance(error, LimitError) and status_of(error) == 504


@needs_ray
def test_a_replica_whose_weights_a_job_changed_fails_its_health_check(setup, monkeypatch):
    """Ray Serve replaces a replica whose `check_health` raises: one on which a write got past the schema
    check (here it refuses nothing) until then refuses jobs, and says it is broken in its identity."""
    from interlace.server.cluster import RayReplica

    replica = RayReplica(setup["folder"], name="tiny-gpt2", kind={}, limits={}, trusted=False, check_weights=False)
    replica.check_health()  # healthy: returns
    monkeypatch.setattr(WriteCheck, "_check", check_without_refusing)
    g = Builder()
    g.call("torch.nn.functional.hardtanh", g.param(f"{PATH}.ln_1.weight"), 0.0, 0.5, True)
    damaging = HostedModel(load_model(setup["folder"], weights=False), name="tiny-gpt2", limits=Limits()).admit(
        g.bytes([(("w5 w6",), {})]))
    reply = replica.answer([damaging], {})
    assert isinstance(decode_answer(reply["answers"][0]), WeightsChangedError)
    assert reply["replica"]["broken"] == [f"{PATH}.ln_1.weight"]
    with pytest.raises(RuntimeError, match=rf"a job changed weight\(s\) {PATH}.ln_1.weight of this replica's model"):
        replica.check_health()
    refused = decode_answer(replica.answer([damaging], {})["answers"][0])
    assert (refused.status, refused.code) == (503, "model_damaged")


@pytest.mark.parametrize("kind", [{}, {"standardized": True, "attention_probs": True}], ids=["native", "standardized"])
def test_the_ingress_model_has_no_weights_and_checks_requests_as_the_loaded_one(setup, kind):
    front = HostedModel(load_model(setup["folder"], weights=False, **kind), name="tiny-gpt2", limits=Limits())
    loaded = HostedModel(load_model(setup["folder"], **kind), name="tiny-gpt2", limits=Limits())
    assert all(p.is_meta for p in front.model.module.parameters())
    assert front.manifest() == loaded.manifest()
    model = loaded.model
    with model.trace("w5 w6 w7") as tracer:
        model.transformer.h[1].output.save()
        if kind:
            model.attentions[1].probes.queries.output.save()
    data = serialize_request(Request(tracer.graph, [tracer.spec(len(tracer.graph))]))
    assert front.admit(data).graph.nodes == loaded.admit(data).graph.nodes
    # the group and size of a job come from the padded prompts, not from tensors on the meta device
    assert front.batching(front.admit(data), Limits()) == loaded.batching(loaded.admit(data), Limits())
    assert front.batching(front.admit(data), Limits())[1] == 3  # one row of three tokens


# -- on Ray ------------------------------------------------------------------------------------------------------
@needs_ray
def test_a_local_ray_instance_listens_on_loopback_only(cluster):
    import psutil

    family = {cluster.process.pid, *descendants(cluster.process.pid)}
    listening = [(conn.laddr.ip, conn.laddr.port, psutil.Process(conn.pid).name())
                 for conn in psutil.net_connections(kind="inet")
                 if conn.status == psutil.CONN_LISTEN and conn.pid in family]
    assert len(listening) >= 5  # the front, GCS, raylet, agents, replicas
    loopback = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
    assert [entry for entry in listening if entry[0] not in loopback] == []


@needs_ray
def test_remote_equals_local(cluster, setup, local):
    remote = interlace.LanguageModel("tiny-gpt2", host=cluster.url, api_key=setup["keys"]["alice"])
    assert all(p.is_meta for p in remote.module.parameters())

    def work(lm, remote):
        with lm.trace("w5 w6 w7 w8", remote=remote):
            lm.transformer.h[0].output[:, -1] += 2.0
            hidden = lm.transformer.h[1].output.save()
            logits = lm.output.logits[:, -1].save()
        with lm.generate("w3 w4", max_new_tokens=3, remote=remote) as tracer:
            steps = interlace.list().save()
            with tracer.all():
                steps.append(lm.lm_head.output[:, -1].argmax(-1))
            tokens = lm.generator.output.save()
        return hidden, logits, steps, tokens

    assert same(work(local, False), work(remote, True))
    with pytest.raises(ExecutionError, match="IndexError"):  # an error raised on a replica: the local class
        with remote.trace("w5 w6", remote=True):
            remote.transformer.h[0].output[:, 99].save()


@needs_ray
@pytest.mark.parametrize("stop", [False, True], ids=["whole", "stopped"])
def test_streamed_steps_come_from_the_replicas_as_they_do_locally(cluster, setup, local, stop):
    remote = interlace.LanguageModel("tiny-gpt2", host=cluster.url, api_key=setup["keys"]["alice"])
    here = generation(local, remote=False, stream=True, stop=stop)
    there = generation(remote, remote=True, stream=True, stop=stop)
    assert [step[0] for step in there["steps"]] == [step[0] for step in here["steps"]]
    for mine, theirs in zip(here["steps"], there["steps"], strict=True):
        index, tokens, text, hidden, logits = theirs
        assert (index, text) == (mine[0], mine[2]) and torch.equal(tokens, mine[1])
        for value, reference in ((hidden, mine[3]), (logits, mine[4])):
            assert_close_in_batch(value[0], reference[0])  # another process, maybe other torch threads
    assert there["missing"] == here["missing"]


@needs_ray
def test_jobs_sent_together_share_a_batch_on_a_replica(cluster, setup, local):
    def steer(prompt, amount):
        def record(tracer):
            with tracer.invoke(prompt):
                local.transformer.h[0].output[:, -1] += amount
                local.output.logits[:, -1].save()
        return record

    recordings = [recorded(local, steer(f"w{n} w{n + 1} w{n + 2}", n / 10)) for n in range(2, 14, 2)]
    jobs_before, batches_before = batch_sizes(cluster)
    jobs = submit_together(cluster, setup, [request for request, _ in recordings])
    for job, (_, tracer) in zip(jobs, recordings):
        outcome = job.result(timeout=60)
        for index, value in tracer.results.items():
            assert_close_in_batch(outcome.results[index], value)
    jobs_after, batches_after = batch_sizes(cluster)
    assert jobs_after - jobs_before == len(recordings) and batches_after - batches_before < len(recordings)


@needs_ray
def test_a_job_whose_generation_ends_first_is_answered_from_its_replica_before_its_batch_ends(cluster, setup, local):
    answered_before_its_batch_ends(cluster, setup, local)


@needs_ray
def test_jobs_spread_over_both_replicas_and_stay_their_owners(cluster, setup, local):
    keys = setup["keys"]
    before = replicas(cluster, keys["alice"])
    run_on_both(cluster, setup, local, matmuls=40)  # longer than --batch-wait: both run at once
    after = replicas(cluster, keys["alice"])
    grew = [replica for replica, seen in after.items() if seen["jobs"] > before.get(replica, {"jobs": 0})["jobs"]]
    assert len(grew) == 2 and len({after[replica]["pid"] for replica in grew}) == 2
    # keys, limits and ownership live in the one ingress, whichever replica ran the job
    job = _submit(cluster, keys["alice"], good())
    assert get(cluster, keys["bob"], f"/v1/jobs/{job}").status_code == 404
    assert get(cluster, keys["alice"], f"/v1/jobs/{job}/result?wait=30").status_code == 200
    assert httpx.get(f"{cluster.url}/v1/replicas").status_code == 401
    assert httpx.post(f"{cluster.url}/v1/jobs", content=good()).status_code == 401


@needs_ray
def test_cancelling_a_running_job_shows_at_once(cluster, setup):
    key = setup["keys"]["user0"]
    job = _submit(cluster, key, slow(3, 25))
    _until(cluster, key, job, ("running",))
    httpx.delete(f"{cluster.url}/v1/jobs/{job}", headers={"Authorization": f"Bearer {key}"})
    info = _until(cluster, key, job, ("cancelled",), seconds=5)  # the replica still runs it; the job says cancelled
    assert info["error"]["code"] == "CancelledError"
    answer = _result(cluster, key, job)
    assert (answer.status_code, answer.json()["code"]) == (410, "CancelledError")


@needs_ray
def test_cancelled_jobs_stop_on_their_replicas(cluster, setup, local):
    """Both replicas busy with jobs of minutes; once both are cancelled, the next job runs within seconds."""
    keys = setup["keys"]
    jobs = [(keys[name], _submit(cluster, keys[name], slow(words, 2000))) for name, words in (("alice", 3), ("bob", 4))]
    for key, job in jobs:
        _until(cluster, key, job, ("running",), seconds=30)
    time.sleep(1.0)  # both inside their matrix products
    for key, job in jobs:
        httpx.delete(f"{cluster.url}/v1/jobs/{job}", headers={"Authorization": f"Bearer {key}"})
    began = time.monotonic()
    answer = _result(cluster, keys["alice"], _submit(cluster, keys["alice"], good()))
    assert answer.status_code == 200 and same(values(answer.content), run_here(local, good()))
    assert time.monotonic() - began < 15  # the two cancelled jobs would hold both replicas for minutes


@needs_ray
def test_a_killed_replica_fails_its_job_and_is_replaced(cluster, setup, local):
    keys = setup["keys"]
    run_on_both(cluster, setup, local, matmuls=5)  # so that the ingress knows both replicas
    known = replicas(cluster, keys["alice"])
    jobs = [(keys["user1"], slow(3, 60)), (keys["user2"], slow(4, 60))]
    ids = [_submit(cluster, key, data) for key, data in jobs]
    for (key, _), job in zip(jobs, ids):
        _until(cluster, key, job, ("running",))
    time.sleep(1.0)  # both batches are on their replicas by now (each replica takes one at a time)
    victim = next(iter(known.values()))["pid"]
    os.kill(victim, signal.SIGKILL)
    answers = [_result(cluster, key, job) for (key, _), job in zip(jobs, ids)]  # each within 30 s, or a 202
    assert sorted(answer.status_code for answer in answers) == [200, 503], [a.text for a in answers]
    failed = next(answer for answer in answers if answer.status_code == 503)
    assert failed.json()["code"] == "replica_failed" and "submit the job again" in failed.json()["message"]
    # Ray starts a new replica in its place; jobs keep succeeding meanwhile, and then run on it
    deadline = time.monotonic() + 90
    while not set(replicas(cluster, keys["alice"])) - set(known):
        assert time.monotonic() < deadline, "no replacement replica ran a job within 90 s"
        run_on_both(cluster, setup, local, matmuls=5)
    new = [seen for replica, seen in replicas(cluster, keys["alice"]).items() if replica not in known]
    assert all(seen["pid"] != victim and seen["jobs"] > 0 for seen in new)
    assert victim not in {seen["pid"] for seen in replicas(cluster, keys["alice"]).values()}  # the dead one is gone
