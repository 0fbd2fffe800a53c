"""Importing a function's handler from the workflow's ``module:function`` string.

The module is looked up next to the workflow's YAML first (examples ship their
handlers beside their workflow), then on the normal import path.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from faastube_spec.workflow import FunctionSpec, Workflow

from faastube_runtime import errors

logger = logging.getLogger(__name__)


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
    except ImportError as e:
        raise HandlerNotFound(f"{where}: cannot import module {module_name!r} "
                              f"(looked next to the workflow in {base} and on sys.path): {e}") from e
    handler = getattr(module, function_name, None)
    if handler is None or not callable(handler):
        raise HandlerNotFound(f"{where}: module {module_name!r} ({getattr(module, '__file__', '?')}) "
                              f"has no callable {function_name!r}")
    logger.debug("loaded %s from %s", function.handler, getattr(module, "__file__", module_name))
    return handler  # type: ignore[no-any-return]
