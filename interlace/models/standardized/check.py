"""The full check of a standardized model, by value (`interlace check-model MODEL`).

Every reference is computed another way than the accessor it checks: hand-written PyTorch hooks
on the native module paths, a plain forward on the exact inputs the trace used, and the family's own
eager attention with `output_attentions=True`. Each check gives one row: ok, FAIL or n/a (the model
has no such part, with the reason).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ...backends.rows import first_input
from .transformer import StandardizedTransformer

# what each read accessor reads: (accessor, module part, input or output), in the order a layer runs
READS = [
    ("layers_input", "layers", "input"),
    ("attentions_input", "attentions", "input"),
    ("queries", "queries", "output"),
    ("keys", "keys", "output"),
    ("values", "values", "output"),
    ("heads_output", "heads_output", "output"),
    ("attentions_output", "attentions", "output"),
    ("mlps_input", "mlps", "input"),
    ("routers_output", "routers", "router"),
    ("mlps_output", "mlps", "output"),
    ("layers_output", "layers", "output"),
]


@dataclass
class CheckResult:
    """One row of the check: what was compared, `ok` / `FAIL` / `n/a`, and the numbers.

    >>> import transformers, interlace
    >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50)
    >>> model = interlace.StandardizedTransformer(transformers.GPT2LMHeadModel(config).eval())
    >>> rows = check_model(model)
    >>> sorted({row.status for row in rows})
    ['n/a', 'ok']
    """

    name: str
    status: str
    detail: str


def check_model(model: StandardizedTransformer, inputs=None) -> list[CheckResult]:
    """Check every standardized accessor and method of `model` by value; returns one row per check.

    inputs: what the traces run on; default two prompts of different lengths (so left padding is
    exercised), as text when the model has a tokenizer, else as token ids.
    """
    if inputs is None:
        inputs = ["The capital of France is", "Hello"] if model.tokenizer else [[3, 4, 5, 6, 7], [8, 9]]
    results: list[CheckResult] = []
    call = _check_reads(model, inputs, results)
    _check_writes(model, call, inputs, results)
    _check_probabilities(model, call, inputs, results)
    return results


def format_table(results: list[CheckResult]) -> str:
    """The rows as an aligned text table."""
    width = max(len(r.name) for r in results)
    lines = [f"{'check':<{width}}  {'result':<6}  detail", f"{'-' * width}  ------  ------"]
    lines += [f"{r.name:<{width}}  {r.status:<6}  {r.detail}" for r in results]
    return "\n".join(lines)


# -- reading ----------------------------------------------------------------------------------
def _check_reads(model, inputs, results):
    """Every read accessor against a hook on its native module; the traced forward against a plain one."""
    available = model.available
    reads = [(name, part, kind) for name, part, kind in READS if available[part] is None]
    with model.trace(inputs):
        call = model.inputs.save()
        embeddings = model.token_embeddings.save()
        ours = {name: [getattr(model, name)[layer].save() for layer in model.layers_with(part)]
                for name, part, _ in reads}
        logits = model.logits.save()
        projected = model.project_on_vocab(model.layers_output[-1]).save()
    args, kwargs = call
    paths = {name: [model._paths_of(part, value=kind == "output")[layer] for layer in model.layers_with(part)]
             for name, part, kind in reads}
    kinds = {name: kind for name, _, kind in reads}
    paths["token_embeddings"], kinds["token_embeddings"] = [model.family.embed_tokens], "output"
    with _capture(model, paths, kinds) as captured, torch.no_grad():
        plain = model.module(*args, **kwargs)
    for name, part, _ in READS:
        if available[part] is not None:
            results.append(CheckResult(name, "n/a", available[part]))
            continue
        results.append(_exact(name, ours[name], captured[name],
                              f"{len(ours[name])} layers vs hooks on the native modules"))
    results.append(_exact("token_embeddings", [embeddings], captured["token_embeddings"], "vs a hook on embed_tokens"))
    results.append(_exact("trace == plain forward", [logits], [plain.logits], "logits, no intervention"))
    results.append(_close("project_on_vocab(layers_output[-1])", projected, plain.logits, "vs the model's logits"))
    return call


@contextmanager
def _capture(model, paths: dict, kinds: dict):
    """Hand-written hooks cloning each module's first input or (first) output, per accessor name."""
    captured = {name: [None] * len(layer_paths) for name, layer_paths in paths.items()}
    handles = []
    for name, layer_paths in paths.items():
        for layer, path in enumerate(layer_paths):
            module = model.module.get_submodule(path)

            def keep(value, name=name, layer=layer):
                if captured[name][layer] is None:
                    captured[name][layer] = _clone(value)

            if kinds[name] == "input":
                handles.append(module.register_forward_pre_hook(
                    lambda m, a, k, keep=keep: keep(first_input(a, k)), with_kwargs=True))
            elif kinds[name] == "router":
                handles.append(module.register_forward_hook(lambda m, a, out, keep=keep: keep(out)))
            else:
                handles.append(module.register_forward_hook(
                    lambda m, a, out, keep=keep: keep(out[0] if isinstance(out, tuple) else out)))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


# -- writing ----------------------------------------------------------------------------------
def _check_writes(model, call, inputs, results):
    """Assignments, steering and skipping against hand-written hooks doing the same."""
    layer = model.num_layers // 2
    available = model.available
    layer_path = model.layers[layer].path

    # assignment rebuilds tuples; each part is checked alone, so one failure names its part
    for name, part, change in (
        ("layers_output", "layers", lambda h: h * 2),
        ("attentions_output", "attentions", lambda h: h * 0.5),
        ("mlps_output", "mlps", lambda h: h + 1),
    ):
        if available[part] is not None:
            results.append(CheckResult(f"{name}[{layer}] = ...", "n/a", available[part]))
            continue
        with model.trace(inputs):
            accessor = getattr(model, name)
            accessor[layer] = change(accessor[layer])
            logits = model.logits.save()
        want = _forward_with_hooks(model, call, [(model._paths_of(part, value=True)[layer], _output_hook(change))])
        results.append(_close(f"{name}[{layer}] = ...", logits, want, "vs a hook replacing the output"))

    torch.manual_seed(0)
    vector = torch.randn(model.hidden_size, dtype=model.module.dtype)
    with model.trace(inputs):
        model.steer(layer, vector, factor=0.5)
        logits = model.logits.save()
    want = _forward_with_hooks(model, call, [(layer_path, _output_hook(lambda h: h + 0.5 * vector.to(h)))])
    results.append(_close(f"steer({layer}, v, 0.5)", logits, want, "vs a hook adding 0.5 * v to the output"))

    end = min(layer + 1, model.num_layers - 1)
    with model.trace(inputs):
        model.skip_layers(layer, end)
        logits = model.logits.save()
    entering = []
    first = model.module.get_submodule(layer_path)
    handle = first.register_forward_pre_hook(lambda m, a, k: entering.append(first_input(a, k)), with_kwargs=True)
    try:
        paths = [model.layers[i].path for i in range(layer, end + 1)]
        want = _forward_with_hooks(model, call, [(path, _output_hook(lambda h: entering[0])) for path in paths])
    finally:
        handle.remove()
    results.append(_close(f"skip_layers({layer}, {end})", logits, want, "vs hooks returning the input of the first"))


def _forward_with_hooks(model, call, hooks):
    """The plain model's logits on `call` (args, kwargs) with forward hooks [(module path, hook)] on."""
    args, kwargs = call
    handles = [model.module.get_submodule(path).register_forward_hook(hook) for path, hook in hooks]
    try:
        with torch.no_grad():
            return model.module(*args, **kwargs).logits
    finally:
        for handle in handles:
            handle.remove()


def _output_hook(change):
    """A forward hook replacing a module's (first) output by `change(output)`."""

    def hook(module, args, output):
        if isinstance(output, tuple):
            return (change(output[0]),) + output[1:]
        return change(output)

    return hook


# -- attention probabilities --------------------------------------------------------------------
def _check_probabilities(model, call, inputs, results):
    """Probabilities against the family's eager attention; writing them against a hook on the probe."""
    name = "attention_probabilities"
    own = model.family.probabilities is not None  # Bloom, GPT-Neo: their attention's own dropout module
    reason = None if own else model.available["queries"]
    if reason is not None:
        for row in ("sum to 1", "== eager attention", "logits == eager logits", "write"):
            results.append(CheckResult(f"{name}: {row}", "n/a", reason))
        return
    kwargs = call[1]
    enabled = model._attention_probs
    attention_paths = model._paths_of("attentions")
    try:
        model._set_attention_probs(True)
        with model.trace(inputs):
            probs = [model.attention_probabilities[i].save() for i in range(model.num_layers)]
            logits = model.logits.save()
        with model.trace(inputs):
            model.attention_probabilities[0] = model.attention_probabilities[0] * 0.5
            edited = model.logits.save()
        want_edited = _forward_with_hooks(model, call, [(model._paths_of(name)[0], lambda m, a, output: output * 0.5)])
        # the family's own eager attention returns its probabilities as the attention module's second output
        if not own:
            model.module.set_attn_implementation("eager")
        eager_probs = [None] * model.num_layers
        eager_logits = _forward_with_hooks(model, call, [
            (path, lambda m, a, out, i=i: eager_probs.__setitem__(i, out[1].detach().clone()))
            for i, path in enumerate(attention_paths)
        ])
    finally:
        model._set_attention_probs(enabled)
    results.append(_sums(model, probs, kwargs.get("attention_mask"), attention_paths))
    results.append(_close(f"{name}: == eager attention", probs, eager_probs, "the family's eager attention weights"))
    results.append(_close(f"{name}: logits == eager logits", logits, eager_logits, "the eager model's logits"))
    results.append(_close(f"{name}: write", edited, want_edited, "layer 0 halved, vs a hook halving them"))


def _sums(model, probs, mask, attention_paths) -> CheckResult:
    """Each real query's probabilities sum to 1 (padded queries attend to nothing real).

    With attention sinks (GPT-OSS) a learned sink takes part of each row, so the sums are in (0, 1].
    """
    sums = torch.cat([p.sum(-1)[mask.bool()] if mask is not None else p.sum(-1).flatten() for p in
                      (q.transpose(1, 2) for q in probs)])
    tolerance = 1e-3 if probs[0].dtype in (torch.float16, torch.bfloat16) else 1e-5
    name = "attention_probabilities: sum to 1"
    if hasattr(model.module.get_submodule(attention_paths[0]), "sinks"):
        good = bool((sums > 0).all() and (sums <= 1 + tolerance).all())
        detail = f"sums in [{sums.min():.3f}, {sums.max():.3f}]: the attention sink takes the rest"
        return CheckResult(name, "ok" if good else "FAIL", detail)
    worst = (sums - 1).abs().max().item()
    return CheckResult(name, "ok" if worst <= tolerance else "FAIL", f"max |sum - 1| over real tokens {worst:.1e}")


# -- comparing --------------------------------------------------------------------------------
def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(v) for v in value)
    return value


def _flat(values) -> list[torch.Tensor]:
    if isinstance(values, torch.Tensor):
        return [values]
    return [t for value in values for t in _flat(value)] if isinstance(values, (tuple, list)) else []


def _exact(name, ours, reference, what) -> CheckResult:
    """Bit-for-bit equality (the same computation read two ways)."""
    ours, reference = _flat(ours), _flat(reference)
    if len(ours) != len(reference) or any(a.shape != b.shape for a, b in zip(ours, reference)):
        return CheckResult(name, "FAIL", f"shapes differ: {[tuple(a.shape) for a in ours]} vs {[tuple(b.shape) for b in reference]}")
    if all(torch.equal(a, b) for a, b in zip(ours, reference)):
        return CheckResult(name, "ok", f"{what}, identical")
    worst = max((a.float() - b.float()).abs().max().item() for a, b in zip(ours, reference))
    return CheckResult(name, "FAIL", f"{what}, max |diff| {worst:.2e}")


def _close(name, ours, reference, what) -> CheckResult:
    """Equality up to float rounding (a value recomputed another way)."""
    ours, reference = _flat(ours), _flat(reference)
    try:
        for a, b in zip(ours, reference, strict=True):
            torch.testing.assert_close(a, b.to(a.dtype))
    except (AssertionError, ValueError) as error:
        first = str(error).strip().splitlines()[0]
        return CheckResult(name, "FAIL", f"{what}: {first}")
    worst = max(((a.float() - b.float()).abs().max().item() for a, b in zip(ours, reference)), default=0.0)
    return CheckResult(name, "ok", f"{what}, max |diff| {worst:.1e}")
