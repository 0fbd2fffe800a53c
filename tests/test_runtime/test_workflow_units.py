"""Sizes and durations as written in Workflow documents."""

from __future__ import annotations

import pytest
from faastube_spec.units import (
    UnitError,
    format_duration,
    format_size,
    parse_duration,
    parse_rate,
    parse_size,
)
from faastube_spec.workflow import parse_duration as wf_parse_duration
from faastube_spec.workflow import parse_size as wf_parse_size


@pytest.mark.parametrize("text, size_bytes", [
    ("130MB", 130_000_000), ("4Gi", 4 * 2**30), ("512KiB", 512 * 1024), ("1.5GB", 1_500_000_000),
    ("100", 100), ("7B", 7), ("2 MiB", 2 * 2**20), (4096, 4096), (0, 0), ("1e3", 1000),
])
def test_sizes_parse_to_bytes(text: str | int, size_bytes: int) -> None:
    assert parse_size(text) == size_bytes


@pytest.mark.parametrize("text", ["12XB", "-1MB", "MB", "", "1.5B", "1mb"])
def test_bad_sizes_raise_unit_errors(text: str) -> None:
    with pytest.raises(UnitError):
        parse_size(text)


@pytest.mark.parametrize("text, seconds", [
    ("250ms", 0.25), ("1.5s", 1.5), ("2m", 120.0), ("500us", 500e-6), ("1h", 3600.0), ("0s", 0.0),
])
def test_durations_parse_to_seconds(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["fast", "-3ms", "10", "1d", "ms"])
def test_bad_durations_raise_unit_errors(text: str) -> None:
    with pytest.raises(UnitError):
        parse_duration(text)


@pytest.mark.parametrize("size_bytes", [1, 999, 130_000_000, 4 * 2**30, 1536, 123_456_789])
def test_format_size_reads_back(size_bytes: int) -> None:
    assert parse_size(format_size(size_bytes)) == size_bytes


@pytest.mark.parametrize("seconds", [0.8, 0.25, 1.5, 500e-6, 120.0, 1e-7, 0.0123])
def test_format_duration_reads_back(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


def test_the_workflow_module_reexports_the_parsers() -> None:
    assert wf_parse_size is parse_size and wf_parse_duration is parse_duration


def test_rates_are_bytes_per_second_from_bits_or_bytes() -> None:
    assert parse_rate("25Gb/s") == 25e9 / 8 == parse_rate("25 Gbps")
    assert parse_rate("3GB/s") == 3e9 == parse_rate("3000000000")
    assert parse_rate("400Mb") == 50e6
    for bad in ("fast", "25G", "0GB/s", "-1GB/s", "1e9", ""):
        with pytest.raises(UnitError, match="rate"):
            parse_rate(bad)
