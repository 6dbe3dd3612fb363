"""The `interlace` command: `demo`, `check-model` (a model's standardized names), `serve` (host a model for
remote traces), `keys` (its API keys) and `doctor` (versions and checks for a bug report)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from .backends.limits import Limits
from .errors import InterlaceError


def _demo(args) -> int:
    from .demo import run

    run(prompt=args.prompt, model=args.model, plot=args.plot, stream=args.stream)
    return 0


def _check_model(args) -> int:
    from .models.standardized import StandardizedTransformer
    from .models.standardized.check import check_model, format_table

    load = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    model = StandardizedTransformer(args.model, dispatch=True, **load)
    print(f"{type(model.module).__name__} ({model.config.model_type}): {model.family}\n")
    results = check_model(model, args.prompt or None)
    print(format_table(results))
    failed = [r.name for r in results if r.status == "FAIL"]
    passed = sum(r.status == "ok" for r in results)
    print(f"\n{passed} ok, {len(failed)} failed, {len(results) - passed - len(failed)} not applicable")
    return 1 if failed else 0


def _serve(args) -> int:
    import logging

    if not args.hub:  # before transformers is imported: nothing a job does may reach the Hub
        os.environ["HF_HUB_OFFLINE"] = "1"
    if not args.ray and (args.replicas != 1 or args.max_replicas or args.gpus_per_replica):
        print("--replicas, --max-replicas and --gpus-per-replica need --ray", file=sys.stderr)
        return 2
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile) or (args.ssl_certfile and args.ray):
        print("TLS needs both --ssl-certfile and --ssl-keyfile, without --ray (with --ray, put a TLS proxy in front)",
              file=sys.stderr)
        return 2
    if missing := [path for path in (args.ssl_certfile, args.ssl_keyfile) if path and not os.path.isfile(path)]:
        print(f"no file at {missing[0]} (--ssl-certfile and --ssl-keyfile take PEM files)", file=sys.stderr)
        return 2

    from .server.app import create_app, serve
    from .server.config import ServerConfig
    from .server.hosting import HostedModel, default_name, load_model
    from .server.keys import KeyStore

    if not os.path.isfile(args.db):
        print(f"no key database at {args.db}: every request would be refused. Create it with a first key:\n"
              f"  interlace keys create --db {args.db} --name NAME\nthen start the server again", file=sys.stderr)
        return 2
    if not any(not key.revoked for key in KeyStore(args.db).list()):
        print(f"WARNING: the key database {args.db} has no active key, so every request gets 401; add one with "
              f"`interlace keys create --db {args.db} --name NAME` (no restart needed)", file=sys.stderr)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.trusted:
        print("WARNING: --trusted: this server runs the Python functions (interlace.apply) that clients send, "
              "with this process's rights. Use it only when every key holder may run code on this machine.",
              file=sys.stderr)
    try:
        limits = Limits(**{name: getattr(args, name) for name in Limits.names()})
        config = ServerConfig(limits=limits, **{f.name: getattr(args, f.name)
                                                for f in dataclasses.fields(ServerConfig) if f.name != "limits"})
    except InterlaceError as error:
        print(f"interlace serve: {error}", file=sys.stderr)
        return 2
    if args.ray:
        from .server.cluster import serve_on_ray

        return serve_on_ray(args, config)
    if (unusable := _cannot_listen(args.host, args.port)) is not None:  # said before minutes of loading a model
        print(f"interlace serve: cannot listen on {args.host}:{args.port}: {unusable}", file=sys.stderr)
        return 2
    print(f"interlace: loading {args.model} ...", file=sys.stderr, flush=True)
    kind = {"standardized": args.standardized, "attention_probs": args.attention_probs}
    name = args.name or default_name(args.model)
    runner = None
    try:  # a model that cannot load fails the command with its reason, not the first job
        if args.in_process:
            hosted = HostedModel(load_model(args.model, **kind), name=name, limits=limits, trusted=args.trusted,
                                 check_weights=args.check_weights)
            app = create_app([hosted], KeyStore(args.db), config)
        else:  # the weights in a worker process (`server/worker.py`); here only what checking requests needs
            from .server.worker import ProcessRunner

            runner = ProcessRunner(None, args.model, check_weights=args.check_weights, name=name, kind=kind,
                                   limits=dataclasses.asdict(limits), trusted=args.trusted)
            runner.start()  # first: the child loads the model while this process builds its own copy
            hosted = runner.hosted = HostedModel(load_model(args.model, weights=False, **kind), name=name,
                                                 limits=limits, trusted=args.trusted)
            runner.wait_ready()
            app = create_app([hosted], KeyStore(args.db), config, runners={name: [runner]})
    except InterlaceError as error:
        if runner is not None:
            runner.close()
        print(f"interlace serve: {error}", file=sys.stderr)
        return 1
    scheme = "https" if args.ssl_certfile else "http"
    print(f"interlace: serving '{hosted.name}' on {scheme}://{args.host}:{args.port} (keys: {args.db})",
          file=sys.stderr, flush=True)
    # the HTTP loop and the model's worker share the GIL: hand it over within 0.5 ms, not the default 5 ms,
    # so a finished job is answered at once
    sys.setswitchinterval(0.0005)
    try:
        serve(app, host=args.host, port=args.port, log_level=args.log_level, ssl_certfile=args.ssl_certfile,
              ssl_keyfile=args.ssl_keyfile)
    finally:
        if runner is not None:
            runner.close()  # after the drain: the running batch has finished
    return 0


def _cannot_listen(host: str, port: int) -> str | None:
    """Why `host:port` cannot be listened on, and what to do; None when it can."""
    import errno
    import socket

    try:
        socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET).close()
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            return "the port is in use (another server?): pick another --port, or stop that one"
        return f"{error.strerror or error}: check --host and --port"
    return None


def _keys(args) -> int:
    from .server.keys import KeyStore

    if args.action != "create" and not os.path.isfile(args.db):
        print(f"no key database at {args.db}; `interlace keys create --db {args.db} --name NAME` makes one",
              file=sys.stderr)
        return 2
    if args.action == "create" and not args.name:
        print("interlace keys create needs --name NAME (who the key is for)", file=sys.stderr)
        return 2
    new = not os.path.exists(args.db)
    store = KeyStore(args.db)
    if args.action == "create":
        if new:
            print(f"created the key database {args.db}", file=sys.stderr)
        others = [key.id for key in store.list() if key.name == args.name and not key.revoked]
        print(store.create(args.name))  # the only time the key is shown
        if others:  # (rotating a key: the old one is revoked by its id, not by the name both share)
            print(f"{args.name!r} has other active keys ({', '.join(others)}): `interlace keys revoke --name "
                  f"{args.name}` would revoke all of them; revoke one by its id", file=sys.stderr)
    elif args.action == "list":
        for key in store.list():
            print(f"{key.id}  {key.name}  {'revoked' if key.revoked else 'active'}")
    else:
        if not args.name:
            print("interlace keys revoke needs --name NAME or key id", file=sys.stderr)
            return 2
        active = [key.id for key in store.list() if args.name in (key.id, key.name) and not key.revoked]
        count = store.revoke(args.name)
        print(f"revoked {count} key(s)" + (f": {', '.join(active)}" if count else ""))
        return 0 if count else 1
    return 0


def _doctor(args) -> int:
    from .doctor import report

    text = report(model=not args.no_model)
    print(text)
    return 1 if "FAILED" in text else 0


def _flag(parser, name: str, default, help: str) -> None:
    parser.add_argument("--" + name.replace("_", "-"), dest=name, type=type(default), default=default,
                        metavar=type(default).__name__.upper(), help=f"{help} (default {default})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="interlace", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # one version line
    parser.add_argument("--version", action="version", version=_version_line())
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="logit lens and activation patching on the default model")
    demo.add_argument("--prompt", default=None, help="prompt for the logit lens (or for --stream)")
    demo.add_argument("--model", default=None, help="model path or name (default: embedded SmolLM2)")
    demo.add_argument("--plot", default=None, metavar="FILE.html", help="also write the logit lens as figures")
    demo.add_argument("--stream", action="store_true",
                      help="instead stream a plain and a steered completion side by side as they are generated")
    demo.set_defaults(handler=_demo)
    check = commands.add_parser(
        "check-model", help="check every standardized name of a model by value, against hand-written hooks"
    )
    check.add_argument("model", help="model path, cached name, or 'smollm2' (the embedded model)")
    check.add_argument("--gguf-file", default=None, help="GGUF file name inside the model folder")
    check.add_argument("--prompt", action="append", help="a prompt to run the checks on (repeatable)")
    check.set_defaults(handler=_check_model)

    serve = commands.add_parser("serve", help="host a model for remote traces (FastAPI on uvicorn)")
    serve.add_argument("model", help="'smollm2', a local model folder, a GGUF file, or a Hugging Face cache id")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    serve.add_argument("--db", default="keys.db",
                       help="the API key database, made by `interlace keys create` (default keys.db); jobs are kept "
                            "there too")
    serve.add_argument("--name", default=None, help="the model's id for clients (default: from MODEL)")
    serve.add_argument("--ssl-certfile", default=None, metavar="PEM",
                       help="serve HTTPS with this certificate (and --ssl-keyfile): API keys cross the network "
                            "encrypted; clients use host='https://...'")
    serve.add_argument("--ssl-keyfile", default=None, metavar="PEM", help="the certificate's private key")
    serve.add_argument("--trusted", action="store_true",
                       help="also run graphs with pickled user functions (interlace.apply): only for trusted users")
    serve.add_argument("--hub", action="store_true",
                       help="let the server reach the Hugging Face Hub (default: HF_HUB_OFFLINE=1, local files only)")
    serve.add_argument("--check-weights", action="store_true",
                       help="test mode: checksum the weights after every job (see /v1/health)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                       help="the least severe messages the server logs (default info)")
    serve.add_argument("--standardized", action="store_true",
                       help="host it as a StandardizedTransformer, so clients can read per-head values")
    serve.add_argument("--attention-probs", action="store_true",
                       help="also attention probabilities (the eager attention; implies --standardized)")
    serve.add_argument("--in-process", action="store_true",
                       help="run jobs in the server's own process, not in a worker process: a small job answers "
                            "a little sooner, but health and status wait while a job computes, and a deadline "
                            "cannot stop a job inside one long operation")
    serve.add_argument("--ray", action="store_true",
                       help="run as a Ray Serve application (the cluster at RAY_ADDRESS, or a Ray instance started "
                            "here): one HTTP ingress, the model in --replicas replicas; needs interlace[ray]")
    serve.add_argument("--replicas", type=int, default=1, help="--ray: model replicas (default 1)")
    serve.add_argument("--max-replicas", type=int, default=None,
                       help="--ray: let Ray autoscale between --replicas and this many replicas by load")
    serve.add_argument("--gpus-per-replica", type=float, default=0,
                       help="--ray: GPUs each replica asks Ray for; the model spreads over them (device_map='auto')")
    service_help = {"queue_depth": "jobs waiting per model", "rate": "job submissions per key per minute",
                    "jobs_per_key": "unfinished jobs per key", "result_ttl": "seconds a result stays readable",
                    "max_wait": "longest ?wait= in seconds", "batch_jobs": "jobs run together in one forward",
                    "batch_tokens": "token positions of one batch of jobs",
                    "batch_wait": "seconds a job waits for others to batch with"}
    from .server.config import ServerConfig  # noqa: PLC0415 - light: no model, no web framework

    for spec in dataclasses.fields(ServerConfig):
        if spec.name != "limits":
            _flag(serve, spec.name, spec.default, service_help[spec.name])
    for name in Limits.names():
        _flag(serve, name, getattr(Limits(), name), Limits.described(name))
    serve.set_defaults(handler=_serve)

    keys = commands.add_parser("keys", help="create, list or revoke the API keys of a server")
    keys.add_argument("action", choices=["create", "list", "revoke"])
    keys.add_argument("--db", required=True, help="the key database file (create makes it when missing)")
    keys.add_argument("--name", default=None, help="who the key is for (create), or a name or key id (revoke)")
    keys.set_defaults(handler=_keys)
    doctor = commands.add_parser("doctor", help="versions, CUDA and the embedded model: paste it into a bug report")
    doctor.add_argument("--no-model", action="store_true", help="skip loading the embedded model (~20 s)")
    doctor.set_defaults(handler=_doctor)
    args = parser.parse_args(argv)
    return args.handler(args)


def _version_line() -> str:
    from .doctor import versions

    found = versions()
    return "interlace " + found.pop("interlace") + " (" + ", ".join(
        f"{name} {found[name]}" for name in ("python", "torch", "transformers", "accelerate")) + ")"


if __name__ == "__main__":
    sys.exit(main())
