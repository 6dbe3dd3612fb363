"""Collecting one token's hidden state at chosen layers, for many prompts.

`get_token_activations` reads one position of each prompt at each layer in one forward, which the
executor stops after the last layer needed; `collect_token_activations_batched` does it batch by
batch with a progress bar, and `collect_last_token_activations_session` batch by batch in one
session (one request when remote); all give the same numbers as one batch. They take a
StandardizedTransformer or a plain LanguageModel (see `getters`).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm as auto_tqdm

from .getters import check_prompt_lengths, get_layer_output, get_num_layers, kept, progress, token_at


def _read(model, layers, get_activations, idx):
    """The traced `[len(layers), prompts, hidden]` stack of token `idx` at each layer."""
    get_activations = get_activations or get_layer_output
    layers = range(get_num_layers(model)) if layers is None else layers
    idx = -1 if idx is None else idx
    return torch.stack([token_at(model, get_activations(model, layer), idx) for layer in layers])


def get_token_activations(
    model, prompts=None, layers=None, get_activations=None, remote: bool = False, idx: int | None = None, tracer=None
) -> torch.Tensor:
    """The hidden state of token `idx` (default the last) of each prompt at each layer.

    Returns `[len(layers), num_prompts, hidden]` on the CPU. get_activations(model, layer): what to
    read (default `get_layer_output`). tracer: record into that open trace instead and return the
    traced (unsaved) stack; prompts is then ignored.
    """
    if tracer is not None:
        return _read(model, layers, get_activations, idx)
    if prompts is None:
        raise ValueError("pass prompts (or an open tracer to record into)")
    check_prompt_lengths(model, prompts, idx)
    return _traced(model, prompts, layers, get_activations, remote, idx)


def _traced(model, prompts, layers, get_activations, remote, idx) -> torch.Tensor:
    with model.trace(prompts, remote=remote):
        activations = _read(model, layers, get_activations, idx).cpu().save()
    return activations


@torch.no_grad()
def collect_last_token_activations_session(
    model, prompts, batch_size: int, layers=None, get_activations=None, remote: bool = False, idx: int | None = None,
) -> torch.Tensor:
    """`get_token_activations` over `prompts` in batches of `batch_size`, all traces in one session.

    Returns `[len(layers), num_prompts, hidden]` on the CPU; remotely the whole loop is one request.
    """
    check_prompt_lengths(model, prompts, idx)
    with model.session(remote=remote):
        batches = []
        for start in range(0, len(prompts), batch_size):
            with model.trace(prompts[start : start + batch_size]):
                batches.append(_read(model, layers, get_activations, idx).cpu())
        activations = torch.cat(batches, dim=1).save()
    return activations


def collect_token_activations_batched(
    model, prompts, batch_size: int, layers=None, get_activations=None, remote: bool = False,
    idx: int | None = None, tqdm=auto_tqdm,
) -> torch.Tensor:
    """`get_token_activations` over `prompts` in batches of `batch_size`, with a progress bar.

    Returns `[len(layers), num_prompts, hidden]` on the CPU. tqdm: the progress bar (None for none).
    """
    check_prompt_lengths(model, prompts, idx)
    starts = progress(model, range(0, len(prompts), batch_size), tqdm, "collecting activations", "batch")
    batches = [
        _traced(model, prompts[start : start + batch_size], layers, get_activations, remote, idx) for start in starts
    ]
    return kept(torch.cat(batches, dim=1))
