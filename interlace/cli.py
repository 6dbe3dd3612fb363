"""The `interlace` command: `interlace demo`, `interlace check-model` (more commands come with the server)."""

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
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
