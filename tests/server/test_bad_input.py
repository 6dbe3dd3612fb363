"""Bad input of every kind, sent to a real server: each gets a clear error with the right status and
class, and after each a good request still works and gives the local result."""

import struct
import time

import httpx
import pytest
import torch

import interlace
from hostile import Builder, raw
from interlace.backends.serialize import deserialize_results
from interlace.errors import SerializationError

PROMPT = [(("w5 w6 w7",), {})]
PATH = "transformer.h.0"


def good() -> bytes:
    g = Builder()
    g.save(g.out(PATH))
    return g.bytes(PROMPT)


def slow(matmuls: int = 400) -> bytes:
    """A request that runs for seconds: repeated 1500 x 1500 matrix products (stopped by a deadline or cancel)."""
    g = Builder()
    x = g.call("operator.truediv", g.method("new_ones", g.out(PATH), [1500, 1500]), 1500.0)
    for _ in range(matmuls):
        x = g.call("operator.matmul", x, x)
    g.save(g.call("torch.sum", x))
    return g.bytes(PROMPT)


def post(server, key, data, headers=None, **params) -> httpx.Response:
    headers = dict(headers or {})
    if key is not None:
        headers.setdefault("Authorization", f"Bearer {key}")
    return httpx.post(f"{server.url}/v1/jobs", params={"wait": 30, **params}, content=data, headers=headers,
                      timeout=60)


def get(server, key, path) -> httpx.Response:
    return httpx.get(f"{server.url}{path}", headers={"Authorization": f"Bearer {key}"}, timeout=60)


def patched(data: bytes, offset: int, value: int) -> bytes:
    return data[:offset] + bytes([value]) + data[offset + 1:]


def graph(*nodes, traces=None) -> bytes:
    return raw(list(nodes), traces)


def node(index, op, target=None, *args, **extra):
    return {"index": index, "op": op, "target": target, "args": list(args), **extra}


def out(index=0, path=PATH, invoke=None, **extra):
    return node(index, "module_value", path, kwargs={"kind": "output", "call": 0, "invoke": invoke}, **extra)


def ref(index):
    return {"ref": index}


def generate(tokens: int, **kwargs) -> list:
    options = {"mode": "generate", "kwargs": {"dict": [["max_new_tokens", tokens]] + [[k, v] for k, v in kwargs.items()]}}
    return [{"start": 0, "end": 1, "invokes": [{"args": ["w5 w6"]}], "options": options}]


# name -> (send(server, keys) -> response, status, code)
CASES = {
    "no key": (lambda s, k: post(s, None, good()), 401, "unauthorized"),
    "unknown key": (lambda s, k: post(s, "il_0123456789ab_guess", good()), 401, "unauthorized"),
    "malformed key": (lambda s, k: post(s, "not-a-key", good()), 401, "unauthorized"),
    "revoked key": (lambda s, k: post(s, k["revoked"], good()), 401, "unauthorized"),
    "basic auth instead of a bearer key": (
        lambda s, k: post(s, None, good(), headers={"Authorization": "Basic YWxpY2U6eA=="}), 401, "unauthorized"),
    "empty body": (lambda s, k: post(s, k["alice"], b""), 400, "SerializationError"),
    "not a frame": (lambda s, k: post(s, k["alice"], b"GET / HTTP/1.1 hello"), 400, "SerializationError"),
    "a results frame as a request": (
        lambda s, k: post(s, k["alice"], b"ILR" + good()[3:]), 400, "SerializationError"),
    "truncated prefix": (lambda s, k: post(s, k["alice"], good()[:6]), 400, "SerializationError"),
    "truncated frame": (lambda s, k: post(s, k["alice"], good()[:-40]), 400, "SerializationError"),
    "newer wire version": (lambda s, k: post(s, k["alice"], patched(good(), 3, 3)), 409, "VersionError"),
    "unknown flags": (lambda s, k: post(s, k["alice"], patched(good(), 4, 0x80)), 400, "SerializationError"),
    "pickled function on an untrusted server": (
        lambda s, k: post(s, k["alice"], patched(good(), 4, 2)), 403, "RefusedError"),
    "body over max_frame_bytes": (lambda s, k: post(s, k["alice"], good() + b"\0" * 2_100_000), 413, "LimitError"),
    "header over max_header_bytes": (
        lambda s, k: post(s, k["alice"], good()[:9] + struct.pack("<Q", 400_000) + b" " * 400_000), 413, "LimitError"),
    "header length past the end of the frame": (
        lambda s, k: post(s, k["alice"], good()[:9] + struct.pack("<Q", 1 << 40) + b"{}"), 400, "SerializationError"),
    "node count over max_nodes": (
        lambda s, k: post(s, k["alice"], good()[:7] + struct.pack("<I", 6000) + good()[11:]), 413, "LimitError"),
    "tensor section over max_tensor_bytes": (lambda s, k: post(s, k["alice"], _big_tensor()), 413, "LimitError"),
    "invokes over max_invokes": (lambda s, k: post(s, k["alice"], Builder().bytes(PROMPT * 9)), 413, "LimitError"),
    "max_new_tokens over the limit": (
        lambda s, k: post(s, k["alice"], graph(out(), traces=generate(17))), 413, "LimitError"),
    "unknown op kind": (lambda s, k: post(s, k["alice"], graph(out(), node(1, "exec", "print"))), 422, "GraphError"),
    "unknown operation": (lambda s, k: post(s, k["alice"], graph(node(0, "call", "os.system", "ls"))), 422, "GraphError"),
    "unknown module path": (lambda s, k: post(s, k["alice"], graph(out(path="transformer.h.9"))), 422, "GraphError"),
    "unknown method": (
        lambda s, k: post(s, k["alice"], graph(out(), node(1, "call_method", "__reduce_ex__", ref(0), 2))), 422, "GraphError"),
    "wrong arity": (
        lambda s, k: post(s, k["alice"], graph(out(), node(1, "call", "operator.add", ref(0), 1, 2))), 422, "GraphError"),
    "ref to a later node": (
        lambda s, k: post(s, k["alice"], graph(node(0, "call", "operator.neg", ref(1)), out(1))), 400, "SerializationError"),
    "invoke that does not exist": (lambda s, k: post(s, k["alice"], graph(out(invoke=3))), 422, "GraphError"),
    "unknown parameter": (lambda s, k: post(s, k["alice"], graph(node(0, "parameter", "transformer.wte.bias"))), 422, "GraphError"),
    "generate option that is not allowed": (
        lambda s, k: post(s, k["alice"], graph(out(), traces=generate(2, output_scores=True))), 403, "RefusedError"),
    "unknown mode": (
        lambda s, k: post(s, k["alice"], graph(out(), traces=[{"start": 0, "end": 1, "invokes": [{"args": ["w5"]}],
                                                               "options": {"mode": "train"}}])), 400, "SerializationError"),
    "write to a weight": (
        lambda s, k: post(s, k["alice"], graph(node(0, "parameter", "lm_head.weight"),
                                               node(1, "call_method", "mul_", ref(0), 0.0))), 403, "RefusedError"),
    "positional in-place write to a weight": (
        lambda s, k: post(s, k["alice"], graph(node(0, "parameter", "transformer.ln_f.weight"),
                                               node(1, "call", "torch.nn.functional.relu", ref(0), True))),
        403, "RefusedError"),
    "norm resizing a weight through its positional out": (
        lambda s, k: post(s, k["alice"], graph(node(0, "call", "torch.ones", 16), node(1, "parameter", "transformer.ln_f.weight"),
                                               node(2, "call", "torch.norm", ref(0), "fro", None, False, ref(1)))),
        403, "RefusedError"),
    "embedding whose max_norm renormalizes the table": (
        lambda s, k: post(s, k["alice"], graph(node(0, "call", "torch.tensor", {"list": [1, 2]}),
                                               node(1, "parameter", "transformer.wte.weight"),
                                               node(2, "call", "torch.nn.functional.embedding", ref(0), ref(1), None, 1e-3))),
        403, "RefusedError"),
    "module call of the generator": (
        lambda s, k: post(s, k["alice"], graph(node(0, "module_call", "generator", kwargs={
            "custom_generate": "someone/repo", "trust_remote_code": True}))), 422, "GraphError"),
    "module call with a repo id": (
        lambda s, k: post(s, k["alice"], graph(node(0, "call", "torch.tensor", {"list": [{"list": [1, 2]}]}),
                                               node(1, "module_call", "", ref(0), kwargs={"custom_generate": "x"}))),
        403, "RefusedError"),
    "trace option of the wrong type": (
        lambda s, k: post(s, k["alice"], graph(out(), traces=[{"start": 0, "end": 1, "invokes": [{"args": ["w5"]}],
                                                               "options": {"kwargs": 5}}])), 400, "SerializationError"),
    "trace mode as a list": (
        lambda s, k: post(s, k["alice"], graph(out(), traces=[{"start": 0, "end": 1, "invokes": [{"args": ["w5"]}],
                                                               "options": {"mode": {"list": ["trace"]}}}])),
        400, "SerializationError"),
    "int literal of a hundred digits": (
        lambda s, k: post(s, k["alice"], graph(node(0, "call", "operator.add", 10**99, 1))), 413, "LimitError"),
    "index out of range while running": (
        lambda s, k: post(s, k["alice"], graph(out(), node(1, "call", "operator.getitem", ref(0), 99, saved=True))),
        422, "ExecutionError"),
    "reading a module after changing an earlier one from it": (
        lambda s, k: post(s, k["alice"], graph(out(0, "transformer.h.1"), out(1, "transformer.h.0"),
                                               node(2, "swap", None, ref(1), ref(0)))), 422, "OutOfOrderError"),
    "replacement the model cannot use": (
        lambda s, k: post(s, k["alice"], graph(out(), node(1, "call", "torch.zeros", 1, 3, 16),
                                               node(2, "swap", None, ref(0), ref(1)),
                                               out(3, "transformer.h.1", saved=True))), 422, "ModelError"),
    "result over max_result_bytes": (
        lambda s, k: post(s, k["alice"], graph(node(0, "call", "torch.zeros", 100_000, saved=True))), 413, "LimitError"),
    "deadline from the client's timeout": (lambda s, k: post(s, k["alice"], slow(), timeout=0.3), 504, "LimitError"),
    "unknown model": (lambda s, k: post(s, k["alice"], good(), model="gpt-5"), 404, "not_found"),
    "negative wait": (lambda s, k: post(s, k["alice"], good(), wait=-1), 400, "bad_request"),
    "unknown job": (lambda s, k: get(s, k["alice"], "/v1/jobs/no-such-job"), 404, "not_found"),
    "another key's job": (lambda s, k: get(s, k["bob"], f"/v1/jobs/{_job_of(s, k['alice'])}/result"), 404, "not_found"),
    "another key's job events": (lambda s, k: get(s, k["bob"], f"/v1/jobs/{_job_of(s, k['alice'])}/events"), 404, "not_found"),
    "cancelling another key's job": (
        lambda s, k: httpx.delete(f"{s.url}/v1/jobs/{_job_of(s, k['alice'])}", headers={"Authorization": f"Bearer {k['bob']}"}),
        404, "not_found"),
    "unknown route": (lambda s, k: get(s, k["alice"], "/v1/everything"), 404, "not_found"),
    "manifest of an unknown model": (lambda s, k: get(s, k["alice"], "/v1/models/gpt-5/manifest"), 404, "not_found"),
}


def _big_tensor() -> bytes:
    g = Builder()
    g.save(g.call("operator.add", g.out(PATH), torch.zeros(300_000)))
    return g.bytes(PROMPT)


def _job_of(server, key) -> str:
    response = post(server, key, good())
    assert response.status_code == 200
    return response.headers["interlace-job"]


@pytest.fixture(scope="module")
def keys(setup):
    keys = dict(setup["keys"])
    keys["revoked"] = setup["store"].create("gone")
    setup["store"].revoke("gone")
    return keys


@pytest.fixture(scope="module")
def expected(local):
    with local.trace("w5 w6 w7"):
        hidden = local.transformer.h[0].output.save()
    return hidden


def assert_good_request_works(server, key, expected):
    response = post(server, key, good())
    assert response.status_code == 200, response.text
    values, _ = deserialize_results(response.content)
    assert torch.equal(next(iter(values.values())), expected)


def test_there_are_at_least_thirty_kinds():
    assert len(CASES) + len(TIGHT) >= 30


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(server, keys, expected, name):
    send, status, code = CASES[name]
    response = send(server, keys)
    body = response.json()
    assert (response.status_code, body["code"]) == (status, code), body
    assert body["message"] and set(body) == {"code", "message", "node", "hint"}
    if "to a weight" in name:  # its own hint, not the one about user functions
        assert "every job shares the hosted weights" in body["hint"], body
    hints = {"unknown route": "this server has no GET /v1/everything: its routes are listed at GET /docs",
             "negative wait": "a parameter of the address or the query is not what the route takes",
             "unknown job": "job ids are readable only with the key that submitted them"}
    if name in hints:  # (a route the server lacks is not a job another key owns)
        assert body["hint"].startswith(hints[name]), body
    if code in ("GraphError", "ExecutionError", "OutOfOrderError", "RefusedError") and "graph" not in name:
        assert body["node"] is None or {"index", "op", "target", "location"} <= set(body["node"])
    assert_good_request_works(server, keys["alice"], expected)


def test_a_frame_that_lies_about_its_header_says_what_was_found(server, keys):
    body = post(server, keys["alice"], good()[:9] + struct.pack("<Q", 1 << 40) + b"{}").json()
    assert "header length 1099511627776 is larger than the 2 bytes that follow" in body["message"]


def test_a_wrong_method_says_which_are_allowed(server, keys):
    response = httpx.put(f"{server.url}/v1/jobs", headers={"Authorization": f"Bearer {keys['alice']}"})
    assert response.status_code == 405 and response.json()["code"] == "method_not_allowed"
    assert response.json()["hint"].startswith("this server has no PUT /v1/jobs")
    assert "POST" in response.headers["allow"].replace(" ", "").split(",")


def test_an_unknown_op_kind_names_the_node(server, keys):
    body = post(server, keys["alice"], graph(out(), node(1, "exec", "print", location=["mine.py", 3]))).json()
    assert body["node"] == {"index": 1, "op": "exec", "target": None, "location": ["mine.py", 3]}
    assert "unknown op kind 'exec'" in body["message"]


def test_a_deep_list_in_a_log_comes_back_as_text(server, keys):
    nodes = [node(0, "call", "torch.zeros", 1)]
    for index in range(1, 2000):
        nodes.append(node(index, "call", "builtins.list", {"list": [ref(index - 1)]}))
    nodes.append(node(2000, "log", None, ref(1999)))
    response = post(server, keys["alice"], graph(*nodes))
    assert response.status_code == 200, response.text
    _, logs = deserialize_results(response.content)
    assert "[[[[" in logs[0][1][0]  # text, shortened


def test_graph_errors_name_the_node(server, keys):
    body = post(server, keys["alice"], graph(out(), out(1, path="transformer.h.9", location=["mine.py", 7]))).json()
    assert body["node"] == {"index": 1, "op": "module_value", "target": "transformer.h.9",
                            "location": ["mine.py", 7]}
    assert "did you mean" in body["message"]


def test_the_model_is_bit_identical_after_all_of_them(server):
    health = server.health()
    assert health["checked_jobs"] >= len(CASES) and health["model_changes"] == []


def test_user_functions_are_refused_before_they_are_sent(remote):
    with pytest.raises(SerializationError, match="--trusted"):
        with remote.trace("w5 w6", remote=True):
            interlace.apply(lambda x: x * 2, remote.transformer.h[0].output).save()


# -- queue, rate, cancel and deadline: the tight server (queue of 1, 2 jobs per key, 8 a minute, 1.5 s) ---
def _submit(server, key, data) -> str:
    response = post(server, key, data, wait=0)
    assert response.status_code == 202, response.text
    return response.headers["interlace-job"]


def _until(server, key, job, states, seconds=30.0) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        info = get(server, key, f"/v1/jobs/{job}").json()
        if info["state"] in states:
            return info
        time.sleep(0.02)
    raise TimeoutError(f"job {job} never reached {states}")


def _result(server, key, job) -> httpx.Response:
    return httpx.get(f"{server.url}/v1/jobs/{job}/result", params={"wait": 30},
                     headers={"Authorization": f"Bearer {key}"}, timeout=60)


def _queue_full(s, k):
    running = _submit(s, k["tight0"], slow())
    _until(s, k["tight0"], running, ("running",))
    waiting = _submit(s, k["tight1"], slow())
    try:
        return post(s, k["tight2"], good())
    finally:
        for key, job in ((k["tight1"], waiting), (k["tight0"], running)):
            httpx.delete(f"{s.url}/v1/jobs/{job}", headers={"Authorization": f"Bearer {key}"})


def _too_many_jobs(s, k):
    running = _submit(s, k["tight3"], slow())
    _until(s, k["tight3"], running, ("running",))
    waiting = _submit(s, k["tight3"], slow())
    try:
        return post(s, k["tight3"], good())
    finally:
        for job in (waiting, running):
            httpx.delete(f"{s.url}/v1/jobs/{job}", headers={"Authorization": f"Bearer {k['tight3']}"})


def _rate(s, k):
    for _ in range(8):
        post(s, k["tight4"], b"")  # refused as malformed, but counted
    return post(s, k["tight4"], good())


def _cancel_queued(s, k):
    running = _submit(s, k["tight5"], slow())
    _until(s, k["tight5"], running, ("running",))
    waiting = _submit(s, k["tight6"], good())
    assert get(s, k["tight6"], f"/v1/jobs/{waiting}").json()["position"] == 1
    cancelled = httpx.delete(f"{s.url}/v1/jobs/{waiting}", headers={"Authorization": f"Bearer {k['tight6']}"}).json()
    httpx.delete(f"{s.url}/v1/jobs/{running}", headers={"Authorization": f"Bearer {k['tight5']}"})
    assert cancelled["state"] == "cancelled"
    return _result(s, k["tight6"], waiting)


def _cancel_running(s, k):
    job = _submit(s, k["tight7"], slow())
    _until(s, k["tight7"], job, ("running",))
    httpx.delete(f"{s.url}/v1/jobs/{job}", headers={"Authorization": f"Bearer {k['tight7']}"})
    return _result(s, k["tight7"], job)


TIGHT = {
    "queue full": (_queue_full, 429, "queue_full"),
    "too many jobs for one key": (_too_many_jobs, 429, "too_many_jobs"),
    "rate per key": (_rate, 429, "rate_limited"),
    "cancel while queued": (_cancel_queued, 410, "CancelledError"),
    "cancel while running": (_cancel_running, 410, "CancelledError"),
    "deadline of the server": (lambda s, k: post(s, k["tight0"], slow()), 504, "LimitError"),
}


@pytest.mark.parametrize("name", list(TIGHT))
def test_queue_rate_cancel_and_deadline(tight, keys, expected, name):
    send, status, code = TIGHT[name]
    response = send(tight, keys)
    body = response.json()
    assert (response.status_code, body["code"]) == (status, code), body
    if status == 429:
        assert int(response.headers["retry-after"]) >= 1
    _until(tight, keys["alice"], _submit(tight, keys["alice"], good()), ("completed",))
    assert_good_request_works(tight, keys["bob"], expected)
