"""Collecting one token's hidden state at chosen layers, for many prompts.

`get_token_activations` reads one position of each prompt at each layer in one forward, which the
executor stops after the last layer needed; `collect_token_activations_batched` does it batch by
batch with a progress bar, giving the same numbers as one batch.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm as auto_tqdm

from .getters import standardized


def _token(model, hidden, idx: int):
    """Token `idx` of every prompt: negative counts from the end, positive from each prompt's start.

    Prompts are left padded, so a positive index is shifted by each row's padding (read from the
    attention mask inside the graph); nnterp refuses positive indices instead.
    """
    if idx < 0:
        return hidden[:, idx]
    position = (model.attention_mask == 0).sum(-1) + idx
    return torch.take_along_dim(hidden, position[:, None, None], dim=1)[:, 0]


def get_token_activations(
    model, prompts=None, layers=None, get_activations=None, remote: bool = False, idx: int | None = None, tracer=None
) -> torch.Tensor:
    """The hidden state of token `idx` (default the last) of each prompt at each layer.

    Returns `[len(layers), num_prompts, hidden]` on the CPU. get_activations(model, layer): what to
    read (default `model.layers_output[layer]`). tracer: record into that open trace instead and
    return the traced (unsaved) stack; prompts is then ignored.
    """
    model = standardized(model)
    if get_activations is None:
        get_activations = lambda m, layer: m.layers_output[layer]  # noqa: E731
    if layers is None:
        layers = range(model.num_layers)
    idx = -1 if idx is None else idx

    def read():
        return torch.stack([_token(model, get_activations(model, layer), idx) for layer in layers])

    if tracer is not None:
        return read()
    if prompts is None:
        raise ValueError("pass prompts (or an open tracer to record into)")
    with model.trace(prompts, remote=remote):
        activations = read().cpu().save()
    return activations


def collect_token_activations_batched(
    model, prompts, batch_size: int, layers=None, get_activations=None, remote: bool = False,
    idx: int | None = None, tqdm=auto_tqdm,
) -> torch.Tensor:
    """`get_token_activations` over `prompts` in batches of `batch_size`, with a progress bar.

    Returns `[len(layers), num_prompts, hidden]` on the CPU. tqdm: the progress bar (None for none).
    """
    starts = range(0, len(prompts), batch_size)
    if tqdm is not None:
        starts = tqdm(starts, desc="collecting activations", unit="batch")
    batches = [
        get_token_activations(model, prompts[start : start + batch_size], layers, get_activations, remote, idx)
        for start in starts
    ]
    return torch.cat(batches, dim=1)
