"""Where a cluster entrypoint (``faastube worker``, ``faastube gateway``) gets its workflow.

In a cluster the operator hands every pod the Workflow document itself in
``FAASTUBE_WORKFLOW_DOCUMENT`` (JSON), so a pod needs no ConfigMap or file; for
local use a ``--workflow FILE`` flag wins over the environment. The environment
is passed in explicitly (never read at import), so tests give their own.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from faastube_spec.workflow import Workflow, load_workflow, loads_workflow

from faastube_runtime import errors

logger = logging.getLogger(__name__)

ENV_DOCUMENT = "FAASTUBE_WORKFLOW_DOCUMENT"
ENV_WORKFLOW = "FAASTUBE_WORKFLOW"
ENV_NAMESPACE = "FAASTUBE_NAMESPACE"
ENV_FUNCTION = "FAASTUBE_FUNCTION"
ENV_HANDLER = "FAASTUBE_HANDLER"
ENV_SOCKET = "FAASTUBE_SOCKET"
ENV_GPU_INDEX = "FAASTUBE_GPU_INDEX"


def parse_document(text: str, *, source: str) -> Workflow:
    """A Workflow from a JSON (or YAML) document's text; errors name ``source`` and the field.

    The same reading, limits included, as a file's (``faastube_spec.workflow.loads_workflow``).
    """
    return loads_workflow(text, source=source)


def load(path: str | None, environ: Mapping[str, str]) -> Workflow:
    """The workflow from ``--workflow`` or ``$FAASTUBE_WORKFLOW_DOCUMENT``.

    ``$FAASTUBE_WORKFLOW``, when set, must be the document's name: a pod whose two
    variables disagree was built from two different specs.
    """
    if path:
        workflow = load_workflow(path)
    elif environ.get(ENV_DOCUMENT, "").strip():
        workflow = parse_document(environ[ENV_DOCUMENT], source=f"${ENV_DOCUMENT}")
    else:
        raise errors.BadInput(f"no workflow: pass --workflow FILE or set {ENV_DOCUMENT} "
                              "to the Workflow document (JSON)")
    expected = environ.get(ENV_WORKFLOW, "").strip()
    if expected and expected != workflow.name:
        raise errors.BadInput(f"${ENV_WORKFLOW}={expected!r} but the workflow document is "
                              f"named {workflow.name!r}")
    return workflow


def namespace(flag_value: str | None, environ: Mapping[str, str], workflow: Workflow) -> str | None:
    """The Workflow's namespace: ``--namespace``, ``$FAASTUBE_NAMESPACE`` or the document's."""
    return setting(flag_value, environ, ENV_NAMESPACE) or workflow.namespace


def setting(flag_value: str | None, environ: Mapping[str, str], name: str) -> str | None:
    """A flag's value, else the environment variable's (empty counts as unset)."""
    if flag_value is not None and flag_value != "":
        return flag_value
    value = environ.get(name, "").strip()
    return value or None


def non_negative_int(text: str, *, field: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise errors.BadInput(f"{field}: {text!r} is not an integer") from None
    if value < 0:
        raise errors.BadInput(f"{field}: must be 0 or more, got {value}")
    return value
