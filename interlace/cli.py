"""The `interlace` command: `interlace demo` (more commands come with the server)."""

from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    from .demo import run

    run(prompt=args.prompt, model=args.model)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="interlace", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="logit lens and activation patching on the default model")
    demo.add_argument("--prompt", default=None, help="prompt for the logit lens")
    demo.add_argument("--model", default=None, help="model path or name (default: embedded SmolLM2)")
    demo.set_defaults(handler=_demo)
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
