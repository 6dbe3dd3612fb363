"""What does steering every generation step cost? Run `python benchmarks/generation.py [--quick]`.

On the embedded SmolLM2-135M, greedy generation of 32 tokens from one prompt, measured side by side
in one run (each repeat runs every variant once, in turn; medians after warmup):
- bare: `model.generate` alone;
- raw hooks: the same generate with a hand-written forward hook adding a steering vector to layer
  10's last position at every step;
- interlace: `lm.generate` with the same steering inside `tracer.all()`.
Prints the times and the ratios interlace/raw and interlace/bare, and checks that the steered
tokens of interlace and of the raw hook are identical.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import interlace  # noqa: E402
from overhead import side_by_side  # noqa: E402  (this folder is on the path when run as a script)

LAYER, TOKENS, PROMPT = 10, 32, "The capital of France is"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args(argv)
    repeats, warmup = (3, 1) if args.quick else (7, 1)

    lm = interlace.LanguageModel.default(dispatch=True)
    model = lm.module
    ids = lm.tokenizer(PROMPT, return_tensors="pt")
    torch.manual_seed(0)
    steer = torch.randn(model.config.hidden_size) * 2
    # min_new_tokens: every variant makes exactly TOKENS steps, even if steering leads to EOS sooner
    options = {"max_new_tokens": TOKENS, "min_new_tokens": TOKENS, "do_sample": False,
               "pad_token_id": lm.tokenizer.pad_token_id}
    results = {}

    def bare():
        with torch.no_grad():
            return model.generate(**ids, **options)

    def raw():
        def hook(module, args, output):
            output[:, -1] += steer

        handle = model.model.layers[LAYER].register_forward_hook(hook)
        try:
            with torch.no_grad():
                results["raw"] = model.generate(**ids, **options)
        finally:
            handle.remove()

    def ours():
        with lm.generate(PROMPT, max_new_tokens=TOKENS, min_new_tokens=TOKENS) as tracer:
            with tracer.all():
                lm.model.layers[LAYER].output[:, -1] += steer
            tokens = lm.generator.output.save()
        results["interlace"] = tokens

    median = side_by_side({"bare": bare, "raw hooks": raw, "interlace": ours}, repeats, warmup)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, SmolLM2-135M, {TOKENS} new tokens, "
          f"median of {repeats} after {warmup} warmup, load average {os.getloadavg()[0]:.2f} at start\n")
    print("| variant | ms | / raw hooks | / bare |\n|---|---|---|---|")
    for name, seconds in median.items():
        print(f"| {name} | {seconds * 1e3:.1f} | {seconds / median['raw hooks']:.3f} | {seconds / median['bare']:.3f} |")
    same = torch.equal(results["raw"], results["interlace"])
    new = results["interlace"].shape[-1] - ids["input_ids"].shape[-1]
    print(f"\nsteered tokens identical to the raw hook's: {same} ({new} new tokens each)")


if __name__ == "__main__":
    main()
