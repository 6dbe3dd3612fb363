"""`interlace demo`: logit lens and an activation-patching sweep on the embedded SmolLM2.

1. Logit lens: every layer's last-position hidden state, through the final norm and the unembedding,
   gives that layer's guess for the next token ("The capital of France is" -> " Paris").
2. Patching: the clean run's last-position hidden state at layer L is written into the corrupted
   run ("The Colosseum ..."), one layer at a time; the layers whose patch moves the answer from
   " Rome" to " Paris" are the ones that carry it at that position.

Both run on the standardized names, so `--model` takes any family of the table.
`--plot FILE.html` also writes the logit lens over every layer and position, and each layer's top
tokens, as interactive figures.
"""

from __future__ import annotations

import time

from tqdm import tqdm

from . import methods
from .models.language import LanguageModel
from .models.standardized import StandardizedTransformer

CLEAN = "The Eiffel Tower is in the city of"
CORRUPTED = "The Colosseum is in the city of"


def _standardized(lm: LanguageModel) -> StandardizedTransformer:
    """`lm` under the standardized names (a plain LanguageModel is wrapped around the same modules)."""
    if isinstance(lm, StandardizedTransformer):
        return lm
    return StandardizedTransformer(lm.module, tokenizer=lm.tokenizer)


def logit_lens(lm: LanguageModel, prompt: str):
    """For each layer: (top token, its probability, probability of the final top token)."""
    model = _standardized(lm)
    return _lens_rows(model, methods.logit_lens(model, [prompt]))


def _lens_rows(model: StandardizedTransformer, probs):
    """The rows of `logit_lens` from `methods.logit_lens` of one prompt, and the final top token."""
    final = probs[0, -1].argmax()
    rows = [(model.tokenizer.decode(p.argmax()), p.max().item(), p[final].item()) for p in probs[0]]
    return rows, model.tokenizer.decode(final)


def patching_sweep(lm: LanguageModel, clean: str, corrupted: str, answer: str, foil: str):
    """Logit difference answer - foil after patching each layer's last position clean -> corrupted."""
    model = _standardized(lm)
    answer_id = model.tokenizer(answer)["input_ids"][-1]
    foil_id = model.tokenizer(foil)["input_ids"][-1]
    with model.trace(clean):
        clean_states = [model.layers_output[layer][:, -1].save() for layer in range(model.num_layers)]
        clean_logits = model.logits[0, -1].save()
    with model.trace(corrupted):
        corrupted_logits = model.logits[0, -1].save()

    def diff(logits):
        return (logits[answer_id] - logits[foil_id]).item()

    diffs = []
    for layer in tqdm(range(model.num_layers), desc="patching layers", unit="layer"):
        with model.trace(corrupted):
            model.layers_output[layer][:, -1] = clean_states[layer]
            logits = model.logits[0, -1].save()
        diffs.append(diff(logits))
    return diffs, diff(clean_logits), diff(corrupted_logits)


def write_plots(model: StandardizedTransformer, prompt: str, probs, path: str) -> None:
    """The logit lens over layers and positions, and each layer's top tokens (`probs`: the prompt's
    `methods.logit_lens`), in one HTML file."""
    from .display import plot_logit_lens, plot_topk_tokens

    figures = [plot_logit_lens(model, prompt), plot_topk_tokens(probs, model.tokenizer, k=5, decoded=True)]
    parts = [fig.to_html(full_html=False, include_plotlyjs=index == 0) for index, fig in enumerate(figures)]
    with open(path, "w", encoding="utf-8") as file:
        file.write("<html><head><meta charset='utf-8'></head><body>" + "".join(parts) + "</body></html>")


def run(prompt: str | None = None, model: str | None = None, plot: str | None = None) -> None:
    started = time.perf_counter()
    lm = StandardizedTransformer(model, dispatch=True) if model else StandardizedTransformer.default(dispatch=True)
    loaded = time.perf_counter()
    print(f"loaded {type(lm.module).__name__} in {loaded - started:.1f}s\n")
    prompt = prompt or "The capital of France is"

    probs = methods.logit_lens(lm, [prompt])
    rows, final = _lens_rows(lm, probs)
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
    if plot:
        write_plots(lm, prompt, probs, plot)
        print(f"\nfigures written to {plot}")
    print(f"\ndone in {time.perf_counter() - loaded:.1f}s after loading")
