"""nnterp's `nnsight_utils` getters, on a `StandardizedTransformer`, so ported code runs unchanged.

Each is a one-line view of the standardized names (`get_layer_output(model, i)` is
`model.layers_output[i]`); use them inside a trace like the names themselves.
"""

from __future__ import annotations

import torch

from ..errors import InterlaceError
from ..models.standardized import StandardizedTransformer


def standardized(model) -> StandardizedTransformer:
    """`model` itself, or a clear error when it is not a StandardizedTransformer."""
    if not isinstance(model, StandardizedTransformer):
        raise InterlaceError(
            f"this method needs the standardized names, but got {type(model).__name__}: wrap the model in "
            "interlace.StandardizedTransformer(...) first."
        )
    return model


def get_num_layers(model) -> int:
    return standardized(model).num_layers


def get_layer(model, layer: int):
    return standardized(model).layers[layer]


def get_layer_input(model, layer: int):
    return standardized(model).layers_input[layer]


def get_layer_output(model, layer: int):
    return standardized(model).layers_output[layer]


def set_layer_output(model, layer: int, value) -> None:
    standardized(model).layers_output[layer] = value


def get_attention(model, layer: int):
    return standardized(model).attentions[layer]


def get_attention_output(model, layer: int):
    return standardized(model).attentions_output[layer]


def get_mlp(model, layer: int):
    return standardized(model).mlps[layer]


def get_mlp_output(model, layer: int):
    return standardized(model).mlps_output[layer]


def get_logits(model):
    return standardized(model).logits


def get_unembed_norm(model):
    return standardized(model).ln_final


def get_unembed(model):
    return standardized(model).lm_head


def project_on_vocab(model, hidden):
    """Final norm, `lm_head` and the family's final-logit transform (which nnterp's version omits)."""
    return standardized(model).project_on_vocab(hidden)


def get_next_token_probs(model):
    return standardized(model).next_token_probs


@torch.no_grad()
def compute_next_token_probs(model, prompts, remote: bool = False) -> torch.Tensor:
    """The next-token distribution after each prompt, `[num_prompts, vocab]`, on the CPU."""
    model = standardized(model)
    with model.trace(prompts, remote=remote):
        probs = model.next_token_probs.cpu().save()
    return probs
