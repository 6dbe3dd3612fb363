"""Plotly figures of what the lenses return. Figures are returned, never shown: call `fig.show()`."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..methods.getters import standardized


def _plotly():
    try:
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots
    except ImportError:
        raise ImportError("interlace.display needs plotly: pip install 'interlace[display]'") from None
    return go, make_subplots


def _token_text(tokenizer, ids: list[int], use_token_ids: bool = False, decoded: bool = True) -> list[str]:
    """Labels of tokens: ids, raw tokens in quotes as nnterp shows them (`'Ġa'`), or decoded text (`' a'`)."""
    if use_token_ids or tokenizer is None:
        return [str(i) for i in ids]
    if decoded:
        return [repr(tokenizer.decode([i])) for i in ids]
    return [f"'{token}'" for token in tokenizer.convert_ids_to_tokens(ids)]


def plot_topk_tokens(
    probs: torch.Tensor, tokenizer, k: int = 4, title: str | None = None, use_token_ids: bool = False,
    file=None, save_html: bool = True, height: int = 300, width: int = 400, *, decoded: bool = False,
):
    """A layers x top-k heatmap per prompt, as nnterp draws it: each cell a raw token in quotes (`'Ġa'`).

    probs: `[prompts, layers, vocab]` (what `logit_lens` returns), `[layers, vocab]` or `[vocab]`.
    use_token_ids: label cells with ids; decoded: with the decoded text (`' a'`) instead of raw tokens.
    file: also write the figure there (an image, plus `.html` when save_html; an `.html` file alone).
    height, width: of each prompt's panel. The figure is returned, never shown: call `fig.show()`.
    """
    go, make_subplots = _plotly()
    probs = probs.detach().float().cpu()
    while probs.dim() < 3:
        probs = probs.unsqueeze(0)
    prompts, layers, _ = probs.shape
    columns = min(3, prompts)
    rows = math.ceil(prompts / columns)
    fig = make_subplots(rows=rows, cols=columns, horizontal_spacing=0.05, vertical_spacing=0.1)
    for index, prompt_probs in enumerate(probs):
        values, ids = prompt_probs.topk(k, dim=-1)
        text = [_token_text(tokenizer, layer_ids, use_token_ids, decoded) for layer_ids in ids.tolist()]
        hover = [[f"ID: {i}<br>Token: {t}" for i, t in zip(layer_ids, layer_text)]
                 for layer_ids, layer_text in zip(ids.tolist(), text)]
        fig.add_trace(
            go.Heatmap(
                z=values.tolist(), x=list(range(k)), y=list(range(layers)), text=text, texttemplate="%{text}",
                customdata=hover, hovertemplate="Layer: %{y}<br>%{customdata}<br>Probability: %{z}<extra></extra>",
                zmin=0, zmax=1, colorscale="RdBu_r", showscale=index == 0,
            ),
            row=index // columns + 1, col=index % columns + 1,
        )
    fig.update_xaxes(title_text="Tokens")
    fig.update_yaxes(title_text="Layers")
    fig.update_layout(title=title or f"Top {k} Tokens Heatmap", width=width * columns, height=height * rows,
                      showlegend=False)
    if file is not None:
        file = Path(file)
        if file.suffix != ".html":
            fig.write_image(file, scale=3)
        if save_html or file.suffix == ".html":
            fig.write_html(file.with_suffix(".html"))
    return fig


@torch.no_grad()
def plot_logit_lens(model, prompt: str, title: str | None = None, width: int | None = None, height: int | None = None):
    """The logit lens at every layer and position of one prompt: each cell the layer's top next token.

    Color is that token's probability; hover shows it. Runs one trace on `model` (a StandardizedTransformer).
    """
    go, _ = _plotly()
    model = standardized(model)
    with model.trace(prompt):
        hidden = torch.cat([model.layers_output[layer] for layer in range(model.num_layers)])  # one prompt: [layers, seq, hidden]
        top = model.project_on_vocab(hidden).softmax(-1, dtype=torch.float32).max(-1)
        values, ids = top[0].cpu().save(), top[1].cpu().save()
    tokens = model.tokenizer(prompt)["input_ids"]
    labels = [f"{position}: {text}" for position, text in enumerate(_token_text(model.tokenizer, tokens, False))]
    text = [_token_text(model.tokenizer, row, False) for row in ids.tolist()]
    fig = go.Figure(
        go.Heatmap(
            z=values.tolist(), x=labels, y=list(range(model.num_layers)), text=text, texttemplate="%{text}",
            hovertemplate="layer %{y}, input %{x}<br>next: %{text}<br>p = %{z:.3f}<extra></extra>",
            zmin=0, zmax=1, colorscale="Blues",
        )
    )
    fig.update_xaxes(title_text="input token")
    fig.update_yaxes(title_text="layer")
    fig.update_layout(title=title or f"Logit lens: {prompt!r}", width=width or max(500, 110 * len(tokens)),
                      height=height or max(400, 22 * model.num_layers))
    return fig
