"""End-to-end benchmark: the example workflows, today's runtime vs the scaled one, each
with tube and host-centric passing.

Four configurations of every example workflow run on this machine, one after another:

* runtime ``today``: every function one replica, no batching, no autoscaling (the
  Workflow's ``batch``, ``minReplicas``, ``maxReplicas`` and ``targetConcurrency`` are
  removed), i.e. the runtime before warm starts, batching and autoscaling;
* runtime ``scaled``: the Workflow as written (batch policies, replica bounds), with
  local mode's autoscaler on;
* each with ``--passing tube`` (outputs stay in the sidecar's pools) and
  ``--passing host-centric`` (INFless-style: through pageable host memory).

Under sporadic, periodic and bursty arrivals each configuration reports:

* the first request's latency once ``faastube run`` says it is ready, against the warm
  p50 (one request at a time, after it);
* the highest offered rate whose requests all succeed within the workflow's SLO at P99:
  the rate doubles from a start until a rate fails, then bisects until the failing rate
  is within ``precision`` of the best passing one, so that every reported maximum has a
  measured failure just above it (``complete: false`` says the budget ran out first);
* P99 at a common rate: today's highest rate (per passing mode and arrival), which
  the scaled runtime is measured at too;
* GPU utilisation (NVML, the busiest GPU) during the highest passing point.

Ratios (same run): scaled / today highest rate, scaled / today P99 at today's highest
rate, tube / host-centric highest rate in the scaled runtime. Writes ``e2e.json`` and
``e2e.png`` under ``--out`` and prints a table last.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from faastube.sdk import Passing
    from faastube_spec.workflow import Workflow

logger = logging.getLogger(__name__)

REPO_EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
EXAMPLES = ("traffic", "driving", "image", "video")
ARRIVALS = ("sporadic", "periodic", "bursty")
RUNTIMES = ("today", "scaled")  # today first: its highest rates are the scaled runtime's common rates
MODES = ("tube", "host-centric")
# What the "today" runtime takes out of a Workflow: the features it did not have.
SCALING_FIELDS = ("batch", "minReplicas", "maxReplicas", "targetConcurrency")


@dataclasses.dataclass(frozen=True)
class Settings:
    min_requests: int  # per measured point, at least
    max_requests: int  # per measured point, at most
    point_s: float  # a point lasts about this long at its rate (more requests at higher rates)
    warmup: int  # sequential requests after the first, for the warm p50
    precision: float  # stop bisecting once failing rate / passing rate <= this
    budget_s: float  # seconds shared by all rate searches of the run
    concurrency: int  # the load generator's open connections


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for e2e.json / e2e.png")
    parser.add_argument("--quick", action="store_true",
                        help="short points, coarser search (precision 1.3), 240 s of searching")
    parser.add_argument("--workflows", default=",".join(EXAMPLES),
                        help=f"comma-separated example names or workflow YAML paths (default {','.join(EXAMPLES)})")
    parser.add_argument("--arrivals", default=",".join(ARRIVALS), help="comma-separated arrival shapes")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES),
                        help="comma-separated: today (1 replica, no batching) and/or scaled")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated passing modes")
    parser.add_argument("--skip", default="",
                        help="comma-separated runtime/mode pairs not to run, e.g. today/host-centric "
                             "(the targets compare scaled with today's tube runtime)")
    parser.add_argument("--backend", choices=("host", "cuda", "auto"), default="auto")
    parser.add_argument("--scale", type=float, default=None,
                        help="FAASTUBE_EXAMPLE_SCALE for the examples (default: theirs; 1.0 on a GPU)")
    parser.add_argument("--requests", type=int, default=None, help="least requests per measured point")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds shared by all rate searches (default 900, quick 240)")
    parser.add_argument("--plot-only", action="store_true", help="redraw e2e.png from an existing e2e.json")


def _settings(args: argparse.Namespace) -> Settings:
    if args.quick:
        base = Settings(min_requests=12, max_requests=240, point_s=4.0, warmup=3, precision=1.3,
                        budget_s=240.0, concurrency=128)
    else:
        base = Settings(min_requests=30, max_requests=600, point_s=10.0, warmup=5, precision=1.15,
                        budget_s=900.0, concurrency=256)
    return dataclasses.replace(base, min_requests=args.requests or base.min_requests,
                               budget_s=args.budget_s or base.budget_s)


def _csv(text: str, allowed: Sequence[str], flag: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [i for i in items if i not in allowed]
    if bad or not items:
        raise SystemExit(f"faastube bench e2e: {flag}: expected some of {', '.join(allowed)}, got {text!r}")
    return items


def _skipped(text: str) -> set[tuple[str, str]]:
    pairs = set()
    for item in (s.strip() for s in text.split(",") if s.strip()):
        runtime, _, mode = item.partition("/")
        if runtime not in RUNTIMES or mode not in MODES:
            raise SystemExit(f"faastube bench e2e: --skip: {item!r} is not runtime/mode "
                             f"({'|'.join(RUNTIMES)}/{'|'.join(MODES)})")
        pairs.add((runtime, mode))
    return pairs


def _workflow_paths(spec: str) -> list[Path]:
    paths = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        path = Path(item) if item.endswith((".yaml", ".yml")) else REPO_EXAMPLES / item / "workflow.yaml"
        if not path.exists():
            raise SystemExit(f"faastube bench e2e: --workflows: {item!r}: no such workflow ({path})")
        paths.append(path)
    return paths


def runtime_variant(workflow: Workflow, runtime: str) -> Workflow:
    """The workflow as the ``runtime`` configuration runs it (``today`` strips scaling)."""
    from faastube_spec.workflow import dump_workflow, parse_workflow

    if runtime == "scaled":
        return workflow
    doc = dump_workflow(workflow)
    for fn in doc["spec"]["functions"]:
        for key in SCALING_FIELDS:
            fn.pop(key, None)
        fn["replicas"] = 1
    return parse_workflow(doc, source_path=workflow.source_path)


def _p99(values: Sequence[float]) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values), 99)) if values else float("inf")


class Session:
    """One workflow in one configuration: a local runtime and measurements against it."""

    def __init__(self, runtime: Any, body: bytes, settings: Settings, slo_s: float) -> None:
        self.runtime = runtime
        self.body = body
        self.settings = settings
        self.slo_s = slo_s
        self.deadline = float("inf")

    def _count(self, rate_per_s: float) -> int:
        """Requests for a point: about ``point_s`` worth at the rate, within the bounds, and no
        more than the search's remaining time holds (never below ``min_requests``)."""
        count = min(self.settings.max_requests,
                    max(self.settings.min_requests, math.ceil(rate_per_s * self.settings.point_s)))
        left_s = self.deadline - time.monotonic()
        if math.isfinite(left_s):
            count = min(count, max(self.settings.min_requests, math.floor(rate_per_s * max(left_s, 0.0))))
        return int(count)

    async def point(self, arrival: str, rate_per_s: float, *, seed: int = 0) -> dict[str, Any]:
        from faastube_runtime import arrivals, loadgen, report

        from faastube_bench.gpu_util import Sampler

        count = self._count(rate_per_s)
        offsets = arrivals.offsets(arrival, count=count, rate_per_s=rate_per_s, seed=seed)
        sent = time.monotonic()
        with Sampler() as gpu:
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
                "queueing_p50_s": summary.stages["queueing_s"].p50_s,
                "gpu_util_busiest_pct": gpu.busiest(),
                "meets_slo": p99 is not None and p99 <= self.slo_s}

    async def one(self) -> float:
        """Latency of one request, as the client sees it."""
        from faastube_runtime import loadgen

        (result,) = await loadgen.drive(self.runtime.url, self.body, [0.0], concurrency=1, timeout_s=300)
        if not result.ok:
            raise RuntimeError(f"request failed: HTTP {result.status}: {result.error}")
        return result.latency_s

    async def sequential(self, count: int) -> float:
        """Median client latency of ``count`` requests sent one after another."""
        import numpy as np

        return float(np.median([await self.one() for _ in range(count)]))

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    async def max_rate(self, arrival: str, start_rate: float, *, budget_s: float,
                       seed_base: int = 0) -> dict[str, Any]:
        """Highest offered rate meeting the SLO: double (or halve) until the answer changes,
        then bisect (geometrically) until failing / passing <= ``precision``."""
        self.deadline = time.monotonic() + budget_s
        steps: list[dict[str, Any]] = []
        good: float | None = None
        bad: float | None = None
        best_point: dict[str, Any] | None = None
        rate = start_rate
        while not self.out_of_time():
            point = await self.point(arrival, rate, seed=seed_base + len(steps))
            steps.append(point)
            if point["meets_slo"]:
                if good is None or rate > good:
                    good, best_point = rate, point
            elif bad is None or rate < bad:
                bad = rate
            if good is not None and bad is not None:
                if bad / good <= self.settings.precision or bad < good:
                    break
                rate = math.sqrt(good * bad)
            elif good is not None:
                rate *= 2
            else:
                rate /= 2
                if rate < start_rate / 64:
                    break
        complete = good is not None and bad is not None and bad / good <= self.settings.precision
        # None: nothing measured met the SLO (or there was no time to measure)
        return {"max_rate_meeting_slo_per_s": good, "at_max": best_point, "search": steps,
                "failing_rate_above_per_s": bad, "complete": complete}


def _local_options(args: argparse.Namespace, runtime: str, mode: str) -> Any:
    from faastube_autoscale import AutoscaleSettings
    from faastube_runtime.local import LocalOptions

    # Knative's 60 s / 6 s windows, shortened so that a rate point of a few seconds moves the
    # decision; replicas stay up across the points of a search (scale-down after 60 s).
    autoscale = AutoscaleSettings(stable_window_s=10.0, panic_window_s=2.0, scale_down_delay_s=60.0,
                                  scale_to_zero_grace_s=60.0)
    return LocalOptions(backend=args.backend, passing=cast("Passing", mode), autoscale=runtime == "scaled",
                        autoscale_settings=autoscale, startup_timeout_s=300.0)


async def _bench_config(workflow: Workflow, body: bytes, args: argparse.Namespace, settings: Settings,
                        started: float, *, runtime_name: str, mode: str, arrivals: Sequence[str],
                        start_rate: float | None, common_rates: dict[str, float | None] | None,
                        search_budget_s: float) -> dict[str, Any]:
    """One configuration. ``common_rates``: per arrival, the rate to measure P99 at (today's
    highest); None for today's runtime itself, whose point at its highest rate is that P99."""
    from faastube_runtime.local import LocalRuntime

    t0 = time.monotonic()
    async with LocalRuntime(runtime_variant(workflow, runtime_name), _local_options(args, runtime_name, mode)) as rt:
        ready_s = time.monotonic() - t0
        session = Session(rt, body, settings, workflow.slo_s)
        first_s = await session.one()  # the first request once the runtime says it is ready
        warm_p50_s = await session.sequential(settings.warmup)
        print(f"[{time.monotonic() - started:6.1f}s] {workflow.name} {runtime_name}/{mode}: ready in "
              f"{ready_s:.1f}s ({rt.backend}); first request {first_s * 1e3:.0f} ms, warm p50 "
              f"{warm_p50_s * 1e3:.0f} ms", file=sys.stderr, flush=True)
        rate0 = start_rate if start_rate is not None else 0.5 / max(warm_p50_s, 1e-3)
        result: dict[str, Any] = {"backend": rt.backend, "ready_s": ready_s, "first_request_s": first_s,
                                  "warm_p50_s": warm_p50_s, "first_over_warm_p50": first_s / warm_p50_s,
                                  "start_rate_per_s": rate0, "arrivals": {}}
        for i, arrival in enumerate(arrivals):
            search = await session.max_rate(arrival, rate0, budget_s=search_budget_s, seed_base=100 * i)
            entry: dict[str, Any] = dict(search)
            common = None if common_rates is None else common_rates.get(arrival)
            if common_rates is None:
                entry["at_common_rate"] = search["at_max"]
            elif common is not None:
                session.deadline = float("inf")  # a full point, whatever the search left
                entry["at_common_rate"] = await session.point(arrival, common, seed=100 * i + 99)
            best = search["max_rate_meeting_slo_per_s"]
            print(f"[{time.monotonic() - started:6.1f}s]   {arrival}: max "
                  f"{'none' if best is None else f'{best:.2f}/s'} within SLO"
                  f"{'' if search['complete'] else ' (search incomplete)'}", file=sys.stderr, flush=True)
            result["arrivals"][arrival] = entry
        result["replicas"] = {name: dataclasses.asdict(scaling) for name, scaling in rt.scaling_report().items()}
    return result


async def _bench_workflow(path: Path, args: argparse.Namespace, settings: Settings, started: float, *,
                          searches: int, checkpoint: Any = None) -> dict[str, Any]:
    from faastube_runtime.cli import request_input
    from faastube_runtime.gateway import to_npy
    from faastube_spec.workflow import load_workflow

    workflow = load_workflow(path)
    body = to_npy(request_input(workflow, None))
    arrivals = _csv(args.arrivals, ARRIVALS, "--arrivals")
    runtimes = _csv(args.runtimes, RUNTIMES, "--runtimes")
    modes = _csv(args.modes, MODES, "--modes")
    skipped = _skipped(args.skip)
    search_budget_s = settings.budget_s / max(1, searches)
    result: dict[str, Any] = {"slo_s": workflow.slo_s, "input_bytes": len(body), "runtimes": {}}
    start_rate: float | None = None
    for runtime_name in [r for r in RUNTIMES if r in runtimes]:
        configs: dict[str, Any] = {}
        for mode in modes:
            if (runtime_name, mode) in skipped:
                continue
            today = result["runtimes"].get("today", {}).get(mode)
            common: dict[str, float | None] | None = None
            if runtime_name == "scaled":
                common = {a: (today["arrivals"][a]["max_rate_meeting_slo_per_s"] if today else None)
                          for a in arrivals}
            configs[mode] = await _bench_config(
                workflow, body, args, settings, started, runtime_name=runtime_name, mode=mode,
                arrivals=arrivals, start_rate=start_rate, common_rates=common, search_budget_s=search_budget_s)
            if start_rate is None:
                start_rate = configs[mode]["start_rate_per_s"]  # one ladder start for every config
            result["runtimes"][runtime_name] = configs
            result["ratios"] = ratios(result, arrivals)
            if checkpoint is not None:
                checkpoint(result)
        result["runtimes"][runtime_name] = configs
    result["ratios"] = ratios(result, arrivals)
    return result


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratios(result: dict[str, Any], arrivals: Sequence[str]) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    today, scaled = result["runtimes"].get("today", {}), result["runtimes"].get("scaled", {})

    def rate(configs: dict[str, Any], mode: str, arrival: str) -> float | None:
        entry = configs.get(mode, {}).get("arrivals", {}).get(arrival)
        return entry["max_rate_meeting_slo_per_s"] if entry else None

    def p99_common(configs: dict[str, Any], mode: str, arrival: str) -> float | None:
        entry = configs.get(mode, {}).get("arrivals", {}).get(arrival) or {}
        point = entry.get("at_common_rate")
        return point["p99_s"] if point else None

    for arrival in arrivals:
        row: dict[str, float | None] = {}
        for mode in MODES:
            key = "tube" if mode == "tube" else "host"
            row[f"max_rate_scaled_over_today_{key}"] = _div(rate(scaled, mode, arrival), rate(today, mode, arrival))
            row[f"p99_scaled_over_today_at_today_max_{key}"] = _div(p99_common(scaled, mode, arrival),
                                                                     p99_common(today, mode, arrival))
        row["max_rate_tube_over_host_scaled"] = _div(rate(scaled, "tube", arrival),
                                                     rate(scaled, "host-centric", arrival))
        row["max_rate_tube_over_host_today"] = _div(rate(today, "tube", arrival),
                                                    rate(today, "host-centric", arrival))
        out[arrival] = row
    return out


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
    def fmt(value: float | None, scale: float = 1.0, width: int = 8, digits: int = 1) -> str:
        if value is None:
            return f"{'-':>{width}}"  # '-': failed requests, not measured, or no rate met the SLO
        return f"{value * scale:>{width}.{digits}f}"

    rows = [f"{'workflow':<9}{'arrival':<9}{'mode':<6}{'today/s':>8}{'scaled/s':>9}{'x':>6}"
            f"{'P99@today-max ms':>17}{'x':>6}{'util%':>6}{'1st/warm':>9}"]
    for name, wf in data["workflows"].items():
        today, scaled = wf.get("runtimes", {}).get("today", {}), wf.get("runtimes", {}).get("scaled", {})
        for arrival, ratio in wf.get("ratios", {}).items():
            for mode in MODES:
                key = "tube" if mode == "tube" else "host"
                t = today.get(mode, {}).get("arrivals", {}).get(arrival, {})
                s = scaled.get(mode, {}).get("arrivals", {}).get(arrival, {})
                tp = (t.get("at_common_rate") or {}).get("p99_s")
                sp = (s.get("at_common_rate") or {}).get("p99_s")
                util = ((s.get("at_max") or {}).get("gpu_util_busiest_pct"))
                first = scaled.get(mode, {}).get("first_over_warm_p50")
                rows.append(
                    f"{name:<9}{arrival:<9}{key:<6}{fmt(t.get('max_rate_meeting_slo_per_s'))}"
                    f"{fmt(s.get('max_rate_meeting_slo_per_s'), width=9)}"
                    f"{fmt(ratio.get(f'max_rate_scaled_over_today_{key}'), width=6, digits=2)}"
                    f"{fmt(tp, 1e3, 8)} -> {fmt(sp, 1e3, 5, 0)}"
                    f"{fmt(ratio.get(f'p99_scaled_over_today_at_today_max_{key}'), width=6, digits=2)}"
                    f"{fmt(util, width=6, digits=0)}{fmt(first, width=9, digits=2)}")
            rows.append(f"{'':<9}{arrival:<9}scaled tube/host max rate: "
                        f"{fmt(ratio.get('max_rate_tube_over_host_scaled'), width=5, digits=2).strip()}"
                        f" (today {fmt(ratio.get('max_rate_tube_over_host_today'), width=5, digits=2).strip()})")
    rows.append("today: 1 replica, no batching; scaled: batching + autoscaling; /s: highest offered rate with "
                "P99 within the SLO; x = scaled / today; util: busiest GPU at scaled's highest rate; "
                "1st/warm: first request after ready over the warm p50 (scaled)")
    return "\n".join(rows)


def plot(data: dict[str, Any], out: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no e2e.png")
        return None
    labels: list[str] = []
    series: dict[str, list[float]] = {"max rate, scaled / today (tube)": [],
                                      "max rate, scaled / today (host-centric)": [],
                                      "max rate, tube / host-centric (scaled)": [],
                                      "P99 at today's max, scaled / today (tube)": []}
    keys = ("max_rate_scaled_over_today_tube", "max_rate_scaled_over_today_host",
            "max_rate_tube_over_host_scaled", "p99_scaled_over_today_at_today_max_tube")
    for name, wf in data["workflows"].items():
        for arrival, ratio in wf.get("ratios", {}).items():
            labels.append(f"{name}\n{arrival}")
            for title, key in zip(series, keys, strict=True):
                series[title].append(ratio.get(key) or 0.0)
    fig, axes = plt.subplots(1, len(series), figsize=(max(12, len(labels) * 1.6), 4.5))
    for ax, (title, values) in zip(axes, series.items(), strict=True):
        ax.bar(range(len(values)), values, color="#c0392b" if title.startswith("P99") else "#3a7bd5")
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(labels)), labels, fontsize=6)
        ax.set_title(title + (" (lower is better)" if title.startswith("P99") else ""), fontsize=8)
    fig.suptitle(f"FaaSTube serving ({', '.join(data['machine'].get('gpus', [])[:1]) or 'CPU only'})")
    fig.tight_layout()
    path = out / "e2e.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    settings = _settings(args)
    started = time.monotonic()
    paths = _workflow_paths(args.workflows)
    configs = [(r, m) for r in _csv(args.runtimes, RUNTIMES, "--runtimes") for m in _csv(args.modes, MODES, "--modes")
               if (r, m) not in _skipped(args.skip)]
    searches = len(paths) * len(_csv(args.arrivals, ARRIVALS, "--arrivals")) * len(configs)
    data: dict[str, Any] = {"benchmark": "e2e", "machine": _machine(),
                            "settings": {**dataclasses.asdict(settings), "quick": bool(args.quick),
                                         "scale": os.environ.get("FAASTUBE_EXAMPLE_SCALE")},
                            "workflows": {}}
    json_path = args.out / "e2e.json"

    for path in paths:
        name = path.parent.name

        def checkpoint(partial: dict[str, Any], name: str = name) -> None:
            data["workflows"][name] = partial
            data["elapsed_s"] = time.monotonic() - started
            json_path.write_text(json.dumps(data, indent=2, default=str))

        try:
            data["workflows"][name] = await _bench_workflow(path, args, settings, started, searches=searches,
                                                            checkpoint=checkpoint)
        except Exception as e:
            logger.exception("workflow %s failed", name)
            data["workflows"][name] = {"error": f"{type(e).__name__}: {e}", "runtimes": {}, "ratios": {}}
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
