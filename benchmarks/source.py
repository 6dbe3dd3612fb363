"""What does `.source` cost? Measured side by side in one run on the embedded SmolLM2-135M.

Run `python benchmarks/source.py [--quick]`. Each repeat runs every variant of a row once in turn (so
drift hits them alike); a row reports the median over repeats, after warmup.

1. Outside a trace: the forward with every attention module's forward rewritten (each call site a
   point with no hooks) against the original forward of the same modules (the rewrite taken off and
   put back between variants), at 16 and 128 tokens. Outputs are checked bit-identical first.
2. The cost of one call site: a module whose forward makes 1,000 `torch.add` calls on a 1-element
   tensor, rewritten vs original (nanoseconds per call, the difference per call).
3. Inside a trace: reading one point (`layers.15.self_attn.source.o_proj_0`) against reading the
   module it calls (`layers.15.self_attn.o_proj`), the same tensor, both with early stop, and the
   bare forward for scale.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import interlace  # noqa: E402
from interlace.source import rewritten_forward, source_of  # noqa: E402


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(variants: dict, repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds of each variant, run in turn each repeat."""
    times = {name: [] for name in variants}
    for repeat in range(warmup + repeats):
        for name, fn in variants.items():
            took = timed(fn)
            if repeat >= warmup:
                times[name].append(took)
    return {name: statistics.median(values) for name, values in times.items()}


class Rewrites:
    """Take the rewritten forwards off the attention modules (the original runs) and put them back."""

    def __init__(self, modules):
        self.modules = modules
        self.installed = [rewritten_forward(module) for module in modules]

    def original(self):
        for module in self.modules:
            module.__dict__.pop("forward")

    def rewritten(self):
        for module, forward in zip(self.modules, self.installed):
            module.__dict__["forward"] = forward


class Adds(torch.nn.Module):
    CALLS = 1000

    def forward(self, x):
        for _ in range(self.CALLS):
            x = torch.add(x, 1)
        return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, 16 tokens only")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    options = parser.parse_args()
    repeats, warmup = (5, 1) if options.quick else (30, 3)
    torch.set_num_threads(options.threads)

    lm = interlace.LanguageModel.default(dispatch=True)
    attentions = [layer.self_attn for layer in lm.model.layers]
    for attention in attentions:
        attention.source  # rewrite every attention forward
    points = sum(len(source_of(a.module)._modules) for a in attentions)
    rewrites = Rewrites([a.module for a in attentions])
    module = lm.module
    print(f"SmolLM2-135M, {len(attentions)} attention forwards rewritten, {points} points in all "
          f"({points // len(attentions)} each); torch threads {torch.get_num_threads()}")

    print("\n1. outside a trace: rewritten vs original forward (median seconds)")
    print(f"{'tokens':>8} {'original':>10} {'rewritten':>10} {'ratio':>7}")
    for tokens in (16,) if options.quick else (16, 128):
        ids = torch.randint(100, 1000, (1, tokens))

        def forward():
            with torch.no_grad():
                return module(ids).logits

        rewrites.original()
        want = forward()
        rewrites.rewritten()
        assert torch.equal(forward(), want), "a rewritten forward changed the output"

        def original():
            rewrites.original()
            forward()
            rewrites.rewritten()

        result = compare({"original": original, "rewritten": forward}, repeats, warmup)
        print(f"{tokens:>8} {result['original']:>10.4f} {result['rewritten']:>10.4f} "
              f"{result['rewritten'] / result['original']:>7.3f}")

    print("\n2. one call site, no hooks: a forward of 1,000 torch.add calls (median ns per call)")
    plain, rewritten = Adds(), Adds()
    interlace.Model(rewritten).source  # one point, add_0, called 1,000 times
    one = torch.zeros(1)
    result = compare({"original": lambda: plain(one), "rewritten": lambda: rewritten(one)}, repeats * 4, warmup)
    per_call = {name: seconds / Adds.CALLS * 1e9 for name, seconds in result.items()}
    print(f"original {per_call['original']:.0f} ns, rewritten {per_call['rewritten']:.0f} ns: "
          f"+{per_call['rewritten'] - per_call['original']:.0f} ns per call site")

    print("\n3. in a trace: one point vs the module it calls (layer 15 of 30; median seconds)")
    prompt = "The Eiffel Tower is in the city of"
    inputs = lm.tokenizer(prompt, return_tensors="pt")
    layer = lm.model.layers[15].self_attn

    def bare():
        with torch.no_grad():
            module(**inputs)

    def read_module():
        with lm.trace(prompt):
            layer.o_proj.output.save()

    def read_point():
        with lm.trace(prompt):
            layer.source.o_proj_0.output.save()

    result = compare({"bare forward": bare, "module output": read_module, "point output": read_point}, repeats, warmup)
    for name, seconds in result.items():
        print(f"{name:>14} {seconds:>9.4f}  x{seconds / result['bare forward']:.3f} of the bare forward")
    print(f"point / module: {result['point output'] / result['module output']:.3f}")


if __name__ == "__main__":
    main()
