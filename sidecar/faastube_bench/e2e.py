"""End-to-end benchmark: the example workflows with tube passing vs host-centric passing.

For each example workflow, the same functions run twice on this machine, once with
``--passing tube`` (outputs stay in the sidecar's pools; a GPU consumer reads GPU
memory) and once with ``--passing host-centric`` (what INFless-style platforms do:
every GPU output is copied device -> pageable host -> shared memory, and every GPU
input host -> device by the function itself). Under sporadic, periodic and bursty
arrivals it measures:

* P99 latency at a fixed offered rate (the same rate for both modes: half of what
  host-centric passing sustains one request at a time), and
* the highest offered rate whose requests all succeed within the workflow's SLO at
  P99 (a doubling ladder, then one bisection step),

and reports each for tube as a ratio to host-centric from the same session.
Writes ``e2e.json`` and ``e2e.png`` under ``--out`` and prints a table last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from faastube.sdk import Passing

logger = logging.getLogger(__name__)

REPO_EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
EXAMPLES = ("traffic", "driving", "image", "video")
ARRIVALS = ("sporadic", "periodic", "bursty")
MODES = ("host-centric", "tube")  # host-centric first: it sets the shared offered rate


@dataclass(frozen=True)
class Settings:
    requests: int  # per measured point
    warmup: int
    ladder_steps: int
    budget_s: float
    concurrency: int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for e2e.json / e2e.png")
    parser.add_argument("--quick", action="store_true",
                        help="12 requests per point, 3 search steps, 180 s of searching (~6 minutes in all)")
    parser.add_argument("--workflows", default=",".join(EXAMPLES),
                        help=f"comma-separated example names or workflow YAML paths (default {','.join(EXAMPLES)})")
    parser.add_argument("--arrivals", default=",".join(ARRIVALS), help="comma-separated arrival shapes")
    parser.add_argument("--backend", choices=("host", "cuda", "auto"), default="auto")
    parser.add_argument("--scale", type=float, default=None,
                        help="FAASTUBE_EXAMPLE_SCALE for the examples (default: theirs; 1.0 on a GPU)")
    parser.add_argument("--requests", type=int, default=None, help="requests per measured point")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds shared by all rate searches (default 420, quick 180)")
    parser.add_argument("--plot-only", action="store_true", help="redraw e2e.png from an existing e2e.json")


def _settings(args: argparse.Namespace) -> Settings:
    if args.quick:
        base = Settings(requests=12, warmup=3, ladder_steps=3, budget_s=180.0, concurrency=64)
    else:
        base = Settings(requests=60, warmup=5, ladder_steps=5, budget_s=420.0, concurrency=128)
    return Settings(requests=args.requests or base.requests, warmup=base.warmup,
                    ladder_steps=base.ladder_steps, budget_s=args.budget_s or base.budget_s,
                    concurrency=base.concurrency)


def _workflow_paths(spec: str) -> list[Path]:
    paths = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        path = Path(item) if item.endswith((".yaml", ".yml")) else REPO_EXAMPLES / item / "workflow.yaml"
        if not path.exists():
            raise SystemExit(f"faastube bench e2e: --workflows: {item!r}: no such workflow ({path})")
        paths.append(path)
    return paths


def _p99(values: Sequence[float]) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values), 99)) if values else float("inf")


class Session:
    """One workflow in one passing mode: a local runtime and measurements against it."""

    def __init__(self, runtime: Any, body: bytes, settings: Settings, slo_s: float, started: float) -> None:
        self.runtime = runtime
        self.body = body
        self.settings = settings
        self.slo_s = slo_s
        self.started = started
        self.deadline = float("inf")

    async def point(self, arrival: str, rate_per_s: float, *, count: int, seed: int = 0) -> dict[str, Any]:
        from faastube_runtime import arrivals, loadgen, report

        offsets = arrivals.offsets(arrival, count=count, rate_per_s=rate_per_s, seed=seed)
        sent = time.monotonic()
        results = await loadgen.drive(self.runtime.url, self.body, offsets,
                                      concurrency=self.settings.concurrency, timeout_s=120)
        summary = report.summarize(results, duration_s=time.monotonic() - sent)
        latencies = [r.latency_s for r in results if r.ok]
        p99 = _p99(latencies) if summary.ok == summary.requests else None  # None: some failed
        return {"arrival": arrival, "rate_per_s": rate_per_s, "requests": summary.requests, "ok": summary.ok,
                "p50_s": summary.client_latency.p50_s, "p99_s": p99,
                "throughput_per_s": summary.throughput_per_s,
                "data_passing_p50_s": summary.stages["data_passing_s"].p50_s,
                "compute_p50_s": summary.stages["compute_s"].p50_s,
                "meets_slo": p99 is not None and p99 <= self.slo_s}

    async def sequential(self, count: int) -> float:
        """Median gateway latency of ``count`` requests sent one after another."""
        import numpy as np
        from faastube_runtime import loadgen

        results = await loadgen.drive(self.runtime.url, self.body, [0.0] * count, concurrency=1, timeout_s=120)
        failed = [r for r in results if not r.ok]
        if failed:
            raise RuntimeError(f"warm-up request failed: HTTP {failed[0].status}: {failed[0].error}")
        return float(np.median([r.breakdown["total_s"] if r.breakdown else r.latency_s for r in results]))

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    async def max_rate(self, arrival: str, start_rate: float, *, budget_s: float) -> dict[str, Any]:
        """Highest offered rate meeting the SLO: double until it fails, then bisect once.

        Going down from the start rate is tried once only: low rates take long to measure.
        """
        self.deadline = time.monotonic() + budget_s
        steps: list[dict[str, Any]] = []
        good: float | None = None
        bad: float | None = None
        rate = start_rate
        for _ in range(self.settings.ladder_steps):
            if self.out_of_time():
                break
            point = await self.point(arrival, rate, count=self.settings.requests, seed=len(steps))
            steps.append(point)
            if point["meets_slo"]:
                good = rate
                if bad is not None:
                    break
                rate *= 2
            else:
                bad = rate
                if good is not None or rate < start_rate:
                    break
                rate /= 2
        if good is not None and bad is not None and bad > good and not self.out_of_time():
            mid = (good + bad) / 2
            point = await self.point(arrival, mid, count=self.settings.requests, seed=len(steps))
            steps.append(point)
            if point["meets_slo"]:
                good = mid
        # None: nothing measured met the SLO (or there was no time to measure)
        return {"max_rate_meeting_slo_per_s": good, "search": steps,
                "complete": bad is not None and good is not None}


async def _bench_workflow(path: Path, args: argparse.Namespace, settings: Settings,
                          started: float, *, workflows: int) -> dict[str, Any]:
    from faastube_runtime.cli import request_input
    from faastube_runtime.gateway import to_npy
    from faastube_runtime.local import LocalOptions, LocalRuntime
    from faastube_spec.workflow import load_workflow

    workflow = load_workflow(path)
    body = to_npy(request_input(workflow, None))
    arrivals = [a.strip() for a in args.arrivals.split(",") if a.strip()]
    result: dict[str, Any] = {"slo_s": workflow.slo_s, "input_bytes": len(body), "modes": {}}
    # an equal share of the time budget for every rate search of the run
    search_budget_s = settings.budget_s / max(1, workflows * len(MODES) * len(arrivals))
    base_rate: float | None = None
    for mode in MODES:
        options = LocalOptions(backend=args.backend, passing=cast("Passing", mode))
        t0 = time.monotonic()
        async with LocalRuntime(workflow, options) as runtime:
            print(f"[{time.monotonic() - started:6.1f}s] {workflow.name} {mode}: started in "
                  f"{time.monotonic() - t0:.1f}s ({runtime.backend} backend)", file=sys.stderr, flush=True)
            session = Session(runtime, body, settings, workflow.slo_s, started)
            # one request at a time: warms caches and CUDA contexts, measures unloaded latency
            unloaded_s = await session.sequential(settings.warmup)
            if base_rate is None:
                base_rate = 0.5 / max(unloaded_s, 1e-3)
            mode_result: dict[str, Any] = {"backend": runtime.backend, "unloaded_p50_s": unloaded_s,
                                           "arrivals": {}}
            for arrival in arrivals:
                fixed = await session.point(arrival, base_rate, count=settings.requests)
                search = await session.max_rate(arrival, base_rate, budget_s=search_budget_s)
                mode_result["arrivals"][arrival] = {"fixed_rate": fixed, **search}
                best = search["max_rate_meeting_slo_per_s"]
                best_text = "no rate" if best is None else f"{best:.1f}/s"
                print(f"[{time.monotonic() - started:6.1f}s]   {arrival}: P99 {fixed['p99_s'] * 1e3:.1f} ms at "
                      f"{base_rate:.1f}/s; max {best_text} within SLO", file=sys.stderr, flush=True)
            result["modes"][mode] = mode_result
    result["base_rate_per_s"] = base_rate
    result["ratios"] = _ratios(result, arrivals)
    return result


def _ratios(result: dict[str, Any], arrivals: Sequence[str]) -> dict[str, dict[str, float | None]]:
    ratios: dict[str, dict[str, float | None]] = {}
    host, tube = result["modes"].get("host-centric"), result["modes"].get("tube")
    if host is None or tube is None:
        return ratios
    for arrival in arrivals:
        h, t = host["arrivals"].get(arrival), tube["arrivals"].get(arrival)
        if h is None or t is None:
            continue
        hp, tp = h["fixed_rate"]["p99_s"], t["fixed_rate"]["p99_s"]
        hr, tr = h["max_rate_meeting_slo_per_s"], t["max_rate_meeting_slo_per_s"]
        ratios[arrival] = {
            "p99_tube_over_host": tp / hp if hp and tp is not None else None,
            "max_rate_tube_over_host": tr / hr if hr and tr is not None else None,
        }
    return ratios


def _machine() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "host": platform.node(),
                            "cpus": os.cpu_count()}
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
        info["gpus"] = [cupy.cuda.runtime.getDeviceProperties(i)["name"].decode() for i in range(count)]
    except Exception:  # noqa: BLE001 - no CuPy, no driver or no GPU all mean a CPU-only run
        info["gpus"] = []
    return info


def table(data: dict[str, Any]) -> str:
    rows = [(f"{'workflow':<10}{'arrival':<10}{'P99 host':>10}{'P99 tube':>10}{'ratio':>7}"
             f"{'max/s host':>11}{'max/s tube':>11}{'ratio':>7}")]

    def fmt(value: float | None, scale: float = 1.0, width: int = 10, digits: int = 1) -> str:
        if value is None:
            return f"{'-':>{width}}"
        return f"{value * scale:>{width}.{digits}f}"  # '-': failed requests or not measured

    for name, wf in data["workflows"].items():
        host, tube = wf["modes"].get("host-centric"), wf["modes"].get("tube")
        if host is None or tube is None:
            continue
        for arrival, ratio in wf["ratios"].items():
            h, t = host["arrivals"][arrival], tube["arrivals"][arrival]
            rows.append(f"{name:<10}{arrival:<10}{fmt(h['fixed_rate']['p99_s'], 1e3)}"
                        f"{fmt(t['fixed_rate']['p99_s'], 1e3)}{fmt(ratio['p99_tube_over_host'], 1, 7, 2)}"
                        f"{fmt(h['max_rate_meeting_slo_per_s'], 1, 11)}{fmt(t['max_rate_meeting_slo_per_s'], 1, 11)}"
                        f"{fmt(ratio['max_rate_tube_over_host'], 1, 7, 2)}")
    rows.append("P99 in ms at the same offered rate; max/s: highest offered rate meeting the SLO at P99; "
                "ratio = tube / host-centric")
    return "\n".join(rows)


def plot(data: dict[str, Any], out: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no e2e.png")
        return None
    labels, p99, rate = [], [], []
    for name, wf in data["workflows"].items():
        for arrival, ratio in wf.get("ratios", {}).items():
            labels.append(f"{name}\n{arrival}")
            p99.append(ratio["p99_tube_over_host"] or 0.0)
            rate.append(ratio["max_rate_tube_over_host"] or 0.0)
    fig, axes = plt.subplots(1, 2, figsize=(max(8, len(labels) * 0.9), 4.5))
    for ax, values, title in ((axes[0], p99, "P99 latency, tube / host-centric (lower is better)"),
                              (axes[1], rate, "max rate within SLO, tube / host-centric (higher is better)")):
        ax.bar(range(len(values)), values, color="#3a7bd5")
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"FaaSTube end to end ({', '.join(data['machine'].get('gpus', [])[:1]) or 'CPU only'})")
    fig.tight_layout()
    path = out / "e2e.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    settings = _settings(args)
    started = time.monotonic()
    data: dict[str, Any] = {"benchmark": "e2e", "machine": _machine(),
                            "settings": {"requests": settings.requests, "ladder_steps": settings.ladder_steps,
                                         "budget_s": settings.budget_s, "quick": bool(args.quick),
                                         "scale": os.environ.get("FAASTUBE_EXAMPLE_SCALE")},
                            "workflows": {}}
    paths = _workflow_paths(args.workflows)
    for path in paths:
        name = path.parent.name
        try:
            data["workflows"][name] = await _bench_workflow(path, args, settings, started,
                                                            workflows=len(paths))
        except Exception as e:
            logger.exception("workflow %s failed", name)
            data["workflows"][name] = {"error": f"{type(e).__name__}: {e}", "modes": {}, "ratios": {}}
    data["elapsed_s"] = time.monotonic() - started
    return data


def run(args: argparse.Namespace) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "e2e.json"
    if args.plot_only:
        data = json.loads(json_path.read_text())
    else:
        if args.scale is not None:
            if not 0 < args.scale <= 1:
                raise SystemExit(f"faastube bench e2e: --scale must be in (0, 1], got {args.scale}")
            os.environ["FAASTUBE_EXAMPLE_SCALE"] = str(args.scale)
        data = asyncio.run(_run(args))
        json_path.write_text(json.dumps(data, indent=2, default=str))
    png = plot(data, args.out)
    print(f"wrote {json_path}" + (f", {png}" if png else ""))
    print(table(data))
    return 0 if all("error" not in wf for wf in data["workflows"].values()) else 1
