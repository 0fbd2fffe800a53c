"""The data-plane benchmark without a GPU: its numbers, targets, table and plots from recorded
measurements; the pass protocol between two processes' pipe ends; one quick host run end to end."""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import pathlib
import threading
from typing import Any

import pytest
from faastube_bench import dataplane
from faastube_bench import dataplane_passes as passes
from faastube_bench import dataplane_report as report
from faastube_bench.dataplane_report import Cell, Concurrency, Measurements, Summary

KiB, MiB, GiB = report.KiB, report.MiB, report.GiB


def summ(median_us: float, p99_us: float | None = None, n: int = 100) -> Summary:
    p99 = median_us * 1.5 if p99_us is None else p99_us
    return Summary(n, median_us, p99, median_us, median_us * 0.8, p99)


def h200_like(*, tube_64k: float = 80.0, ping_us: float = 35.0, pairs8: float = 16_000.0,
              bad: int = 0) -> Measurements:
    """A 2-GPU run where every target is met unless a keyword says otherwise."""
    cells = [Cell(report.SAME_GPU, report.FLOOR, 0, summ(20.0)), Cell(report.GPU_GPU, report.FLOOR, 0, summ(21.0))]
    for size, tube, torch, hc, raw in ((64 * KiB, tube_64k, 600.0, 300.0, 8.0),
                                       (MiB, 85.0, 620.0, 1600.0, 15.0),
                                       (16 * MiB, 95.0, 650.0, 20_000.0, 20.0),
                                       (128 * MiB, 200.0, 700.0, 200_000.0, 80.0),
                                       (GiB, 900.0, 1400.0, 1_500_000.0, 515.0)):
        cells += [Cell(report.SAME_GPU, report.TUBE_PUT, size, summ(tube), summ(tube / 2), summ(tube / 3),
                       bad_passes=bad, warmup=3),
                  Cell(report.SAME_GPU, report.TUBE_SEAL, size, summ(tube * 0.8), summ(30.0), summ(20.0), warmup=3),
                  Cell(report.SAME_GPU, report.TORCH_IPC, size, summ(torch), warmup=3),
                  Cell(report.SAME_GPU, report.HOST_CENTRIC, size, summ(hc), summ(hc / 2), summ(hc / 2), warmup=3),
                  Cell(report.SAME_GPU, report.RAW_COPY, size, summ(raw), gpu=summ(raw * 0.9))]
    # GPU to GPU: 128 MiB in 420 us = 320 GB/s; 1 GiB in 3.0 ms = 358 GB/s.
    for size, tube in ((128 * MiB, 420.0), (GiB, 3000.0)):
        cells += [Cell(report.GPU_GPU, report.TUBE_PUT, size, summ(tube), warmup=3),
                  Cell(report.GPU_GPU, report.RAW_COPY, size, summ(size / 380e9 * 1e6))]
    conc = tuple(Concurrency(report.SAME_GPU, n, MiB, 3.0, int(rate * 3), 0, 60.0 + 10 * n)
                 for n, rate in ((1, 4000.0), (4, 12_000.0), (8, pairs8)))
    return Measurements(tuple(cells), summ(ping_us), conc)


def statuses(m: Measurements, gpus: int = 2) -> dict[str, str]:
    return {t.key: t.status for t in report.targets(m, gpus=gpus)}


# --- numbers ---------------------------------------------------------------------------------------

def test_a_summary_is_in_microseconds_with_a_p99_above_the_median() -> None:
    s = Summary.of_seconds([i * 1e-6 for i in range(1, 101)])
    assert s.n == 100 and s.median_us == pytest.approx(50.5) and s.min_us == pytest.approx(1.0)
    assert 99.0 <= s.p99_us <= 100.0


def test_no_samples_is_an_error_not_a_zero() -> None:
    with pytest.raises(ValueError):
        Summary.of_seconds([])


def test_effective_bandwidth_is_bytes_over_the_median_pass() -> None:
    c = Cell(report.GPU_GPU, report.TUBE_PUT, GiB, summ(3000.0))
    assert c.effective_gbps == pytest.approx(GiB / 3e-3 / 1e9)


def test_ratios_set_each_tube_cell_against_the_baselines_of_its_size() -> None:
    m = h200_like()
    r = next(r for r in report.ratios(m)
             if (r.pattern, r.method, r.size_bytes) == (report.SAME_GPU, report.TUBE_PUT, 64 * KiB))
    assert r.speedup_vs_torch_ipc == pytest.approx(600 / 80)
    assert r.speedup_vs_host_centric == pytest.approx(300 / 80)
    assert r.times_floor == pytest.approx(80 / 20)
    assert r.times_floor_and_copy == pytest.approx(80 / (20 + 8))
    g = next(r for r in report.ratios(m) if r.pattern == report.GPU_GPU and r.size_bytes == GiB)
    assert g.speedup_vs_torch_ipc is None and g.speedup_vs_host_centric is None   # not measured: no ratio


def test_measurements_survive_a_json_round_trip() -> None:
    m = h200_like()
    again = Measurements.from_dict(json.loads(json.dumps(m.to_dict())))
    assert again == m


# --- targets ---------------------------------------------------------------------------------------

def test_a_run_that_meets_every_goal_prints_only_met_lines() -> None:
    targets = report.targets(h200_like(), gpus=2)
    assert [t.status for t in targets] == ["MET"] * len(targets)
    assert len(targets) == 9
    assert all(t.line().startswith("[MET] ") for t in targets)


def test_each_goal_misses_on_its_own_number() -> None:
    assert statuses(h200_like(tube_64k=120.0))["same_gpu_latency"] == "MISS"
    assert statuses(h200_like(tube_64k=130.0))["same_gpu_vs_torch"] == "MISS"      # 600 / 130 < 5
    assert statuses(h200_like(tube_64k=110.0))["same_gpu_vs_host_centric_64k"] == "MISS"   # 300 / 110 < 3
    assert statuses(h200_like(tube_64k=301.0))["same_gpu_vs_host_centric"] == "MISS"
    assert statuses(h200_like(ping_us=41.0))["ping"] == "MISS"
    assert statuses(h200_like(pairs8=14_999.0))["pairs8"] == "MISS"
    assert statuses(h200_like(bad=1))["data_correct"] == "MISS"


def test_gpu_to_gpu_bandwidth_is_judged_on_the_tube_not_the_raw_copy() -> None:
    m = h200_like()
    slow = Measurements(tuple(replace_median(c, 1000.0) if (c.pattern, c.method, c.size_bytes) ==
                              (report.GPU_GPU, report.TUBE_PUT, 128 * MiB) else c for c in m.cells),
                        m.ping, m.concurrency)
    t = {t.key: t for t in report.targets(slow, gpus=2)}["gpu_gpu_128m"]
    assert t.status == "MISS" and "134 GB/s" in t.measured and "raw peer copy 380 GB/s" in t.measured


def replace_median(c: Cell, median_us: float) -> Cell:
    return Cell(c.pattern, c.method, c.size_bytes, summ(median_us), c.put, c.get, c.gpu, c.bad_passes, c.warmup)


def test_a_host_run_marks_the_gpu_goals_not_applicable_with_the_reason() -> None:
    m = Measurements((Cell(report.HOST, report.FLOOR, 0, summ(30.0)),
                      Cell(report.HOST, report.TUBE_PUT, MiB, summ(300.0), warmup=2)),
                     summ(50.0), (Concurrency(report.HOST, 8, MiB, 1.0, 900, 0, 40.0),))
    targets = {t.key: t for t in report.targets(m, gpus=0)}
    assert targets["same_gpu_latency"].status == "N/A" and "no GPU" in targets["same_gpu_latency"].measured
    assert targets["gpu_gpu_1g"].status == "N/A" and "2 GPUs" in targets["gpu_gpu_1g"].measured
    assert targets["pairs8"].status == "N/A" and "900 passes/s" in targets["pairs8"].measured
    assert targets["ping"].status == "MISS"
    assert targets["data_correct"].status == "MET"


def test_torch_missing_is_not_applicable_rather_than_a_miss() -> None:
    m = h200_like()
    no_torch = Measurements(tuple(c for c in m.cells if c.method != report.TORCH_IPC), m.ping, m.concurrency)
    t = {t.key: t for t in report.targets(no_torch, gpus=2)}["same_gpu_vs_torch"]
    assert t.status == "N/A" and "torch" in t.measured


# --- text and plots -----------------------------------------------------------------------------

def test_the_table_has_a_row_per_pattern_and_size_with_ratios() -> None:
    text = report.format_table(h200_like(), card="2x NVIDIA H200")
    lines = text.splitlines()
    assert lines[0].startswith("== dataplane:") and "2x NVIDIA H200" in lines[0]
    row = next(line for line in lines if line.startswith("same-gpu   64Ki"))
    assert "80.0" in row and "7.5x" in row and "3.8x" in row and "4.0x" in row
    row = next(line for line in lines if line.startswith("gpu-gpu     1Gi"))
    assert " - " in row                                 # no torch or host-centric cell there
    assert "metadata round trip: median 35.0 us" in text
    assert "8 pair(s) 16,000 passes/s, sidecar CPU 140% of a core" in text


def test_size_labels_are_binary_units() -> None:
    assert [report.size_label(s) for s in (64 * KiB, MiB, 16 * MiB, GiB, 10**7, 1001)] == [
        "64Ki", "1Mi", "16Mi", "1Gi", "10M", "1001B"]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    dataplane.add_arguments(parser)
    return parser.parse_args(argv)


def test_plot_only_redraws_both_figures_and_reprints_the_targets(tmp_path: pathlib.Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    src = tmp_path / "dataplane.json"
    src.write_text(json.dumps({"card": "2x NVIDIA H200", "gpus": 2, "backend": "cuda", **h200_like().to_dict()}))
    assert dataplane.run(parse(["--plot-only", str(src)])) == 0
    for name in ("dataplane_latency.png", "dataplane_concurrency.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "[MET] metadata round trip (ping) <= 40 us median: median 35.0 us" in out
    assert out.rstrip().splitlines()[-1].startswith("concurrency")   # the table comes last


def test_plot_only_reports_an_unreadable_json(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert dataplane.run(parse(["--plot-only", str(tmp_path / "missing.json")])) == 2
    assert "--plot-only: cannot read" in capsys.readouterr().out


# --- configuration -------------------------------------------------------------------------------

def test_sizes_take_binary_units_and_refuse_nonsense() -> None:
    assert parse(["--sizes", "64Ki", "1Gi"]).sizes == [64 * KiB, GiB]
    for bad in ("0", "8Gi", "12XB"):
        with pytest.raises(SystemExit):
            parse(["--sizes", bad])


def test_without_a_gpu_the_default_is_the_host_pattern_and_cuda_is_refused() -> None:
    cfg = dataplane.config_from_args(parse(["--quick"]), gpus=0)
    assert cfg.backend == "host" and cfg.patterns == (report.HOST,) and cfg.pairs == (1, 4, 8)
    assert cfg.max_passes < dataplane.config_from_args(parse([]), gpus=0).max_passes
    with pytest.raises(ValueError, match="no GPU"):
        dataplane.config_from_args(parse(["--backend", "cuda"]), gpus=0)
    with pytest.raises(ValueError, match="only the host pattern"):
        dataplane.config_from_args(parse(["--backend", "host", "--patterns", "same-gpu"]), gpus=2)


def test_two_gpus_default_to_every_pattern() -> None:
    cfg = dataplane.config_from_args(parse([]), gpus=2)
    assert cfg.backend == "cuda" and cfg.patterns == (report.SAME_GPU, report.GPU_GPU, report.HOST)
    assert cfg.sizes == dataplane.DEFAULT_SIZES
    assert dataplane.config_from_args(parse(["--pairs"]), gpus=2).pairs == ()


def test_torch_ipc_runs_only_on_gpu_patterns_and_is_skipped_without_torch() -> None:
    cfg = dataplane.config_from_args(parse([]), gpus=2)
    run, skipped = dataplane.methods_for(report.SAME_GPU, cfg, torch=True)
    assert run == [report.TUBE_PUT, report.TUBE_SEAL, report.TORCH_IPC, report.HOST_CENTRIC, report.RAW_COPY]
    run, skipped = dataplane.methods_for(report.SAME_GPU, cfg, torch=False)
    assert report.TORCH_IPC not in run and "torch is not installed" in skipped[0]
    run, skipped = dataplane.methods_for(report.HOST, cfg, torch=True)
    assert report.TORCH_IPC not in run and skipped == []


def test_buffers_rotate_past_any_cache_within_bounds() -> None:
    assert dataplane.rotation(64 * KiB) == 64
    assert dataplane.rotation(16 * MiB) == 16
    assert dataplane.rotation(GiB) == 2


# --- the pass protocol ----------------------------------------------------------------------------

def test_a_cell_is_the_timed_passes_after_warmup_from_both_sides_clocks() -> None:
    plan = passes.CellPlan(report.SAME_GPU, report.TUBE_PUT, MiB, 2, 10, 1, 1.0, 2)
    prod = {"t0": [0, 1000, 2000, 3000], "t_sent": [10, 1010, 2040, 3040], "error": None}
    cons = {"t_recv": [20, 1020, 2050, 3050], "t_end": [90, 1090, 2100, 3100], "bad": 0, "error": None}
    c = dataplane.cell_from(plan, prod, cons)
    assert c.passes.n == 2 and c.passes.median_us == pytest.approx(0.1)        # 100 ns each
    assert c.put is not None and c.put.median_us == pytest.approx(0.04)
    assert c.get is not None and c.get.median_us == pytest.approx(0.05)
    torch_plan = passes.CellPlan(report.SAME_GPU, report.TORCH_IPC, MiB, 2, 10, 1, 1.0, 2)
    assert dataplane.cell_from(torch_plan, prod, cons).put is None
    with pytest.raises(dataplane.WorkerError, match="disagree"):
        dataplane.cell_from(plan, prod, {**cons, "t_end": [90]})
    with pytest.raises(dataplane.WorkerError, match="boom"):
        dataplane.cell_from(plan, prod, {**cons, "error": "boom"})


class Fakes:
    """A producer and a consumer passing marker bytes, each able to fail at one pass."""

    class Producer:
        pickled = False

        def __init__(self, fail_at: int | None = None) -> None:
            self.fail_at = fail_at

        def prepare(self, i: int, value: int) -> None:
            pass

        def publish(self, i: int, value: int) -> bytes:
            if i == self.fail_at:
                raise RuntimeError("producer broke")
            return bytes([value])

        def close(self) -> None:
            pass

    class Consumer:
        pickled = False

        def __init__(self, fail_at: int | None = None, corrupt_at: int | None = None) -> None:
            self.fail_at, self.corrupt_at = fail_at, corrupt_at

        def fetch(self, i: int, message: Any) -> Any:
            if i == self.fail_at:
                raise RuntimeError("consumer broke")
            return message[0] + (1 if i == self.corrupt_at else 0)

        def check(self, data: Any, value: int) -> bool:
            return bool(data == value)

        def finish(self, message: Any) -> None:
            pass

        def close(self) -> None:
            pass


def exchange(producer: Any, consumer: Any, passes_: int, warmup: int = 1) -> tuple[dict, dict]:
    a, b = mp.Pipe(duplex=True)
    out: dict[str, Any] = {}
    t = threading.Thread(target=lambda: out.update(c=passes.consume(consumer, b)))
    t.start()
    p = passes.produce(producer, a, warmup=warmup, should_stop=lambda timed: timed >= passes_)
    t.join(10)
    assert not t.is_alive()
    assert not a.poll(0) and not b.poll(0)         # nothing left in the pipe for the next cell
    return p, out["c"]


def test_passes_run_in_lockstep_and_both_sides_record_each() -> None:
    p, c = exchange(Fakes.Producer(), Fakes.Consumer(), 5)
    assert len(p["t0"]) == len(c["t_end"]) == 6 and p["error"] is None and c["error"] is None
    assert all(t0 <= end for t0, end in zip(p["t0"], c["t_end"]))
    assert all(end <= nxt for end, nxt in zip(c["t_end"], p["t0"][1:]))   # one pass in flight
    assert c["bad"] == 0


def test_a_wrong_byte_counts_as_a_bad_pass() -> None:
    _, c = exchange(Fakes.Producer(), Fakes.Consumer(corrupt_at=3), 5)
    assert c["bad"] == 1


def test_a_consumer_failure_stops_the_producer_and_leaves_the_pipe_clean() -> None:
    p, c = exchange(Fakes.Producer(), Fakes.Consumer(fail_at=2), 10)
    assert "consumer broke" in c["error"] and "gave up" in p["error"]
    assert len(p["t0"]) == len(c["t_end"]) == 2


def test_a_producer_failure_ends_the_cell_on_both_sides() -> None:
    p, c = exchange(Fakes.Producer(fail_at=3), Fakes.Consumer(), 10)
    assert "producer broke" in p["error"] and c["error"] is None
    assert len(p["t0"]) == len(c["t_end"]) == 3


def test_the_cell_budget_keeps_min_passes_and_caps_at_max() -> None:
    plan = passes.CellPlan(report.HOST, report.TUBE_PUT, KiB, 0, 7, 3, 0.0, 2)
    stop = passes.cell_budget(plan)
    assert [stop(i) for i in range(5)] == [False, False, False, True, True]   # budget 0: min_passes
    plan = passes.CellPlan(report.HOST, report.TUBE_PUT, KiB, 0, 7, 3, 60.0, 2)
    stop = passes.cell_budget(plan)
    assert [stop(i) for i in range(8)] == [False] * 7 + [True]


def test_host_memory_markers_and_shared_memory_slots(tmp_path: pathlib.Path) -> None:
    mem = passes.HostMemory()
    a = mem.array(1000)
    mem.mark(a, 7)
    assert mem.marks(a) == (7, 7, 7) and int(a.sum()) == 21
    slot = passes.Segment.create(4096)
    try:
        other = passes.Segment(slot.path, 4096, create=False)
        slot.array[4095] = 9
        assert other.array[4095] == 9
        other.close()
    finally:
        slot.close(unlink=True)
    assert not pathlib.Path(slot.path).exists()


# --- end to end -------------------------------------------------------------------------------------

def test_a_quick_host_run_measures_every_host_method_and_writes_its_json(
        tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = parse(["--backend", "host", "--quick", "--sizes", "64Ki", "1Mi", "--pairs", "1", "2",
                  "--iterations", "10", "--no-plot", "--tag", "test", "--out", str(tmp_path)])
    assert dataplane.run(args) == 0
    data = json.loads((tmp_path / "dataplane-host-test.json").read_text())
    got = {(r["method"], r["size_bytes"]) for r in data["results"]}
    for method in (report.TUBE_PUT, report.TUBE_SEAL, report.HOST_CENTRIC, report.RAW_COPY):
        assert {(method, 64 * KiB), (method, MiB)} <= got
    assert (report.FLOOR, 0) in got
    assert all(r["bad_passes"] == 0 for r in data["results"]) and data["skipped"] == []
    assert [c["pairs"] for c in data["concurrency"]] == [1, 2]
    assert all(c["passes"] > 0 for c in data["concurrency"])
    assert data["metadata_roundtrip"]["n"] == 300
    assert data["sidecar_after"]["host"]["objects"] == 0        # every pass was released
    assert data["backend"] == "host" and data["card"] == "no GPU (host backend)" and "numpy" in data["versions"]
    out = capsys.readouterr().out
    assert "[MET] every pass delivered the bytes its producer wrote" in out
    assert "[N/A] same-GPU put+get <= 100 us median" in out
    assert out.rstrip().splitlines()[-1].startswith("concurrency host 1MiB: 2 pair(s)")
