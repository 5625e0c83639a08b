"""What opening a module for a cut costs: the Python in its ``forward`` that tracing would freeze.

A cut inside a module *opens* it: its ``forward`` is traced into the stage's graph, so the Python in it runs once,
at trace time, and its result is baked in. That is harmless for tensor code, but not for Python that must run on
every call. :func:`frozen_python` finds such code in one module's own ``forward``:

- assignments to ``self`` (``self.calls += 1``, ``self.cache[k] = v``, ``self.history.append(x)``);
- Python or NumPy random numbers (``random.random()``, ``np.random.rand()``, ``self.rng.random()``);
- forward hooks and pre-hooks registered on the module (a traced module's hooks run at trace time only);
- reads of global state (``if DEBUG_STATS:``, ``global step``), except constants: ``UPPER_CASE`` names bound to
  numbers, strings or tuples.

It reads the source of ``forward`` only, not of the methods ``forward`` calls. The planner avoids cuts that open
such modules (:mod:`lightning_ddg.planning`) and warns where it cannot.

Example::

    >>> import torch.nn as nn
    >>> class Counting(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.calls = 0
    ...     def forward(self, x):
    ...         self.calls += 1
    ...         return x
    >>> [f.what for f in frozen_python(Counting(), "block")]
    ['assigns self.calls']
"""

from __future__ import annotations

import ast
import builtins
import functools
import inspect
import os
import random
import textwrap
import types
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["Frozen", "frozen_python", "opened_by"]

_TORCH_DIR = os.path.dirname(torch.__file__)
_MUTATORS = {
    "append",
    "extend",
    "insert",
    "pop",
    "popitem",
    "remove",
    "clear",
    "update",
    "setdefault",
    "add",
    "discard",
}
_HOOKS = {"_forward_hooks": "forward hook", "_forward_pre_hooks": "forward pre-hook"}


@dataclass(frozen=True)
class Frozen:
    """One piece of Python that a trace of ``module``'s forward would run once instead of at every call."""

    module: str  # the module's qualified name ('' for the module being split)
    what: str  # 'assigns self.calls', 'draws Python random numbers (random.random)', ...
    where: str  # 'path/to/file.py:12: self.calls += 1'

    def __str__(self) -> str:
        return f"{self.where} ({self.what})"


def opened_by(split_point: str) -> list[str]:
    """The modules a cut at ``split_point`` opens: its strict ancestors, outermost first ('' is the root).

    >>> opened_by("net.blocks.5.attn")
    ['', 'net', 'net.blocks', 'net.blocks.5']
    """
    parts = split_point.split(".")
    return [".".join(parts[:i]) for i in range(len(parts))]


def frozen_python(module: nn.Module, name: str) -> list[Frozen]:
    """The Python in ``module.forward`` (and the hooks on ``module``) that tracing the module would freeze."""
    found = [Frozen(name, what, where) for what, where in _in_source(type(module).forward, module)]
    for attribute, kind in _HOOKS.items():
        for hook in getattr(module, attribute, {}).values():
            found.append(Frozen(name, f"has a {kind}, {getattr(hook, '__qualname__', repr(hook))}", _location(hook)))
    return found


def _in_source(forward: Any, module: nn.Module) -> list[tuple[str, str]]:
    function = getattr(forward, "__func__", forward)
    code = getattr(function, "__code__", None)
    if code is None or code.co_filename.startswith(_TORCH_DIR):
        return []  # PyTorch's own modules, or a forward that is not plain Python
    findings = []
    for kind, detail, line in _scan(code):
        if kind == "self":
            findings.append((f"assigns self.{detail}", line))
        elif kind == "call":
            what = _random_call(detail, function.__globals__, module)
            if what is None and detail[0] == "self" and len(detail) == 3 and detail[2] in _MUTATORS:
                value = getattr(module, detail[1], None)
                what = f"changes self.{detail[1]}" if isinstance(value, (list, dict, set)) else None
            if what is not None:
                findings.append((what, line))
        elif kind == "global":
            findings.append((f"declares global {detail}", line))
        elif kind == "name" and _global_state(detail, function.__globals__):
            findings.append((f"reads the global {detail}", line))
    return findings


@functools.lru_cache(maxsize=512)
def _scan(code: types.CodeType) -> tuple[tuple[str, Any, str], ...]:
    """('self', attribute, where) for assignments to self, ('call', dotted name, where) for calls,
    ('global', names, where) and ('name', global name, where) for global reads, from the source of ``code``."""
    try:
        lines, start = inspect.getsourcelines(code)
        tree = ast.parse(textwrap.dedent("".join(lines)))
    except (OSError, TypeError, SyntaxError, IndentationError):
        return ()
    function = next((n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))), None)
    if function is None or not function.args.args:
        return ()
    this = function.args.args[0].arg
    local = {a.arg for a in [*function.args.args, *function.args.kwonlyargs, *function.args.posonlyargs]}
    local |= {a.arg for a in (function.args.vararg, function.args.kwarg) if a is not None}
    local |= {n.id for n in ast.walk(function) if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load)}
    local |= {
        n.name for n in ast.walk(function) if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n is not function
    }
    local |= {
        a.asname or a.name.split(".")[0]
        for n in ast.walk(function)
        if isinstance(n, (ast.Import, ast.ImportFrom))
        for a in n.names
    }

    def where(node: ast.AST) -> str:
        text = lines[node.lineno - 1].strip() if node.lineno <= len(lines) else ""
        return f"{code.co_filename}:{start + node.lineno - 1}: {text}"

    found: list[tuple[str, Any, str]] = []
    for node in ast.walk(function):
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            for target in targets:
                for part in ast.walk(target):
                    chain = _dotted(part.value if isinstance(part, ast.Subscript) else part)
                    if (
                        isinstance(part, (ast.Attribute, ast.Subscript))
                        and chain
                        and chain[0] == this
                        and len(chain) > 1
                    ):
                        found.append(("self", chain[1], where(node)))
                        break
        elif isinstance(node, ast.Call):
            chain = _dotted(node.func)
            if chain:
                chain = ("self", *chain[1:]) if chain[0] == this else chain
                if chain == ("setattr",) and node.args and _dotted(node.args[0]) == (this,):
                    found.append(("self", "<setattr>", where(node)))
                else:
                    found.append(("call", chain, where(node)))
        elif isinstance(node, ast.Global):
            found.append(("global", ", ".join(node.names), where(node)))
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in local:
            found.append(("name", node.id, where(node)))
    unique = dict.fromkeys(found)  # a name read twice is reported once per line
    return tuple(unique)


def _dotted(node: ast.AST) -> tuple[str, ...] | None:
    """``a.b.c`` as ('a', 'b', 'c'); None for anything else."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return (node.id, *reversed(parts))


def _random_call(chain: tuple[str, ...], namespace: dict, module: nn.Module) -> str | None:
    """'draws ... random numbers (...)' when the call ``chain`` draws from Python's or NumPy's generators."""
    dotted = ".".join(chain)
    if chain[0] == "self":
        owner = getattr(module, chain[1], None) if len(chain) > 2 else None
        return f"draws random numbers from self.{chain[1]}" if _is_generator(owner) else None
    value: Any = namespace.get(chain[0], getattr(builtins, chain[0], None))
    for attribute in chain[1:]:
        value = getattr(value, attribute, None)
    if _is_random(value) or (_is_generator(value) and len(chain) == 1):
        return f"draws Python or NumPy random numbers ({dotted})"
    return None


def _is_random(value: Any) -> bool:
    origin = getattr(value, "__module__", None) or ""
    owner = getattr(value, "__self__", None)
    return (
        origin == "random"
        or origin.startswith("numpy.random")
        or isinstance(owner, random.Random)
        or (type(owner).__module__.startswith("numpy.random") if owner is not None else False)
    )


def _is_generator(value: Any) -> bool:
    return isinstance(value, random.Random) or type(value).__module__.startswith("numpy.random")


def _global_state(name: str, namespace: dict) -> bool:
    """A global read that may change between calls: not a module, class or function, nor an UPPER_CASE constant."""
    if name not in namespace:
        return False  # a builtin, or unknown
    value = namespace[name]
    if isinstance(value, (types.ModuleType, type)) or callable(value) or value is None or value is Ellipsis:
        return False
    constant = isinstance(value, (bool, int, float, complex, str, bytes, tuple, frozenset, torch.dtype))
    return not (constant and name.isupper())


def _location(obj: Any) -> str:
    try:
        function = inspect.unwrap(getattr(obj, "__func__", obj))
        file = inspect.getsourcefile(function)
        lines, start = inspect.getsourcelines(function)
        return f"{file}:{start}: {lines[0].strip()}"
    except (OSError, TypeError):
        return repr(obj)
