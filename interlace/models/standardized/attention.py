"""Per-head attention values through transformers' attention interface, without touching model source.

Most families call their attention through `ALL_ATTENTION_FUNCTIONS`, chosen by the config's
`_attn_implementation`. We register three implementations there and switch the model to one:

- `interlace_sdpa` and `interlace_eager` compute exactly what `sdpa` / `eager` compute (the same
  functions, the same masks), but first pass the queries, keys and values, and afterwards the
  per-head output, through identity submodules (`AttentionProbes`) added under each attention
  module. Envoys hook those like any module, so reading and assigning them just works.
- `interlace_probabilities` runs the family's own eager attention (softcapping, sinks, sliding
  windows and all) and passes its probabilities through the `probabilities` identity. When a trace
  wrote them (replaced them, or changed them in place), the output is the values weighted by what
  came out, so the write changes the output; else it is the eager function's own output, exactly.

A model whose native implementation is neither sdpa nor eager (flash attention) gets no per-head
values unless probabilities are asked for. Families whose attention does not use the interface
(Bloom, GPT-Neo, MPT in transformers 5.25) get none; `StandardizedTransformer` says so when they are
read. (Bloom and GPT-Neo pass their probabilities through a dropout module of their own, which their
family rows name.)
"""

from __future__ import annotations

import sys

import torch

PROBES = "probes"  # the attribute, under each attention module, holding its AttentionProbes
PROBABILITIES = "interlace_probabilities"
_WRAPPED = ("sdpa", "eager")  # native implementations we can wrap without changing a single number


class Identity(torch.nn.Module):
    """Returns its input: a module-tree place for a value computed inside a function."""

    def forward(self, value):
        return value


class AttentionProbes(torch.nn.Module):
    """The identity modules one attention module passes its per-head values through.

    Shapes: `queries` `[batch, heads, seq, head_dim]`, `keys` and `values` `[batch, kv_heads, kv_seq,
    head_dim]` (as the attention function receives them: after rotary embeddings, with cached
    positions during generation), `probabilities` `[batch, heads, seq, kv_seq]`, `heads`
    `[batch, heads, seq, head_dim]` (the per-head output, before the output projection).

    >>> import torch
    >>> probes = AttentionProbes(native="sdpa")
    >>> keys = torch.ones(1, 2, 3, 4)
    >>> probes.keys(keys) is keys
    True
    """

    def __init__(self, native: str):
        super().__init__()
        self.native = native  # the implementation the model had before interlace switched it
        self.queries = Identity()
        self.keys = Identity()
        self.values = Identity()
        self.probabilities = Identity()
        self.heads = Identity()


def _family_eager(module):
    """The family's own eager attention function (defined beside its attention class)."""
    return sys.modules[type(module).__module__].eager_attention_forward


def _repeat_heads(value, heads: int):
    """Grouped-query values repeated to one per query head, as the eager functions do."""
    groups = heads // value.shape[1]
    if groups == 1:
        return value
    batch, kv_heads, length, dim = value.shape
    return value[:, :, None].expand(batch, kv_heads, groups, length, dim).reshape(batch, heads, length, dim)


def _attention_function(inner: str | None, swap: tuple | None = None):
    """The registered attention function: `inner` computes the attention; None: eager with probabilities.

    swap: (the family's eager function, what it calls instead): `.source` of the attention's call site
    rewrote the eager function (see `source.Point`), which this function calls in its place."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def eager(module):
        found = _family_eager(module)
        return swap[1] if swap is not None and found is swap[0] else found

    def attention(module, query, key, value, attention_mask, **kwargs):
        probes = getattr(module, PROBES)
        query, key, value = probes.queries(query), probes.keys(key), probes.values(value)
        if inner is None:
            own, weights = eager(module)(module, query, key, value, attention_mask, **kwargs)
            version = None if weights.is_inference() else weights._version  # (inference tensors count no writes)
            probabilities = probes.probabilities(weights)
            if probabilities is weights and version is not None and weights._version == version:
                output = own  # not written: the family's own output, which may do more than weigh the values (sinks)
            else:
                value = _repeat_heads(value, probabilities.shape[1])
                output = torch.matmul(probabilities, value).transpose(1, 2).contiguous()
            weights = probabilities
        elif inner == "eager":
            output, weights = eager(module)(module, query, key, value, attention_mask, **kwargs)
        else:
            output, weights = ALL_ATTENTION_FUNCTIONS[inner](module, query, key, value, attention_mask, **kwargs)
        # functions return [batch, seq, heads, head_dim]; per-head outputs are read like the queries
        output = probes.heads(output.transpose(1, 2)).transpose(1, 2)
        return output, weights

    attention.calling_instead = lambda target, rewritten: _attention_function(inner, (target, rewritten))
    return attention


_registered = False


def _register() -> None:
    """Add our implementations to transformers' attention and mask interfaces (once per process)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    for inner in _WRAPPED:
        AttentionInterface.register(f"interlace_{inner}", _attention_function(inner))
        AttentionMaskInterface.register(f"interlace_{inner}", ALL_MASK_ATTENTION_FUNCTIONS[inner])
    AttentionInterface.register(PROBABILITIES, _attention_function(None))
    AttentionMaskInterface.register(PROBABILITIES, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    _registered = True


def install(model: torch.nn.Module, attention_modules: list, *, probabilities: bool) -> str | None:
    """Add `AttentionProbes` under each attention module and switch the implementation.

    Returns None on success, else why the per-head values are unavailable (nothing is changed then).
    Installing twice (an already standardized model) reuses the probes.
    """
    if not hasattr(model, "set_attn_implementation") or not type(model)._can_set_attn_implementation():
        return f"{type(model).__name__}'s attention does not go through transformers' attention interface"
    current = model.config._attn_implementation
    existing = getattr(attention_modules[0], PROBES, None) if attention_modules else None
    if isinstance(existing, AttentionProbes):
        native = existing.native
    else:  # a config already switched by us (weights loaded later share it) names the native one
        native = {f"interlace_{inner}": inner for inner in _WRAPPED}.get(current, current)
        native = "eager" if native == PROBABILITIES else native
    if probabilities:
        if not all(hasattr(sys.modules[type(m).__module__], "eager_attention_forward") for m in attention_modules):
            return f"{type(model).__name__} has no eager attention function to compute probabilities with"
        target = PROBABILITIES
    elif native in _WRAPPED:
        target = f"interlace_{native}"
    else:
        return (
            f"the model runs attention with '{native}'; per-head values need 'sdpa' or 'eager' "
            "(load with attn_implementation='sdpa') or enable_attention_probs=True"
        )
    _register()
    for module in attention_modules:
        if not isinstance(getattr(module, PROBES, None), AttentionProbes):
            setattr(module, PROBES, AttentionProbes(native))
    if current != target:
        model.set_attn_implementation(target)
    return None

