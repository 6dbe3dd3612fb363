"""`interlace demo`: logit lens and an activation-patching sweep on the embedded SmolLM2.

1. Logit lens: every layer's last-position hidden state, through the final norm and the unembedding,
   gives that layer's guess for the next token ("The capital of France is" -> " Paris").
2. Patching: the clean run's last-position hidden state at layer L is written into the corrupted
   run ("The Colosseum ..."), one layer at a time; the layers whose patch moves the answer from
   " Rome" to " Paris" are the ones that carry it at that position.
"""

from __future__ import annotations

import time

import torch
from tqdm import tqdm

from .models.language import LanguageModel

# (layers, final norm, unembedding) module paths, one row per naming family
_NAMES = [
    ("model.layers", "model.norm", "lm_head"),
    ("transformer.h", "transformer.ln_f", "lm_head"),
    ("gpt_neox.layers", "gpt_neox.final_layer_norm", "embed_out"),
]

CLEAN = "The Eiffel Tower is in the city of"
CORRUPTED = "The Colosseum is in the city of"


def _parts(lm: LanguageModel):
    for layers, norm, head in _NAMES:
        try:
            return lm.get(layers), lm.get(norm), lm.get(head)
        except AttributeError:
            continue
    raise SystemExit("the demo knows Llama-, GPT-2- and NeoX-style module names; this model has none")


def logit_lens(lm: LanguageModel, prompt: str):
    """For each layer: (top token, its probability, probability of the final top token)."""
    layers, norm, head = _parts(lm)
    with lm.trace(prompt):
        probs = [head(norm(layer.output[:, -1])).softmax(-1).save() for layer in layers]
    final = probs[-1][0].argmax()
    rows = []
    for p in probs:
        top = p[0].argmax()
        rows.append((lm.tokenizer.decode(top), p[0, top].item(), p[0, final].item()))
    return rows, lm.tokenizer.decode(final)


def patching_sweep(lm: LanguageModel, clean: str, corrupted: str, answer: str, foil: str):
    """Logit difference answer - foil after patching each layer's last position clean -> corrupted."""
    layers, _, _ = _parts(lm)
    answer_id = lm.tokenizer(answer)["input_ids"][-1]
    foil_id = lm.tokenizer(foil)["input_ids"][-1]
    with lm.trace(clean):
        clean_states = [layer.output[:, -1].save() for layer in layers]
        clean_logits = lm.output.logits[0, -1].save()
    with lm.trace(corrupted):
        corrupted_logits = lm.output.logits[0, -1].save()

    def diff(logits):
        return (logits[answer_id] - logits[foil_id]).item()

    diffs = []
    for index in tqdm(range(len(layers)), desc="patching layers", unit="layer"):
        with lm.trace(corrupted):
            layers[index].output[:, -1] = clean_states[index]
            logits = lm.output.logits[0, -1].save()
        diffs.append(diff(logits))
    return diffs, diff(clean_logits), diff(corrupted_logits)


def run(prompt: str | None = None, model: str | None = None) -> None:
    started = time.perf_counter()
    lm = LanguageModel(model, dispatch=True) if model else LanguageModel.default(dispatch=True)
    loaded = time.perf_counter()
    print(f"loaded {type(lm.module).__name__} in {loaded - started:.1f}s\n")
    prompt = prompt or "The capital of France is"

    rows, final = logit_lens(lm, prompt)
    print(f"Logit lens: {prompt!r} -> {final!r}")
    print(f"{'layer':>5}  {'top token':<14} {'p(top)':>7}  {'p(' + final.strip() + ')':>9}")
    for index, (token, p_top, p_final) in enumerate(rows):
        print(f"{index:>5}  {token!r:<14} {p_top:>7.3f}  {p_final:>9.3f}")

    print(f"\nActivation patching, last position: clean {CLEAN!r}, corrupted {CORRUPTED!r}")
    diffs, clean, corrupted = patching_sweep(lm, CLEAN, CORRUPTED, " Paris", " Rome")
    print(f"logit(' Paris') - logit(' Rome'): clean {clean:+.2f}, corrupted {corrupted:+.2f}")
    span = max(clean - corrupted, 1e-6)
    print(f"{'layer':>5}  {'diff':>7}  {'restored':>8}")
    for index, value in enumerate(diffs):
        restored = (value - corrupted) / span
        bar = "#" * max(0, round(restored * 30))
        print(f"{index:>5}  {value:+7.2f}  {restored:8.0%}  {bar}")
    print(f"\ndone in {time.perf_counter() - loaded:.1f}s after loading")
