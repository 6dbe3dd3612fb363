"""The allow-list of operations a graph may name, kept as data.

A `call` node names an entry of the function table (`operator.add`, `torch.softmax`,
`torch.nn.functional.gelu`, `builtins.getattr`, ...); a `call_method` node names a method of
`TENSOR_METHODS` (called on a tensor) or of `CONTAINER_METHODS` (on a list, dict or model output);
`getattr` reads a name of `TENSOR_ATTRIBUTES` or a field of a model output. That is everything a
graph from a stranger can do. Every entry is a pure function of its arguments: no dunder beyond the
Python operators, nothing that takes or returns a callable, nothing that touches files, processes,
threads, storage, random number generators or torch's global state. A reviewer reads this file to
see all of it.

Each entry carries a *size rule*: the name of a function in `backends/guard.py` that bounds the
number of elements its result holds from the shapes of its arguments, so an untrusted run refuses a
call before it allocates. Local traces may also call functions outside this table (they run your
own code); such graphs cannot be sent to a server.
"""

from __future__ import annotations

import builtins
import operator

import torch


def _table(groups: dict[str, str]) -> dict[str, str]:
    """{rule: "name name ..."} -> {name: rule}."""
    return {name: rule for rule, names in groups.items() for name in names.split()}


# -- Python operators and builtins ------------------------------------------------------------------
_OPERATORS = _table({
    "broadcast": "add sub mul truediv floordiv mod pow and_ or_ xor lshift rshift lt le eq ne gt ge "
                 "iadd isub imul itruediv ifloordiv imod ipow iand ior ixor ilshift irshift",
    "matmul": "matmul imatmul",
    "same": "neg pos abs invert setitem delitem",
    "index": "getitem",
    "scalar": "not_ truth contains",
})
# getattr reads only the data attributes below; the others build plain Python values.
_BUILTINS = _table({
    "attribute": "getattr",
    "container": "list tuple dict",
    "scalar": "int float bool len abs",
})

# -- torch functions (torch.*, torch.nn.functional.*, torch.linalg.*, torch.special.*) --------------
_TORCH = _table({
    # elementwise: the result has the broadcast shape of the tensor arguments
    "broadcast": "add sub subtract mul multiply div true_divide floor_divide remainder fmod pow float_power "
                 "atan2 hypot maximum minimum fmax fmin eq ne lt le gt ge greater less greater_equal "
                 "less_equal not_equal logical_and logical_or logical_xor bitwise_and bitwise_or bitwise_xor "
                 "where lerp addcmul addcdiv clamp clip copysign xlogy isclose logaddexp take_along_dim "
                 "masked_fill masked_select max min",
    # never larger than the largest tensor argument (unary maps, reductions, views, indexing by index
    # tensors whose result has the index's shape)
    "same": "abs absolute neg negative sign sgn exp exp2 expm1 log log2 log10 log1p sqrt rsqrt square sin "
            "cos tan asin acos atan sinh cosh tanh asinh acosh atanh sigmoid relu erf erfc erfinv floor "
            "ceil round trunc frac reciprocal logit isnan isinf isfinite isposinf isneginf nan_to_num "
            "logical_not bitwise_not signbit real imag angle conj deg2rad rad2deg digamma lgamma i0 "
            "softmax log_softmax sum mean nansum nanmean prod std var std_mean var_mean amax amin "
            "aminmax argmax argmin all any count_nonzero logsumexp norm median nanmedian mode kthvalue "
            "topk sort argsort msort cumsum cumprod cummax cummin logcumsumexp diff trace reshape flatten "
            "unflatten squeeze unsqueeze transpose swapaxes swapdims permute movedim moveaxis t adjoint "
            "narrow select gather scatter scatter_add scatter_reduce index_add index_copy index_fill take "
            "flip fliplr flipud roll rot90 diagonal tril triu clone detach zeros_like ones_like "
            "empty_like full_like",
    "nonzero": "nonzero argwhere",
    "concatenate": "cat concat concatenate stack hstack vstack dstack column_stack",
    "pieces": "chunk split tensor_split unbind",
    "matmul": "matmul mm bmm mv dot addmm baddbmm addmv",
    "product": "outer kron cartesian_prod",
    "index_select": "index_select",
    "repeat": "tile",
    "expand": "broadcast_to",
    "repeat_interleave": "repeat_interleave",
    "size": "zeros ones empty full",
    "range": "arange linspace logspace",
    "eye": "eye",
    "data": "tensor as_tensor",
    # shapes not worth a formula: evaluated on the meta device first
    "meta": "einsum tensordot inner cdist diag diag_embed block_diag",
    "scalar": "numel is_tensor is_floating_point is_complex result_type promote_types can_cast",
})
_FUNCTIONAL = _table({
    "same": "gelu silu relu relu6 elu selu celu leaky_relu softplus softsign mish hardtanh hardswish "
            "hardsigmoid tanhshrink logsigmoid sigmoid tanh softmax log_softmax softmin normalize "
            "layer_norm group_norm rms_norm glu kl_div cross_entropy mse_loss l1_loss nll_loss "
            "binary_cross_entropy binary_cross_entropy_with_logits",
    "broadcast": "cosine_similarity pairwise_distance",
    "linear": "linear",
    "embedding": "embedding",
    "meta": "pad",
})
_LINALG = _table({"same": "norm vector_norm matrix_norm", "meta": "vecdot"})
_SPECIAL = _table({"same": "expit logit erf erfc erfinv entr softmax log_softmax logsumexp"})

_NAMESPACES = (
    ("torch", torch, _TORCH),
    ("torch.nn.functional", torch.nn.functional, _FUNCTIONAL),
    ("torch.linalg", torch.linalg, _LINALG),
    ("torch.special", torch.special, _SPECIAL),
)

# -- methods -----------------------------------------------------------------------------------------
# In-place variants (`add_`, ...) change the tensor they are called on: an untrusted run refuses them
# on parameters and buffers, a local run restores those afterwards.
TENSOR_METHODS = _table({
    "broadcast": "add sub mul div true_divide floor_divide remainder fmod pow maximum minimum eq ne lt le "
                 "gt ge logical_and logical_or logical_xor bitwise_and bitwise_or bitwise_xor where lerp "
                 "addcmul addcdiv clamp clip masked_fill masked_select max min add_ sub_ mul_ div_ pow_ clamp_ "
                 "clip_ masked_fill_ lerp_ addcmul_ addcdiv_ fmod_ remainder_ copy_ logical_and_ "
                 "logical_or_ logical_not_",
    "same": "abs neg sign exp log log1p sqrt rsqrt square sin cos tanh sigmoid relu erf floor ceil round "
            "trunc reciprocal nan_to_num logical_not isnan isinf isfinite conj softmax "
            "log_softmax sum mean nansum prod std var amax amin argmax argmin all any "
            "count_nonzero logsumexp norm median mode kthvalue topk sort argsort cumsum cumprod diff "
            "reshape reshape_as view view_as flatten unflatten squeeze unsqueeze transpose permute t "
            "movedim narrow select gather scatter scatter_add index_add index_copy index_fill take flip "
            "roll diagonal tril triu clone detach contiguous to cpu cuda float double half bfloat16 int "
            "long short bool byte type_as expand_as "
            "abs_ neg_ exp_ log_ sqrt_ sigmoid_ tanh_ relu_ floor_ ceil_ round_ trunc_ reciprocal_ "
            "nan_to_num_ zero_ fill_ scatter_ scatter_add_ index_add_ index_copy_ index_fill_ index_put_ "
            "index_put masked_scatter masked_scatter_ tril_ triu_ squeeze_ unsqueeze_ t_ transpose_ "
            "requires_grad_ retain_grad backward",
    "nonzero": "nonzero argwhere",
    "pieces": "chunk split tensor_split unbind",
    "matmul": "matmul mm bmm mv dot",
    "index_select": "index_select",
    "repeat": "repeat tile",
    "expand": "expand",
    "repeat_interleave": "repeat_interleave",
    "new_size": "new_zeros new_ones new_empty new_full",
    "new_data": "new_tensor",
    "tolist": "tolist",
    "meta": "unfold outer inner",
    "scalar": "item size dim ndimension numel nelement element_size is_contiguous is_floating_point "
              "is_complex stride",
})
CONTAINER_METHODS = {
    list: frozenset("append extend insert pop index count copy".split()),
    dict: frozenset("keys values items get".split()),  # dicts and model outputs
}
# What `getattr` may read from a tensor; model outputs expose their fields, structseqs their names.
TENSOR_ATTRIBUTES = frozenset(
    "shape dtype device T mT H mH ndim real imag grad data is_leaf requires_grad layout is_cuda "
    "is_meta itemsize nbytes names".split()
)

# Methods that change a tensor's autograd flags, not its data: no operator schema describes them, so an
# untrusted run refuses them on weights by name (writes to data are decided from schemas: writes.py).
AUTOGRAD_METHODS = frozenset({"requires_grad_", "retain_grad"})

# In-place operators: a node with one of these targets changes its first argument.
MUTATING_TARGETS = frozenset(
    f"operator.{name}" for name in _OPERATORS
    if name in ("setitem", "delitem") or name.startswith("i") and name != "invert"
)
IN_PLACE_OPERATORS = frozenset(target for target in MUTATING_TARGETS if target.startswith("operator.i"))  # `+=`...


def _build() -> dict[str, tuple[object, str]]:
    table = {f"operator.{name}": (getattr(operator, name), rule) for name, rule in _OPERATORS.items()}
    table.update({f"builtins.{name}": (getattr(builtins, name), rule) for name, rule in _BUILTINS.items()})
    for prefix, namespace, names in _NAMESPACES:
        table.update({f"{prefix}.{name}": (getattr(namespace, name), rule) for name, rule in names.items()})
    return table


FUNCTIONS: dict[str, tuple[object, str]] = _build()  # registry name -> (callable, size rule)
_BY_ID = {}
for _name, (_fn, _rule) in FUNCTIONS.items():
    _BY_ID.setdefault(id(_fn), _name)  # torch.abs and torch.absolute may be one object: first name wins


# torch.Tensor's methods and operator dunders, as a traced call reaches them through
# __torch_function__ when a real tensor meets a proxy: id -> (op, target, reflected)
_TENSOR_CALLS = {id(getattr(torch.Tensor, name)): ("call_method", name, False) for name in TENSOR_METHODS}
for _name in _OPERATORS:
    _dunder = _name.rstrip("_")
    for _prefix, _reflected in (("", False), ("r", True)):
        _method = getattr(torch.Tensor, f"__{_prefix}{_dunder}__", None)
        if _method is not None and not (_reflected and _name.startswith("i")):
            _TENSOR_CALLS.setdefault(id(_method), ("call", f"operator.{_name}", _reflected))


def tensor_method_of(fn):
    """(op, target, reflected) recording a call of `fn`, a method or operator of torch.Tensor."""
    return _TENSOR_CALLS.get(id(fn))


def name_of(fn) -> str | None:
    """The registry name of `fn`, or None when it is not an allowed operation."""
    return _BY_ID.get(id(fn))


def resolve(name: str):
    """The callable registered under `name`; KeyError names the unknown entry."""
    try:
        return FUNCTIONS[name][0]
    except (KeyError, TypeError):
        raise KeyError(f"'{name}' is not an allowed operation") from None


def size_rule(name: str) -> str:
    """The size rule of function entry `name` (a tensor method's is `TENSOR_METHODS[name]`)."""
    return FUNCTIONS[name][1]


def is_registered(name) -> bool:
    return isinstance(name, str) and name in FUNCTIONS


def allowed_method(name) -> bool:
    """Whether some receiver (a tensor, list or dict) has an allowed method of this name."""
    return isinstance(name, str) and (
        name in TENSOR_METHODS or any(name in methods for methods in CONTAINER_METHODS.values())
    )


def allowed_attribute(name) -> bool:
    """Attribute names a graph may record: public ones (the receiver is checked when it runs)."""
    return isinstance(name, str) and name.isidentifier() and not name.startswith("_")


# The methods of CONTAINER_METHODS that change the container they are called on.
CONTAINER_CHANGES = frozenset({"append", "extend", "insert", "pop"})


def is_in_place_method(name: str) -> bool:
    """Methods that change what they are called on: tensor methods like `add_` and `zero_`, and a list's
    `append`, `extend`, `insert` and `pop` (so they run in the order written, and reads wait for them)."""
    return name.endswith("_") and not name.startswith("_") or name in CONTAINER_CHANGES
