"""Envoy: the mirror of one `nn.Module` that users reach into during a trace.

`envoy.output`, `.input` and `.inputs` record reads of the module's values; assigning to them records
a replacement; `.next()` moves to the module's next call (a later generation step), `.skip(value)`
makes the module not run, and calling an envoy runs its module on traced values. Child modules are
attributes (`net.layer1`) and items (`net.layers[3]`), exactly as in the wrapped module.
"""

from __future__ import annotations

import copy
import difflib
import weakref

import torch

from .errors import InterlaceError, ModulePathError
from .source import SOURCE, rewrite, source_of


_OWN_FIELDS = frozenset({"_children", "_module", "_root", "_path", "_aliases"})

# An envoy keeps the envoys it hands out for `envoy.name` in its instance dict, where Python finds them without
# a call to __getattr__ (30 ns, not 650: most of that is the failed lookup before it). torch calls its global
# module registration hooks whenever a module's child is set (`module.name = new`, `register_module`,
# `ModuleList[i] = new`, `= None`), and on that the envoys of that module drop what they keep for the name;
# `del envoy.name` drops it too. (A child deleted by `del module.name` on the torch module itself leaves its
# envoy readable: the paths it records then fail when the trace runs, naming the path.)
_mirrors: "weakref.WeakKeyDictionary[torch.nn.Module, weakref.WeakValueDictionary[int, Envoy]]" = (
    weakref.WeakKeyDictionary())  # module -> its envoys that keep children, by id


def _forget_child(module, name, submodule) -> None:
    envoys = _mirrors.get(module)
    if envoys is not None:
        for ref in envoys.valuerefs():  # (a list made in one step: another thread may add to it meanwhile)
            envoy = ref()
            if envoy is not None and name in vars(envoy):
                _drop_kept(envoy, (name,))


torch.nn.modules.module.register_module_module_registration_hook(_forget_child)


def _keep(envoy: "Envoy", name: str, found: "Envoy") -> None:
    """Keep `found` (an envoy) in `envoy`'s instance dict for `envoy.name`, which its module's changes drop."""
    _mirrors.setdefault(envoy._module, weakref.WeakValueDictionary())[id(envoy)] = envoy
    envoy.__dict__[name] = found


def _drop_kept(envoy: "Envoy", names=None) -> None:
    """Drop what `envoy` keeps (see _keep) under `names` (default: all): the entries of its instance dict that
    are its child or alias of that name, not an attribute set by hand."""
    attributes = vars(envoy)
    children, aliases = attributes.get("_children", {}), attributes.get("_aliases", {})
    for name in [name for name in (attributes if names is None else names)
                 if attributes[name] is children.get(name, _ABSENT) or attributes[name] is aliases.get(name, _ABSENT)]:
        del attributes[name]


_ABSENT = object()


def _reader(kind: str):
    """The getter of `envoy.output` (`kind`): the value, recorded by the open trace (one call: the commonest read)."""

    def read(envoy: "Envoy"):
        tracer = envoy._root._tracer
        return (tracer if tracer is not None else envoy._active(kind)).module_value(envoy, kind)

    return read


class Envoy:
    """Mirror of a module and its children.

    >>> import torch, interlace
    >>> net = interlace.Model(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()))
    >>> net[1].path
    '1'
    """

    def __init__(self, module: torch.nn.Module, path: str = "", root: "Envoy | None" = None):
        set_ = object.__setattr__
        set_(self, "_module", module)
        set_(self, "_path", path)
        set_(self, "_root", root if root is not None else self)
        set_(self, "_call", None)  # the call chosen with at_call() (None: the current one, see .next())
        set_(self, "_tracer", None)  # set on the root while a trace records
        set_(self, "_aliases", {})  # from Model(rename=...)
        set_(self, "_children", {name: self._child_envoy(name, child) for name, child in module.named_children()})

    def _child_envoy(self, name: str, module: torch.nn.Module) -> "Envoy":
        return Envoy(module, f"{self._path}.{name}" if self._path else name, self._root)

    def _child(self, name: str) -> "Envoy | None":
        """The envoy of child `name`, made now for a module attached after this envoy was built."""
        child = self._children.get(name)
        module = self._module._modules.get(name)
        if module is None and name == SOURCE:
            module = source_of(self._module)  # the points of a rewritten forward
        if module is None:
            return None
        if child is None or child._module is not module:
            child = self._children[name] = self._child_envoy(name, module)
        return child

    # -- tree -------------------------------------------------------------------------------
    @property
    def path(self) -> str:
        """The module's path as in `named_modules()` ('' for the root)."""
        return self._path

    @property
    def module(self) -> torch.nn.Module:
        return self._module

    def modules(self):
        """This envoy and every envoy below it, depth first."""
        yield self
        for name in self._names():
            yield from self._child(name).modules()

    def get(self, path: str) -> "Envoy":
        """The envoy at a dotted module path (`'layers.3.mlp'`)."""
        envoy = self
        for part in filter(None, path.split(".")):
            child = envoy._child(part)
            if child is not None:
                envoy = child
            elif part in envoy._aliases:
                envoy = envoy._aliases[part]
            else:
                raise ModulePathError(_missing_child(envoy, part))
        return envoy

    def __getattr__(self, name: str):
        # (not set yet while an envoy is made or copied: looking them up here would come back here)
        if name[:1] == "_" and (name in _OWN_FIELDS or name.startswith("__")):
            raise AttributeError(name)
        child = self._child(name)
        if child is None:
            child = self._aliases.get(name)
        if isinstance(child, Envoy):
            _keep(self, name, child)  # (the next `envoy.name` does not come here)
            return child
        if child is not None:  # (an alias to several modules: a list)
            return child
        tracer = self._root._tracer
        module = self._module
        if tracer is not None and (name in module._parameters or name in module._buffers):
            full = f"{self._path}.{name}" if self._path else name
            return tracer.record("parameter", full)
        try:
            return getattr(module, name)
        except AttributeError:
            raise ModulePathError(_missing_child(self, name)) from None

    def __setattr__(self, name: str, value) -> None:
        """`envoy.sae = SAE()` attaches a module to the wrapped one, traceable like any other."""
        if isinstance(value, torch.nn.Module) and not name.startswith("_"):
            setattr(self._module, name, value)
        else:
            object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        """`del envoy.sae` detaches a module attached with `envoy.sae = ...`."""
        if not name.startswith("_") and name in self._module._modules:
            delattr(self._module, name)
            _forget_child(self._module, name, None)
        else:
            object.__delattr__(self, name)

    def __getitem__(self, key):
        if type(key) is int and isinstance(self._module, torch.nn.ModuleList):
            # a ModuleList names its children '0'..'n-1' in order: no list of names to build per access
            modules = self._module._modules
            size = len(modules)
            if -size <= key < size:
                name = str(key + size if key < 0 else key)
                child = self._children.get(name)
                if child is not None and child._module is modules.get(name):
                    return child  # (the commonest read, `layers[i]`, without a call to _child)
                child = self._child(name)
                if child is not None:
                    return child
        names = self._names()
        if isinstance(key, int):
            try:
                return self._child(names[key])
            except IndexError:
                raise ModulePathError(
                    f"{self._path or 'the model'} has {len(names)} children; index {key} is out of range (use 0 to "
                    f"{len(names) - 1}, or -{len(names)} to -1 from the end)"
                ) from None
        if isinstance(key, str):
            return self.get(key)
        if isinstance(key, slice):  # `model.layers[2:5]`: those children's envoys, in a list
            return [self._child(name) for name in names[key]]
        raise ModulePathError(f"index a module with an int, a slice or a path string, not {type(key).__name__}")

    def __len__(self) -> int:
        return len(self._names())

    def __iter__(self):
        return iter([self._child(name) for name in self._names()])

    def _names(self) -> list[str]:
        return [name for name, module in self._module._modules.items() if module is not None]

    def __repr__(self) -> str:
        return repr(self._module)

    def __str__(self) -> str:
        return str(self._module)  # a Source prints its code with each point's name

    @property
    def source(self) -> "Envoy":
        """Every call site in this module's forward as a named point with `.input`, `.inputs` and
        `.output`, like a module: `attn.source.softmax_0.output`. The forward is rewritten on first
        use (outside a trace it computes exactly what it did); `print(attn.source)` shows the code with
        each point's name. On a point that calls a Python function, `.source` goes into that function."""
        if SOURCE not in self._module._modules:  # else the module's own child named 'source'
            rewrite(self._module, self._path or "the model")
        return self._child(SOURCE)

    # -- values -----------------------------------------------------------------------------
    def _active(self, what: str):
        tracer = self._root._tracer
        if tracer is None:
            raise InterlaceError(
                f"`{self._path or 'model'}.{what}` exists only inside `with model.trace(...)` "
                "(or `model.generate(...)`): the module's values are produced when the model runs."
            )
        return tracer

    def _replace(self, kind: str, value) -> None:
        tracer = self._active(kind)
        tracer.record("swap", None, (tracer.module_value(self, kind), value))

    output = property(_reader("output"), lambda self, v: self._replace("output", v))
    output.__doc__ = "The module's output; assign to replace it."
    input = property(_reader("input"), lambda self, v: self._replace("input", v))
    input.__doc__ = "The module's first input (first positional argument, else first keyword)."
    inputs = property(_reader("inputs"), lambda self, v: self._replace("inputs", v))
    inputs.__doc__ = "All inputs of the call as `(args, kwargs)`; assign a pair to replace them."

    def next(self, steps: int = 1) -> "Envoy":
        """Move this module to its next call (the next generation step); returns the envoy."""
        self._active("next()").advance(self._path, steps)
        return self

    def at_call(self, call: int) -> "Envoy":
        """This module at its `call`-th call in the forward (0-based), e.g. a module run twice."""
        view = copy.copy(self)
        view._call = call
        return view

    def __copy__(self) -> "Envoy":
        """A shallow copy (an `at_call` view, `Model._copy`) without what this envoy keeps (see _keep): the copy
        looks its children up again, and keeps them where its module's changes reach it."""
        copied = object.__new__(type(self))
        copied.__dict__.update(self.__dict__)
        _drop_kept(copied)
        return copied

    def _point_at(self, module: torch.nn.Module) -> None:
        """Mirror `module` from now on (the same module loaded: LanguageModel.dispatch)."""
        self._module = module
        _drop_kept(self)

    def skip(self, value) -> None:
        """Do not run this module in this call; `value` is used as its output."""
        tracer = self._active("skip()")
        call, invoke = tracer.call_index(self), tracer.current_invoke
        tracer.record("skip", self._path, (value,), {"call": call, "invoke": invoke})

    def __call__(self, *args, hook: bool = False, **kwargs):
        """Run the module on (traced) values. hook=True runs it through its hooks, so the values of
        it and its submodules in this call can be read and changed like any other module's."""
        tracer = self._root._tracer
        if tracer is None:
            return self._module(*args, **kwargs)
        return tracer.record("module_call", self._path, args, {**kwargs, "hook": True} if hook else kwargs)

    # -- the module's own methods that return it: here they return the envoy, to chain calls -------
    def to(self, *args, **kwargs) -> "Envoy":
        self._module.to(*args, **kwargs)
        return self

    def cuda(self, device=None) -> "Envoy":
        return self.to("cuda" if device is None else device)

    def cpu(self) -> "Envoy":
        return self.to("cpu")

    def float(self) -> "Envoy":
        return self.to(torch.float32)

    def half(self) -> "Envoy":
        return self.to(torch.float16)

    def bfloat16(self) -> "Envoy":
        return self.to(torch.bfloat16)

    def train(self, mode: bool = True) -> "Envoy":
        self._module.train(mode)
        return self

    def eval(self) -> "Envoy":
        return self.train(False)

    def requires_grad_(self, requires_grad: bool = True) -> "Envoy":
        self._module.requires_grad_(requires_grad)
        return self


def _missing_child(envoy: Envoy, name: str) -> str:
    where = envoy._path or "the model"
    children = ", ".join(envoy._names()) or "none"
    # an envoy's own names too: `.outputs` most likely meant `.output`
    attributes = [attribute for attribute in dir(type(envoy)) if not attribute.startswith("_")]
    close = difflib.get_close_matches(name, envoy._names() + attributes, n=3)
    if close:
        children += f" (closest to '{name}': {', '.join(close)})"
    return (
        f"{where} ({type(envoy._module).__name__}) has no submodule or attribute '{name}'. "
        f"Its submodules are: {children}.{_deeper(envoy, name)}{_STEP_VERBS.get(name, '')} Print the model to see "
        "the whole tree."
    )


# nnsight 0.4's per-module step verbs, which here are the tracer's blocks
_STEP_VERBS = {
    "all": " To apply lines to every generation step, put them in a `with tracer.all():` block.",
    "iter": " To apply lines to chosen generation steps, put them in a `with tracer.iter[a:b]:` block.",
}


def _deeper(envoy: Envoy, name: str) -> str:
    """Where modules called `name` are further down (`lm.norm`: `model.norm`), and the names given to them
    (`ln_final`, a standardized name): what someone used to another model or library most likely meant."""
    if name.startswith("_"):  # (private names: asked by getattr(..., default) in code, never a module's)
        return ""
    below = [path for path, _ in envoy._module.named_modules() if path.rpartition(".")[2] == name][:3]
    if not below:
        return ""
    prefix = f"{envoy._path}." if envoy._path else ""
    found = ", ".join(prefix + path for path in below)
    named = [alias for alias, target in envoy._aliases.items()
             if isinstance(target, Envoy) and target._path in {prefix + path for path in below}]
    return f" A module called '{name}' is at {found}" + (f", named {', '.join(named)} here." if named else ".")
