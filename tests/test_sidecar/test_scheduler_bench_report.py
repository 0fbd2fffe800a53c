"""The transfers benchmark's report side: --plot-only redraws PNGs from a JSON, the table reads it."""

from __future__ import annotations

import argparse
import json
import pathlib

import pytest
from faastube_bench import transfers

MiB = 1 << 20


def recorded() -> dict:
    rows = []
    for size, tube in ((MiB, 30.0), (256 * MiB, 150.0)):
        leg = {"path": "h2d-multipath[0,1,2,3]", "pinned_GBps": 52.0, "pageable_GBps": 8.0,
               "tube_GBps": tube, "tube_vs_pinned": tube / 52.0, "tube_vs_pageable": tube / 8.0}
        rows.append({"size_bytes": size, "reps": 3, "h2d": leg, "d2h": dict(leg, path="d2h-direct")})
    return {
        "card": "NVIDIA H100 80GB HBM3", "gpus": [0, 1, 2, 3], "wall_s": 100.0,
        "sweep": {"rows": rows, "chunk_bytes": 16 * MiB, "min_multipath_bytes": 32 * MiB},
        "isolation": {"bulk_bytes": 4 << 30, "small_bytes": MiB, "small_alone_p50_s": 3e-5,
                      "fifo_small_latency_s": [0.07, 0.072], "tube_small_latency_s": [2e-4, 3e-4],
                      "tube_small_p50_s": 2e-4, "tube_small_p99_s": 3e-4, "fifo_small_p50_s": 0.07,
                      "bulk_keeps_fraction_of_solo": 0.97, "bulk_keeps_fraction_of_pinned": 0.95},
    }


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    transfers.add_arguments(parser)
    return parser.parse_args(argv)


def test_plot_only_draws_both_figures_from_a_json(tmp_path: pathlib.Path) -> None:
    pytest.importorskip("matplotlib")
    src = tmp_path / "transfers.json"
    src.write_text(json.dumps(recorded()))
    assert transfers.run(parse(["--plot-only", str(src), "--out", str(tmp_path / "png")])) == 0
    for name in ("transfers_bandwidth.png", "transfers_isolation_cdf.png"):
        assert (tmp_path / "png" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_only_reports_an_unreadable_json(tmp_path: pathlib.Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert transfers.run(parse(["--plot-only", str(tmp_path / "missing.json")])) == 2
    assert "--plot-only: cannot read" in capsys.readouterr().out


def test_table_summarises_every_section() -> None:
    text = transfers.table(recorded())
    assert "NVIDIA H100" in text
    assert "2.88x" in text  # 150 / 52 at 256 MiB
    assert "tube p50 200 us p99 300 us" in text and "FIFO p50 70000 us" in text


def test_bad_flags_are_rejected_before_touching_a_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    assert transfers.run(parse(["--chunk-mib", "0"])) == 2
    assert transfers.run(parse(["--sizes-mib", "-1"])) == 2
    assert "--sizes-mib" in capsys.readouterr().out
