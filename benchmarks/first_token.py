"""Where a remote streamed first token's time goes: a timeline across the client, the server's front and its
worker process.

Run `python benchmarks/first_token.py [--model tiny] [--repeats 30] [--in-a-row]`. It starts an `interlace
serve` process on 127.0.0.1 whose front and worker process note the time (`time.perf_counter`, one clock
for every process of the machine) as a request passes each stage, streams the steered generation of
`benchmarks/streaming.py` (32 tokens), alternating with the same generation run here unless `--in-a-row`,
and prints, per stage, the median time after the end of the client's `with` block and what that stage added:
the client writing the request and sending it; the front reaching the app, reading the body, admitting the
request (`HostedModel.admit`), recording the job and queueing it (a job alone in the queue is not grouped for
batching); the worker thread taking it, the worker process receiving and unpickling it and reaching the run;
the first step sent, received by the front, written to the event stream, and read by the client.

The marks come from wrapping the functions of each stage (this file is also the server's program: it wraps
them in its front, and in the worker process it starts), so a stage renamed in the code is reported missing
rather than measured wrong.
"""

from __future__ import annotations

import argparse
import glob
import inspect
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "server"))
sys.path.insert(0, str(ROOT / "benchmarks"))

STAGES = [
    "client: block ended", "client: request written", "client: sending", "front: app reached",
    "front: body read", "front: admitted", "front: job recorded", "front: queued",
    "front: worker thread has it", "worker: batch received", "worker: batch unpickled", "worker: run begins",
    "worker: first step sent", "front: first step received", "front: first step written",
    "client: first step read",
]
_marks = None


def mark(stage: str) -> None:
    """Note the time of `stage` in this process's file of marks (in $INTERLACE_MARKS)."""
    global _marks
    if _marks is None:
        _marks = open(os.path.join(os.environ["INTERLACE_MARKS"], f"{os.getpid()}.txt"), "a", buffering=1)
    _marks.write(f"{time.perf_counter():.7f} {stage}\n")


def _marked(owner, name: str, stage: str, *, before: bool = False) -> None:
    """Mark `stage` when `owner.name` returns (`before`: when it is called); a coroutine function when it ends."""
    original = getattr(owner, name)
    if inspect.iscoroutinefunction(original):
        async def wrapped(*args, **kwargs):
            result = await original(*args, **kwargs)
            mark(stage)
            return result
    else:
        def wrapped(*args, **kwargs):
            if before:
                mark(stage)
            result = original(*args, **kwargs)
            if not before:
                mark(stage)
            return result
    setattr(owner, name, wrapped)


def _front() -> None:
    """Wrap the front's stages, and start the worker process through `_worker`."""
    from interlace.server import app, hosting, jobs, store, worker
    from interlace.server.routers import jobs as routes

    counted = app._CountRefusals.__call__

    async def asgi(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await counted(self, scope, receive, send)
        mark("front: app reached")

        async def sending(message):
            if message["type"] == "http.response.body" and b"event: step" in message.get("body", b""):
                mark("front: first step written")
            await send(message)
        return await counted(self, scope, receive, sending)
    app._CountRefusals.__call__ = asgi
    _marked(routes, "_read_body", "front: body read")
    _marked(app.Service, "submit", "front: queued")
    _marked(hosting.HostedModel, "admit", "front: admitted")
    _marked(store.JobStore, "add", "front: job recorded")
    _marked(worker.ProcessRunner, "_run", "front: worker thread has it", before=True)
    _marked(jobs.Job, "publish_step", "front: first step received", before=True)
    worker._child = _worker


class _Connection:
    """The worker's end of its pipe, noting when a batch comes and a step goes."""

    def __init__(self, connection):
        self.connection = connection

    def recv_bytes(self):
        data = self.connection.recv_bytes()
        mark("worker: batch received")
        return data

    def send(self, message):
        if message[0] == "step":
            mark("worker: first step sent")
        self.connection.send(message)

    def __getattr__(self, name):
        return getattr(self.connection, name)


def _worker(connection, *args):
    from interlace.backends import local
    from interlace.server import replica, worker

    _marked(replica.ModelReplica, "answer", "worker: batch unpickled", before=True)
    _marked(local.Interleaver, "run", "worker: run begins", before=True)
    worker._child(_Connection(connection), *args)


def _client(args) -> None:
    import httpx
    import torch

    import interlace
    from interlace.backends.remote import RemoteBackend
    from interlace.server.keys import KeyStore
    from remote import _model
    from serving import Server

    torch.set_num_threads(1)
    _marked(RemoteBackend, "_encode", "client: request written")
    _marked(httpx.Client, "send", "client: sending", before=True)
    with tempfile.TemporaryDirectory() as folder:
        marks = os.environ["INTERLACE_MARKS"] = os.path.join(folder, "marks")
        os.mkdir(marks)
        source, local, layers, prompt = _model(args.model, folder)
        key = KeyStore(os.path.join(folder, "keys.db")).create("bench")
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
        server = Server(source, os.path.join(folder, "keys.db"), "--rate", "100000", ready_within=300, env=env,
                        program=(__file__, "--front"))
        try:
            name = os.path.basename(source) if args.model == "tiny" else "smollm2"
            remote = interlace.LanguageModel(name, host=server.url, api_key=key)
            remote._remote.progress = False
            firsts = {"local": [], "remote": []}
            for number in range(3 + args.repeats):
                if number == 3:  # (the warm-up's marks are not counted)
                    for path in glob.glob(os.path.join(marks, "*.txt")):
                        open(path, "w").close()
                firsts["remote"].append(_first_token(remote, layers, prompt, remote=True))
                if not args.in_a_row:
                    firsts["local"].append(_first_token(local, layers, prompt, remote=False))
        finally:
            server.stop()
        _report(marks, {way: times[3:] for way, times in firsts.items() if times}, args)


def _first_token(lm, layers: str, prompt: str, *, remote: bool) -> float:
    import torch

    import interlace

    layer = lm.get(layers)[len(lm.get(layers)) // 2]
    with lm.generate(prompt, max_new_tokens=32, remote=remote, stream=True) as tracer:
        hidden = interlace.list().save()
        with tracer.all():
            layer.output[:, -1] += torch.full((lm.config.hidden_size,), 0.01)
            hidden.append(layer.output[:, -1])
        lm.generator.output.save()
        if remote:
            mark("client: block ended")
        start = time.perf_counter()
    first = None
    for _ in tracer.stream():
        if first is None:
            first = time.perf_counter() - start
            if remote:
                mark("client: first step read")
    return first


def _report(folder: str, firsts: dict, args) -> None:
    noted = sorted((float(time_), stage.strip()) for path in glob.glob(os.path.join(folder, "*.txt"))
                   for time_, stage in (line.split(" ", 1) for line in open(path)))
    jobs, job = [], None
    for moment, stage in noted:
        if stage == "client: block ended":
            job = {}
            jobs.append(job)
        if job is not None and stage not in job:  # (a stage's first time in a job: its first step)
            job[stage] = moment
    jobs = [job for job in jobs if "client: first step read" in job]
    print(f"model: {args.model}; 32 new tokens, steered at every step; {len(jobs)} remote streamed generations"
          + (" in a row" if args.in_a_row else ", each after a local one") + "; medians, ms after the block ends")
    print(f"{'stage':32}{'at':>8}{'added':>8}")
    before = 0.0
    for stage in STAGES:
        times = [job[stage] - job["client: block ended"] for job in jobs if stage in job]
        if not times:
            print(f"{stage:32}{'missing':>8}")
            continue
        at = statistics.median(times) * 1000
        print(f"{stage:32}{at:8.2f}{at - before:+8.2f}")
        before = at
    print("first token: " + ", ".join(f"{way} {statistics.median(times) * 1000:.2f} ms" for way, times in firsts.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="tiny")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--in-a-row", action="store_true", help="no local generation between the remote ones")
    _client(parser.parse_args())


if __name__ == "__main__":
    if sys.argv[1:2] == ["--front"]:  # (the server: `python first_token.py --front serve MODEL ...`)
        from interlace.cli import main as serve

        _front()
        sys.argv = [sys.argv[0], *sys.argv[2:]]
        sys.exit(serve())
    main()
