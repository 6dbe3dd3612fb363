"""The allow-list: every entry checked against its category, and every size rule against reality."""

import builtins
import operator

import pytest
import torch

from interlace import ops
from interlace import LimitError
from interlace.backends import sizes
from interlace.backends.limits import Limits

_NAMESPACES = {"operator": operator, "builtins": builtins, "torch": torch, "torch.nn.functional": torch.nn.functional,
               "torch.linalg": torch.linalg, "torch.special": torch.special}
# words no allowed name may contain: files, processes, threads, storage, hooks, randomness, global
# state, code loading, memory tricks, and anything that takes a callable
_FORBIDDEN = {"save", "load", "seed", "set", "hook", "hooks", "storage", "file", "thread", "threads", "pickle",
              "compile", "rand", "randn", "randint", "randperm", "bernoulli", "multinomial", "normal", "dropout",
              "manual", "exec", "eval", "import", "open", "fork", "wait", "vmap", "cond", "while", "jit", "script",
              "ptr", "numpy", "share", "pin", "resize", "strided", "apply", "map", "autocast", "enabled",
              "deterministic", "default", "print", "library", "sparse", "ir", "handle", "record", "stream",
              "sorted", "hash", "getattribute", "setattr", "delattr", "setstate", "dlpack", "array"}


def _words(name: str) -> set:
    return set(name.strip("_").split("_"))


def test_names_round_trip():
    for fn in (operator.add, torch.softmax, torch.nn.functional.gelu, getattr, torch.matmul):
        name = ops.name_of(fn)
        assert name is not None and ops.resolve(name) is fn
    assert ops.name_of(lambda x: x) is None
    with pytest.raises(KeyError, match="'os.system' is not an allowed operation"):
        ops.resolve("os.system")


@pytest.mark.parametrize("name", sorted(ops.FUNCTIONS))
def test_every_function_entry_is_what_its_name_says_and_harmless(name):
    fn, rule = ops.FUNCTIONS[name]
    namespace, attribute = name.rsplit(".", 1)
    assert getattr(_NAMESPACES[namespace], attribute) is fn
    assert callable(fn) and not isinstance(fn, type) or name in ("builtins.list", "builtins.tuple", "builtins.dict",
                                                                 "builtins.int", "builtins.float", "builtins.bool")
    assert not attribute.startswith("_")
    assert rule in sizes.RULES
    assert not _words(attribute) & _FORBIDDEN, name
    if namespace == "builtins":  # only functions that cannot call back into a value they are given
        assert attribute in {"getattr", "list", "tuple", "dict", "int", "float", "bool", "len", "abs"}


@pytest.mark.parametrize("name", sorted(ops.TENSOR_METHODS))
def test_every_tensor_method_is_a_real_public_method(name):
    assert callable(getattr(torch.Tensor, name)) and not name.startswith("_")
    assert ops.TENSOR_METHODS[name] in sizes.RULES
    assert not _words(name) & _FORBIDDEN, name
    if name.endswith("_"):
        assert ops.is_in_place_method(name)


def test_what_the_old_registry_allowed_is_gone():
    for fn in (torch.save, torch.load, torch.manual_seed, torch.set_num_threads, torch.fork, torch.vmap, torch.cond,
               torch.set_default_dtype, torch.randn, sorted, min, max, sum, eval, exec, open,
               torch.Tensor.__getattribute__, torch.Tensor.__torch_function__, torch.Tensor.__setstate__,
               torch.Tensor.__reduce_ex__, torch.Tensor.register_hook, torch.Tensor.untyped_storage):
        assert ops.name_of(fn) is None, fn
    for method in ("set_", "untyped_storage", "register_hook", "data_ptr", "__reduce_ex__", "__setattr__",
                   "__class__", "numpy", "apply_", "map_", "share_memory_", "resize_", "__getattribute__"):
        assert not ops.allowed_method(method), method
    assert not ops.allowed_attribute("__class__") and not ops.allowed_attribute("_version")
    assert ops.allowed_attribute("logits") and not ops.allowed_attribute("a.b")


def test_in_place_targets():
    assert ops.is_in_place_method("add_") and not ops.is_in_place_method("add")
    assert "operator.setitem" in ops.MUTATING_TARGETS and "operator.iadd" in ops.MUTATING_TARGETS
    assert "operator.invert" not in ops.MUTATING_TARGETS and "operator.add" not in ops.MUTATING_TARGETS


# -- size rules are upper bounds -------------------------------------------------------------------
def _samples():
    """Argument lists to try on every entry; whichever a function accepts is compared with its rule."""
    torch.manual_seed(0)
    a, b = torch.randn(3, 4), torch.randn(4, 5)
    column, row, long = torch.randn(6, 1), torch.randn(1, 7), torch.tensor([0, 2, 1, 2])
    vector, index = torch.randn(4), torch.tensor([[0, 1, 2, 0], [1, 1, 0, 2]])
    return [
        (a,), (a, b), (a, a), (column, row), (a, 1), (a, 0), (a, -1), (a, 2), (a, long), (a, (2, 3)), (a, 3, 2),
        (a, 0, long[:2]), (long, a), (long, 3), (long,), ([a, a],), ((a, a),), ((2, 3),), (2, 3), (5,),
        (0.0, 1.0, 7), (3, 5), (a, a > 0), (a > 0, a, a), (a, (0, 1)), (a, 1, 0, 2), (column, row, row),
        (a, a, a), (torch.randn(2, 3, 4), torch.randn(2, 4, 5)), (vector,), (vector, vector), (a, vector),
        (a, 0, 1), (a, a > 0, 0.0), (a, 3, 4), (a, 1, (2, 2)), (a, (4,)), ((2, 3), 1.0), (torch.randn(3, 5), a, b),
        (a, 0, index), (a, 0, index, torch.randn(2, 4)), (a, 0, long[:2], torch.randn(2, 4)), (a, 0, long[:2], 1.0),
    ]


def _checked(fn, rule, as_method: bool):
    limits, tried = Limits(), 0
    for args in _samples():
        if as_method and not isinstance(args[0], torch.Tensor):
            continue
        try:
            result = fn(*args)
        except Exception:
            continue
        bound = sizes.RULES[rule](args, {}, limits, fn)
        bound = bound[0] if isinstance(bound, tuple) else bound  # (elements, floating point operations)
        assert bound >= sizes.elements(result) // 2, (fn, args)  # rules bound within a factor of 2
        tried += 1
    return tried


def test_size_rules_bound_what_the_calls_really_make():
    tried = untried = 0
    for name, (fn, rule) in ops.FUNCTIONS.items():
        if name.startswith("torch"):
            if _checked(fn, rule, False):
                tried += 1
            else:
                untried += 1
    for name, rule in ops.TENSOR_METHODS.items():
        if name in ("backward", "requires_grad_", "retain_grad", "cuda"):
            continue
        if _checked(getattr(torch.Tensor, name), rule, True):
            tried += 1
        else:
            untried += 1
    assert tried > 4 * untried, (tried, untried)


def test_growth_is_seen_before_it_happens():
    limits = Limits()
    x = torch.randn(1000)
    assert sizes.RULES["broadcast"]((x[:, None], x[None, :]), {}, limits, torch.add) == 1_000_000
    assert sizes.RULES["matmul"]((x[:, None], x[None, :]), {}, limits, torch.matmul) == (1_000_000, 2_000_000)
    big = torch.empty(8192, 8192, device="meta")  # (elements, floating point operations) of a matrix product
    assert sizes.RULES["matmul"]((big, big), {}, limits, torch.matmul) == (8192**2, 2 * 8192**3)
    square = torch.zeros(200, 200)  # ab x cd is an outer product of 200^4 before bd contracts it
    assert sizes.RULES["meta"](("ab,cd,bd->ac", square, square, square), {}, limits, torch.einsum)[0] == 200**4
    assert sizes.RULES["size"]((torch.tensor(2**20), torch.tensor(2**20)), {}, limits, torch.zeros) == 2**40
    assert sizes.RULES["eye"]((1, torch.tensor(2**30)), {}, limits, torch.eye) == 2**30
    assert sizes.RULES["index"]((torch.randn(10, 10), torch.zeros(500, dtype=torch.long)), {}, limits, None) == 5000
    assert sizes.RULES["size"]((2**20, 2**20), {}, limits, torch.zeros) == 2**40
    assert sizes.RULES["range"]((0, 1e12), {}, limits, torch.arange) == 10**12
    assert sizes.RULES["repeat"]((x, 1000, 1000), {}, limits, torch.Tensor.repeat) == 10**9
    assert sizes.RULES["expand"]((x[:, None], -1, 10**6), {}, limits, torch.Tensor.expand) == 10**9
    assert sizes.RULES["repeat_interleave"]((x, torch.tensor(10**6)), {}, limits, torch.repeat_interleave) == 10**9
    with pytest.raises(LimitError, match="max_pieces"):
        sizes.RULES["pieces"]((x, 1), {}, Limits(max_pieces=10), torch.split)


def test_the_broadcast_rule_is_torchs_broadcast_shape():
    """The rule works the shape out itself (torch.broadcast_shapes is slow); every shape pair and triple
    over sizes 0..2 and up to 3 dimensions agrees with torch, and shapes that do not broadcast fall
    back to the largest argument (the call itself then fails)."""
    import itertools

    shapes = [shape for dims in range(4) for shape in itertools.product(range(3), repeat=dims)]
    for group in itertools.chain(itertools.combinations(shapes, 2), itertools.combinations(shapes[:20], 3)):
        args = tuple(torch.empty(shape) for shape in group)
        try:
            want = torch.broadcast_shapes(*group).numel()
        except RuntimeError:
            want = max(arg.numel() for arg in args)
        assert sizes.RULES["broadcast"](args, {}, Limits(), torch.add) == want, group
