"""Importing a function's handler from the workflow's ``module:function`` string.

The module is looked up next to the workflow's YAML first (examples ship their
handlers beside their workflow), then on the normal import path.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from faastube_spec.workflow import FunctionSpec, Workflow

from faastube_runtime import errors

logger = logging.getLogger(__name__)

# How much of an import error's message ``import_problem`` keeps.
MAX_PROBLEM_CHARS = 300


class HandlerNotFound(errors.RuntimeFailure):
    """A handler string names no importable callable; fix the workflow or its module."""


def load_handler(workflow: Workflow, function: FunctionSpec, *,
                 search_dir: Path | None = None) -> Callable[..., Any]:
    """Import ``function``'s handler, looking first in ``search_dir`` (default: the folder of
    the workflow's YAML)."""
    base = search_dir if search_dir is not None else workflow.base_dir
    if base is not None and str(base) not in sys.path:
        sys.path.insert(0, str(base))
    module_name, function_name = function.handler_module, function.handler_function
    where = f"function {function.name!r} handler {function.handler!r}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:  # the module was found; something it imports was not
            raise HandlerNotFound(f"{where}: importing module {module_name!r} failed: {import_problem(e)}") from e
        raise HandlerNotFound(f"{where}: cannot import module {module_name!r} "
                              f"(looked next to the workflow in {base} and on sys.path): {e}") from e
    except Exception as e:  # noqa: BLE001 - whatever the module raised at import: one line, with where
        raise HandlerNotFound(f"{where}: importing module {module_name!r} failed: {import_problem(e)}") from e
    handler = getattr(module, function_name, None)
    if handler is None or not callable(handler):
        raise HandlerNotFound(f"{where}: module {module_name!r} ({getattr(module, '__file__', '?')}) "
                              f"has no callable {function_name!r}")
    logger.debug("loaded %s from %s", function.handler, getattr(module, "__file__", module_name))
    return handler  # type: ignore[no-any-return]


def import_problem(e: BaseException) -> str:
    """One line saying why a handler module did not import: ``file:line: Error: message``.

    For a ``SyntaxError`` the place is the offending line; otherwise it is the innermost
    frame of the user's code (import machinery and this package left out).
    """
    if isinstance(e, SyntaxError):
        return f"{e.filename}:{e.lineno}: {type(e).__name__}: {e.msg}"
    ours = str(Path(__file__).resolve().parent) + os.sep
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if not f.filename.startswith("<") and not str(Path(f.filename).resolve()).startswith(ours)
              and "importlib" not in Path(f.filename).parts]
    where = f"{frames[-1].filename}:{frames[-1].lineno}: " if frames else ""
    message = " ".join(str(e).split())
    if len(message) > MAX_PROBLEM_CHARS:
        message = message[:MAX_PROBLEM_CHARS] + "..."
    return f"{where}{type(e).__name__}: {message}"
