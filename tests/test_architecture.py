"""Layer boundaries, checked on the source: what each package may import.

The light client (`faastube`) is what a function image installs, so it must not
reach the daemon, the operator or their heavy dependencies; inside the sidecar,
framing and dispatch sit above the services, never the other way round.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SIDECAR = ROOT / "sidecar"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _violations(package: Path, forbidden: tuple[str, ...], *, skip: tuple[str, ...] = ()) -> list[str]:
    found = []
    for path in sorted(package.rglob("*.py")):
        if path.name in skip:
            continue
        for name in _imports(path):
            if name.split(".")[0] in forbidden or name in forbidden:
                found.append(f"{path.relative_to(ROOT)} imports {name}")
    return found


def test_the_client_package_imports_no_daemon_operator_or_runtime_code() -> None:
    # cli.py dispatches to subcommands by module *name* (importlib), never by import.
    assert _violations(SIDECAR / "faastube", ("faastube_sidecar", "faastube_operator", "faastube_runtime",
                                              "faastube_bench", "faastube_spec", "faastube_placement",
                                              "kopf", "kubernetes", "grpc", "prometheus_client",
                                              "aiohttp")) == []


def test_the_spec_package_is_pure() -> None:
    # Read by the operator, the sidecar and the runtime alike: it may import the
    # client's errors and PyYAML, nothing that runs.
    assert _violations(SIDECAR / "faastube_spec", ("faastube_sidecar", "faastube_operator", "faastube_runtime",
                                                   "faastube_bench", "faastube_placement", "kopf",
                                                   "kubernetes", "grpc", "prometheus_client",
                                                   "aiohttp", "cupy", "torch")) == []


def test_placement_is_pure_and_shared() -> None:
    # The operator and `faastube run` both place through it, so it imports neither.
    assert _violations(SIDECAR / "faastube_placement", ("faastube_sidecar", "faastube_operator",
                                                        "faastube_runtime", "faastube_bench", "kopf",
                                                        "kubernetes", "grpc", "prometheus_client",
                                                        "aiohttp", "cupy", "torch")) == []


def test_the_autoscaler_is_pure_and_shared() -> None:
    # The gateway, `faastube run` and the operator all decide through it: no clock, no I/O.
    assert _violations(SIDECAR / "faastube_autoscale", ("faastube_sidecar", "faastube_operator",
                                                        "faastube_runtime", "faastube_bench",
                                                        "faastube_placement", "kopf", "kubernetes", "grpc",
                                                        "prometheus_client", "aiohttp", "asyncio", "time",
                                                        "cupy", "torch")) == []


def test_the_group_and_version_are_spelled_once() -> None:
    spelled = [f"{path.relative_to(ROOT)}" for package in (SIDECAR, ROOT / "operator")
               for path in sorted(package.rglob("*.py"))
               if "v1alpha1" in path.read_text() and path.name != "api.py"]
    assert spelled == []


def test_the_sidecar_never_imports_the_operator_or_the_runtime() -> None:
    assert _violations(SIDECAR / "faastube_sidecar", ("faastube_operator", "faastube_runtime", "kopf")) == []


def test_the_operator_never_imports_the_sidecar_daemon() -> None:
    assert _violations(ROOT / "operator" / "faastube_operator", ("faastube_sidecar", "faastube_runtime")) == []


@pytest.mark.parametrize("module", ["framing.py", "dispatch.py"])
def test_framing_and_dispatch_sit_above_the_backends(module: str) -> None:
    imports = _imports(SIDECAR / "faastube_sidecar" / module)
    assert not {n for n in imports if n.startswith("faastube_sidecar.backends")}


def test_framing_knows_nothing_of_what_frames_mean() -> None:
    imports = _imports(SIDECAR / "faastube_sidecar" / "framing.py")
    assert not {n for n in imports if n.startswith("faastube_sidecar.")}


def test_importing_the_client_pulls_in_no_heavy_dependency() -> None:
    code = ("import sys, faastube; "
            "heavy = [m for m in ('kopf', 'kubernetes', 'grpc', 'cupy', 'torch', 'prometheus_client', 'aiohttp', "
            "'faastube_sidecar', 'faastube_operator', 'faastube_spec', 'faastube_placement', 'yaml') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"
