"""What does it cost that a saved weight is a copy? Run `python benchmarks/saved_weights.py [--quick]`.

A saved value never aliases the model's weights (`w = lm.lm_head.weight.save()` then `w.zero_()`
must not change the model), so interlace copies saved values that share memory with a parameter or
buffer. On the embedded SmolLM2-135M, one prompt, measured side by side in one run (medians):
- bare: the plain forward;
- save all, copied: a trace that saves every parameter (what interlace does);
- save all, aliased: the same trace with the copy turned off (what it would cost without);
- one activation: a trace that saves one layer's output (no weight: nothing is copied).
Prints the times and the ratios to the bare forward.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import interlace  # noqa: E402
from interlace.models import base  # noqa: E402
from overhead import side_by_side  # noqa: E402  (this folder is on the path when run as a script)

PROMPT = "The capital of France is"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args(argv)
    repeats, warmup = (3, 1) if args.quick else (7, 1)
    lm = interlace.LanguageModel.default(dispatch=True)
    ids = lm.tokenizer(PROMPT, return_tensors="pt")
    names = [name for name, _ in lm.module.named_parameters()]
    size = sum(p.numel() * p.element_size() for p in lm.module.parameters())

    def bare():
        with torch.no_grad():
            lm.module(**ids)

    def save_all():
        with lm.trace(PROMPT, early_stop=False):
            saved = [lm.get(name.rpartition(".")[0]).__getattr__(name.rpartition(".")[2]).save() for name in names]
            lm.output.logits.save()
        return saved

    def save_all_aliased():
        with mock.patch.object(base, "_copy_weights", lambda results, module: None):
            return save_all()

    def one_activation():
        with lm.trace(PROMPT, early_stop=False):
            lm.model.layers[10].output.save()
            lm.output.logits.save()

    times = side_by_side({"bare": bare, "copied": save_all, "aliased": save_all_aliased, "one": one_activation},
                         repeats, warmup)
    print(f"SmolLM2-135M, {len(names)} parameters, {size / 2**20:.0f} MiB, prompt of {ids['input_ids'].shape[1]} tokens")
    for name, label in (("bare", "bare forward"), ("one", "trace, one activation saved"),
                        ("aliased", "trace, every weight saved, aliased"), ("copied", "trace, every weight saved, copied")):
        print(f"{label:40s} {times[name] * 1e3:8.1f} ms   x{times[name] / times['bare']:.2f} of bare")
    print(f"copy / aliased: {times['copied'] / times['aliased']:.2f}")


if __name__ == "__main__":
    main()
