"""The state of a model and of torch a run could change, and how to put it back.

`ModelState` is a snapshot of everything about a model a run could change (parameters, buffers,
`requires_grad`, `.grad`, hooks, instance `forward`, training flags) and of torch's global state;
`restore()` puts it back and `diff()` says what changed (the tests use it on every hostile graph).
`global_state` / `restore_global_state` and `Attachments` (hooks and instance attributes a forward
may add for good, as transformers' output-capturing hooks do) are the cheap part an untrusted run
restores every time; `initialized_memory` fills the memory an untrusted run's operations allocate.
"""

from __future__ import annotations

import threading

import torch
from torch.utils.hooks import RemovableHandle

from ..source import rewrite_attributes, rewritten_forward
from .tree import ModelTree, tables_of


_HOOK_TABLES = (
    "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
    "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs",
    "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)


class Attachments:
    """What a run could attach to the modules of `root` or set on them and leave there: hooks, instance
    attributes, parameters and buffers.

    transformers installs output-capturing hooks on every layer (and flags the model) the first time a
    forward is asked for `output_attentions`, and leaves them; a dynamic RoPE's forward registers a new
    `inv_freq` buffer and sets `max_seq_len_cached` for a long prompt, which later calls then use (another
    job's numbers would depend on this one's prompt). `restore()` takes off what was added and puts back
    what was replaced, by identity: each module's instance dict and its parameter and buffer tables are
    copied (shallow: ~0.5 ms for 400 modules). Hook ids only grow (`RemovableHandle.next_id`), so a hook
    added since is one with a larger id (and when the only ids handed out since are the caller's own
    hooks', no hook table needs a look).

    >>> net = torch.nn.Linear(2, 2)
    >>> attachments = Attachments(net)
    >>> handle = net.register_forward_hook(lambda *a: None); net.flag = True; net.in_features = 3
    >>> attachments.changes()
    ["<root>: instance attribute 'flag' added", "<root>: instance attribute 'in_features' changed", \
'<root>: _forward_hooks added']
    >>> attachments.restore(); attachments.changes(), net.in_features
    ([], 2)
    """

    _TABLES = ("instance attribute", "parameter", "buffer")

    def __init__(self, root: torch.nn.Module, *, carried: bool = False):
        """carried: (an untrusted run's) a held model's copies may be those the last such run left (see tree.py),
        and are left for the next one when this run changed nothing."""
        self.first_id = RemovableHandle.next_id  # hooks registered from now on have ids from here
        self.tree = ModelTree.of(root)
        # every module's instance dict, the root's first (the tree holds none of the root's: see tree.py)
        self.attributes = [vars(root), *self.tree.attributes]
        self.tables = [*tables_of(self.attributes[0]), *self.tree.tables]
        self.carried = carried and self.tree.held
        kept = self.tree.copies if self.carried else None
        self.copies = kept if kept is not None else list(map(dict.copy, self.tables))
        self.clean = False  # (set by _changed: nothing changed)

    def _changed(self, own: int = 0):
        """(module name, what, the table, its copy, the keys added, the keys replaced) for every instance dict,
        parameter or buffer table and hook table a run changed. own: how many hooks the caller registered
        since (and takes off itself): those need no look."""
        hooked = RemovableHandle.next_id - self.first_id > own
        changed = not _same(self.tables, self.copies)
        self.clean = not changed and not hooked
        if self.clean:
            return
        names = ["<root>", *(name for name, _ in self.tree.modules)]
        for number, (name, attributes) in enumerate(zip(names, self.attributes)):
            mine = slice(3 * number, 3 * number + 3) if changed else slice(0)
            for table, copy, what in zip(self.tables[mine], self.copies[mine], self._TABLES):
                # (but a `.source` rewrite's: part of the model once made)
                rewrite = rewrite_attributes(attributes) if table is attributes else ()
                added = [key for key in table if key not in copy and key not in rewrite]
                replaced = [key for key, value in copy.items() if table.get(key, _MISSING) is not value
                            and key not in rewrite]
                if added or replaced:
                    yield name, what, table, copy, added, replaced
            if not hooked:
                continue
            for label in _HOOK_TABLES:
                hooks = attributes.get(label)
                if hooks:
                    keys = [key for key in hooks if type(key) is int and key >= self.first_id]
                    if keys:
                        yield name, label, hooks, {}, keys, []

    def changes(self) -> list[str]:
        changes = []
        for name, what, _, _, added, replaced in self._changed():
            if what in self._TABLES:
                changes += [f"{name}: {what} {key!r} added" for key in added]
                changes += [f"{name}: {what} {key!r} changed" for key in replaced]
            else:
                changes.append(f"{name}: {what} added")
        return changes

    def restore(self, own: int = 0) -> None:
        """Take off what was added and put back what was replaced; `own`: as for `_changed` (the caller's hooks
        may then stay)."""
        for _, _, table, copy, added, replaced in list(self._changed(own)):
            for key in added:
                del table[key]
            for key in replaced:
                table[key] = copy[key]
        if self.carried:
            self.tree.copies = self.copies if self.clean else None


_MISSING = object()


def _same(tables: list[dict], copies: list[dict]) -> bool:
    """Whether every table holds what its copy does, compared in one C call: a value that is the same object
    is equal without its `__eq__` being called."""
    try:
        return tables == copies
    except Exception:  # a value replaced by one whose == gives no bool (a tensor's): changed
        return False


class _InitializedMemory:
    """`with initialized_memory:` the kernels that hand out memory without writing it (`torch.empty`, `new_empty`,
    `empty_like`, a growing `resize_`, whatever calls them) fill it: NaN, or an integer type's largest value.
    Otherwise a graph's `torch.empty(n)` holds what the allocator last freed: another user's activations from the
    job before (on a GPU, the caching allocator hands those blocks straight back). Which kernels those are is
    torch's own knowledge: its deterministic mode fills them (`torch.utils.deterministic.fill_uninitialized_memory`),
    warning only, not failing, where an operation has no deterministic kernel; the mode is set around the graph's
    operations, not the model's own forward.

    The mode is one flag for the whole process, and a server runs each of its models in a thread of its own: it
    is set when the first run enters and put back when the last one leaves, so that one run leaving cannot turn
    it off under another's operations; `global_state` and `restore_global_state` read and set the flag as it is
    outside them. (torch's own setters, `use_deterministic_algorithms` and
    `set_deterministic_debug_mode`, are the flag's setter wrapped: the first imports the compiler, ~4 s.)"""

    def __init__(self):
        self.lock = threading.Lock()
        self.runs = 0  # inside it now
        self.before = (False, False)  # the flag and its warn_only as the first of them found them

    def __enter__(self) -> None:
        with self.lock:
            if not self.runs:
                self.before = (torch._C._get_deterministic_algorithms(),
                               torch._C._get_deterministic_algorithms_warn_only())
                torch._C._set_deterministic_algorithms(True, warn_only=True)
            self.runs += 1

    def __exit__(self, *exception) -> None:
        with self.lock:
            self.runs -= 1
            if not self.runs:
                on, warn_only = self.before
                torch._C._set_deterministic_algorithms(on, warn_only=warn_only)

    def outside(self) -> tuple[bool, bool]:
        """The flag and its warn_only as the process has them outside the runs' operations."""
        with self.lock:
            if self.runs:
                return self.before
            return torch._C._get_deterministic_algorithms(), torch._C._get_deterministic_algorithms_warn_only()

    def put_back(self, flags: tuple[bool, bool]) -> None:
        """Make `flags` what the process has outside the runs' operations: now, or as the last run leaves."""
        with self.lock:
            if self.runs:
                self.before = flags
            else:
                torch._C._set_deterministic_algorithms(flags[0], warn_only=flags[1])


initialized_memory = _InitializedMemory()


def global_state() -> dict:
    """torch's process-wide settings a graph could change."""
    state = {
        "grad_enabled": torch.is_grad_enabled(),
        "default_dtype": torch.get_default_dtype(),
        "deterministic": initialized_memory.outside(),  # (on, warn_only)
        "anomaly": torch.is_anomaly_enabled(),
    }
    for device in ("cpu", "cuda"):
        state[f"autocast_{device}"] = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
    return state


class ModelState:
    """Everything about `root` (and torch's global state) a run could change, and how to restore it.

    >>> net = torch.nn.Linear(2, 2)
    >>> state = ModelState(net)
    >>> net.weight.requires_grad_(False) is net.weight
    True
    >>> state.diff()
    ['weight: requires_grad True -> False']
    >>> state.restore(); state.diff()
    []
    """

    def __init__(self, root: torch.nn.Module, *, values: bool = True):
        self.root = root
        self.attachments = Attachments(root)
        self.modules = [(name, module, module.__dict__.get("forward"), module.training,
                         {table: dict(getattr(module, table, {}) or {}) for table in _HOOK_TABLES})
                        for name, module in root.named_modules(remove_duplicate=False)]
        self.tensors = []
        for name, module in root.named_modules(remove_duplicate=False):
            for table in (module._parameters, module._buffers):
                for key, tensor in table.items():
                    if tensor is None:
                        continue
                    copy = tensor.detach().clone() if values and tensor.device.type != "meta" else None
                    hooks = dict(tensor._backward_hooks or {})
                    self.tensors.append((f"{name}.{key}".lstrip("."), table, key, tensor, tensor.requires_grad,
                                         tensor.grad, hooks, copy))
        self.globals = global_state()

    def diff(self) -> list[str]:
        """What differs from the snapshot, one line each (empty when nothing does)."""
        changes = [line for line in self.attachments.changes()  # (hooks, forward and weights: compared below)
                   if line.split(": ", 1)[1].startswith("instance attribute") and "'forward'" not in line]
        for name, module, forward, training, hooks in self.modules:
            if module.__dict__.get("forward") not in (forward, rewritten_forward(module)):
                changes.append(f"{name or '<root>'}: instance forward changed")
            if module.training != training:
                changes.append(f"{name or '<root>'}: training {training} -> {module.training}")
            for table, before in hooks.items():
                if dict(getattr(module, table, {}) or {}) != before:
                    changes.append(f"{name or '<root>'}: {table} changed")
        for name, table, key, tensor, requires_grad, grad, hooks, copy in self.tensors:
            if table.get(key) is not tensor:
                changes.append(f"{name}: replaced")
            if tensor.requires_grad != requires_grad:
                changes.append(f"{name}: requires_grad {requires_grad} -> {tensor.requires_grad}")
            if tensor.grad is not grad:
                changes.append(f"{name}: .grad changed")
            if dict(tensor._backward_hooks or {}) != hooks:
                changes.append(f"{name}: tensor hooks changed")
            if copy is not None and not _same_bits(tensor, copy):
                changes.append(f"{name}: values changed")
        now = global_state()
        changes += [f"torch global {key}: {value} -> {now[key]}" for key, value in self.globals.items() if now[key] != value]
        return changes

    def restore(self) -> None:
        self.attachments.restore()
        ModelTree.of(self.root).forget_reads()  # (the weights' counters move below)
        for _, module, forward, training, hooks in self.modules:
            forward = forward or rewritten_forward(module)  # a `.source` rewrite stays: it is part of the model
            if forward is None:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = forward
            module.training = training
            for table, before in hooks.items():
                current = getattr(module, table, None)
                if current is not None and dict(current) != before:
                    current.clear()
                    current.update(before)
        with torch.no_grad():
            for _, table, key, tensor, requires_grad, grad, hooks, copy in self.tensors:
                table[key] = tensor
                tensor.requires_grad_(requires_grad)
                tensor.grad = grad
                if tensor._backward_hooks is not None and dict(tensor._backward_hooks) != hooks:
                    tensor._backward_hooks.clear()
                    tensor._backward_hooks.update(hooks)
                if copy is not None and not _same_bits(tensor, copy):
                    tensor.copy_(copy)
        restore_global_state(self.globals)


def restore_global_state(state: dict) -> None:
    """Put back the settings of `state` that differ now (setting them all costs ~100 us)."""
    now = global_state()
    if now["grad_enabled"] != state["grad_enabled"]:
        torch.set_grad_enabled(state["grad_enabled"])
    if now["default_dtype"] != state["default_dtype"]:
        torch.set_default_dtype(state["default_dtype"])
    if now["deterministic"] != state["deterministic"]:
        initialized_memory.put_back(state["deterministic"])
    if now["anomaly"] != state["anomaly"]:
        torch.set_anomaly_enabled(state["anomaly"])
    for device in ("cpu", "cuda"):
        key = f"autocast_{device}"
        if now[key] != state[key]:
            torch.set_autocast_enabled(device, state[key][0])
            torch.set_autocast_dtype(device, state[key][1])


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a, b = a.detach().contiguous().reshape(-1), b.contiguous().reshape(-1)
    if a.dtype.is_floating_point or a.dtype.is_complex:
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return torch.equal(a, b)
