"""Hostile and very large Workflow documents: how long each takes and how much memory.

Each case runs in a fresh Python process (so one case's peak memory is not another's)
with a wall-clock limit, through the same entry points as the runtime and the operator:
``load_workflow`` for a YAML file, ``parse_workflow`` for a document that arrived as a
dict (a Kubernetes object), ``workflow_source.parse_document`` for a pod's JSON
environment variable, and ``reconcile.parse`` for the operator. Targets: every hostile
case rejected with a clear error within 1 s and 100 MiB; a 10,000-function workflow
validated within 1 s.

Prints one line per case: outcome, seconds (the best of ``--repeat`` runs), peak RSS
growth over the process's RSS just before the case (MiB, the largest of the runs; the
input is built before the kernel's peak count is reset), and the start of the error
message. With ``--out`` also writes them as JSON.

    PYTHONPATH=sidecar:operator .venv/bin/python bench/workflow_abuse.py [--timeout 60] [--out FILE]
    PYTHONPATH=sidecar:operator .venv/bin/python bench/workflow_abuse.py --case alias-bomb
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HEAD = "apiVersion: faastube.io/v1alpha1\nkind: Workflow\nmetadata: {name: abuse}\n"


def _function(name: str) -> dict[str, Any]:
    return {"name": name, "handler": "functions:step", "gpu": {"memory": "1Gi"}}


def _function_with_every_field(name: str) -> dict[str, Any]:
    return {"name": name, "handler": "functions:step", "image": "ghcr.io/faastube/examples:0.1.0",
            "gpu": {"memory": "1Gi"}, "replicas": 2, "slo": "500ms", "computeTime": "20ms"}


def _document(functions: list[dict[str, Any]], edges: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "faastube.io/v1alpha1", "kind": "Workflow", "metadata": {"name": "big"},
            "spec": {"slo": "10s", "functions": functions, "edges": edges}}


def chain(n: int) -> dict[str, Any]:
    """``n`` functions in a line, every optional field set (the most values per function)."""
    return _document([_function_with_every_field(f"f{i}") for i in range(n)],
                     [{"from": f"f{i}", "to": f"f{i + 1}", "size": "1MB"} for i in range(n - 1)])


def fan_out(width: int) -> dict[str, Any]:
    """One source, ``width`` functions in parallel, one sink: 2 x width edges."""
    middle = [f"m{i}" for i in range(width)]
    return _document([_function("source"), *(_function(m) for m in middle), _function("sink")],
                     [{"from": "source", "to": m, "size": "1MB"} for m in middle]
                     + [{"from": m, "to": "sink", "size": "1MB"} for m in middle])


def _yaml_of(doc: dict[str, Any]) -> str:
    """Flow-style YAML, one function or edge a line, as a person might generate it."""
    spec = doc["spec"]
    lines = [HEAD.replace("abuse", doc["metadata"]["name"]), "spec:\n", f"  slo: {spec['slo']}\n",
             "  functions:\n"]
    lines += [f"    - {json.dumps(f)}\n" for f in spec["functions"]]
    lines.append("  edges:\n")
    lines += [f"    - {json.dumps(e)}\n" for e in spec["edges"]]
    return "".join(lines)


def _nested_dict(depth: int) -> Any:
    value: Any = "1Gi"
    for _ in range(depth):
        value = {"memory": value}
    return value


# Each case returns (how, argument): how is "yaml" (text written to a file, then load_workflow),
# "dict" (parse_workflow), "env" (parse_document) or "operator" (reconcile.parse of the spec).
CASES: dict[str, Callable[[], tuple[str, Any]]] = {
    # Nine levels of ten aliases each: 10**9 values, in 400 bytes; kind's error quotes it.
    "alias-bomb": lambda: ("yaml", "apiVersion: faastube.io/v1alpha1\n"
                           + "metadata:\n  name: abuse\n  annotations:\n"
                           + "    l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
                           + "".join(f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]\n"
                                     for i in range(1, 10))
                           + "kind: *l9\nspec: {slo: 1s, functions: [{name: a, handler: 'm:f'}]}\n"),
    "recursive-alias": lambda: ("yaml", HEAD + "spec: &s {slo: 1s, functions: [*s]}\n"),
    "deep-brackets-50k": lambda: ("yaml", HEAD + "spec: {slo: 1s, functions: " + "[" * 50_000 + "\n"),
    "deep-mappings-5k": lambda: ("yaml", HEAD + "spec: {slo: 1s, functions: " + "{a: " * 5_000 + "\n"),
    "huge-document-64MiB": lambda: ("yaml", HEAD + "spec: {slo: 1s, functions: [{name: a, handler: 'm:f'}]}\n"
                                    + "# " + "x" * 64 * 2**20 + "\n"),
    "many-values-4MiB": lambda: ("yaml", HEAD + "spec: {slo: 1s, functions: [" + "[]," * 1_300_000 + "]}\n"),
    "many-floats-4MiB": lambda: ("yaml", HEAD + "spec: {slo: 1s, functions: ["
                                 + ",".join(f"{i}.5" for i in range(400_000)) + "]}\n"),
    "many-aliases-4MiB": lambda: ("yaml", HEAD + "spec: {slo: 1s, functions: [&a x, "
                                  + "*a, " * 900_000 + "]}\n"),
    "long-string-1MiB": lambda: ("yaml", HEAD + "spec: {slo: 1s, functions: [{name: a, handler: '"
                                 + "m" * 2**20 + ":f'}]}\n"),
    "long-string-200KiB": lambda: ("yaml", HEAD + "spec: {slo: 1s, functions: [{name: a, handler: '"
                                   + "m." * 100 * 2**10 + "'}]}\n"),
    "huge-int-100k-digits": lambda: ("yaml", HEAD + "spec: {slo: 1s, functions: [{name: a, handler: 'm:f', "
                                     + "replicas: " + "9" * 100_000 + "}]}\n"),
    "huge-size-1e300": lambda: ("yaml", HEAD + "spec: {slo: 1s, functions: [{name: a, handler: 'm:f', "
                                + "gpu: {memory: 1e300Gi}}]}\n"),
    "reserved-name-gateway": lambda: ("yaml", HEAD + "spec: {slo: 1s, functions: [{name: gateway, "
                                      + "handler: 'm:f'}]}\n"),
    "unknown-fields-100k": lambda: ("yaml", HEAD + "spec: {slo: 1s, functions: [{name: a, handler: 'm:f', "
                                    + ", ".join(f"replica{i}: 1" for i in range(100_000)) + "}]}\n"),
    "unknown-edges-10k": lambda: ("dict", {**chain(10_000), "spec": {
        **chain(10_000)["spec"],
        "edges": [{"from": f"f{i}", "to": f"g{i}", "size": "1MB"} for i in range(10_000)]}}),
    "cycle-10k": lambda: ("dict", {**chain(10_000), "spec": {
        **chain(10_000)["spec"],
        "edges": chain(10_000)["spec"]["edges"] + [{"from": "f9999", "to": "f0", "size": "1MB"}]}}),
    "deep-dict-100k": lambda: ("dict", {**chain(1), "spec": {"slo": "1s", "functions": [
        {"name": "a", "handler": "m:f", "gpu": _nested_dict(100_000)}]}}),
    "deep-json-env-50k": lambda: ("env", '{"apiVersion": "faastube.io/v1alpha1", "spec": '
                                  + "[" * 50_000 + "]" * 50_000 + "}"),
    "operator-deep-spec-100k": lambda: ("operator", {"slo": "1s", "functions": [
        {"name": "a", "handler": "m:f", "gpu": _nested_dict(100_000)}]}),
    "operator-gateway-name": lambda: ("operator", {"slo": "1s", "functions": [
        {"name": "gateway", "handler": "m:f"}]}),
    # Valid workflows: these must be accepted.
    "chain-10k-validate": lambda: ("dict", chain(10_000)),
    "chain-10k-load": lambda: ("yaml", _yaml_of(chain(10_000))),
    "fan-out-10k-validate": lambda: ("dict", fan_out(10_000)),
    "fan-out-10k-load": lambda: ("yaml", _yaml_of(fan_out(10_000))),
}


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def _reset_peak() -> bool:
    """Start the kernel's peak-RSS count afresh (Linux >= 4.0), so building the input does not count."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_case(name: str) -> dict[str, Any]:
    """Run one case in this process and describe the outcome."""
    from faastube.errors import FaastubeError
    from faastube_operator import reconcile
    from faastube_runtime import workflow_source
    from faastube_spec.workflow import load_workflow, parse_workflow

    how, argument = CASES[name]()
    path = None
    if how == "yaml":
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False, encoding="utf-8") as f:
            f.write(argument)
        path = f.name
        argument = None  # the file is what is read
    before_mib = _status_mib("VmRSS")
    fresh_peak = _reset_peak()
    started = time.perf_counter()
    try:
        if how == "yaml":
            workflow = load_workflow(path)  # type: ignore[arg-type]
        elif how == "dict":
            workflow = parse_workflow(argument)
        elif how == "env":
            workflow = workflow_source.parse_document(argument, source="$FAASTUBE_WORKFLOW_DOCUMENT")
        else:
            workflow = reconcile.parse(reconcile.WorkflowObject(
                name="abuse", namespace="default", generation=1, spec=argument, status={}))
        outcome, message = "accepted", f"{len(workflow.functions)} functions, {len(workflow.edges)} edges"
    except FaastubeError as e:
        outcome, message = "rejected", str(e)
    except BaseException as e:  # what the bench is here to find: anything but a clear error
        outcome, message = f"CRASH {type(e).__name__}", str(e)
    seconds = time.perf_counter() - started
    peak_mib = (_status_mib("VmHWM") if fresh_peak
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if path is not None:
        os.unlink(path)
    return {"case": name, "outcome": outcome, "seconds": round(seconds, 3),
            "peak_growth_mib": round(max(0.0, peak_mib - before_mib), 1),
            "message_chars": len(message), "message": " | ".join(message.splitlines())[:200]}


def _run_in_child(name: str, timeout_s: float) -> dict[str, Any]:
    try:
        done = subprocess.run([sys.executable, __file__, "--case", name], capture_output=True,
                              text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"case": name, "outcome": "TIMEOUT", "seconds": timeout_s, "peak_growth_mib": None,
                "message": f"still running after {timeout_s:g} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        result: dict[str, Any] = json.loads(lines[-1])
        return result
    return {"case": name, "outcome": f"CRASH rc={done.returncode}", "seconds": None,
            "peak_growth_mib": None, "message": done.stderr.strip()[-200:]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=sorted(CASES), help="run one case here and print its JSON")
    parser.add_argument("--only", nargs="+", choices=sorted(CASES), help="run these cases only")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case (default 3)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per run (default 60)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args.case)))
        return 0
    results: list[dict[str, Any]] = []
    print(f"{'case':26} {'outcome':16} {'seconds':>8} {'MiB':>7}  message")
    for name in args.only or CASES:
        runs = [_run_in_child(name, args.timeout)]
        while len(runs) < args.repeat and runs[-1]["outcome"] in ("accepted", "rejected"):
            runs.append(_run_in_child(name, args.timeout))
        result = min(runs, key=lambda r: r["seconds"] if r["seconds"] is not None else float("inf"))
        memory = [r["peak_growth_mib"] for r in runs if r["peak_growth_mib"] is not None]
        result = {**result, "runs": len(runs), "peak_growth_mib": max(memory) if memory else None}
        results.append(result)
        seconds = "-" if result["seconds"] is None else f"{result['seconds']:.3f}"
        mib = "-" if result["peak_growth_mib"] is None else f"{result['peak_growth_mib']:.1f}"
        print(f"{name:26} {result['outcome']:16} {seconds:>8} {mib:>7}  {result['message'][:110]}",
              flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"python": platform.python_version(), "machine": platform.machine(),
                                        "cpus": os.cpu_count(), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
