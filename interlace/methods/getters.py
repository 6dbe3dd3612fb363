"""nnterp's `nnsight_utils` getters and `ModuleAccessor`, so ported code runs unchanged.

On a `StandardizedTransformer` each getter is a one-line view of the standardized names
(`get_layer_output(model, i)` is `model.layers_output[i]`). On a plain `LanguageModel` (with
nnterp's renames or without) they find each part from the family table and unwrap tuple outputs as
the standardized names do; which modules return tuples is learnt once per model, from one run on
fake tensors. Use them inside a trace like the names themselves.
"""

from __future__ import annotations

import weakref

import torch

from ..envoy import Envoy
from ..errors import InterlaceError
from ..models.base import Model
from ..models.standardized import StandardizedTransformer
from ..models.standardized.layout import RenameConfig, family_of, get_rename_dict
from ..models.standardized.structure import StandardizationError, observe
from ..proxy import Proxy


def progress(model, items, tqdm, what: str, unit: str):
    """`items` with a progress bar (`tqdm`; None: none), counting `unit`s of `what`; none in a session, whose
    traces only record as the loop goes (they run when it ends)."""
    if tqdm is None or getattr(model, "_session", None) is not None:
        return items
    return tqdm(items, desc=what, unit=unit)


def kept(value):
    """A method's result: as it is, or saved where it is a traced value (the method was called inside a
    session, whose traces run when it ends; the value is known then)."""
    return value.save() if isinstance(value, Proxy) else value


def standardized(model) -> StandardizedTransformer:
    """`model` itself, or a clear error when it is not a StandardizedTransformer."""
    if not isinstance(model, StandardizedTransformer):
        raise InterlaceError(
            f"this method needs the standardized names, but got {type(model).__name__}: wrap the model in "
            "interlace.StandardizedTransformer(...) first."
        )
    return model


class _Layout:
    """Where a plain model keeps each part, and which parts return tuples (their first item is the value)."""

    def __init__(self, model: Model):
        family = self.family = family_of(model._module)
        layer = f"{family.layers}.0"
        parts = {"layers": layer, "attention": f"{layer}.{family.output_of('attention')}"}
        if family.mlp is not None:
            parts["mlp"] = f"{layer}.{family.output_of('mlp')}"
        seen = observe(model._module, list(parts.values()))
        self.tuples = {part for part, path in parts.items() if isinstance(seen.get(path, (None, None))[1], tuple)}


_layouts: "weakref.WeakKeyDictionary[Model, _Layout]" = weakref.WeakKeyDictionary()


def _layout(model) -> _Layout:
    if not isinstance(model, Model):
        raise InterlaceError(f"nnterp's getters take an interlace model (LanguageModel), not {type(model).__name__}")
    if model not in _layouts:
        _layouts[model] = _Layout(model)
    return _layouts[model]


def _value(model, envoy: Envoy, part: str):
    """The module's output, its first item when the part returns tuples."""
    return envoy.output[0] if part in _layout(model).tuples else envoy.output


def _root_part(model, name: str) -> Envoy:
    """A part the family table names from the root: the standardized envoy, or the table's path."""
    if isinstance(model, StandardizedTransformer):
        return getattr(model, name)
    return model.get(getattr(_layout(model).family, name))


def get_embed_tokens(model) -> Envoy:
    return _root_part(model, "embed_tokens")


def get_layers(model) -> Envoy:
    return _root_part(model, "layers")


def get_num_layers(model) -> int:
    return len(get_layers(model))


def get_layer(model, layer: int) -> Envoy:
    return get_layers(model)[layer]


def get_layer_input(model, layer: int):
    if isinstance(model, StandardizedTransformer):
        return model.layers_input[layer]
    return get_layer(model, layer).input


def get_layer_output(model, layer: int):
    if isinstance(model, StandardizedTransformer):
        return model.layers_output[layer]
    return _value(model, get_layer(model, layer), "layers")


def set_layer_output(model, layer: int, value) -> None:
    if isinstance(model, StandardizedTransformer):
        model.layers_output[layer] = value
        return
    envoy = get_layer(model, layer)
    envoy.output = (value,) + envoy.output[1:] if "layers" in _layout(model).tuples else value


def get_attention(model, layer: int) -> Envoy:
    if isinstance(model, StandardizedTransformer):
        return model.attentions[layer]
    return get_layer(model, layer).get(_layout(model).family.attention)


def get_attention_output(model, layer: int):
    if isinstance(model, StandardizedTransformer):
        return model.attentions_output[layer]
    return _value(model, get_layer(model, layer).get(_layout(model).family.output_of("attention")), "attention")


def get_mlp(model, layer: int) -> Envoy:
    if isinstance(model, StandardizedTransformer):
        return model.mlps[layer]
    mlp = _layout(model).family.mlp
    if mlp is None:
        raise StandardizationError(f"{type(model._module).__name__} has no MLP module: its feed-forward layers "
                                   "sit on the layer itself")
    return get_layer(model, layer).get(mlp)


def get_mlp_output(model, layer: int):
    if isinstance(model, StandardizedTransformer):
        return model.mlps_output[layer]
    get_mlp(model, layer)  # (a family without an MLP module says so)
    return _value(model, get_layer(model, layer).get(_layout(model).family.output_of("mlp")), "mlp")


def get_logits(model):
    return model.output.logits


def get_unembed_norm(model) -> Envoy:
    return _root_part(model, "ln_final")


def get_unembed(model) -> Envoy:
    return _root_part(model, "lm_head")


def project_on_vocab(model, hidden):
    """Final norm, `lm_head` and the family's final-logit transform (which nnterp's version omits)."""
    if isinstance(model, StandardizedTransformer):
        return model.project_on_vocab(hidden)
    logits = get_unembed(model)(get_unembed_norm(model)(hidden))
    return _layout(model).family.final_transform(logits, model._module.config)


def get_next_token_probs(model):
    return token_at(model, get_logits(model), -1).softmax(-1, dtype=torch.float32)


def token_at(model, value, idx: int):
    """Token `idx` of every prompt of traced `value` (`[prompts, tokens, ...]`): negative counts from each
    prompt's end, positive from its start, wherever the padding is (from the attention mask, inside the
    graph, where it depends on it). Past a prompt's end is an error; before its start reads padding, which
    `check_prompt_lengths` refuses first where the prompts are known."""
    right = getattr(model, "padding_side", "left") == "right"
    if (idx < 0) != right:  # counted from the side without padding: the same column in every row
        return value[:, idx]
    mask = model.inputs[1]["attention_mask"]
    position = mask.sum(-1) + idx if right else (mask == 0).sum(-1) + idx
    # an index, not take_along_dim (which reads whatever lies there on CPU): past a prompt's end it fails
    return value[torch.arange(value.shape[0]), position]


def check_prompt_lengths(model, prompts, idx, name: str = "idx") -> list[int]:
    """A clear error, before anything runs, where token `idx` (one for every prompt, or a sequence of one for
    each) lies outside its prompt. Returns the prompts' lengths in tokens (none where `idx` needs no look)."""
    if idx is None or isinstance(idx, int) and idx == -1:  # (every prompt has a last token: no need to tokenize)
        return []
    lengths = [len(ids) for ids, _ in model._sequences(prompts)] if hasattr(model, "_sequences") else []
    each = [idx] * len(lengths) if isinstance(idx, int) else [int(position) for position in idx]
    for number, (position, length) in enumerate(zip(each, lengths)):
        if not -length <= position < length:
            raise InterlaceError(f"{name}={position} lies outside prompt {number} ({_shortened(prompts[number])}), "
                                 f"which has {length} token(s): pass {name} from {-length} to {length - 1}, or leave "
                                 "that prompt out")
    return lengths


def _shortened(prompt) -> str:
    text = repr(prompt)
    return text if len(text) <= 40 else text[:37] + "..."


@torch.no_grad()
def compute_next_token_probs(model, prompts, remote: bool = False) -> torch.Tensor:
    """The next-token distribution after each prompt, `[num_prompts, vocab]`, on the CPU."""
    with model.trace(prompts, remote=remote):
        probs = get_next_token_probs(model).cpu().save()
    return probs


class ModuleAccessor:
    """A Hugging Face model's modules (plain `nn.Module`s) under nnterp's names, without tracing.

    Attributes follow `get_rename_dict()` (plus `rename`): `accessor.model`, `accessor.layers`,
    `accessor.lm_head`; the methods give the standardized parts, found from the family table.

    >>> import transformers
    >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50)
    >>> accessor = ModuleAccessor(transformers.GPT2LMHeadModel(config))
    >>> accessor.model is accessor.nn_model.module.transformer, type(accessor.get_attention(1)).__name__
    (True, 'GPT2Attention')
    """

    def __init__(self, model: torch.nn.Module, rename_config: RenameConfig | None = None,
                 rename: dict[str, str] | None = None):
        self.rename_config = rename_config
        self.nn_model = Model(model, rename={**get_rename_dict(rename_config), **(rename or {})})

    def __getattr__(self, name: str) -> torch.nn.Module:
        if name.startswith("__") or name in ("nn_model", "rename_config"):
            raise AttributeError(name)
        value = getattr(self.nn_model, name)
        if not isinstance(value, Envoy):
            raise AttributeError(f"Attribute {name} is not a module")
        return value._module

    def _family(self):
        return family_of(self.nn_model._module, self.rename_config)

    def get_embed_tokens(self) -> torch.nn.Module:
        return self.nn_model.get(self._family().embed_tokens)._module

    def get_layers(self) -> torch.nn.ModuleList:
        return self.nn_model.get(self._family().layers)._module

    def get_attention(self, layer: int) -> torch.nn.Module:
        return self.get_layers()[layer].get_submodule(self._family().attention)

    def get_mlp(self, layer: int) -> torch.nn.Module:
        mlp = self._family().mlp
        if mlp is None:
            raise StandardizationError(f"{type(self.nn_model._module).__name__} has no MLP module")
        return self.get_layers()[layer].get_submodule(mlp)

    def get_unembed_norm(self) -> torch.nn.Module:
        return self.nn_model.get(self._family().ln_final)._module

    def get_unembed(self) -> torch.nn.Module:
        return self.nn_model.get(self._family().lm_head)._module
