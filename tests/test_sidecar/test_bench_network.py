"""`faastube bench network --quick`: two sidecars as two nodes, raw NIXL and host-centric, one run.

Checks that every method runs through real processes and that the report says what the
issue asks for; no speed is asserted (shared CPU machines say nothing about networks).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
from faastube_bench import network

pytest.importorskip("nixl_cu13", reason="NIXL not installed (make setup installs it)")


def test_the_quick_run_reports_get_raw_nixl_and_host_centric_per_size(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "faastube.cli", "--log-level", "WARNING", "bench", "network", "--quick",
         "--backend", "host", "--sizes", "64Ki,1Mi", "--repeat", "2", "--out", str(tmp_path), "--tag", "smoke"],
        capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads((tmp_path / "network-smoke.json").read_text())
    assert data["benchmark"] == "faastube bench network" and data["card"] == "no GPU (host backend)"
    assert "host memory" in data["machine"]["description"] and data["machine"]["ucx_tls"] == "tcp"
    assert data["settings"]["backend"] == "host" and data["settings"]["repeat"] == 2
    assert len(data["machine"]["load_average_before"]) == 3
    assert [row["size_bytes"] for row in data["sizes"]] == [64 << 10, 1 << 20] and data["failures"] == []
    for row in data["sizes"]:
        for method in network.METHODS:
            cell = row[method]
            assert len(cell["samples_s"]) == 2 and all(s > 0 for s in cell["samples_s"])
            assert cell["median_s"] <= cell["p90_s"]
            assert cell["throughput_bytes_per_s"] == pytest.approx(row["size_bytes"] / cell["median_s"])
        assert {"tube_over_raw", "tube_minus_raw_s", "tube_over_host_centric"} <= set(row)
    goals = {t["goal"]: t for t in data["targets"]}
    assert len(goals) == 3
    small = next(t for g, t in goals.items() if "200 us more" in g)
    assert small["met"] in (True, False), "1 MiB was measured: the target is judged"
    assert sum(t["met"] is None for t in goals.values()) == 2, "64 MiB+ and 128 MiB were not measured"
    assert (tmp_path / "network-smoke.png").exists()
    lines = done.stdout.rstrip().splitlines()
    assert any(line.startswith(("[MET ]", "[MISS]")) for line in lines)
    assert lines[-1].startswith("tube: get of a ref"), "the table comes last"


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    network.add_arguments(parser)
    return parser.parse_args(argv)


def test_sizes_take_lists_and_ranges_of_powers_of_two() -> None:
    assert network.parse_sizes("1Mi..8Mi") == (1 << 20, 2 << 20, 4 << 20, 8 << 20)
    assert network.parse_sizes("64Ki, 1Mi,1Mi") == (64 << 10, 1 << 20)
    for bad, message in (("0", "between 1 byte"), ("8Mi..1Mi", "smallest first"), ("lots", "--sizes 'lots'"),
                         ("8Gi", "between 1 byte and 4Gi"), (",", "no size")):
        with pytest.raises(network.BenchError, match=message):
            network.parse_sizes(bad)


def test_flags_are_checked_with_one_clear_line() -> None:
    for argv, message in ((("--repeat", "0"), "--repeat must be >= 1"),
                          (("--warmup", "-1"), "--warmup must be >= 0"),
                          (("--methods", "raw-nixl"), "tube and any of"),
                          (("--methods", "tube,carrier-pigeon"), "tube and any of"),
                          (("--gpus", "0,1"), "--gpus needs --backend cuda"),
                          (("--backend", "cuda", "--gpus", "1"), "two CUDA ordinals")):
        with pytest.raises(network.BenchError, match=message):
            network.settings_from(_args("--backend", "host", *argv) if "--backend" not in argv else _args(*argv),
                                  gpu_count=lambda: 2)


def test_the_cuda_backend_refuses_clearly_without_a_gpu_per_node() -> None:
    with pytest.raises(network.BenchError, match="no GPU is visible"):
        network.settings_from(_args("--backend", "cuda"), gpu_count=lambda: 0)
    with pytest.raises(network.BenchError, match="each node needs a GPU of its own"):
        network.settings_from(_args("--backend", "cuda"), gpu_count=lambda: 1)
    shared = network.settings_from(_args("--backend", "cuda", "--gpus", "0,0"), gpu_count=lambda: 1)
    assert shared.gpus == (0, 0) and shared.ucx_tls == network.CUDA_TLS
    assert network.settings_from(_args(), gpu_count=lambda: 1).backend == "host", "auto: cuda needs two GPUs"
    assert network.settings_from(_args(), gpu_count=lambda: 2).backend == "cuda"


def test_the_targets_are_judged_from_the_rows() -> None:
    def row(size: int, tube_s: float, raw_s: float, host_s: float) -> dict[str, object]:
        return network.summarize({size: {network.TUBE: [tube_s], network.RAW: [raw_s],
                                         network.HOST_CENTRIC: [host_s]}})[0]

    rows = [row(1 << 20, 400e-6, 250e-6, 2e-3), row(64 << 20, 10e-3, 9.5e-3, 80e-3),
            row(128 << 20, 22e-3, 19e-3, 100e-3)]
    by_goal = list(network.evaluate(rows, network.Targets()))
    assert [t["met"] for t in by_goal] == [False, True, False]
    assert "128 MiB 86%" in by_goal[0]["measured"] and "+150 us" in by_goal[1]["measured"]
    assert "4.55x" in by_goal[2]["measured"]


def test_a_size_that_failed_is_reported_with_its_error_and_the_rest_still_judged() -> None:
    settings = network.Settings(backend="host", sizes=(1 << 20, 256 << 20), repeat=1, warmup=0, ucx_tls="tcp",
                                gpus=(0, 1), quick=False)
    measured = network.Measured({1 << 20: {network.TUBE: [5e-3], network.RAW: [4e-3], network.HOST_CENTRIC: [6e-3]}},
                                [{"size_bytes": 256 << 20, "method": network.TUBE, "error": "node-b tube: Unavailable",
                                  "passes_done": {network.TUBE: 0}}])
    data = network.build_report(settings, measured, machine_info={"card": "c", "description": "d"}, wall_s=1.0)
    assert [r["size_bytes"] for r in data["sizes"]] == [1 << 20]
    assert [t["met"] for t in data["targets"]] == [None, False, None]
    assert "256 MiB  FAILED in tube: node-b tube: Unavailable" in network.table(data)
