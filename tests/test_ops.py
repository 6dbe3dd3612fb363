"""The op registry: stable names both ways, and what it allows."""

import operator

import torch

from interlace import ops


def test_names_round_trip():
    for fn in (operator.add, torch.softmax, torch.nn.functional.gelu, torch.Tensor.sum, getattr):
        name = ops.name_of(fn)
        assert name is not None and ops.resolve(name) is fn
    assert ops.name_of(lambda x: x) is None


def test_whitelist():
    assert ops.allowed_method("sum") and ops.allowed_method("append")
    assert not ops.allowed_method("__reduce__") and not ops.allowed_method("_private")
    assert not ops.allowed_attribute("__class__") and ops.allowed_attribute("logits")
    assert ops.is_in_place_method("add_") and not ops.is_in_place_method("add")
    assert "operator.setitem" in ops.MUTATING_TARGETS and "operator.iadd" in ops.MUTATING_TARGETS
    assert not ops.is_registered("os.system")


def test_dangerous_callables_are_not_registered():
    for fn in (torch.save, torch.load, torch.manual_seed, torch.set_num_threads):
        assert ops.name_of(fn) is None
    for method in ("set_", "untyped_storage", "register_hook", "data_ptr"):
        assert not ops.allowed_method(method)
