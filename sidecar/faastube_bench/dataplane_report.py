"""The data-plane benchmark's results as values: statistics, ratios, targets, table, plots.

Pure functions of measured samples, apart from `plot` (which writes PNGs): the
driver (`dataplane`) feeds them what the function processes measured, and
`--plot-only` feeds them a saved JSON, so every number printed can be recomputed
from the file, and tested without a GPU.
"""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

logger = logging.getLogger(__name__)

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

# Methods, in table order. The tube's two ways to publish, then the baselines.
TUBE_PUT = "tube-put"            # producer's array -> put -> pipe -> get on the consumer's device
TUBE_SEAL = "tube-seal"          # empty() in the pool, the producer writes, seal -> pipe -> get
TORCH_IPC = "torch-ipc"          # clone, torch.multiprocessing CUDA IPC over the pipe, consumer syncs
HOST_CENTRIC = "host-centric"    # D2H (pageable) -> shared memory -> H2D
FLOOR = "floor"                  # the ref-sized message alone over the same pipe
RAW_COPY = "raw-copy"            # one in-process copy (D2D, peer, memcpy): the copy a pass can't avoid
PING = "ping"                    # metadata round trip to the sidecar
TUBE_METHODS = (TUBE_PUT, TUBE_SEAL)
PASS_METHODS = (TUBE_PUT, TUBE_SEAL, TORCH_IPC, HOST_CENTRIC, FLOOR)
METHODS = (*PASS_METHODS, RAW_COPY, PING)

SAME_GPU, GPU_GPU, HOST = "same-gpu", "gpu-gpu", "host"
PATTERNS = (SAME_GPU, GPU_GPU, HOST)

Status = Literal["MET", "MISS", "N/A"]


# --- statistics -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Summary:
    """Samples of one duration, in microseconds."""

    n: int
    median_us: float
    p99_us: float
    mean_us: float
    min_us: float
    max_us: float

    @classmethod
    def of_seconds(cls, samples_s: Sequence[float]) -> Summary:
        if not samples_s:
            raise ValueError("no samples to summarise")
        us = np.asarray(samples_s, dtype=np.float64) * 1e6
        return cls(int(us.size), float(np.median(us)), float(np.percentile(us, 99)), float(us.mean()),
                   float(us.min()), float(us.max()))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Summary:
        return cls(int(d["n"]), float(d["median_us"]), float(d["p99_us"]), float(d["mean_us"]),
                   float(d["min_us"]), float(d["max_us"]))


def _summary_or_none(d: Mapping[str, Any] | None) -> Summary | None:
    return None if d is None else Summary.from_dict(d)


@dataclass(frozen=True)
class Cell:
    """One method at one size in one pattern.

    `passes` is the whole pass: the producer starts -> the consumer's data is usable
    (its stream synchronized). `put` is the producer's part before the message is
    sent, `get` the consumer's part after it arrived; None where that split means
    nothing (torch IPC works inside the pipe's pickling; the floor has no data).
    For the raw copy, `passes` is one copy's wall time including the sync, `gpu` the
    same copy timed with CUDA events.
    """

    pattern: str
    method: str
    size_bytes: int
    passes: Summary
    put: Summary | None = None
    get: Summary | None = None
    gpu: Summary | None = None
    bad_passes: int = 0
    warmup: int = 0
    note: str = ""

    @property
    def effective_gbps(self) -> float:
        """Bytes per second (10^9) at the median pass: nbytes / median pass time."""
        return self.size_bytes / (self.passes.median_us * 1e-6) / 1e9 if self.passes.median_us > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["effective_gbps"] = round(self.effective_gbps, 3)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Cell:
        return cls(str(d["pattern"]), str(d["method"]), int(d["size_bytes"]), Summary.from_dict(d["passes"]),
                   _summary_or_none(d.get("put")), _summary_or_none(d.get("get")), _summary_or_none(d.get("gpu")),
                   int(d.get("bad_passes", 0)), int(d.get("warmup", 0)), str(d.get("note", "")))


@dataclass(frozen=True)
class Concurrency:
    """N producer/consumer pairs looping put -> pipe -> get -> release for a fixed time."""

    pattern: str
    pairs: int
    size_bytes: int
    duration_s: float
    passes: int
    bad_passes: int
    sidecar_cpu_percent: float | None    # of one core, over the same window; None: not readable

    @property
    def passes_per_s(self) -> float:
        return self.passes / self.duration_s if self.duration_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passes_per_s": round(self.passes_per_s, 1)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Concurrency:
        cpu = d.get("sidecar_cpu_percent")
        return cls(str(d["pattern"]), int(d["pairs"]), int(d["size_bytes"]), float(d["duration_s"]),
                   int(d["passes"]), int(d.get("bad_passes", 0)), None if cpu is None else float(cpu))


@dataclass(frozen=True)
class Measurements:
    """Everything one run measured."""

    cells: tuple[Cell, ...]
    ping: Summary | None = None
    concurrency: tuple[Concurrency, ...] = ()

    def cell(self, pattern: str, method: str, size_bytes: int) -> Cell | None:
        for c in self.cells:
            if (c.pattern, c.method, c.size_bytes) == (pattern, method, size_bytes):
                return c
        return None

    def floor(self, pattern: str) -> Cell | None:
        """The message alone: measured once per pattern, whatever the size."""
        return next((c for c in self.cells if c.pattern == pattern and c.method == FLOOR), None)

    def sizes(self, pattern: str, method: str) -> list[int]:
        return sorted(c.size_bytes for c in self.cells if c.pattern == pattern and c.method == method)

    def patterns(self) -> list[str]:
        seen = {c.pattern for c in self.cells}
        return [p for p in PATTERNS if p in seen]

    def pairs(self, n: int) -> Concurrency | None:
        return next((c for c in self.concurrency if c.pairs == n), None)

    def to_dict(self) -> dict[str, Any]:
        return {"results": [c.to_dict() for c in self.cells],
                "metadata_roundtrip": None if self.ping is None else asdict(self.ping),
                "concurrency": [c.to_dict() for c in self.concurrency]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Measurements:
        return cls(tuple(Cell.from_dict(c) for c in d.get("results", [])),
                   _summary_or_none(d.get("metadata_roundtrip")),
                   tuple(Concurrency.from_dict(c) for c in d.get("concurrency", [])))


def size_label(n: int) -> str:
    """64Ki, 1Mi, 1Gi: exact binary units where they fit, then decimal ones (10M), else bytes."""
    for unit, name in ((GiB, "Gi"), (MiB, "Mi"), (KiB, "Ki"), (10**9, "G"), (10**6, "M"), (10**3, "k")):
        if n >= unit and n % unit == 0:
            return f"{n // unit}{name}"
    return f"{n}B"


# --- ratios -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Ratio:
    """A tube cell against the baselines of the same pattern and size, from the same run.

    speedup_vs_X = X's median pass / the tube's (above 1: the tube is faster);
    times_floor = the tube's median pass / the message alone; times_floor_and_copy =
    the tube's median / (message alone + one raw copy), the floor of any design that
    copies the bytes once.
    """

    pattern: str
    method: str
    size_bytes: int
    median_us: float
    speedup_vs_torch_ipc: float | None
    speedup_vs_host_centric: float | None
    times_floor: float | None
    times_floor_and_copy: float | None


def _div(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def ratios(m: Measurements) -> list[Ratio]:
    out = []
    for c in m.cells:
        if c.method not in TUBE_METHODS:
            continue
        def median(method: str, c: Cell = c) -> float | None:
            other = m.cell(c.pattern, method, c.size_bytes)
            return None if other is None else other.passes.median_us
        floor = m.floor(c.pattern)
        floor_us = None if floor is None else floor.passes.median_us
        raw_us = median(RAW_COPY)
        floor_and_copy = None if floor_us is None or raw_us is None else floor_us + raw_us
        out.append(Ratio(c.pattern, c.method, c.size_bytes, c.passes.median_us,
                         _div(median(TORCH_IPC), c.passes.median_us),
                         _div(median(HOST_CENTRIC), c.passes.median_us),
                         _div(c.passes.median_us, floor_us), _div(c.passes.median_us, floor_and_copy)))
    return out


# --- targets ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """One goal of the data-plane issue and what this run measured against it."""

    key: str
    goal: str
    status: Status
    measured: str        # the numbers, for people
    values: Mapping[str, float | None]

    def line(self) -> str:
        return f"[{self.status}] {self.goal}: {self.measured}"


SMALL_SIZES = (64 * KiB, 16 * MiB)       # "from 64 KiB to 16 MiB", inclusive


def _na(key: str, goal: str, why: str) -> Target:
    return Target(key, goal, "N/A", why, {})


def _status(ok: bool) -> Status:
    return "MET" if ok else "MISS"


def _fmt_us(us: float) -> str:
    return f"{us:.1f} us" if us < 10_000 else f"{us / 1000:.1f} ms"


def targets(m: Measurements, *, gpus: int) -> list[Target]:
    """Every goal, MET / MISS with the measured numbers, or N/A with the reason."""
    out: list[Target] = []
    lo, hi = SMALL_SIZES
    small = [s for s in m.sizes(SAME_GPU, TUBE_PUT) if lo <= s <= hi]
    no_gpu = "not measured (no GPU)" if gpus == 0 else "not measured in this run"

    goal = "same-GPU put+get <= 100 us median, 64 KiB to 16 MiB"
    if small:
        cells = [m.cell(SAME_GPU, TUBE_PUT, s) for s in small]
        meds = {size_label(c.size_bytes): c.passes.median_us for c in cells if c is not None}
        worst = max(meds.values())
        out.append(Target("same_gpu_latency", goal, _status(worst <= 100.0),
                          ", ".join(f"{k} {_fmt_us(v)}" for k, v in meds.items()), {"worst_median_us": worst}))
    else:
        out.append(_na("same_gpu_latency", goal, no_gpu))

    goal = "same-GPU put+get >= 5x faster than torch IPC, 64 KiB to 16 MiB"
    pairs = [(s, m.cell(SAME_GPU, TUBE_PUT, s), m.cell(SAME_GPU, TORCH_IPC, s)) for s in small]
    speed = {size_label(s): t.passes.median_us / c.passes.median_us
             for s, c, t in pairs if c is not None and t is not None}
    if speed:
        least = min(speed.values())
        out.append(Target("same_gpu_vs_torch", goal, _status(least >= 5.0 and len(speed) == len(small)),
                          ", ".join(f"{k} {v:.1f}x" for k, v in speed.items()), {"least_speedup": least}))
    else:
        out.append(_na("same_gpu_vs_torch", goal, no_gpu if not small else "torch IPC not measured (no torch?)"))

    goal = "same-GPU put+get faster than host-centric at every size"
    every = {size_label(s): hc.passes.median_us / c.passes.median_us
             for s in m.sizes(SAME_GPU, TUBE_PUT)
             if (c := m.cell(SAME_GPU, TUBE_PUT, s)) is not None and (hc := m.cell(SAME_GPU, HOST_CENTRIC, s))}
    if every:
        least = min(every.values())
        out.append(Target("same_gpu_vs_host_centric", goal, _status(least > 1.0),
                          ", ".join(f"{k} {v:.1f}x" for k, v in every.items()), {"least_speedup": least}))
    else:
        out.append(_na("same_gpu_vs_host_centric", goal, no_gpu))

    goal = "same-GPU put+get >= 3x faster than host-centric at 64 KiB"
    c64, hc64 = m.cell(SAME_GPU, TUBE_PUT, 64 * KiB), m.cell(SAME_GPU, HOST_CENTRIC, 64 * KiB)
    if c64 is not None and hc64 is not None:
        r = hc64.passes.median_us / c64.passes.median_us
        out.append(Target("same_gpu_vs_host_centric_64k", goal, _status(r >= 3.0),
                          f"{r:.1f}x ({_fmt_us(c64.passes.median_us)} vs {_fmt_us(hc64.passes.median_us)})",
                          {"speedup": r}))
    else:
        out.append(_na("same_gpu_vs_host_centric_64k", goal, no_gpu if gpus == 0 else "64Ki not measured"))

    for key, size, floor_gbps in (("gpu_gpu_128m", 128 * MiB, 300.0), ("gpu_gpu_1g", GiB, 340.0)):
        goal = f"GPU-to-GPU put+get >= {floor_gbps:.0f} GB/s effective at {size_label(size)}B"
        c = m.cell(GPU_GPU, TUBE_PUT, size)
        if c is None:
            why = "not measured (needs 2 GPUs)" if gpus < 2 else f"{size_label(size)} not measured"
            out.append(_na(key, goal, why))
            continue
        raw = m.cell(GPU_GPU, RAW_COPY, size)
        extra = f"; raw peer copy {raw.effective_gbps:.0f} GB/s" if raw is not None else ""
        out.append(Target(key, goal, _status(c.effective_gbps >= floor_gbps),
                          f"{c.effective_gbps:.0f} GB/s (median pass {_fmt_us(c.passes.median_us)}){extra}",
                          {"effective_gbps": c.effective_gbps,
                           "raw_peer_gbps": None if raw is None else raw.effective_gbps}))

    goal = "metadata round trip (ping) <= 40 us median"
    if m.ping is not None:
        out.append(Target("ping", goal, _status(m.ping.median_us <= 40.0),
                          f"median {m.ping.median_us:.1f} us, p99 {m.ping.p99_us:.1f} us",
                          {"median_us": m.ping.median_us, "p99_us": m.ping.p99_us}))
    else:
        out.append(_na("ping", goal, "not measured in this run"))

    goal = "8 pairs on one GPU at 1 MiB >= 15,000 passes/s"
    eight = m.pairs(8)
    if eight is not None and eight.pattern == SAME_GPU and eight.size_bytes == MiB:
        out.append(Target("pairs8", goal, _status(eight.passes_per_s >= 15_000),
                          f"{eight.passes_per_s:,.0f} passes/s" + _cpu(eight), {"passes_per_s": eight.passes_per_s}))
    elif eight is not None:
        out.append(_na("pairs8", goal, f"measured on the {eight.pattern} pattern, not one GPU: "
                                       f"{eight.passes_per_s:,.0f} passes/s at {size_label(eight.size_bytes)}B"))
    else:
        out.append(_na("pairs8", goal, "8 pairs not measured in this run"))

    goal = "every pass delivered the bytes its producer wrote"
    checked = sum(c.passes.n + c.warmup for c in m.cells if c.method not in (FLOOR, RAW_COPY))
    bad = sum(c.bad_passes for c in m.cells) + sum(c.bad_passes for c in m.concurrency)
    if checked or m.concurrency:
        out.append(Target("data_correct", goal, _status(bad == 0),
                          f"{bad} bad passes" + (f" of {checked} checked passes" if checked else "") +
                          (" (concurrency: every 8th pass checked)" if m.concurrency else ""),
                          {"bad_passes": float(bad)}))
    else:
        out.append(_na("data_correct", goal, "no data passed"))
    return out


def _cpu(c: Concurrency) -> str:
    return "" if c.sidecar_cpu_percent is None else f", sidecar CPU {c.sidecar_cpu_percent:.0f}% of a core"


# --- text -------------------------------------------------------------------------------------

def _us(us: float) -> str:
    return f"{us:.1f}" if us < 100_000 else f"{us:.0f}"


def _cell_us(c: Cell | None) -> str:
    return "-" if c is None else _us(c.passes.median_us)


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}x"


def format_table(m: Measurements, *, card: str = "") -> str:
    """The short table printed last: median pass per method, and the tube's ratios."""
    lines = ["== dataplane: median pass time in us (producer starts -> consumer's data usable) ==" +
             (f"  [{card}]" if card else "")]
    head = (f"{'pattern':9s} {'size':>5s} {'tube-put':>9s} {'p99':>9s} {'GB/s':>7s} {'tube-seal':>9s} "
            f"{'torch-ipc':>9s} {'host-ctr':>9s} {'floor':>6s} {'raw-copy':>9s}  "
            f"{'vs torch':>8s} {'vs host':>8s} {'x floor':>7s}")
    lines.append(head)
    by_ratio = {(r.pattern, r.size_bytes): r for r in ratios(m) if r.method == TUBE_PUT}
    for pattern in m.patterns():
        floor = m.floor(pattern)
        sizes = sorted({c.size_bytes for c in m.cells if c.pattern == pattern and c.method != FLOOR})
        for size in sizes:
            put = m.cell(pattern, TUBE_PUT, size)
            r = by_ratio.get((pattern, size))
            lines.append(
                f"{pattern:9s} {size_label(size):>5s} {_cell_us(put):>9s} "
                f"{('-' if put is None else _us(put.passes.p99_us)):>9s} "
                f"{('-' if put is None else f'{put.effective_gbps:.1f}'):>7s} "
                f"{_cell_us(m.cell(pattern, TUBE_SEAL, size)):>9s} {_cell_us(m.cell(pattern, TORCH_IPC, size)):>9s} "
                f"{_cell_us(m.cell(pattern, HOST_CENTRIC, size)):>9s} {_cell_us(floor):>6s} "
                f"{_cell_us(m.cell(pattern, RAW_COPY, size)):>9s}  "
                f"{_x(None if r is None else r.speedup_vs_torch_ipc):>8s} "
                f"{_x(None if r is None else r.speedup_vs_host_centric):>8s} "
                f"{_x(None if r is None else r.times_floor):>7s}")
    if m.ping is not None:
        lines.append(f"metadata round trip: median {m.ping.median_us:.1f} us, p99 {m.ping.p99_us:.1f} us")
    for c in m.concurrency:
        lines.append(f"concurrency {c.pattern} {size_label(c.size_bytes)}B: {c.pairs} pair(s) "
                     f"{c.passes_per_s:,.0f} passes/s" + _cpu(c))
    return "\n".join(lines)


# --- plots ------------------------------------------------------------------------------------

_STYLE = {TUBE_PUT: ("C0", "o", "-"), TUBE_SEAL: ("C1", "s", "-"), TORCH_IPC: ("C2", "^", "--"),
          HOST_CENTRIC: ("C3", "v", "--"), RAW_COPY: ("C7", "x", ":")}


def plot(m: Measurements, out_dir: pathlib.Path, *, suffix: str = "", title: str = "") -> list[pathlib.Path]:
    """Latency vs size per method (log-log, one panel per pattern) and the concurrency bars."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plots (redraw later with --plot-only JSON)")
        return []
    written: list[pathlib.Path] = []
    patterns = m.patterns()
    if patterns:
        fig, axes = plt.subplots(1, len(patterns), figsize=(5.2 * len(patterns), 4.4), squeeze=False)
        for ax, pattern in zip(axes[0], patterns):
            for method, (color, marker, ls) in _STYLE.items():
                cells = [c for c in m.cells if c.pattern == pattern and c.method == method]
                if not cells:
                    continue
                cells.sort(key=lambda c: c.size_bytes)
                x = [c.size_bytes for c in cells]
                med = [c.passes.median_us for c in cells]
                up = [max(0.0, c.passes.p99_us - c.passes.median_us) for c in cells]
                ax.errorbar(x, med, yerr=[[0.0] * len(up), up], color=color, marker=marker, ls=ls,
                            capsize=3, label=f"{method} (median, bar to p99)" if method == TUBE_PUT else method)
            floor = m.floor(pattern)
            if floor is not None:
                ax.axhline(floor.passes.median_us, color="k", ls=":", lw=1,
                           label=f"floor: message alone {floor.passes.median_us:.0f} us")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            sizes = sorted({c.size_bytes for c in m.cells if c.pattern == pattern and c.method != FLOOR})
            if sizes:
                ax.set_xticks(sizes, [size_label(s) for s in sizes])
            ax.set_xlabel("object size (bytes)")
            ax.set_ylabel("pass time, producer start -> data usable (us)")
            ax.set_title(pattern)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        if title:
            fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        path = out_dir / f"dataplane_latency{suffix}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    if m.concurrency:
        fig, ax = plt.subplots(figsize=(5.2, 4.0))
        conc = sorted(m.concurrency, key=lambda c: c.pairs)
        xs = list(range(len(conc)))
        bars = ax.bar(xs, [c.passes_per_s for c in conc], color="C0")
        ax.set_xticks(xs, [str(c.pairs) for c in conc])
        for bar, c in zip(bars, conc):
            label = f"{c.passes_per_s:,.0f}/s"
            if c.sidecar_cpu_percent is not None:
                label += f"\nsidecar {c.sidecar_cpu_percent:.0f}%"
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                        va="bottom", fontsize=8)
        if conc[0].pattern == SAME_GPU:
            ax.axhline(15_000, color="C3", ls="--", lw=1, label="target, 8 pairs: 15,000/s")
            ax.legend(fontsize=8)
        ax.set_xlabel("producer/consumer pairs")
        ax.set_ylabel("passes per second, all pairs")
        ax.set_title(f"{conc[0].pattern}, {size_label(conc[0].size_bytes)}B, put -> pipe -> get -> release")
        ax.set_ylim(0, max(c.passes_per_s for c in conc) * 1.25 + 1)
        ax.grid(True, axis="y", alpha=0.3)
        if title:
            fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        path = out_dir / f"dataplane_concurrency{suffix}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written

