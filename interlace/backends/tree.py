"""A model's modules and weights, listed once per model rather than walked on every run.

Every run asks the same questions of the model: which storages hold weights (a local write to one is
copied first; a saved weight is copied out), and, in an untrusted run, every weight's version counter,
every module's hooks and attributes, and its module paths. Walking a model to answer them costs ~1 ms
a run on SmolLM2 (300 modules); `ModelTree.of(root)` lists them once, and again only when the lists may
be out of date: after a parameter, buffer or module was registered on one of a listed model's modules
(torch's registration hooks, which every `module.x = ...` and `register_*` goes through; not those of
modules made on the way, such as the `ModuleList` a Llama forward slices from its layers on every
call), or when the model was moved or cast (its first weight's storage changed). A storage lookup is
checked against the weight itself, so a stale entry never answers for other memory.

A model a server hosts is `hold`-ed: nothing but the runs of interlace changes it. Its tree then keeps what the
untrusted runs' second line (`writes.Versions`, `state.Attachments`) read at the end of the last run that changed
nothing, and the next run starts from that rather than reading every weight's counter and copying every module's
tables again (on SmolLM2, ~0.45 ms of cold memory a run: after a forward through 540 MB of weights, each object
read is a miss). What interlace itself changes between runs drops them (a local run that put a weight back, a
`ModelState.restore`); a new tree starts without them.

>>> net = torch.nn.Linear(2, 2)
>>> tree = ModelTree.of(net)
>>> tree.holds(net.weight[0].untyped_storage().data_ptr()), tree.holds(torch.ones(2).data_ptr())
(True, False)
>>> [name for name, _ in tree.weights], ModelTree.of(net) is tree
(['weight', 'bias'], True)
"""

from __future__ import annotations

import itertools
import weakref

import torch


class ModelTree:
    """The modules and weights of `root`, as they were when listed (see the module docstring)."""

    _cache: "weakref.WeakKeyDictionary[torch.nn.Module, ModelTree]" = weakref.WeakKeyDictionary()
    _members: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()  # the modules of every listed tree
    _held: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()  # the roots `hold` was called with
    _epoch = itertools.count(1)  # bumped on every registration of a parameter, buffer or module on a member
    epoch = 0

    def __init__(self, root: torch.nn.Module):
        self.epoch = ModelTree.epoch
        # every (path, module) below the root, a module shared by two paths under both (its hooks are looked at
        # once each). Nothing here holds the root or its instance dict: the cache of trees is the module's, and a
        # tree that held its key would keep every model ever traced alive (a `.source` rewrite puts a method of
        # the module in its instance dict). Its children do not hold it.
        everything = root.named_modules(remove_duplicate=False)
        self.modules = [(path, module) for path, module in everything if module is not root]
        self.by_path = dict(self.modules)
        self.attributes = [vars(module) for _, module in self.modules]  # each module's instance dict (itself)
        # what a run may change on a module in place: its instance dict, parameter table and buffer table (state.py;
        # the root's, `tables_of(root)`, are read there)
        self.tables = [table for attributes in self.attributes for table in tables_of(attributes)]
        ModelTree._members.add(root)
        ModelTree._members.update(module for _, module in self.modules)
        self.weights: list[tuple[str, torch.Tensor]] = []  # (name, tensor): every parameter and buffer once
        self.tensors: dict[int, torch.Tensor] = {}  # data_ptr -> a weight with that storage
        self.by_storage: dict[int, list[int]] = {}  # data_ptr -> the numbers in `weights` of those in it
        self.buffers: list[int] = []  # the numbers in `weights` of the buffers
        self.buffer_copies: dict[int, tuple[int, torch.Tensor]] = {}  # number -> (version, copy): writes.Versions
        seen, names = set(), set()
        for prefix, module in [("", root), *self.modules]:
            for table in (module._parameters, module._buffers):
                for key, tensor in table.items():
                    if tensor is None:
                        continue
                    name = f"{prefix}.{key}".lstrip(".")
                    names.add(name)
                    if id(tensor) in seen:
                        continue
                    seen.add(id(tensor))
                    if tensor.device.type != "meta" and tensor.numel():
                        pointer = tensor.untyped_storage().data_ptr()
                        self.tensors.setdefault(pointer, tensor)
                        self.by_storage.setdefault(pointer, []).append(len(self.weights))
                    if table is module._buffers:
                        self.buffers.append(len(self.weights))
                    self.weights.append((name, tensor))
        self.weight_names = frozenset(names)  # every name a weight has (a tied one has several)
        self.weight_tensors = [tensor for _, tensor in self.weights]  # (read in one pass: `writes.Versions`)
        self.held = root in ModelTree._held
        self.versions: list[int] | None = None  # held: the counters after the last untrusted run, if clean
        self.copies: list[dict] | None = None  # held: copies of `tables` as the last untrusted run left them
        self.first = next(iter(self.tensors.items()), None)  # (pointer, tensor): moved when the model is
        self.rehearsals: dict[tuple, tuple] = {}  # module calls, by shapes (`Guard.before_module_call`)
        self.pure_calls: dict[tuple, None] = {}  # function calls seen to declare no write, by shapes (`Guard.call`)

    @classmethod
    def of(cls, root: torch.nn.Module) -> "ModelTree":
        tree = cls._cache.get(root)
        if tree is None or tree.stale():
            tree = cls._cache[root] = cls(root)
        return tree

    @classmethod
    def hold(cls, root: torch.nn.Module, held: bool = True) -> None:
        """Nothing but interlace's runs will change `root` from now on (see the module docstring); `held=False`
        undoes it (other code may change it again)."""
        (cls._held.add if held else cls._held.discard)(root)
        tree = cls._cache.get(root)
        if tree is not None:
            tree.held = held
            tree.forget_reads()

    def forget_reads(self) -> None:
        """Interlace changed the model outside an untrusted run: the next one reads everything again."""
        self.versions = self.copies = None

    def stale(self) -> bool:
        if self.epoch != ModelTree.epoch:
            return True
        return self.first is not None and self.first[1].untyped_storage().data_ptr() != self.first[0]

    def holds(self, pointer: int) -> bool:
        """Whether the storage at `pointer` is a weight's."""
        tensor = self.tensors.get(pointer)
        return tensor is not None and tensor.untyped_storage().data_ptr() == pointer


def tables_of(attributes: dict) -> tuple[dict, dict, dict]:
    """A module's tables a run may change in place, from its instance dict: that dict, `_parameters`, `_buffers`."""
    return attributes, attributes["_parameters"], attributes["_buffers"]


def _registered(module, *_):
    if module in ModelTree._members:
        ModelTree.epoch = next(ModelTree._epoch)


for _register in (torch.nn.modules.module.register_module_parameter_registration_hook,
                  torch.nn.modules.module.register_module_buffer_registration_hook,
                  torch.nn.modules.module.register_module_module_registration_hook):
    _register(_registered)
