"""Finding a model's layout: its row of the family table, or a search of its module tree by names.

`family_of(module)` returns the `Family` of a built Hugging Face model: the table row for its
`config.model_type`, or, for a family the table does not know, the paths found by looking for the
usual module names; a `RenameConfig` changes the paths it names (of a known family: only those).
`rename_table(family)` turns a layout into the alias table of `Model(rename=...)`, so a plain
`LanguageModel` gets the standardized names too;
`get_rename_dict()` is nnterp's own alias table (its tree under `model.model`), and `get_ignores`,
`get_vocab_size` nnterp's helpers around it.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import torch

from .families import CONFIG_KEYS, FAMILIES, OUT_OF_REACH, Family
from .structure import StandardizationError

# Module names searched for when a family is not in the table, most common first.
SEARCHED_NAMES = {
    "layers": ("layers", "h", "blocks"),
    "attention": ("self_attn", "attn", "attention", "self_attention"),
    "mlp": ("mlp", "ffn", "feed_forward", "block_sparse_moe"),
    "router": ("router", "gate"),
    "ln_final": ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f", "layer_norm"),
    "lm_head": ("lm_head", "embed_out", "output_projection"),
    "embed_tokens": ("embed_tokens", "wte", "embed_in", "word_embeddings"),
}

Names = str | list[str] | None


@dataclass
class RenameConfig:
    """Module names (or dotted paths) of an architecture the family table does not know.

    The fields are nnterp's: each names the module to use for that standardized part; None means
    "search the usual names" (on a family the table knows: "the table's", and the rest of its row stays).
    `ignore_mlp` / `ignore_router` mark parts the model does not have; `*_config_key` name the config
    attribute holding a size, or give the size as an int.

    >>> import transformers, interlace
    >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50)
    >>> model = transformers.GPT2LMHeadModel(config)
    >>> st = interlace.StandardizedTransformer(model, rename_config=RenameConfig(attn_name="attn"))
    >>> st.attentions[0].path
    'transformer.h.0.attn'
    """

    attn_name: Names = None
    mlp_name: Names = None
    ln_final_name: Names = None
    lm_head_name: Names = None
    model_name: Names = None
    layers_name: Names = None
    router_name: Names = None
    embed_tokens_name: Names = None
    ignore_mlp: bool = False
    ignore_attn: bool = False
    ignore_router: bool = False
    attn_head_config_key: str | list[str] | int | None = None
    hidden_size_config_key: str | list[str] | int | None = None
    vocab_size_config_key: str | list[str] | int | None = None


def family_of(module: torch.nn.Module, rename_config: RenameConfig | None = None) -> Family:
    """The layout of `module`: the table row for its model type, or one found by module names."""
    config = getattr(module, "config", None)
    model_type = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        raise StandardizationError(
            f"{type(module).__name__} is an encoder-decoder model; StandardizedTransformer covers "
            "decoder-only language models. Use interlace.LanguageModel (or interlace.Model) with its own module names."
        )
    if model_type in OUT_OF_REACH:
        raise StandardizationError(
            f"'{model_type}' is {OUT_OF_REACH[model_type]}, so StandardizedTransformer cannot describe it. "
            "Use interlace.LanguageModel with the model's own module names."
        )
    row = FAMILIES.get(model_type)
    if row is not None and rename_config is None:
        _check_has(module, row, model_type)
        return row
    if row is None and rename_config is None:
        named = f"'{model_type}'" if model_type else "A model whose config names no model_type"
        warnings.warn(
            f"{named} is not in interlace's tested family table; its module names were found by "
            "search. Run `interlace check-model` on it, and pass a RenameConfig if a name is wrong.",
            stacklevel=3,
        )
    return _search(module, rename_config or RenameConfig(), row)


def _check_has(module: torch.nn.Module, row: Family, model_type: str) -> None:
    """A clear error where `module` lacks the layers or head that its family's models have (most often: the bare
    model, loaded with AutoModel, which has no language-model head and keeps its layers one level up)."""
    paths = dict(module.named_modules())
    missing = [f"'{path}' ({part})" for part, path in (("its layers", row.layers), ("its head", row.lm_head))
               if path not in paths]
    if missing:
        raise StandardizationError(
            f"{type(module).__name__} lacks {' and '.join(missing)}, which a '{model_type}' language model has. "
            "StandardizedTransformer takes the model with its language-model head (loaded with "
            "AutoModelForCausalLM), not the bare model (AutoModel); for another layout pass a RenameConfig "
            "(layers_name=..., lm_head_name=...).")


def _search(module: torch.nn.Module, names: RenameConfig, row: Family | None = None) -> Family:
    """The parts' paths, each the one `names` gives or found among the usual names. A family of the table
    (`row`) keeps the paths `names` does not give, and what else its row knows (its final-logit transform...)."""

    def part(given, kept, search):
        return kept if row is not None and given is None else search()

    paths = dict(module.named_modules())
    layers = part(names.layers_name or names.model_name, row and row.layers, lambda: _find(
        paths, names.layers_name, "layers", lambda p, m: isinstance(m, torch.nn.ModuleList)
        and (names.model_name is None or p.startswith(_first(names.model_name) + "."))))
    outside = {p: m for p, m in paths.items() if not p.startswith(layers + ".")}
    layer0 = dict(paths[layers + ".0"].named_modules()) if layers + ".0" in paths else {}
    attention = part(names.attn_name, row and row.attention, lambda: _find(layer0, names.attn_name, "attention"))
    mlp = None if names.ignore_mlp else part(
        names.mlp_name, row and row.mlp, lambda: _find(layer0, names.mlp_name, "mlp", required=False))

    def router_below_mlp():
        for number in range(len(paths[layers])):  # the first layers of some MoE families are dense
            prefix = f"{layers}.{number}.{mlp}."
            below = {p[len(prefix):]: m for p, m in paths.items() if p.startswith(prefix)}
            found = _find(below, names.router_name, "router", required=False)
            if found:
                return f"{mlp}.{found}"
        return None

    # the row's update submodules (see Family.attention_update) belong to its own attention and MLP
    attention_update = row.attention_update if row is not None and attention == row.attention else None
    mlp_update = row.mlp_update if row is not None and mlp == row.mlp else None
    router = None if mlp is None or names.ignore_router else part(
        names.router_name or names.mlp_name, row and row.router, router_below_mlp)
    return dataclasses.replace(
        row or Family(),
        embed_tokens=part(names.embed_tokens_name, row and row.embed_tokens,
                          lambda: _find(outside, names.embed_tokens_name, "embed_tokens")),
        layers=layers,
        attention=attention,
        mlp=mlp,
        ln_final=part(names.ln_final_name, row and row.ln_final,
                      lambda: _find(outside, names.ln_final_name, "ln_final", last=True)),
        lm_head=part(names.lm_head_name, row and row.lm_head, lambda: _find(outside, names.lm_head_name, "lm_head")),
        router=router,
        attention_update=attention_update,
        mlp_update=mlp_update,
    )


def _first(names: Names) -> str:
    return names if isinstance(names, str) else names[0]


def _find(paths: dict, given: Names, part: str, accept=None, *, required: bool = True, last: bool = False):
    """The path in `paths` that is one of the given names (or a usual name for `part`)."""
    wanted = SEARCHED_NAMES[part] if given is None else ([given] if isinstance(given, str) else list(given))
    found = []
    for name in wanted:
        for path, module in paths.items():
            if path and (path == name or path.endswith("." + name)) and (accept is None or accept(path, module)):
                found.append(path)
        if found:
            return found[-1] if last else found[0]
    if not required:
        return None
    raise StandardizationError(
        f"could not find the {part} module: none of {', '.join(map(repr, wanted))} is a module of this model. "
        f"Print the model to see its module names and pass the right one in RenameConfig({_FIELD[part]}=...)."
    )


_FIELD = {
    "layers": "layers_name", "attention": "attn_name", "mlp": "mlp_name", "router": "router_name",
    "ln_final": "ln_final_name", "lm_head": "lm_head_name", "embed_tokens": "embed_tokens_name",
}


def rename_table(model: torch.nn.Module | Family, rename_config: RenameConfig | None = None) -> dict[str, str]:
    """The `Model(rename=...)` aliases giving a plain LanguageModel the standardized names.

    model: a built Hugging Face model (its family is looked up) or a `Family`. Root paths become root
    attributes (`embed_tokens`, `layers`, `ln_final`, `lm_head`); each layer's attention and MLP
    module get the aliases `self_attn` and `mlp`.

    >>> rename_table(FAMILIES["gpt2"])["transformer.h"]
    'layers'
    """
    family = model if isinstance(model, Family) else family_of(model, rename_config)
    table = {
        family.embed_tokens: "embed_tokens",
        family.layers: "layers",
        family.ln_final: "ln_final",
        family.lm_head: "lm_head",
    }
    for part, alias in ((family.attention, "self_attn"), (family.mlp, "mlp")):
        if part is not None and "." not in part and part != alias:
            table[part] = alias
    return {path: alias for path, alias in table.items() if path != alias}


# nnterp's renaming rules as data: its name for a part <- the names models use for it. A path that
# starts with "model." is also looked for under each container name ("model.transformer.layers").
_CONTAINERS = ("transformer", "gpt_neox", "decoder", "language_model")
NNTERP_NAMES: dict[str, tuple[str, ...]] = {
    "model": _CONTAINERS,
    "layers": ("h", "blocks", "model.layers"),
    "self_attn": ("attn", "self_attention", "attention", "norm_attn_norm"),
    "mlp": ("block_sparse_moe", "ffn"),
    "ln_final": ("final_layer_norm", "ln_f", "norm_f", "norm", "embedding_norm", "model.ln_final"),
    "lm_head": ("embed_out",),
    "embed_tokens": ("wte", "embed_in", "word_embeddings", "model.embed_tokens"),
}
_CONFIG_NAMES = {"model": "model_name", "layers": "layers_name", "self_attn": "attn_name", "mlp": "mlp_name",
                 "ln_final": "ln_final_name", "lm_head": "lm_head_name", "embed_tokens": "embed_tokens_name"}


def get_rename_dict(rename_config: RenameConfig | None = None) -> dict[str, str]:
    """nnterp's alias table for `Model(rename=...)`: `model.model.layers`, `model.layers`, `model.ln_final`...

    The names a `rename_config` gives come first (a name in both keeps the config's part).

    >>> lm_renames = get_rename_dict()
    >>> lm_renames["transformer"], lm_renames["h"], lm_renames["model.gpt_neox.layers"]
    ('model', 'layers', 'layers')
    """
    table = {}
    for alias, names in NNTERP_NAMES.items():
        for name in names:
            table[name] = alias
            if name.startswith("model."):
                table.update({name.replace("model.", f"model.{c}.", 1): alias for c in _CONTAINERS})
    if rename_config is not None:
        for alias, field in _CONFIG_NAMES.items():
            given = getattr(rename_config, field)
            table.update({name: alias for name in ([given] if isinstance(given, str) else given or [])})
    return table


def get_ignores(model, rename_config: RenameConfig | None = None) -> list[str]:
    """The standardized parts a model does not have, as nnterp names them: "mlp", "attention".

    model: a Hugging Face model or an interlace model. From the family table (OPT, BioGPT and XGLM
    keep their feed-forward on the layer: no "mlp"), and the config's `ignore_mlp` / `ignore_attn`.
    """
    module = getattr(model, "_module", model)
    family = family_of(module, rename_config)
    ignores = []
    if family.mlp is None or rename_config is not None and rename_config.ignore_mlp:
        ignores.append("mlp")
    if rename_config is not None and rename_config.ignore_attn:
        ignores.append("attention")
    return ignores


def get_vocab_size(model, raise_error: bool = True, rename_config: RenameConfig | None = None) -> int | None:
    """The vocabulary size in the model's config (or the one `rename_config.vocab_size_config_key` names).

    raise_error: a StandardizationError when the config has none (else None).
    """
    override = rename_config.vocab_size_config_key if rename_config is not None else None
    if isinstance(override, int):
        return override
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    keys = ([override] if isinstance(override, str) else list(override or [])) + list(CONFIG_KEYS["vocab_size"])
    size = next((getattr(config, key) for key in keys if getattr(config, key, None) is not None), None)
    if size is None and raise_error:
        raise StandardizationError(f"the config of {type(model).__name__} has no vocabulary size (tried {', '.join(keys)}); "
                         "name its key with RenameConfig(vocab_size_config_key=...)")
    return size
