"""Checks of a workflow beyond its document: its handlers import, take the arguments the
runtime passes them, and the entry module's ``make_input()`` returns what ``spec.input`` says.

``parse_workflow`` can check only the YAML. What fails a first ``faastube run`` after that is
usually Python: a module that does not import, a fan-in handler whose parameter names do not
match its predecessors, a ``make_input()`` of the wrong shape. These checks import the
handlers' modules (running their top-level code) but call nothing except ``make_input()``.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
from faastube import sdk
from faastube_spec.workflow import FunctionSpec, Workflow


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing to fix: where (a function, a handler, ``make_input``) and what."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


def _where_raised(exc: BaseException) -> str:
    """``file:line`` of the innermost frame (or of the syntax error), for the user to open."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f" ({exc.filename}:{exc.lineno})"
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith("<frozen") and f.filename != __file__]
    return f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""


class _Modules:
    """Imports handler modules the way the worker finds them: next to the YAML first, then
    on ``sys.path``. Modules beside the YAML load under private names, so that validating
    several workflows in one process never returns another workflow's ``functions``."""

    def __init__(self, workflow: Workflow) -> None:
        self.base = workflow.base_dir
        self.prefix = f"_faastube_validate_{id(self)}_"
        self.loaded: dict[str, ModuleType | BaseException] = {}

    def get(self, name: str) -> ModuleType:
        if name not in self.loaded:
            try:
                self.loaded[name] = self._load(name)
            except Exception as e:  # the user's module may raise anything at import
                self.loaded[name] = e
        found = self.loaded[name]
        if isinstance(found, BaseException):
            raise found
        return found

    def _load(self, name: str) -> ModuleType:
        candidate = None if self.base is None else self.base / (name.replace(".", "/") + ".py")
        if candidate is None or not candidate.exists():
            return importlib.import_module(name)
        private = self.prefix + name.replace(".", "_")
        spec = importlib.util.spec_from_file_location(private, candidate)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {candidate}")
        module = importlib.util.module_from_spec(spec)
        # Siblings it imports (helpers beside the YAML) resolve as they do in the worker.
        added = str(self.base) not in sys.path
        if added:
            sys.path.insert(0, str(self.base))
        sys.modules[private] = module
        try:
            spec.loader.exec_module(module)
        finally:
            del sys.modules[private]
            if added:
                sys.path.remove(str(self.base))
        return module


def handler_inputs(workflow: Workflow, function: FunctionSpec) -> tuple[str, ...]:
    """The names the runtime passes ``function``'s handler: its predecessors, or the request."""
    return workflow.predecessors(function.name) or (sdk.REQUEST_INPUT,)


def check_signature(handler: Callable[..., Any], inputs: tuple[str, ...]) -> str | None:
    """Why ``handler`` cannot be called as the runtime calls it on ``inputs``; None if it can."""
    try:
        signature = inspect.signature(handler)
    except (TypeError, ValueError):
        return None  # a builtin or C callable without a signature: nothing to check
    if len(inputs) == 1:
        try:
            signature.bind(None)
        except TypeError as e:
            return (f"takes {signature} but is called with one positional argument "
                    f"(its one input) ({e})")
        return None
    names = [sdk.kwarg_name(name) for name in inputs]
    try:
        signature.bind(**dict.fromkeys(names))
    except TypeError as e:
        wanted = ", ".join(names)
        return (f"takes {signature} but is called with keyword arguments {wanted} "
                f"(one per predecessor, '-' -> '_') ({e})")
    return None


def _check_function(workflow: Workflow, function: FunctionSpec, modules: _Modules) -> list[Problem]:
    where = f"function {function.name!r} handler {function.handler!r}"
    try:
        module = modules.get(function.handler_module)
    except Exception as e:
        place = workflow.base_dir if workflow.base_dir is not None else "the current directory"
        return [Problem(where, f"cannot import module {function.handler_module!r} (looked next to the "
                               f"workflow in {place} and on sys.path): {type(e).__name__}: {e}"
                               f"{_where_raised(e)}")]
    handler = getattr(module, function.handler_function, None)
    if handler is None or not callable(handler):
        return [Problem(where, f"module {function.handler_module!r} ({getattr(module, '__file__', '?')}) "
                               f"has no callable {function.handler_function!r}")]
    why = check_signature(handler, handler_inputs(workflow, function))
    return [] if why is None else [Problem(where, why)]


def _check_make_input(workflow: Workflow, modules: _Modules) -> tuple[list[Problem], str]:
    """Problems of the entry module's ``make_input()``, and a note for the summary."""
    entry = workflow.function(workflow.entry)
    try:
        module = modules.get(entry.handler_module)
    except Exception:
        return [], "make_input() not checked"  # the import problem is already listed
    make_input = getattr(module, "make_input", None)
    if make_input is None:
        return [], "no make_input() (faastube run will need --input)"
    where = f"{entry.handler_module}.make_input()"
    try:
        value = make_input()
    except Exception as e:
        return [Problem(where, f"raised {type(e).__name__}: {e}{_where_raised(e)}")], ""
    if not isinstance(value, np.ndarray):
        return [Problem(where, f"returned {type(value).__name__}, not a NumPy array")], ""
    problems = []
    shape = tuple(int(n) for n in value.shape)
    # An entry handler declared @function(shapes="rank") is checked by rank (the examples scale
    # their request down on machines without a GPU): make_input() is held to the same rule.
    handler = getattr(module, entry.handler_function, None)
    by_rank = handler is not None and sdk.options_of(handler).shapes == "rank"
    if workflow.input_shape is not None and by_rank and len(shape) != len(workflow.input_shape):
        problems.append(Problem(where, f"returned {len(shape)} dimensions {list(shape)}, but spec.input.shape "
                                       f"has {len(workflow.input_shape)} {list(workflow.input_shape)}"))
    elif workflow.input_shape is not None and not by_rank and shape != workflow.input_shape:
        problems.append(Problem(where, f"returned shape {list(shape)}, but spec.input.shape is "
                                       f"{list(workflow.input_shape)}"))
    if workflow.input_dtype is not None and np.dtype(value.dtype) != np.dtype(workflow.input_dtype):
        problems.append(Problem(where, f"returned dtype {value.dtype}, but spec.input.dtype is "
                                       f"{workflow.input_dtype}"))
    return problems, f"make_input() gives {list(shape)} {value.dtype}"


@dataclass(frozen=True, slots=True)
class Report:
    problems: tuple[Problem, ...]
    make_input_note: str


def check_workflow(workflow: Workflow) -> Report:
    """Every problem of ``workflow``'s handlers and ``make_input()``, in the functions' order."""
    modules = _Modules(workflow)
    problems: list[Problem] = []
    for function in workflow.functions:
        problems.extend(_check_function(workflow, function, modules))
    more, note = _check_make_input(workflow, modules)
    problems.extend(more)
    return Report(problems=tuple(problems), make_input_note=note)
