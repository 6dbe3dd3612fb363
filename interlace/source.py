"""Source points: every call site inside a module's forward, as a named module of its own.

`rewrite(module)` parses the class's `forward` with `ast`, makes every call in it go through a
`Point` named after what it calls (`q_proj_0`, `softmax_0`, `softmax_1`: the number counts calls of
one name), compiles the result with the original's globals, closure cells, defaults and decorators,
and installs it on that instance only. The points are the children of a `Source` module kept on the
module (not among its children: containers iterate those), reached by the path part `source`, so
hooks, paths (`layers.0.self_attn.source.softmax_0`), validation, serialization and the server
treat a point exactly like a module. A point whose callee is a Python function can be rewritten in
turn: its `source` reaches one level into that function (found before the model runs, from the
names the forward uses; a call that turns out to reach another function does not enter it).

Outside a trace a point holds no hooks and calls straight through, so a rewritten model computes
bit for bit what it did. `submodule(root, path)` is `get_submodule` that rewrites what a path through
`source` needs, which is how a server rewrites its own hosted code when a request names a point.

Not handled: a forward that uses class-private names (`self.__x`: an error), and a deep copy of a
rewritten module, which keeps calling the original's points.
"""

from __future__ import annotations

import ast
import builtins
import copy
import inspect
import textwrap
import types

import torch

from .errors import ModulePathError, SourceError, did_you_mean

SOURCE = "source"  # the path part that leads from a module (or point) to its points
_ATTRIBUTE = "_interlace_source"  # where a rewritten module (or point) keeps its Source
_POINTS = "__interlace_points__"  # the free variable of a rewrite holding its points' `run` methods
# builtins that read their caller's frame: called through a point they would read the point's frame
_FRAME_READERS = frozenset({"super", "locals", "globals", "vars", "dir", "eval", "exec"})


class Point(torch.nn.Module):
    """One call site of a rewritten function. Its hooks see the call's inputs and its output.

    >>> import torch, interlace
    >>> net = interlace.Model(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    >>> print(net[0].source.linear_0.code)
    F.linear(input, self.weight, self.bias)
    """

    def __init__(self, name: str, code: str, line: int, resolve):
        super().__init__()
        self.name, self.code, self.line = name, code, line  # the call's text and its line in the file
        self._resolve = resolve  # finds, before the model runs, the function this point calls
        self._calls: list = []  # the callees of this point's calls now running (innermost last)
        self._inner = None  # (callee, its rewrite) once `.source` is used on this point
        self._swapped = None  # (a function calling the callee, the same calling the rewrite): see _swap
        self.bypassed = None  # the last function called here in place of the rewritten one (see _swap)

    def forward(self, *args, **kwargs):
        return self._calls[-1](*args, **kwargs)

    def run(self, fn, /, *args, **kwargs):
        """Make the call `fn(*args, **kwargs)`, through this module's hooks when it has any."""
        if self._inner is not None:
            fn = self._swap(fn)
        # an instance forward is interlace's skip(): like hooks, only there while a trace runs
        if not (self._forward_pre_hooks or self._forward_hooks or "forward" in self.__dict__):
            return fn(*args, **kwargs)
        self._calls.append(fn)
        try:
            return self(*args, **kwargs)
        finally:
            self._calls.pop()

    def _swap(self, fn):
        target, rewritten = self._inner
        if fn is target:
            return rewritten
        if type(fn) is types.MethodType and fn.__func__ is target:
            return types.MethodType(rewritten, fn.__self__)
        # a function that calls the rewritten one itself (interlace's attention wrappers) says how to make it
        # call the rewrite instead: `fn.calling_instead(target, rewritten)`, made once per function
        calling_instead = getattr(fn, "calling_instead", None)
        if calling_instead is not None:
            if self._swapped is None or self._swapped[0] is not fn:
                self._swapped = (fn, calling_instead(target, rewritten))
            return self._swapped[1]
        self.bypassed = fn  # another function than the one rewritten (another attention implementation)
        return fn

    def extra_repr(self) -> str:
        return f"{self.code}  (line {self.line})"


class Source(torch.nn.Module):
    """The points of one rewritten function, as children named after their calls; `str()` is the
    function's code with each point's name beside the line it is on.

    >>> import torch, interlace
    >>> net = interlace.Model(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    >>> [point.path for point in net[0].source]
    ['0.source.linear_0']
    """

    def __init__(self, title: str, first: int, lines: list[str], points: list[Point]):
        super().__init__()
        self.title, self.first, self.lines = title, first, lines
        self.installed = None  # the forward installed on the module, when this is a module's
        for point in points:
            self.add_module(point.name, point)

    def __repr__(self) -> str:
        return f"Source({self.title}: {len(self._modules)} points; print it to see them)"

    def __str__(self) -> str:
        names: dict[int, list[str]] = {}
        for point in self._modules.values():
            names.setdefault(point.line, []).append(point.name)
        labels = {line: ", ".join(found) for line, found in names.items()}
        width = min(max(map(len, labels.values()), default=0), 48)
        rows = [self.title]
        for number, text in enumerate(self.lines, self.first):
            rows.append(f"{labels.get(number, ''):>{width}}  {number:5d}  {text.rstrip()}")
        return "\n".join(rows)


def rewrite(module: torch.nn.Module, where: str) -> Source:
    """The `Source` of `module` (a module, or a `Point` whose callee is a Python function), made on
    first use. `where` names the module in errors."""
    existing = source_of(module)
    if existing is not None:
        return existing
    if SOURCE in module._modules:
        raise SourceError(f"{where} has its own submodule '{SOURCE}', so its call sites cannot be reached as such")
    if isinstance(module, Point):
        try:
            target = module._resolve()
        except SourceError as error:
            raise SourceError(f"{where}: {error}") from None
        source, rewritten = _rewrite(target, where, owner=None)
        module._inner = (target, rewritten)
    else:
        if isinstance(module, torch.jit.ScriptModule) or getattr(module, "_compiled_call_impl", None) is not None:
            raise SourceError(f"cannot rewrite the forward of {where} ({type(module).__name__}): it is compiled "
                              "(torch.jit or torch.compile), so it runs no Python code to rewrite. Read its "
                              "submodules' .output instead, or rewrite the module before compiling it.")
        if type(module).forward is torch.nn.Module.forward:  # (`_forward_unimplemented`: a container's)
            raise SourceError(f"{where} ({type(module).__name__}) has no forward of its own to rewrite: it holds "
                              "modules that its parent calls. Use the `.source` of its parent, or of one of the "
                              f"modules it holds ({where}[0].source)")
        if "forward" in module.__dict__:
            raise SourceError(f"cannot rewrite the forward of {where} ({type(module).__name__}): the instance has "
                              "its own forward (another tool's wrapper, e.g. accelerate's hooks) in place of its "
                              "class's. Use .source before wrapping it, or on a model loaded without that tool.")
        source, rewritten = _rewrite(type(module).forward, where, owner=module)
        source.installed = module.forward = types.MethodType(rewritten, module)
    object.__setattr__(module, _ATTRIBUTE, source)  # a plain attribute: not a child module
    return source


def source_of(module: torch.nn.Module) -> Source | None:
    """The `Source` of `module` if it was rewritten, else None."""
    return module.__dict__.get(_ATTRIBUTE)


def rewritten_forward(module: torch.nn.Module):
    """The forward `rewrite` installed on `module` (part of the model from then on), or None."""
    source = source_of(module)
    return None if source is None else source.installed


def rewrite_attributes(attributes: dict) -> set[str]:
    """Of a module's instance `attributes`, those a rewrite added (none if it was not rewritten)."""
    return {"forward", _ATTRIBUTE} if _ATTRIBUTE in attributes else set()


def points(root: torch.nn.Module):
    """(path, point) of every point made so far under `root`, also those inside points."""
    for path, module in root.named_modules():
        source = source_of(module)
        if source is not None:
            for name, point in source._modules.items():
                yield from _point_and_inner(point, f"{path}.{SOURCE}.{name}" if path else f"{SOURCE}.{name}")


def _point_and_inner(point: Point, path: str):
    yield path, point
    inner = source_of(point)
    if inner is not None:
        for name, deeper in inner._modules.items():
            yield from _point_and_inner(deeper, f"{path}.{SOURCE}.{name}")


def submodule(root: torch.nn.Module, path: str) -> torch.nn.Module:
    """`root.get_submodule(path)`, rewriting the modules a path through `source` needs on the way."""
    module = root
    parts = path.split(".") if path else []
    for depth, part in enumerate(parts):
        child = module._modules.get(part)
        if child is None and part == SOURCE:
            child = rewrite(module, ".".join(parts[:depth]) or "the model")
        if child is None:
            where = ".".join(parts[:depth]) or "the model"
            what = "call site" if isinstance(module, Source) else "submodule"
            raise ModulePathError(f"{where} has no {what} {part!r}{did_you_mean(part, module._modules)}")
        module = child
    return module


def listing(function, where: str) -> str:
    """The code of `function` with each call site's point name beside it (nothing is installed)."""
    return str(_rewrite(function, where, owner=None)[0])


def point_names(function) -> list[str]:
    """The names of the points a rewrite of `function` would have (nothing is installed)."""
    return [name for name, _, _, _ in _parse(function, "function")[3]]


# -- rewriting -----------------------------------------------------------------------------------------
def _parse(function, where: str):
    """(raw function, its source lines, its first line, [(name, call, line, text)], its `def`)."""
    raw = inspect.unwrap(function)
    if not isinstance(raw, types.FunctionType):
        raise SourceError(f"cannot rewrite {where}: it calls {raw!r}, which is not a Python function "
                          "(compiled, torch.jit or builtin), so it has no source to rewrite")
    try:
        lines, first = inspect.getsourcelines(raw)
    except (OSError, TypeError) as error:
        raise SourceError(f"cannot rewrite {where}: the source of {raw.__qualname__} is not available ({error}); "
                          "code made at run time (exec, a notebook without files) cannot be rewritten") from None
    tree = ast.parse(textwrap.dedent("".join(lines)))
    definition = tree.body[0]
    if not isinstance(definition, (ast.FunctionDef, ast.AsyncFunctionDef)):
        raise SourceError(f"cannot rewrite {where}: {raw.__qualname__} is a lambda; only `def` functions are rewritten")
    ast.increment_lineno(tree, first - 1)
    in_class = any(part != "<locals>" for part in raw.__qualname__.split(".")[:-1])
    if in_class and any(_private(node) for node in ast.walk(definition)):
        raise SourceError(f"cannot rewrite {where}: {raw.__qualname__} uses class-private names (`self.__name`), "
                          "which Python mangles only inside its class body; read the values around it instead")
    # the body's calls only: decorators, defaults and annotations are not part of the function's code
    calls = [node for statement in definition.body for node in ast.walk(statement)
             if isinstance(node, ast.Call) and not _reads_frame(node)]
    calls.sort(key=_name_position)
    counts: dict[str, int] = {}
    points = []
    for call in calls:
        base = _base_name(call.func)
        points.append((f"{base}_{counts.get(base, 0)}", call, _name_position(call)[0], ast.unparse(call)))
        counts[base] = counts.get(base, 0) + 1
    return raw, lines, first, points, definition


def _rewrite(function, where: str, owner) -> tuple[Source, types.FunctionType]:
    raw, lines, first, found, definition = _parse(function, where)
    context = _Context(raw, copy.deepcopy(definition), owner)
    # the callees as written: wrapping below changes the tree in place
    points = [Point(name, text, line, lambda func=copy.deepcopy(call.func), name=name: context.callee(func, name))
              for name, call, line, text in found]
    index = {id(call): k for k, (_, call, _, _) in enumerate(found)}
    definition.decorator_list = []  # applied again as they were: see _rewrap
    body = _Wrap(index).visit(definition)
    freevars = raw.__code__.co_freevars
    if "__class__" in freevars:  # zero-argument super() finds its class in this cell; keep it referenced
        body.body.insert(0, ast.Expr(ast.Name("__class__", ast.Load())))
    # the function is compiled inside a factory whose locals are the original's free variables, so they
    # stay free variables, bound below to the original's own cells
    factory = ast.FunctionDef(
        name="__interlace_factory__", args=ast.arguments([], [], None, [], [], None, []), decorator_list=[],
        body=[ast.Assign([ast.Name(name, ast.Store())], ast.Constant(None)) for name in (*freevars, _POINTS)]
        + [body, ast.Return(ast.Constant(None))],
    )
    tree = ast.fix_missing_locations(ast.Module([factory], []))
    code = compile(tree, raw.__code__.co_filename, "exec", dont_inherit=True)
    factory_code = next(c for c in code.co_consts if isinstance(c, types.CodeType))
    inner = next(c for c in factory_code.co_consts if isinstance(c, types.CodeType) and c.co_name == raw.__name__)
    cells = dict(zip(freevars, raw.__closure__ or ()))
    cells[_POINTS] = types.CellType(tuple(point.run for point in points))
    rewritten = types.FunctionType(inner, raw.__globals__, raw.__name__, raw.__defaults__,
                                   tuple(cells[name] for name in inner.co_freevars))
    _copy_attributes(raw, rewritten)
    title = f"{raw.__qualname__}  ({raw.__code__.co_filename}:{first})"
    return Source(title, first, lines, points), _rewrap(function, raw, rewritten, where)


def _rewrap(function, raw, rewritten, where: str):
    """`function`'s decorators (functools.wraps wrappers) around `rewritten` in place of `raw`, made by
    copying each wrapper with the cell that held the function it wraps pointing to the new one."""
    if function is raw:
        return rewritten
    inner = function.__wrapped__
    new_inner = _rewrap(inner, raw, rewritten, where)
    cells = [cell for cell in (getattr(function, "__closure__", None) or ()) if _holds(cell, inner)]
    if not isinstance(function, types.FunctionType) or not cells:
        raise SourceError(f"cannot rewrite {where}: its decorator {getattr(function, '__qualname__', function)!r} "
                          "does not keep the function it wraps in a closure, so it cannot be applied again")
    closure = tuple(types.CellType(new_inner) if _holds(cell, inner) else cell for cell in function.__closure__)
    copy = types.FunctionType(function.__code__, function.__globals__, function.__name__, function.__defaults__, closure)
    _copy_attributes(function, copy)
    copy.__wrapped__ = new_inner
    return copy


def _holds(cell, value) -> bool:
    try:
        return cell.cell_contents is value
    except ValueError:  # an empty cell
        return False


def _copy_attributes(source, target) -> None:
    target.__dict__.update(source.__dict__)
    target.__kwdefaults__ = dict(source.__kwdefaults__) if source.__kwdefaults__ else None
    for name in ("__qualname__", "__doc__", "__module__", "__annotations__"):
        setattr(target, name, getattr(source, name))


def _private(node: ast.AST) -> bool:
    name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else ""
    return name.startswith("__") and not name.endswith("__")


def _reads_frame(call: ast.Call) -> bool:
    return isinstance(call.func, ast.Name) and call.func.id in _FRAME_READERS


def _base_name(func: ast.expr) -> str:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return "call"  # a call of a call, a subscript, a lambda...


def _name_position(call: ast.Call) -> tuple[int, int]:
    """Where the callee's name ends: calls are numbered in the order their names are read."""
    func = call.func
    if isinstance(func, (ast.Name, ast.Attribute)):
        return func.end_lineno, func.end_col_offset
    return call.lineno, call.col_offset


class _Wrap(ast.NodeTransformer):
    """`f(a, k=b)` -> `__interlace_points__[n](f, a, k=b)`: same order of evaluation, one more call."""

    def __init__(self, index: dict[int, int]):
        self.index = index

    def visit_Call(self, node: ast.Call):
        number = self.index.get(id(node))
        self.generic_visit(node)
        if number is None:
            return node
        point = ast.Subscript(ast.Name(_POINTS, ast.Load()), ast.Constant(number), ast.Load())
        return ast.copy_location(ast.Call(point, [node.func, *node.args], node.keywords), node)


class _Context:
    """What a rewritten function's names mean, to find a point's callee before the model runs."""

    def __init__(self, raw, definition, owner):
        self.raw, self.owner = raw, owner
        params = definition.args.posonlyargs + definition.args.args
        self.self_name = params[0].arg if owner is not None and params else None
        self.assigned: dict[str, list[ast.expr]] = {}
        for node in ast.walk(definition):
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    if isinstance(target, ast.Name):
                        self.assigned.setdefault(target.id, []).append(node.value)

    def callee(self, func: ast.expr, name: str):
        found = self._value(func, name)
        if isinstance(found, torch.nn.Module):
            raise SourceError(f"{name} calls the module `{ast.unparse(func)}` ({type(found).__name__}): use that "
                              "module's own .source to reach inside it")
        if isinstance(found, types.MethodType):
            found = found.__func__
        if not isinstance(inspect.unwrap(found), types.FunctionType):
            raise SourceError(f"{name} calls `{ast.unparse(func)}` = {found!r}, which is not a Python function: "
                              "it has no source to go into")
        return found

    def _value(self, func: ast.expr, name: str):
        if isinstance(func, ast.Attribute):
            return getattr(self._value(func.value, name), func.attr)
        if isinstance(func, ast.Name):
            return self._name(func.id, name)
        raise SourceError(f"cannot tell which function {name} calls (`{ast.unparse(func)}`) before the model runs")

    def _name(self, identifier: str, name: str):
        if identifier == self.self_name:
            return self.owner
        if identifier in self.assigned:
            # a local variable: the Python functions its assignments name (e.g. the eager attention passed
            # as the default of ALL_ATTENTION_FUNCTIONS.get_interface); one of them, or we cannot tell
            candidates = []
            for value in self.assigned[identifier]:
                for node in ast.walk(value):
                    if isinstance(node, ast.Name) and node.id != identifier:
                        found = self._global(node.id)
                        if isinstance(found, types.FunctionType) and found not in candidates:
                            candidates.append(found)
            if len(candidates) != 1:
                raise SourceError(
                    f"cannot tell which function {name} calls before the model runs: the local variable "
                    f"`{identifier}` is assigned {len(candidates)} Python functions here")
            return candidates[0]
        found = self._global(identifier)
        if found is None:
            raise SourceError(f"cannot tell which function {name} calls: `{identifier}` is not a global here")
        return found

    def _global(self, identifier: str):
        cells = dict(zip(self.raw.__code__.co_freevars, self.raw.__closure__ or ()))
        if identifier in cells:
            try:
                return cells[identifier].cell_contents
            except ValueError:
                return None
        if identifier in self.raw.__globals__:
            return self.raw.__globals__[identifier]
        return getattr(builtins, identifier, None)
