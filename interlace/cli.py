"""The `interlace` command: `demo`, `check-model`, `serve` (a model for remote traces) and `keys`."""

from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    from .demo import run

    run(prompt=args.prompt, model=args.model, plot=args.plot)
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
    from dataclasses import fields

    from .backends.limits import Limits
    from .server import ServerSettings, serve

    limits = Limits(**{f.name: getattr(args, f.name) for f in fields(Limits)})
    settings = ServerSettings(**{f.name: getattr(args, f.name) for f in fields(ServerSettings) if f.name != "limits"},
                              limits=limits)
    serve(args.model, name=args.name, db=args.db, host=args.host, port=args.port, settings=settings)
    return 0


def _keys(args) -> int:
    from .server.keys import KeyStore

    store = KeyStore(args.db)
    if args.action == "create":
        print(store.create(args.name or "unnamed"))
    elif args.action == "list":
        for key in store.list():
            print(f"{key.id}  {key.name}  {'revoked' if key.revoked else 'active'}")
    elif not store.revoke(args.name or ""):
        print(f"no active key {args.name!r}", file=sys.stderr)
        return 1
    return 0


def _add_serve(commands) -> None:
    from dataclasses import fields

    from .backends.limits import Limits
    from .server.settings import ServerSettings

    serve = commands.add_parser("serve", help="host a model for remote traces (remote=True)")
    serve.add_argument("model", help="'smollm2' (the embedded model), a model folder, a GGUF file or a cache id")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--db", default="keys.db", help="the API key database (interlace keys create)")
    serve.add_argument("--name", default=None, help="the model's id for clients (default: from MODEL)")
    for group in (ServerSettings, Limits):
        for field in fields(group):
            if field.name == "limits":
                continue
            flag = "--" + field.name.replace("_", "-")
            if field.type in ("bool", bool):
                serve.add_argument(flag, action="store_true", help=f"(default: {field.default})")
            else:
                kind = float if "seconds" in field.name else int
                serve.add_argument(flag, type=kind, default=field.default, help=f"(default: {field.default})")
    serve.set_defaults(handler=_serve)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="interlace", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="logit lens and activation patching on the default model")
    demo.add_argument("--prompt", default=None, help="prompt for the logit lens")
    demo.add_argument("--model", default=None, help="model path or name (default: embedded SmolLM2)")
    demo.add_argument("--plot", default=None, metavar="FILE.html", help="also write the logit lens as figures")
    demo.set_defaults(handler=_demo)
    check = commands.add_parser(
        "check-model", help="check every standardized name of a model by value, against hand-written hooks"
    )
    check.add_argument("model", help="model path, cached name, or 'smollm2' (the embedded model)")
    check.add_argument("--gguf-file", default=None, help="GGUF file name inside the model folder")
    check.add_argument("--prompt", action="append", help="a prompt to run the checks on (repeatable)")
    check.set_defaults(handler=_check_model)
    _add_serve(commands)
    keys = commands.add_parser("keys", help="create, list or revoke the API keys of a server")
    keys.add_argument("action", choices=["create", "list", "revoke"])
    keys.add_argument("--db", default="keys.db", help="the key database the server uses")
    keys.add_argument("--name", default=None, help="who the key is for (create), or the key id (revoke)")
    keys.set_defaults(handler=_keys)
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
