"""StandardizedTransformer: one set of names for the internals of every decoder family.

The model is wrapped as it is (the original Hugging Face modules, never reimplemented). The family
table gives module paths; aliases (`Model(rename=...)`) expose them as `embed_tokens`, `layers`,
`ln_final`, `lm_head`, `layers[i].self_attn`, `layers[i].mlp`; accessors such as
`layers_output[i]` read and assign each layer's values as `[batch, seq, hidden]` tensors, unwrapping
tuples on read and rebuilding them on assignment. Everything they record is plain graph operations
on module values, so the same code can run wherever the graph runs.

Remotely (`host=`, or $INTERLACE_HOST), the tree is built from the server's manifest and gets its
probes here; per-head values need a server started with `interlace serve MODEL --standardized`
(probabilities: `--attention-probs` too), and reading one the server lacks is a StandardizationError.
"""

from __future__ import annotations

import warnings

import torch

from ...envoy import Envoy
from ...proxy import Proxy
from ...source import listing
from ..language import LanguageModel
from . import attention as attention_probes
from .families import CONFIG_KEYS
from .layout import RenameConfig, family_of, get_rename_dict, rename_table
from .structure import StandardizationError, matches, observe, shape_of

# per-head values: accessor name -> identity module under each attention module's probes
HEAD_VALUES = {
    "queries": "queries",
    "keys": "keys",
    "values": "values",
    "attention_probabilities": "probabilities",
    "heads_output": "heads",
}


class _Values:
    """Descriptor for `model.layers_output` and friends: a `LayerValues` bound to the model."""

    def __init__(self, part: str, kind: str, doc: str):
        self.part, self.kind, self.__doc__ = part, kind, doc

    def __get__(self, model, owner=None):
        return self if model is None else LayerValues(model, self.part, self.kind)


class LayerValues:
    """One value (or module) per layer, indexed like the layers: `model.layers_output[i]`.

    kind: `output` / `input` (tensors, read and assigned; tuples unwrapped and rebuilt), `router`
    (the router's whole output) or `module` (the envoy itself: `model.attentions[i]`).
    """

    def __init__(self, model: "StandardizedTransformer", part: str, kind: str):
        self._model, self._part, self._kind = model, part, kind

    def __getitem__(self, layer: int | slice):
        if type(layer) is slice:  # `model.layers_output[2:4]`: a list, one value per layer, as `model.layers[2:4]`
            return [self[number] for number in range(self._model.num_layers)[layer]]
        envoy = self._model._module_of(self._part, layer, value=self._kind == "output")
        if self._kind == "module":
            return envoy
        if self._kind == "input":
            return envoy.input
        output = envoy.output
        if self._kind == "output" and self._model._returns_tuple(envoy):
            output = output[0]
        return output.clone() if self._part in self._model.family.copy_on_read else output

    def __setitem__(self, layer: int, value) -> None:
        if type(layer) is slice:
            raise StandardizationError(
                f"assign one layer at a time, `for layer in range({layer.start}, {layer.stop}): ...[layer] = value`: "
                "a slice reads a list, one value per layer, and cannot be assigned")
        envoy = self._model._module_of(self._part, layer, value=self._kind == "output")
        if self._kind == "module":
            raise StandardizationError(f"cannot assign a module; assign its value: {self._part}_output[{layer}] = ...")
        if self._kind == "input":
            envoy.input = value
        elif self._kind == "output" and self._model._returns_tuple(envoy):
            envoy.output = (value,) + envoy.output[1:]  # rebuilt: the rest of the tuple passes through
        else:
            envoy.output = value

    def print_source(self, layer: int = 0) -> None:
        """Print the code this value comes from, each call site named as `.source` names it (nnterp's
        name). `attention_probabilities` are the softmax of the family's eager attention function
        (Bloom's, GPT-Neo's: the output of the dropout module their attention calls); the other per-head
        values are the arguments and result of the attention module's `attention_interface_0`."""
        envoy = self._model._module_of(self._part, layer)
        if self._part == "attention_probabilities" and self._model.family.probabilities is not None:
            caller = envoy.path.rsplit(".", 1)[0]
            function = type(self._model._module.get_submodule(caller)).forward
            print(f"{self._part}[{layer}] is the output of {envoy.path}, called in:")
        elif self._part in HEAD_VALUES:
            attention = self._model._module_of("attentions", layer)
            function = type(attention.module).forward
            if self._part == "attention_probabilities":
                function = attention_probes._family_eager(attention.module)
            print(f"{self._part}[{layer}] is read at {envoy.path}, from the call of the attention function in:")
        else:
            function = type(envoy.module).forward
        print(listing(function, envoy.path))

    def __len__(self) -> int:
        return self._model.num_layers

    def __iter__(self):
        return (self[layer] for layer in range(len(self)))


class StandardizedTransformer(LanguageModel):
    """A decoder language model under nnterp's standardized names, on its original modules.

    `layers_output[i]` is the residual stream after layer `i` (before the final norm), a tensor
    `[batch, seq, hidden]` on every family; `attentions_output[i]` and `mlps_output[i]` are the updates the
    attention and MLP compute for it (before the post-norm of Gemma 2/3, OLMo 2); all of them can be assigned.
    Prompts are padded on the left.

    >>> import transformers, interlace
    >>> config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=16, intermediate_size=32,
    ...                                   num_attention_heads=2, vocab_size=50)
    >>> model = interlace.StandardizedTransformer(transformers.LlamaForCausalLM(config))
    >>> with model.trace([[1, 2, 3]]):
    ...     hidden = model.layers_output[1].save()
    ...     logits = model.project_on_vocab(hidden).save()
    ...     model.layers_output[0] = model.layers_output[0] * 2
    >>> tuple(hidden.shape), tuple(logits.shape)
    ((1, 3, 16), (1, 3, 50))
    """

    layers_input = _Values("layers", "input", "The residual stream entering each layer.")
    layers_output = _Values("layers", "output", "The residual stream after each layer, before the final norm.")
    attentions_input = _Values("attentions", "input", "What each attention module reads (normed, on pre-norm families).")
    attentions_output = _Values("attentions", "output", "What each attention module returns, before it joins the residual.")
    mlps_input = _Values("mlps", "input", "What each MLP reads.")
    mlps_output = _Values("mlps", "output", "What each MLP returns, before it joins the residual.")
    routers_output = _Values("routers", "router", "Each MoE router's output: (logits, top-k weights, chosen experts).")
    queries = _Values("queries", "output", "Per-head queries [batch, heads, seq, head_dim], after rotary embeddings.")
    keys = _Values("keys", "output", "Per-head keys [batch, kv_heads, kv_seq, head_dim], after rotary embeddings.")
    values = _Values("values", "output", "Per-head values [batch, kv_heads, kv_seq, head_dim].")
    attention_probabilities = _Values(
        "attention_probabilities", "output", "Attention after the softmax [batch, heads, seq, kv_seq]."
    )
    heads_output = _Values("heads_output", "output", "Per-head attention output [batch, heads, seq, head_dim].")
    attentions = _Values("attentions", "module", "Each layer's attention module.")
    mlps = _Values("mlps", "module", "Each layer's MLP module.")
    routers = _Values("routers", "module", "Each layer's MoE router module.")

    def __init__(
        self,
        model,
        *,
        tokenizer=None,
        enable_attention_probs: bool | None = None,
        rename_config: RenameConfig | None = None,
        check_renaming: bool = True,
        dispatch: bool = False,
        padding_side: str = "left",
        rename: dict[str, str] | None = None,
        **load_kwargs,
    ):
        if padding_side != "left":
            raise StandardizationError(
                f"StandardizedTransformer pads prompts on the left (got padding_side={padding_side!r}), so "
                "that position -1 is every prompt's last token; use LanguageModel for right padding."
            )
        # the user's names are applied below, with the family's
        super().__init__(model, tokenizer=tokenizer, dispatch=dispatch, **load_kwargs)
        self.family = family_of(self._module, rename_config)
        self._rename_config = rename_config or RenameConfig()
        if enable_attention_probs is None:  # by default: what the server hosts (remotely), else off
            served = self._remote.manifest().get("standardized") if self._remote is not None else None
            enable_attention_probs = bool(served and served["attention_probs"])
        self._attention_probs = enable_attention_probs
        self._unavailable: dict[str, str] = {}
        if self._remote is not None:
            self._unavailable.update(self._missing_on_server())
        self._tuple_outputs: dict[str, int] = {}  # module path -> length of the tuple it returns
        self._absent: dict[str, list[int]] = {}  # part -> the layers without it (others have it)
        self._prepare(self._module)
        # the aliases give the standard names (the probes' envoys are made when first reached)
        # nnterp's tree too (`model.model.layers`, `model.model.ln_final`), under the family's names
        self._rename = {**get_rename_dict(rename_config), **rename_table(self.family), **(rename or {})}
        self._apply_renames()
        self._inspect(check_renaming)

    # -- loading --------------------------------------------------------------------------------
    def _prepare(self, module: torch.nn.Module) -> None:
        """Add the attention probes to `module` (the model itself, or one just loaded by dispatch)."""
        attention_modules = [module.get_submodule(p) for p in self._paths_of("attentions")]
        reason = attention_probes.install(module, attention_modules, probabilities=self._attention_probs)
        if reason is not None:
            for name in HEAD_VALUES:
                if name != "attention_probabilities" or self.family.probabilities is None:
                    self._unavailable.setdefault(name, reason)

    def _missing_on_server(self) -> dict[str, str]:
        """Per-head values the server cannot give (its model has no probes, or no probabilities): why not.

        The probes are identity modules: a client adds them to the tree it builds from the manifest,
        but only a server that hosts a StandardizedTransformer runs values through them.
        """
        served = self._remote.manifest().get("standardized")
        hosted = f"the server at {self._remote.host} hosts '{self._remote.model}'"
        if served is None:
            reason = (f"{hosted} without attention probes; its operator can start it with "
                      "`interlace serve MODEL --standardized` (add --attention-probs for attention_probabilities)")
            return dict.fromkeys(HEAD_VALUES, reason)
        if not served["attention_probs"]:
            return {"attention_probabilities": f"{hosted} without attention probabilities; its operator can "
                                               "start it with `interlace serve MODEL --standardized --attention-probs`"}
        return {}

    def _load_weights(self) -> torch.nn.Module:
        module = super()._load_weights()
        if hasattr(self, "family"):  # dispatch after construction: give the loaded model its probes
            self._prepare(module)
        return module

    def _paths_of(self, part: str, value: bool = False) -> list[str]:
        """The module path of `part` in each layer (empty when the family has no such part).

        value: the path of the module whose output is the part's output value (see `_suffix`)."""
        family, suffix = self.family, self._suffix(part, value)
        if suffix is None:
            return []
        layers = self._module.get_submodule(family.layers)
        return [f"{family.layers}.{i}" + (f".{suffix}" if suffix else "") for i in range(len(layers))]

    def _suffix(self, part: str, value: bool = False) -> str | None:
        """The path of `part` under a layer ("" for the layer itself; None: the family has none).

        value: the module whose output is the part's value: the submodule computing the update alone
        where the part's module adds the residual itself (Bloom, MPT)."""
        family = self.family
        if value and part in ("attentions", "mlps"):
            return family.output_of(part[:-1])  # ("attentions" -> "attention")
        if part == "attention_probabilities" and family.probabilities is not None:
            return f"{family.attention}.{family.probabilities}"
        if part in HEAD_VALUES:
            return f"{family.attention}.{attention_probes.PROBES}.{HEAD_VALUES[part]}"
        return {"layers": "", "attentions": family.attention, "mlps": family.mlp, "routers": family.router}[part]

    def _inspect(self, check: bool) -> None:
        """Run the model once on fake tensors: learn which modules return tuples, check every shape."""
        family = self.family
        # probabilities run only under the eager attention: without it they are checked when enabled
        parts = ["layers", "attentions", "mlps", "routers"] + [
            name for name in HEAD_VALUES
            if name not in self._unavailable and (name != "attention_probabilities" or self._attention_probs)
        ]
        per_layer = {part: self._paths_of(part, value=True) for part in parts}
        modules = dict(self._module.named_modules())
        for part, paths in per_layer.items():
            if not paths:
                self._unavailable.setdefault(part, self._missing_reason(part))
            # a part some layers lack: the router of a MoE family whose first (or every other) layers are dense
            absent = [layer for layer, path in enumerate(paths) if path not in modules]
            if absent and len(absent) == len(paths):
                self._unavailable.setdefault(part, f"{paths[0]} is not a module of this model")
            elif absent:
                self._absent[part] = absent
            per_layer[part] = [path for path in paths if path in modules]
        top = [family.embed_tokens, family.ln_final, family.lm_head]
        seen = observe(self._module, top + [p for paths in per_layer.values() for p in paths])
        batch, length = 2, 3
        hidden, heads = self.hidden_size, self.num_heads
        for path, (_, output) in seen.items():
            if isinstance(output, tuple):
                self._tuple_outputs[path] = len(output)
        expected = {
            "layers": (batch, length, hidden),
            "attentions": (batch, length, hidden),
            "mlps": (batch, length, hidden),
            "routers": (batch * length, None),
            "queries": (batch, heads, length, None),
            "keys": (batch, None, length, None),
            "values": (batch, None, length, None),
            "attention_probabilities": (batch, heads, length, length),
            "heads_output": (batch, heads, length, None),
        }
        problems = []
        for part, paths in per_layer.items():
            for path in paths:
                if path not in seen:
                    self._unavailable.setdefault(part, f"{path} never ran in a forward pass")
                    break
                if not matches(shape_of(seen[path][1]), expected[part]):
                    reason = f"{path} returned {shape_of(seen[path][1])}, expected {_fmt(expected[part])}"
                    self._unavailable.setdefault(part, reason)
                    if part == "layers":
                        problems.append(reason)
                    break
        for path, shape in ((family.ln_final, (batch, length, hidden)), (family.lm_head, (batch, length, self.vocab_size))):
            got = shape_of(seen[path][1]) if path in seen else None
            if not matches(got, shape):
                problems.append(f"{path} returned {got}, expected {_fmt(shape)}")
        if problems and check:
            raise StandardizationError(
                f"{type(self._module).__name__} does not fit the standardized layout: " + "; ".join(problems)
                + ". Pass a RenameConfig naming the right modules, or check_renaming=False to load it anyway."
            )

    def _missing_reason(self, part: str) -> str:
        model_type = getattr(self.config, "model_type", type(self._module).__name__)
        if part == "mlps":
            return f"'{model_type}' has no MLP module (its feed-forward layers sit on the layer itself)"
        if part == "routers":
            return f"'{model_type}' is not a mixture-of-experts family (no router module)"
        return f"'{model_type}' has no {part}"

    # -- parts ------------------------------------------------------------------------------------
    def _module_of(self, part: str, layer: int, value: bool = False) -> Envoy:
        """The envoy of `part` in layer `layer` (value: of its output value, see `_suffix`); a clear error
        when the family has none."""
        if part in self._unavailable:
            raise StandardizationError(f"{part} is not available on this model: {self._unavailable[part]}.")
        if part == "attention_probabilities" and not self._attention_probs:
            raise StandardizationError(
                "attention_probabilities needs the eager attention: load the model with "
                "StandardizedTransformer(..., enable_attention_probs=True)."
            )
        if part in self._absent and type(layer) is int and -self.num_layers <= layer < self.num_layers \
                and layer % self.num_layers in self._absent[part]:
            having = [i for i in range(self.num_layers) if i not in self._absent[part]]
            raise StandardizationError(
                f"layer {layer} has no {part[:-1]}: {self._paths_of(part)[layer]} is not a module of this model "
                f"(the layers with one: {_spans(having)})")
        envoy, suffix = self.layers[layer], self._suffix(part, value)
        return envoy if suffix == "" else envoy.get(suffix)

    def layers_with(self, part: str) -> list[int]:
        """The layers that have `part` ('routers', 'mlps', ...): every layer, but where some lack it (a MoE family
        whose first layers are dense has no router there)."""
        return [layer for layer in range(self.num_layers) if layer not in self._absent.get(part, ())]

    def _returns_tuple(self, envoy: Envoy) -> bool:
        return envoy.path in self._tuple_outputs

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int | None:
        return self._config_value("hidden_size", self._rename_config.hidden_size_config_key)

    @property
    def num_heads(self) -> int | None:
        return self._config_value("num_heads", self._rename_config.attn_head_config_key)

    @property
    def vocab_size(self) -> int | None:
        return self._config_value("vocab_size", self._rename_config.vocab_size_config_key)

    def _config_value(self, name: str, override) -> int | None:
        if isinstance(override, int):
            return override
        keys = ([override] if isinstance(override, str) else list(override or [])) + list(CONFIG_KEYS[name])
        config = self.config
        config = getattr(config, "text_config", None) or config
        return next((getattr(config, key) for key in keys if getattr(config, key, None) is not None), None)

    @property
    def attn_probs_available(self) -> bool:
        """Whether `attention_probabilities` can be read (loaded with enable_attention_probs=True, and
        the family supports it; `available` says why not)."""
        return self.available["attention_probabilities"] is None

    @property
    def available(self) -> dict[str, str | None]:
        """Each standardized part: None when available, else why not."""
        parts = ["layers", "attentions", "mlps", "routers", *HEAD_VALUES]
        reasons = {part: self._unavailable.get(part) for part in parts}
        if reasons["attention_probabilities"] is None and not self._attention_probs:
            reasons["attention_probabilities"] = "load with enable_attention_probs=True"
        return reasons

    # -- whole-model values -------------------------------------------------------------------------
    @property
    def token_embeddings(self) -> Proxy:
        """The output of `embed_tokens` (before any scaling the model applies after it)."""
        return self.embed_tokens.output

    @token_embeddings.setter
    def token_embeddings(self, value) -> None:
        self.embed_tokens.output = value

    @property
    def logits(self) -> Proxy:
        """The model's logits `[batch, seq, vocab]`, final-logit transforms included."""
        return self.output.logits

    @property
    def next_token_probs(self) -> Proxy:
        """The softmax of the last position's logits `[batch, vocab]`, in float32 (a bfloat16 softmax keeps
        about three digits of each probability)."""
        return self.output.logits[:, -1].softmax(-1, dtype=torch.float32)

    @property
    def input_ids(self) -> Proxy:
        """The token ids the model was called with (left padded)."""
        return self.inputs[1]["input_ids"]

    @property
    def input_size(self) -> Proxy:
        """The shape of the input ids, `(batch, seq)` (traced)."""
        return self.input_ids.shape

    @property
    def attention_mask(self) -> Proxy:
        """The attention mask the model was called with (0 on padding)."""
        return self.inputs[1]["attention_mask"]

    # -- interventions ------------------------------------------------------------------------------
    def skip_layer(self, layer: int, skip_with=None) -> None:
        """Do not run `layer`: its output is `skip_with`, by default its input (the residual passes through)."""
        self.skip_layers(layer, layer, skip_with)

    def skip_layers(self, start: int, end: int, skip_with=None) -> None:
        """Skip layers `start` to `end` inclusive: each outputs `skip_with`, by default `layers_input[start]`."""
        count = self.num_layers
        first, last = (index + count if index < 0 else index for index in (start, end))
        if not 0 <= first <= last < count:
            raise StandardizationError(f"skip_layers({start}, {end}) skips layers start to end inclusive: start "
                                       f"must not come after end, and both must be layers of the {count}")
        start, end = first, last
        if skip_with is None:
            skip_with = self.layers_input[start]
        for layer in range(start, end + 1):
            envoy = self.layers[layer]
            length = self._tuple_outputs.get(envoy.path)
            envoy.skip(skip_with if length is None else (skip_with,) + (None,) * (length - 1))

    def steer(self, layers, steering_vector: torch.Tensor, factor: float = 1.0, positions=None, token_positions=None,
              batch_index=None) -> None:
        """Add `factor * steering_vector` to the output of each layer in `layers`.

        token_positions / batch_index: an int, a list, a tensor or a slice restricting where it is added
        (default: every position of every prompt). Positions are the padded batch's, as in nnterp: prompts
        are left padded, so a negative position is the same token of every prompt, a positive one is not.
        Each position chosen is steered once, however often it is listed (`[2, 2]`, or `[-1]` and the last
        positive index, add `factor * steering_vector` once there): scale `factor` to add more.
        Layers are steered in ascending order.
        positions: the older name of token_positions (nnterp's; deprecated there too).
        """
        if positions is not None:
            if token_positions is not None:
                raise StandardizationError("Cannot specify both `positions` (deprecated) and `token_positions`: "
                                           "pass token_positions only.")
            warnings.warn("`positions` is deprecated, use `token_positions` instead.", DeprecationWarning, stacklevel=2)
            token_positions = positions
        layers = [layers] if isinstance(layers, int) else sorted(layers)
        self._check_width(steering_vector, "steer's steering_vector")
        delta = factor * steering_vector
        rows, columns = _steered(batch_index, "batch_index"), _steered(token_positions, "token_positions")
        if isinstance(rows, torch.Tensor) and isinstance(columns, torch.Tensor) and rows.dim() and columns.dim():
            rows = rows.reshape(-1, 1)  # every chosen position of every chosen prompt, not pairs
        for layer in layers:
            hidden = self.layers_output[layer]
            hidden[rows, columns] += delta.to(hidden)

    def project_on_vocab(self, hidden):
        """Logits of a residual-stream value: final norm, `lm_head`, then the family's final-logit transform.

        Works inside a trace on traced values and outside on real tensors (cast to the model's dtype: a
        float32 copy of a bfloat16 model's hidden state, say).
        """
        weight = getattr(self.lm_head.module, "weight", None)
        self._check_width(hidden, "project_on_vocab's hidden")
        if isinstance(hidden, torch.Tensor) and isinstance(weight, torch.Tensor):
            hidden = hidden.to(weight.dtype)
        return self.family.final_transform(self.lm_head(self.ln_final(hidden)), self.config)

    def _check_width(self, value, what: str) -> None:
        """A tensor whose last dimension is not the residual stream's width is refused at the caller's line (its
        own error would come from inside the model's norm or a hook, naming neither)."""
        width = self.hidden_size
        if isinstance(value, torch.Tensor) and width is not None and (not value.dim() or value.shape[-1] != width):
            raise StandardizationError(
                f"{what} must have the model's hidden size ({width}) as its last dimension, as residual-stream values "
                f"do; got a tensor of shape {list(value.shape)}")

    def get_topk_closest_tokens(self, hidden: torch.Tensor, k: int = 5):
        """The `k` likeliest next tokens of a saved hidden state, as `{token: probability}`.

        hidden: `[hidden]` gives one dict; `[n, hidden]` a list of n dicts.
        """
        if isinstance(hidden, Proxy):
            raise StandardizationError(
                "get_topk_closest_tokens needs a real tensor: save the hidden state in the trace and call it after."
            )
        with torch.no_grad():
            probs = self.project_on_vocab(hidden).softmax(-1, dtype=torch.float32)
        values, indices = probs.topk(k, dim=-1)
        rows = [
            {self.tokenizer.decode(i) if self.tokenizer else str(i): v for i, v in zip(ids, ps)}
            for ids, ps in zip(indices.reshape(-1, k).tolist(), values.reshape(-1, k).tolist())
        ]
        return rows[0] if hidden.dim() == 1 else rows

    def _set_attention_probs(self, enabled: bool) -> None:
        """Switch between the native attention and the eager one that exposes probabilities."""
        if "attention_probabilities" in self._unavailable:
            raise StandardizationError(
                f"attention probabilities are not available: {self._unavailable['attention_probabilities']}"
            )
        self._attention_probs = enabled
        self._prepare(self._module)


def _spans(numbers: list[int]) -> str:
    """`[1, 2, 3, 5]` as '1-3, 5'."""
    runs: list[list[int]] = []
    for number in numbers:
        if runs and number == runs[-1][-1] + 1:
            runs[-1].append(number)
        else:
            runs.append([number])
    return ", ".join(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]) for run in runs)


def _fmt(shape: tuple) -> str:
    return "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"


def _steered(index, name: str):
    """`steer`'s token_positions or batch_index as a tensor index (None and slices as they are)."""
    if index is None:
        return slice(None)
    if isinstance(index, slice):
        return index
    try:
        index = torch.as_tensor(index)
    except (TypeError, RuntimeError, ValueError):
        index = None
    if index is None or index.is_floating_point() or index.dtype == torch.bool or index.dim() > 1:
        raise StandardizationError(f"steer: {name} must be an int, a list or 1-d tensor of ints, or a slice")
    return index
