"""Scale-out on Ray Serve: `interlace serve MODEL --ray --replicas N` (needs `pip install 'interlace[ray]'`).

The same FastAPI app and service as one process (`create_app`), run as a Ray Serve application of two
deployments:

- `Ingress`, one replica on the node where the command runs: the app and everything a server holds,
  the key store (SQLite, `--db`), quotas, jobs with their ids, owners, events and results, and the
  model's queue. Keys, limits and job ownership hold across replicas because they live only here.
  It builds the model without weights (config and tokenizer; the module on the meta device), which is
  all that checking requests (`HostedModel.admit`) and the manifest need.
- `ModelReplica`, N replicas (or autoscaled between `--replicas` and `--max-replicas`): the weights in
  a `HostedModel` (`replica.py`), one batch of jobs at a time (`max_ongoing_requests=1`: hooks sit on
  the shared module). The requests the ingress admitted travel as they are (Ray pickles them), not
  checked again; a batch's answer comes back as a stream:
  a `step` event per generation step of each streamed job, as it comes, then result bytes or an error
  body per job, the same data the HTTP side sends; the ingress raises each error again as its own class.

The ingress starts one worker thread per replica (`runners` of `create_app`), all taking batches from
the model's one queue; each sends its batch through the replica deployment's handle and reads its
stream, and Ray's router gives it to a free replica. Ray replaces a replica that dies or fails its
health check, as one does whose weights a job changed (`RayReplica.check_health`; until Ray replaces it,
it refuses jobs with 503 `model_damaged`). A batch that was running on a replica that died fails with 503 `replica_failed` (the
client submits it again); no wait lasts longer than the batch's deadline plus `ANSWER_MARGIN` seconds.

Cancelling a running job shows at once (410). Once every job of its batch is cancelled, the batch is
cancelled on its replica too, which stops it at its next operation and takes the next batch only once
it has stopped; a job cancelled beside others still running runs on, and its answer is dropped.

A Ray instance started here (no RAY_ADDRESS) has its node at 127.0.0.1, so every Ray process listens
there only, and no dashboard. SIGTERM ends Serve and Ray at once (no drain, unlike one process).

`GET /v1/replicas` (any valid key) lists the live replicas that answered jobs: Ray's replica id, process,
node, jobs, and with `--check-weights` the replica's own checks (`/v1/health` reports only the
ingress, which has no weights to check).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections import Counter

from .. import collector
from ..errors import CancelledError, ServiceError
from .config import ServerConfig
from .jobs import model_groups
from .replica import ModelReplica, crossing, decode_answer

log = logging.getLogger("interlace.server")

INSTALL = "pip install 'interlace[ray]'"
APP_NAME = "interlace"
ANSWER_MARGIN = 60.0  # seconds, over a batch's own deadline: routing, and a replacement replica starting
LOOPBACK = "127.0.0.1"  # the address of a Ray instance started here
CANCEL_CHECK = 0.25  # seconds between looks at the jobs' cancel flags while a replica runs them


# -- the model's replicas --------------------------------------------------------------------------------
class RayReplica(ModelReplica):
    """A `ModelReplica` as a Ray Serve replica: its batch's answers and steps come as a stream."""

    def __init__(self, source: str, **options):
        _serve_on_loopback_if_local()
        super().__init__(source, **options)
        collector.settle()  # (a process of its own: see collector.settle)

    def check_health(self) -> None:
        """Ray Serve calls this periodically and replaces a replica for which it raises: one whose
        weights a job changed (it refuses every job until then)."""
        if self.hosted.broken:
            raise RuntimeError(f"a job changed weight(s) {', '.join(self.hosted.broken[:5])} of this replica's "
                               "model: it must be replaced with one that loads the model again")

    async def run(self, requests: list, limits: dict, streamed: list[bool], groups: list):
        """Run one batch (`ModelReplica.answer`) in a thread; yield ("step", number, event) for each step of a
        streamed request and ("answer", number, answer) for each request answered, as they come, and last
        ("answers", reply). A cancelled call (the ingress gives up
        on the batch) stops every request at its next operation, and returns only once the batch has
        stopped, so that the next batch never runs beside it on the module."""
        loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()
        cancels = [threading.Event() for _ in requests]

        def send(*message) -> None:
            loop.call_soon_threadsafe(items.put_nowait, message)

        work = loop.run_in_executor(None, self.answer, requests, limits, streamed, send, cancels, groups)
        work.add_done_callback(lambda _: items.put_nowait(None))
        try:
            while (item := await items.get()) is not None:
                yield item
            yield "answers", work.result()
        finally:
            if not work.done():  # cancelled by the ingress
                for cancel in cancels:
                    cancel.set()
                await asyncio.shield(work)


# -- the HTTP side -----------------------------------------------------------------------------------------
class Ingress:
    """The app (a Ray Serve ingress): the whole service of one process, its jobs run by `ModelReplica`s."""

    def __init__(self, replicas, *, source: str, name: str, kind: dict, config: ServerConfig, db: str,
                 trusted: bool, workers: int):
        self.replicas = replicas  # the handle of the ModelReplica deployment
        self.source, self.name, self.kind, self.config, self.db, self.trusted = source, name, kind, config, db, trusted
        self.workers = workers
        self.seen: dict[str, dict] = {}  # replica id -> its identity and the jobs it answered
        self.jobs: Counter = Counter()
        self._lock = threading.Lock()

    def __serve_build_asgi_app__(self):
        from fastapi import Depends

        from .app import create_app
        from .auth import caller
        from .hosting import HostedModel, load_model
        from .keys import KeyStore

        os.environ.pop("INTERLACE_HOST", None)  # this process is the server: a model name here is never remote
        _serve_on_loopback_if_local()
        hosted = HostedModel(load_model(self.source, weights=False, **self.kind), name=self.name,
                             limits=self.config.limits, trusted=self.trusted)
        app = create_app([hosted], KeyStore(self.db), self.config,
                         runners={hosted.name: [self.run_batch] * self.workers})
        app.add_api_route("/v1/replicas", self.replica_view, methods=["GET"], dependencies=[Depends(caller)],
                          tags=["health"], summary="The model replicas that answered jobs, and how many each")
        collector.settle()
        return app

    def replica_view(self) -> dict:
        """The replicas that answered jobs and are still alive (a dead one's Ray actor is gone)."""
        import ray

        with self._lock:
            seen = dict(self.seen)
        alive = {}
        for replica, identity in seen.items():
            try:
                ray.get_actor(identity["actor"], namespace="serve")
            except ValueError:  # no such actor: it died (Ray Serve starts a new one under a new id)
                continue
            alive[replica] = {**identity, "jobs": self.jobs[replica]}
        with self._lock:
            for replica in set(seen) - set(alive):
                self.seen.pop(replica, None)
        return {"replicas": list(alive.values())}

    def run_batch(self, jobs: list, started, finish) -> list:
        """One worker's batch, run on a free replica; per job (result bytes, logs, missing) or its error
        (`finish(number, answer)` for one answered before the batch's end: see `Worker`).
        The replica's stream is read by a thread of its own into `items`, so that this one can look at the
        jobs' cancel flags and the deadline while it waits: a batch whose jobs are all cancelled, or that
        is past its deadline and margin, is cancelled on the replica too (it stops at its next operation)."""
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

        limits = jobs[0].limits  # a batch shares its limits (they are part of its group)
        response = self.replicas.options(stream=True).run.remote(
            [crossing(job) for job in jobs], dataclasses.asdict(limits), [job.stream for job in jobs], model_groups(jobs))
        started()
        items: queue.Queue = queue.Queue()
        threading.Thread(target=_read_into, args=(response, items), name="interlace-replica-stream", daemon=True).start()
        longest = limits.max_seconds + ANSWER_MARGIN
        deadline = time.monotonic() + longest
        while True:
            try:
                item = items.get(timeout=CANCEL_CHECK)
            except queue.Empty:  # nothing yet (waiting for a free replica, or running there)
                if all(job.cancel.is_set() for job in jobs):
                    response.cancel()
                    return [CancelledError("the job was cancelled while running")] * len(jobs)
                if time.monotonic() > deadline:
                    response.cancel()
                    error = ServiceError(f"no model replica answered within {longest:.0f} s (the job's deadline and "
                                         "a margin): the cluster may have too few replicas running; submit the job "
                                         "again", status=504, code="replica_timeout")
                    return [error] * len(jobs)
                continue
            if isinstance(item, (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)):
                log.warning("a model replica failed while running %d job(s): %s", len(jobs), str(item)[:300])
                error = ServiceError("the model replica running this job stopped (Ray is replacing it); submit the "
                                     "job again", status=503, code="replica_failed")
                return [error] * len(jobs)
            if isinstance(item, BaseException):
                raise item
            if item[0] == "step":
                _, number, event = item
                jobs[number].publish_step(event)
                continue
            if item[0] == "answer":
                _, number, answer = item
                finish(number, decode_answer(answer))
                continue
            reply = item[1]
            break
        identity = reply["replica"]
        with self._lock:
            self.seen[identity["replica"]] = identity
            self.jobs[identity["replica"]] += len(jobs)
        cancelled = CancelledError("the job was cancelled while running")
        return [cancelled if job.cancel.is_set() else decode_answer(answer)
                for job, answer in zip(jobs, reply["answers"])]


def _read_into(response, items: queue.Queue) -> None:
    """Every item of a replica's stream into `items`, and then the error that ended it, if one did."""
    try:
        for item in response:
            items.put(item)
    except BaseException as error:  # noqa: BLE001 - handed to the worker thread, which decides
        items.put(error)


def application(source: str, *, name: str, config: ServerConfig, db: str, kind: dict | None = None,
                trusted: bool = False, check_weights: bool = False, replicas: int = 1, max_replicas: int | None = None,
                gpus_per_replica: float = 0):
    """The Ray Serve application: the ingress on this node, bound to the model replicas.
    `kind`: `standardized` and `attention_probs` of `hosting.load_model`."""
    import ray
    from ray import serve

    kind = kind or {}

    scaling = ({"autoscaling_config": {"min_replicas": replicas, "max_replicas": max_replicas,
                                       "target_ongoing_requests": 1}}
               if max_replicas and max_replicas > replicas else {"num_replicas": replicas})
    model = serve.deployment(
        RayReplica, name="ModelReplica", max_ongoing_requests=1,  # one batch at a time: hooks sit on the module
        ray_actor_options={"num_cpus": 1, "num_gpus": gpus_per_replica}, **scaling,
    ).bind(source, name=name, kind=kind, limits=dataclasses.asdict(config.limits), trusted=trusted,
           check_weights=check_weights,
           device_map="auto" if gpus_per_replica else None)  # "auto": over the GPUs Ray gave the replica
    ingress = serve.deployment(
        serve.ingress()(Ingress), name="Ingress", num_replicas=1,
        # every HTTP request goes through it, long waits and event streams included
        max_ongoing_requests=100_000,
        # on this node: the key database (--db) is a file here; it holds no model, so no CPU is reserved
        ray_actor_options={"num_cpus": 0, "resources": {f"node:{ray.util.get_node_ip_address()}": 0.001}},
    )
    return ingress.bind(model, source=source, name=name, kind=kind, config=config, db=db, trusted=trusted,
                        workers=max(replicas, max_replicas or 0))


def _serve_on_loopback_if_local() -> None:
    """On a Ray node at 127.0.0.1 (the instance `serve_on_ray` starts), bind this replica's gRPC server for
    calls between deployments there too: Ray Serve binds it to every interface ([::]) whatever the node's
    address. Called in a replica's constructor, which Ray Serve runs before it starts that server."""
    import ray
    from ray.serve._private import replica

    if ray.util.get_node_ip_address() != LOOPBACK or getattr(replica.add_port_to_grpc_server, "loopback", False):
        return
    bind = replica.add_port_to_grpc_server

    def on_loopback(server, address):
        return bind(server, address.replace("[::]", LOOPBACK).replace("0.0.0.0", LOOPBACK))

    on_loopback.loopback = True
    replica.add_port_to_grpc_server = on_loopback


# -- the command -------------------------------------------------------------------------------------------
def serve_on_ray(args, config: ServerConfig) -> int:
    """`interlace serve MODEL --ray`: on the cluster at RAY_ADDRESS, or on a Ray instance started here."""
    local = not os.environ.get("RAY_ADDRESS")
    if local:
        # Ray's own switch for a single-machine instance (its default on macOS and Windows): the node's address
        # is 127.0.0.1, so that Ray's servers (GCS, raylet, workers, agents) listen there, not on every interface;
        # read when Ray is imported, and inherited by every process it starts
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    try:
        import ray
        from ray import serve
    except ImportError:
        print(f"interlace serve --ray needs Ray Serve, which is not installed: {INSTALL}", file=sys.stderr)
        return 2
    if args.replicas < 1 or (args.max_replicas is not None and args.max_replicas < args.replicas):
        print("--replicas must be at least 1, and --max-replicas at least --replicas", file=sys.stderr)
        return 2
    from .hosting import default_name

    # paths as seen from here: the ingress and the replicas run in other processes (or nodes)
    source = os.path.abspath(args.model) if os.path.exists(args.model) else args.model
    name = args.name or default_name(args.model)
    if not local:
        ray.init(logging_level=args.log_level.upper())  # joins the cluster RAY_ADDRESS names
    else:  # a Ray instance of our own, ended with this command; room for every replica, even on a small machine
        ray.init(num_cpus=max(os.cpu_count() or 1, args.replicas, args.max_replicas or 0), include_dashboard=False,
                 _node_ip_address=LOOPBACK, logging_level=args.log_level.upper())
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a terminate ends Serve and Ray as Ctrl-C does
    logging_config = {"log_level": args.log_level.upper()}
    try:
        serve.start(http_options={"host": args.host, "port": args.port}, proxy_location="HeadOnly",
                    logging_config=logging_config)
        print(f"interlace: starting '{name}' on Ray Serve: {args.replicas} replica(s) of {args.model} ...",
              file=sys.stderr, flush=True)
        kind = {"standardized": args.standardized, "attention_probs": args.attention_probs}
        serve.run(application(source, name=name, config=config, db=os.path.abspath(args.db), kind=kind,
                              trusted=args.trusted, check_weights=args.check_weights, replicas=args.replicas,
                              max_replicas=args.max_replicas, gpus_per_replica=args.gpus_per_replica),
                  name=APP_NAME, route_prefix="/", logging_config=logging_config)
        print(f"interlace: serving '{name}' on http://{args.host}:{args.port} (keys: {args.db})",
              file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        serve.shutdown()
        ray.shutdown()
