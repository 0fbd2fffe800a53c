"""The examples image's ``functions`` module: the handlers of the example this pod serves.

The example workflows name their handlers ``functions:<name>``. In a checkout that is
the ``functions.py`` beside each workflow's YAML; in the examples image the four
examples sit side by side under ``/opt/faastube/examples/<name>/``, and this module,
first on ``PYTHONPATH``, stands in for all of them: it runs the ``functions.py`` of the
example named by ``$FAASTUBE_EXAMPLE``, else by ``$FAASTUBE_WORKFLOW`` (the operator sets
the workflow's name in every function pod), and puts that module in its own place in
``sys.modules``, so ``import functions`` gives the example's module itself.

A name that matches no example raises ImportError, which ``faastube worker`` reports
with the handler it was loading.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

EXAMPLES_DIR = Path(os.environ.get("FAASTUBE_EXAMPLES_DIR", "/opt/faastube/examples"))


def _example_file() -> Path:
    name = (os.environ.get("FAASTUBE_EXAMPLE") or os.environ.get("FAASTUBE_WORKFLOW") or "").strip()
    available = sorted(p.parent.name for p in EXAMPLES_DIR.glob("*/functions.py"))
    if not name:
        raise ImportError(f"which example? set FAASTUBE_EXAMPLE or FAASTUBE_WORKFLOW to one of "
                          f"{', '.join(available)}")
    if name not in available:
        raise ImportError(f"no example {name!r} in {EXAMPLES_DIR} (this image has "
                          f"{', '.join(available)}; a renamed workflow needs FAASTUBE_EXAMPLE)")
    return EXAMPLES_DIR / name / "functions.py"


def _become_example() -> None:
    path = _example_file()
    spec = importlib.util.spec_from_file_location(__name__, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[__name__] = module       # what `import functions` returns from now on
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[__name__]
        raise


_become_example()
