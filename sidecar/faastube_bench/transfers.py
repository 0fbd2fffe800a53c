"""``faastube bench transfers``: host<->GPU multi-path, isolation and SLO sharing on real GPUs.

Every number is a ratio against a baseline measured in the same run on the same
card (one pinned ``cudaMemcpyAsync``; a pageable copy; a plain FIFO copy engine),
because the lent machines are shared and absolute numbers drift between leases.
Writes ``transfers.json`` (+ PNGs when matplotlib is importable) under ``--out``;
``--plot-only JSON`` redraws the PNGs from a JSON elsewhere. Sized to finish in
well under 4 minutes on 4x H100.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import pathlib
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

logger = logging.getLogger(__name__)

MiB = 1 << 20
GiB = 1 << 30
GB = 1e9
DEFAULT_SIZES = (MiB, 4 * MiB, 16 * MiB, 64 * MiB, 256 * MiB, GiB, 4 * GiB)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="bench/results", help="folder for transfers.json and PNGs")
    parser.add_argument("--plot-only", metavar="JSON", help="only draw the PNGs from this JSON")
    parser.add_argument("--target", type=int, default=0, help="the GPU data moves to/from")
    parser.add_argument("--gpus", type=int, default=4, help="use at most this many GPUs")
    parser.add_argument("--sizes-mib", type=float, nargs="*", help="sizes to sweep (MiB)")
    parser.add_argument("--chunk-mib", type=int, default=16, help="chunk size for the sweep")
    parser.add_argument("--min-multipath-mib", type=int, default=32,
                        help="below this size the tube uses only the target's own link")
    parser.add_argument("--skip", nargs="*", default=(), choices=("sweep", "isolation", "slo"))


def run(args: argparse.Namespace) -> int:
    out = pathlib.Path(args.out)
    if args.plot_only:
        path = pathlib.Path(args.plot_only)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            print(f"faastube bench transfers: --plot-only: cannot read {path}: {e}")
            return 2
        written = plot(data, out)
        print("wrote " + (", ".join(str(p) for p in written) or "nothing (matplotlib missing)"))
        return 0
    if args.chunk_mib <= 0 or args.min_multipath_mib < 0 or args.gpus < 1:
        print("faastube bench transfers: --chunk-mib and --gpus must be >= 1, "
              "--min-multipath-mib >= 0")
        return 2
    sizes = DEFAULT_SIZES if not args.sizes_mib else tuple(int(s * MiB) for s in args.sizes_mib)
    if any(s <= 0 for s in sizes):
        print("faastube bench transfers: --sizes-mib: sizes must be > 0")
        return 2
    try:
        import cupy  # noqa: F401
    except ImportError as e:
        print(f"faastube bench transfers: needs CuPy and a GPU ({e})")
        return 2
    bench = _Bench(args, sizes)
    data = bench.run_all()
    out.mkdir(parents=True, exist_ok=True)
    (out / "transfers.json").write_text(json.dumps(data, indent=2))
    written = plot(data, out)
    print(f"wrote {out / 'transfers.json'}" + "".join(f", {p}" for p in written))
    print(table(data))
    return 0


def _card_name(cp: Any, gpu: int) -> str:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(gpu))
            return name.decode() if isinstance(name, bytes) else str(name)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # NVML missing: fall back to the CUDA properties
        name = cp.cuda.runtime.getDeviceProperties(gpu)["name"]
        return name.decode() if isinstance(name, bytes) else str(name)


class _Bench:
    def __init__(self, args: argparse.Namespace, sizes: Sequence[int]) -> None:
        import cupy as cp
        import numpy as np
        from faastube_sidecar.transfers import cuda_executor, scheduler

        from faastube_bench import pinned_ring

        self.cp, self.np, self.ce, self.sc = cp, np, cuda_executor, scheduler
        self.args = args
        self.sizes = sorted(sizes)
        count = cp.cuda.runtime.getDeviceCount()
        self.gpus = list(range(min(count, args.gpus)))
        self.target = args.target
        if self.target not in self.gpus:
            raise SystemExit(f"faastube bench transfers: --target: GPU {self.target} not in {self.gpus}")
        self.relays = [g for g in self.gpus if g != self.target]
        self.chunk = args.chunk_mib * MiB
        biggest = max(self.sizes)
        t0 = time.perf_counter()
        self.ring = pinned_ring.PinnedHostRing(biggest)
        self.host_piece = self.ring.allocate(biggest)
        view = self.ring.view(self.host_piece)
        view[:] = np.arange(biggest, dtype=np.uint64).astype(np.uint8) if biggest <= 64 * MiB \
            else np.resize(np.arange(251, dtype=np.uint8), biggest)
        self.pageable = np.empty(biggest, dtype=np.uint8)
        self.pageable[:] = view
        with cp.cuda.Device(self.target):
            self.dev = cp.empty(biggest, dtype=cp.uint8)
            self.stream = cp.cuda.Stream(non_blocking=True)
        self.executor = cuda_executor.CudaChunkExecutor(
            self.gpus, staging=cuda_executor.StagingSettings(3, max(self.chunk, 4 * MiB)))
        self.executor.preallocate_staging(self.gpus)
        logger.info("setup (pin %d bytes, fill, allocate) took %.2fs", biggest, time.perf_counter() - t0)

    # -- helpers ------------------------------------------------------------------
    def _time(self, fn: Callable[[], None], reps: int) -> list[float]:
        fn()  # warm-up
        out = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
        return out

    def _reps(self, size: int) -> int:
        return max(3, min(20, int(2 * GiB // size)))

    def _links(self, pcie_bw: float) -> list[Any]:
        return self.ce.node_links(self.gpus, pcie_bandwidth_bytes_per_s=pcie_bw,
                                  p2p_bandwidth_bytes_per_s=390 * GB)

    def _scheduler(self, pcie_bw: float, chunk: int, inflight: int) -> Any:
        return self.sc.TransferScheduler(
            self._links(pcie_bw), executor=self.executor, clock=self.ce.MonotonicClock(),
            settings=self.sc.SchedulerSettings(chunk_bytes=chunk, max_inflight_chunks_per_link=inflight))

    def _route(self, size: int, to_gpu: bool) -> Any:
        t, H = self.target, self.sc.HOST
        nodes: list[tuple[Any, ...]] = [(H, t) if to_gpu else (t, H)]
        if size >= self.args.min_multipath_mib * MiB:
            nodes += [(H, r, t) if to_gpu else (t, r, H) for r in self.relays]
        return self.sc.make_route([(n, 1.0) for n in nodes], size, align_bytes=self.chunk)

    def _tube(self, sched: Any, size: int, to_gpu: bool) -> Any:
        host = self.ring.address_of(self.host_piece)
        req = self.sc.TransferRequest(
            f"t{time.perf_counter_ns()}", self.sc.FunctionIdentity("bench", "tube"),
            self._route(size, to_gpu), src_address=host if to_gpu else self.dev.data.ptr,
            dst_address=self.dev.data.ptr if to_gpu else host)
        done: list[Any] = []
        sched.submit(req, done.append)
        self.ce.run_to_completion(sched, self.executor)
        return done[0]

    def _tube_labelled(self, labels: list[str], sched: Any, size: int, to_gpu: bool) -> None:
        labels.append(self._tube(sched, size, to_gpu).path_label)

    def _memcpy(self, dst: int, src: int, size: int, kind: int) -> None:
        with self.cp.cuda.Device(self.target):
            self.cp.cuda.runtime.memcpyAsync(dst, src, size, kind, self.stream.ptr)
            self.stream.synchronize()

    # -- sections -------------------------------------------------------------------
    def sweep(self) -> dict[str, Any]:
        cp, np = self.cp, self.np
        host = self.ring.address_of(self.host_piece)
        page = int(self.pageable.ctypes.data)
        rows = []
        pcie_bw = 55 * GB
        for size in self.sizes:
            reps = self._reps(size)
            sched = self._scheduler(pcie_bw, self.chunk, 4)
            row: dict[str, Any] = {"size_bytes": size, "reps": reps}
            for direction, to_gpu in (("h2d", True), ("d2h", False)):
                kind = 1 if to_gpu else 2
                dev = self.dev.data.ptr
                pinned = self._time(functools.partial(
                    self._memcpy, dev if to_gpu else host, host if to_gpu else dev, size, kind), reps)
                pageable = self._time(functools.partial(
                    self._memcpy, dev if to_gpu else page, page if to_gpu else dev, size, kind), reps)
                labels: list[str] = []
                tube = self._time(functools.partial(self._tube_labelled, labels, sched, size, to_gpu),
                                  reps)
                med = {k: statistics.median(v) for k, v in
                       (("pinned", pinned), ("pageable", pageable), ("tube", tube))}
                row[direction] = {
                    "path": labels[-1],
                    "pinned_GBps": size / med["pinned"] / GB,
                    "pageable_GBps": size / med["pageable"] / GB,
                    "tube_GBps": size / med["tube"] / GB,
                    "tube_vs_pinned": med["pinned"] / med["tube"],
                    "tube_vs_pageable": med["pageable"] / med["tube"],
                }
                if size == GiB and to_gpu:
                    pcie_bw = size / med["pinned"]  # measured link bandwidth for later sections
            # Correctness spot check of the last H2D tube copy: a strided sample of bytes.
            self._tube(sched, size, True)
            step = max(1, size // 4096)
            sample = cp.asnumpy(self.dev[:size:step])
            row["h2d_sample_correct"] = bool(np.array_equal(sample, self.ring.view(self.host_piece)[:size:step]))
            rows.append(row)
            logger.info("sweep %d MiB: h2d %.2fx, d2h %.2fx of one pinned link", size // MiB,
                        row["h2d"]["tube_vs_pinned"], row["d2h"]["tube_vs_pinned"])
        self.pcie_bw = pcie_bw
        return {"rows": rows, "chunk_bytes": self.chunk,
                "min_multipath_bytes": self.args.min_multipath_mib * MiB}

    def isolation(self) -> dict[str, Any]:
        cp = self.cp
        bulk = min(4 * GiB, max(self.sizes))
        small = MiB
        host = self.ring.address_of(self.host_piece)
        sc = self.sc
        t = self.target
        with cp.cuda.Device(t):
            small_dst = cp.empty(small, dtype=cp.uint8)
            s_bulk = cp.cuda.Stream(non_blocking=True)
            s_small = cp.cuda.Stream(non_blocking=True)

        def small_alone() -> None:
            with cp.cuda.Device(t):
                cp.cuda.runtime.memcpyAsync(small_dst.data.ptr, host, small, 1, s_small.ptr)
                s_small.synchronize()
        alone = self._time(small_alone, 50)
        # FIFO baseline: the bulk as one copy, the small copy on another stream of the same GPU.
        fifo_lat, fifo_bulk = [], []
        for _ in range(3):
            with cp.cuda.Device(t):
                t0 = time.perf_counter()
                cp.cuda.runtime.memcpyAsync(self.dev.data.ptr, host, bulk, 1, s_bulk.ptr)
                time.sleep(0.002)
                t1 = time.perf_counter()
                cp.cuda.runtime.memcpyAsync(small_dst.data.ptr, host, small, 1, s_small.ptr)
                s_small.synchronize()
                fifo_lat.append(time.perf_counter() - t1)
                s_bulk.synchronize()
                fifo_bulk.append(time.perf_counter() - t0)
        # Tube: the bulk (function B) and a stream of 1 MiB transfers (function A), one link.
        sched = self._scheduler(getattr(self, "pcie_bw", 55 * GB), 4 * MiB, 3)
        solo: list[Any] = []
        for _ in range(2):
            sched.submit(sc.TransferRequest(f"solo{len(solo)}", sc.FunctionIdentity("bench", "b"),
                                            sc.make_route([((sc.HOST, t), 1.0)], bulk),
                                            src_address=host, dst_address=self.dev.data.ptr),
                         solo.append)
            self.ce.run_to_completion(sched, self.executor)
        tube_lat: list[float] = []
        shared: list[Any] = []
        for rep in range(2):
            sched.submit(sc.TransferRequest(f"bulk{rep}", sc.FunctionIdentity("bench", "b"),
                                            sc.make_route([((sc.HOST, t), 1.0)], bulk),
                                            src_address=host, dst_address=self.dev.data.ptr),
                         shared.append)
            n = 0
            while len(shared) <= rep:
                got: list[Any] = []
                sched.submit(sc.TransferRequest(f"a{rep}-{n}", sc.FunctionIdentity("bench", "a"),
                                                sc.make_route([((sc.HOST, t), 1.0)], small),
                                                src_address=host, dst_address=small_dst.data.ptr),
                             got.append)
                n += 1
                while not got:
                    if self.executor.poll() == 0:
                        time.sleep(0)
                if len(shared) <= rep:
                    tube_lat.append(got[0].duration_s)
                # a short gap, still polling, so A's requests spread over B's transfer
                t_gap = time.perf_counter() + 200e-6
                while time.perf_counter() < t_gap:
                    self.executor.poll()
            self.ce.run_to_completion(sched, self.executor)

        def p(xs: list[float], q: float) -> float:
            xs = sorted(xs)
            return xs[min(len(xs) - 1, int(q * len(xs)))]
        pinned_solo_s = statistics.median(fifo_bulk)
        return {
            "bulk_bytes": bulk, "small_bytes": small,
            "small_alone_p50_s": p(alone, 0.5),
            "fifo_small_latency_s": fifo_lat,
            "tube_small_latency_s": tube_lat,
            "tube_small_p50_s": p(tube_lat, 0.5), "tube_small_p99_s": p(tube_lat, 0.99),
            "fifo_small_p50_s": p(fifo_lat, 0.5),
            "bulk_solo_pinned_GBps": bulk / pinned_solo_s / GB,
            "bulk_solo_tube_GBps": bulk / statistics.median(r.duration_s for r in solo) / GB,
            "bulk_shared_tube_GBps": bulk / statistics.median(r.duration_s for r in shared) / GB,
            "bulk_keeps_fraction_of_solo": (statistics.median(r.duration_s for r in solo)
                                            / statistics.median(r.duration_s for r in shared)),
            "bulk_keeps_fraction_of_pinned": (pinned_solo_s
                                              / statistics.median(r.duration_s for r in shared)),
        }

    def slo(self) -> dict[str, Any]:
        cp, sc, t = self.cp, self.sc, self.target
        bw = getattr(self, "pcie_bw", 50 * GB)
        host = self.ring.address_of(self.host_piece)
        size_a = min(GiB, max(self.sizes))
        # rate_least: a 40%, b 5%, c 5% of the link; the spare 50% should go to a (tightest).
        specs = [  # (name, bytes, slo_s, compute_s)
            ("a", size_a, size_a / (0.40 * bw) + 0.010, 0.010),
            ("b", size_a // 2, (size_a // 2) / (0.05 * bw), 0.0),
            ("c", size_a, size_a / (0.05 * bw), 0.0),
        ]
        dsts = []
        with cp.cuda.Device(t):
            for _, size, _, _ in specs:
                dsts.append(cp.empty(size, dtype=cp.uint8))
        sched = self._scheduler(bw, 4 * MiB, 4)
        done: dict[str, Any] = {}
        admissions = {}
        for (name, size, slo_s, compute_s), dst in zip(specs, dsts):
            admissions[name] = sched.submit(
                sc.TransferRequest(f"slo-{name}", sc.FunctionIdentity("bench", name),
                                   sc.make_route([((sc.HOST, t), 1.0)], size), slo_s=slo_s,
                                   expected_compute_s=compute_s, src_address=host,
                                   dst_address=dst.data.ptr),
                lambda r, n=name: done.__setitem__(n, r))
        self.ce.run_to_completion(sched, self.executor)
        least = {n: s / (slo - c) for n, s, slo, c in specs}
        expect_a = least["a"] + (bw - sum(least.values()))
        return {
            "link_bandwidth_GBps": bw / GB,
            "functions": {n: {
                "bytes": s, "slo_s": slo, "compute_s": c,
                "rate_least_GBps": least[n] / GB,
                "achieved_GBps": done[n].rate_bytes_per_s / GB,
                "met_deadline": done[n].met_deadline,
                "slo_guaranteed": admissions[n].slo_guaranteed,
            } for n, s, slo, c in specs},
            "tightest_expected_GBps": expect_a / GB,
            "tightest_achieved_vs_expected": done["a"].rate_bytes_per_s / expect_a,
        }

    def run_all(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        data: dict[str, Any] = {
            "card": _card_name(self.cp, self.target), "gpus": self.gpus, "target": self.target,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        try:
            for name in ("sweep", "isolation", "slo"):
                if name not in self.args.skip:
                    t = time.perf_counter()
                    data[name] = getattr(self, name)()
                    logger.info("%s took %.1fs", name, time.perf_counter() - t)
        finally:
            self.executor.close()
            self.ring.close()
        data["wall_s"] = time.perf_counter() - t0
        return data


def table(data: dict[str, Any]) -> str:
    lines = [f"card: {data.get('card')}  gpus: {data.get('gpus')}  wall: {data.get('wall_s', 0):.1f}s"]
    sweep = data.get("sweep")
    if sweep:
        lines.append(f"{'size':>9} {'dir':>4} {'pageable':>9} {'pinned':>8} {'tube':>8} "
                     f"{'x pinned':>9} {'x pageable':>10}  path")
        for row in sweep["rows"]:
            for d in ("h2d", "d2h"):
                r = row[d]
                lines.append(f"{row['size_bytes'] / MiB:>7.0f}Mi {d:>4} {r['pageable_GBps']:>8.1f}G "
                             f"{r['pinned_GBps']:>7.1f}G {r['tube_GBps']:>7.1f}G "
                             f"{r['tube_vs_pinned']:>8.2f}x {r['tube_vs_pageable']:>9.2f}x  {r['path']}")
    iso = data.get("isolation")
    if iso:
        lines.append(f"isolation: 1 MiB alone {iso['small_alone_p50_s'] * 1e6:.0f} us; behind "
                     f"{iso['bulk_bytes'] / GiB:.0f} GiB: tube p50 {iso['tube_small_p50_s'] * 1e6:.0f} us "
                     f"p99 {iso['tube_small_p99_s'] * 1e6:.0f} us "
                     f"(n={len(iso['tube_small_latency_s'])}), FIFO p50 "
                     f"{iso['fifo_small_p50_s'] * 1e6:.0f} us; bulk keeps "
                     f"{iso['bulk_keeps_fraction_of_solo']:.1%} of tube solo, "
                     f"{iso['bulk_keeps_fraction_of_pinned']:.1%} of one pinned copy")
    slo = data.get("slo")
    if slo:
        parts = [f"{n}: {f['achieved_GBps']:.1f}/{f['rate_least_GBps']:.1f} GB/s "
                 f"{'met' if f['met_deadline'] else 'MISSED'}" for n, f in slo["functions"].items()]
        lines.append(f"slo sharing on {slo['link_bandwidth_GBps']:.1f} GB/s (achieved/least): "
                     + ", ".join(parts)
                     + f"; tightest got {slo['tightest_achieved_vs_expected']:.2f} of its expected share")
    return "\n".join(lines)


def plot(data: dict[str, Any], out: pathlib.Path) -> list[pathlib.Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plots (use --plot-only JSON elsewhere)")
        return []
    out.mkdir(parents=True, exist_ok=True)
    written = []
    sweep = data.get("sweep")
    if sweep:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        sizes = [r["size_bytes"] / MiB for r in sweep["rows"]]
        for ax, d in zip(axes, ("h2d", "d2h")):
            for key, label in (("tube_GBps", "tube (multi-path)"), ("pinned_GBps", "one pinned copy"),
                               ("pageable_GBps", "pageable copy")):
                ax.plot(sizes, [r[d][key] for r in sweep["rows"]], marker="o", label=label)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("size (MiB)")
            ax.set_title(f"{'host -> GPU' if d == 'h2d' else 'GPU -> host'} ({data.get('card')})")
            ax.grid(True, alpha=0.3)
        axes[0].set_ylabel("bandwidth (GB/s)")
        axes[0].legend()
        path = out / "transfers_bandwidth.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    iso = data.get("isolation")
    if iso:
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, label in (("tube_small_latency_s", "tube (few chunks in flight)"),
                           ("fifo_small_latency_s", "FIFO copy engine")):
            xs = sorted(v * 1e3 for v in iso[key])
            if xs:
                ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=label)
        ax.set_xscale("log")
        ax.set_xlabel("1 MiB transfer latency (ms)")
        ax.set_ylabel("CDF")
        ax.set_title(f"1 MiB behind a {iso['bulk_bytes'] / GiB:.0f} GiB bulk, same link")
        ax.grid(True, alpha=0.3)
        ax.legend()
        path = out / "transfers_isolation_cdf.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written
