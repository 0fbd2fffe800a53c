"""``faastube worker``: serve one function of a workflow, as a function pod's container does.

Every setting comes from a flag or, failing that, from the environment the
operator gives function pods (``manifests.function_deployment``):

==================  ===============================  ==============================
flag                environment                      meaning
==================  ===============================  ==============================
``--workflow``      ``FAASTUBE_WORKFLOW_DOCUMENT``   the Workflow (file / JSON text)
``--function``      ``FAASTUBE_FUNCTION``            the function this pod serves
``--listen``        ``FAASTUBE_LISTEN``              ``tcp://host:port`` or a Unix path
``--sidecar``       ``FAASTUBE_SOCKET``              the node sidecar's Unix socket
``--gpu-index``     ``FAASTUBE_GPU_INDEX``           the node's GPU the pod was given
``--namespace``     ``FAASTUBE_NAMESPACE``           the Workflow's namespace
==================  ===============================  ==============================

``FAASTUBE_WORKFLOW`` and ``FAASTUBE_HANDLER``, when set, are checked against the
document: a disagreement means the pod was built from another spec. Every problem
is reported at once, and the command exits with status 2; a worker whose warm-up
fails (its ``warmup`` hook or warm-up call raised) exits with status 3.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Mapping

from faastube import errors as ft_errors
from faastube import sdk

from faastube_runtime import errors, worker, workflow_source
from faastube_runtime.addresses import MAX_UNIX_PATH_BYTES, parse_address
from faastube_runtime.workflow_source import ENV_FUNCTION, ENV_GPU_INDEX, ENV_HANDLER, ENV_SOCKET

logger = logging.getLogger(__name__)

ENV_LISTEN = "FAASTUBE_LISTEN"
DEFAULT_STARTUP_TIMEOUT_S = 60.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workflow", default=None,
                        help="the Workflow YAML/JSON file (default: $FAASTUBE_WORKFLOW_DOCUMENT)")
    parser.add_argument("--function", default=None, help=f"the function to serve (default: ${ENV_FUNCTION})")
    parser.add_argument("--listen", default=None,
                        help=f"tcp://HOST:PORT, unix:/PATH or /PATH (default: ${ENV_LISTEN})")
    parser.add_argument("--sidecar", default=None, help=f"the sidecar's Unix socket (default: ${ENV_SOCKET})")
    gpu = parser.add_mutually_exclusive_group()
    gpu.add_argument("--gpu-index", default=None,
                     help=f"the node's GPU index this function was placed on (default: ${ENV_GPU_INDEX}); "
                          "mapped to this process's CUDA device through the sidecar")
    gpu.add_argument("--device", default=None, help="a CUDA ordinal of this process (local use)")
    parser.add_argument("--namespace", default=None,
                        help="the Workflow's namespace (default: $FAASTUBE_NAMESPACE, else the document's)")
    parser.add_argument("--passing", choices=sdk.PASSINGS, default="tube")
    parser.add_argument("--startup-timeout", type=float, default=DEFAULT_STARTUP_TIMEOUT_S,
                        help="seconds to wait for the sidecar's socket (default %(default)s)")


def build_config(args: argparse.Namespace, environ: Mapping[str, str]) -> worker.WorkerConfig:
    """The worker's configuration, or ``BadInput`` / ``WorkflowInvalid`` naming every problem."""
    workflow = workflow_source.load(args.workflow, environ)
    problems: list[str] = []
    function = workflow_source.setting(args.function, environ, ENV_FUNCTION)
    spec = None
    if function is None:
        problems.append(f"--function: not given and ${ENV_FUNCTION} is not set")
    else:
        try:
            spec = workflow.function(function)
        except KeyError:
            known = ", ".join(f.name for f in workflow.functions)
            problems.append(f"--function: workflow {workflow.name!r} has no function {function!r} "
                            f"(it has {known})")
    handler = environ.get(ENV_HANDLER, "").strip()
    if spec is not None and handler and handler != spec.handler:
        problems.append(f"${ENV_HANDLER}={handler!r} but the workflow document gives function "
                        f"{spec.name!r} the handler {spec.handler!r}")
    listen = None
    listen_text = workflow_source.setting(args.listen, environ, ENV_LISTEN)
    if listen_text is None:
        problems.append(f"--listen: not given and ${ENV_LISTEN} is not set")
    else:
        try:
            listen = parse_address(listen_text, field="--listen", listen=True)
        except errors.BadInput as e:
            problems.append(str(e))
    sidecar = workflow_source.setting(args.sidecar, environ, ENV_SOCKET)
    if sidecar is None:
        problems.append(f"--sidecar: not given and ${ENV_SOCKET} is not set")
    elif len(sidecar.encode()) > MAX_UNIX_PATH_BYTES:
        problems.append(f"--sidecar: {sidecar!r} is longer than {MAX_UNIX_PATH_BYTES} bytes")
    device = gpu_index = None
    try:
        if args.device is not None:
            device = workflow_source.non_negative_int(args.device, field="--device")
        else:
            gpu_text = workflow_source.setting(args.gpu_index, environ, ENV_GPU_INDEX)
            field = "--gpu-index" if args.gpu_index else f"${ENV_GPU_INDEX}"
            if gpu_text is not None:
                gpu_index = workflow_source.non_negative_int(gpu_text, field=field)
                if spec is not None and not spec.gpu:
                    problems.append(f"{field}: function {spec.name!r} is not a GPU function "
                                    "(gpu: false in the workflow)")
    except errors.BadInput as e:
        problems.append(str(e))
    if not args.startup_timeout >= 0:
        problems.append(f"--startup-timeout: must be 0 or more, got {args.startup_timeout}")
    if problems or function is None or listen is None or sidecar is None:
        raise errors.BadInput("; ".join(problems))
    return worker.WorkerConfig(workflow=workflow, function=function, listen=listen,
                               sidecar_socket=sidecar, device=device, gpu_index=gpu_index,
                               passing=args.passing, startup_timeout_s=args.startup_timeout,
                               namespace=workflow_source.namespace(args.namespace, environ, workflow))


def run(args: argparse.Namespace) -> int:
    try:
        config = build_config(args, os.environ)
        logger.info("serving function %s of workflow %s on %s", config.function, config.workflow.name,
                    config.listen)
        asyncio.run(worker.serve(config))
    except sdk.WarmupFailed as e:
        print(f"faastube worker: warm-up failed: {e}", file=sys.stderr)
        return worker.EXIT_WARMUP_FAILED
    except ft_errors.FaastubeError as e:
        print(f"faastube worker: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
