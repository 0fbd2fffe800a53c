"""Splitting a transfer's bytes over a plan's paths in bandwidth proportion."""

from __future__ import annotations

import pytest
from faastube_sidecar.transfers import planner
from faastube_sidecar.transfers.planner import HOST, PathShare, Plan, PlanError
from faastube_spec import topology
from faastube_spec.topology import GBPS
from hypothesis import given, settings
from hypothesis import strategies as st


def plan_of(*bandwidths: float) -> Plan:
    paths = tuple(PathShare(hops=(HOST, i), bandwidth_bytes_per_s=bw, bottleneck=(HOST, i),
                            links=((HOST, i),)) for i, bw in enumerate(bandwidths))
    return Plan(paths=paths, total_bandwidth_bytes_per_s=sum(bandwidths))


def assert_tiles(chunks: list[tuple[int, int, int]], nbytes: int) -> None:
    offset = 0
    for _path, start, length in chunks:
        assert start == offset and length > 0
        offset += length
    assert offset == nbytes


def test_chunks_cover_the_bytes_exactly_and_follow_bandwidth() -> None:
    plan = plan_of(48 * GBPS, 24 * GBPS)
    chunks = planner.split_bytes(plan, 10 * 2**20 + 5, chunk_bytes=2**20)
    assert_tiles(chunks, 10 * 2**20 + 5)
    per_path = [sum(n for p, _o, n in chunks if p == i) for i in range(2)]
    assert per_path[0] == pytest.approx(2 * per_path[1], rel=0.1)
    assert max(n for _p, _o, n in chunks) == 2**20
    assert {n for p, _o, n in chunks[:-2] if p == 1} == {2**19}


def test_the_lent_machines_host_plan_splits_evenly_over_four_links() -> None:
    node = topology.builtin_node("lent-4xh100")
    plan = planner.plan_paths(node, HOST, 0)
    chunks = planner.split_bytes(plan, 2**30, chunk_bytes=16 * 2**20)
    assert_tiles(chunks, 2**30)
    per_path = [sum(n for p, _o, n in chunks if p == i) for i in range(len(plan.paths))]
    assert per_path == [2**28] * 4


@settings(max_examples=60, deadline=None)
@given(bandwidths=st.lists(st.floats(min_value=1e6, max_value=1e12), min_size=1, max_size=8),
       nbytes=st.integers(min_value=0, max_value=10**7),
       chunk_bytes=st.integers(min_value=512, max_value=4 * 2**20))
def test_any_split_tiles_the_range_without_gaps_or_overlaps(
        bandwidths: list[float], nbytes: int, chunk_bytes: int) -> None:
    chunks = planner.split_bytes(plan_of(*bandwidths), nbytes, chunk_bytes=chunk_bytes)
    assert_tiles(chunks, nbytes)
    assert all(0 <= p < len(bandwidths) and n <= chunk_bytes for p, _o, n in chunks)


def test_zero_bytes_give_no_chunks() -> None:
    assert planner.split_bytes(plan_of(1e9), 0, chunk_bytes=4096) == []


@pytest.mark.parametrize(("nbytes", "chunk_bytes", "message"), [
    (-1, 4096, "nbytes: must be an integer >= 0"),
    (10, 0, "chunk_bytes: must be an integer >= 1"),
    (1.5, 4096, "nbytes: must be an integer >= 0"),
])
def test_bad_split_arguments_are_rejected(nbytes: int, chunk_bytes: int, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        planner.split_bytes(plan_of(1e9), nbytes, chunk_bytes=chunk_bytes)


def test_a_plan_without_bandwidth_cannot_be_split() -> None:
    with pytest.raises(PlanError, match="no path with a positive finite bandwidth"):
        planner.split_bytes(Plan(paths=(), total_bandwidth_bytes_per_s=0.0), 10, chunk_bytes=4)
