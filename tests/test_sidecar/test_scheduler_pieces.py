"""How the scheduler cuts and starts a split transfer, in the deterministic link model.

The engine's settings (16 MiB chunks, 2 in flight, 2 MiB relay edges) must keep the
scheduler's guarantees: a small transfer behind a bulk one still finishes within a
millisecond, and a split transfer starts every path at once and ends them together.
"""

from __future__ import annotations

import pytest
from faastube_sidecar.backends.cuda_transfers import EngineSettings
from faastube_sidecar.transfers import linkmodel, planner, scheduler
from faastube_sidecar.transfers.cuda_executor import node_links
from faastube_sidecar.transfers.scheduler import (
    HOST,
    FunctionIdentity,
    LinkId,
    LinkSpec,
    SchedulerSettings,
    TransferError,
    TransferRequest,
    TransferResult,
    TransferScheduler,
    cut_path,
    make_route,
    route_from_plan,
    sized_route,
)
from faastube_spec import topology
from hypothesis import given, settings
from hypothesis import strategies as st

GB = 1e9
MiB = 1 << 20
ENGINE = EngineSettings()
LINKS = node_links(range(4), pcie_bandwidth_bytes_per_s=55 * GB, p2p_bandwidth_bytes_per_s=380 * GB)
H2D_PATHS = [((HOST, 0), 1.0)] + [((HOST, r, 0), 1.0) for r in (1, 2, 3)]


def model(issue_delay_s: float = 20e-6) -> linkmodel.LinkModel:
    return linkmodel.LinkModel({s.link: linkmodel.LinkParams(s.bandwidth_bytes_per_s) for s in LINKS},
                               issue_delay_s=issue_delay_s)


def run(route: scheduler.Route, settings: SchedulerSettings) -> tuple[TransferResult, list[scheduler.Chunk]]:
    lm = model()
    issued: list[scheduler.Chunk] = []

    class Recording:
        def issue(self, chunk: scheduler.Chunk, on_done: scheduler.ChunkDone) -> None:
            issued.append(chunk)
            lm.issue(chunk, on_done)

    sched = TransferScheduler(LINKS, executor=Recording(), clock=lm, settings=settings)
    done: list[TransferResult] = []
    sched.submit(TransferRequest("t", FunctionIdentity("wf", "f"), route), done.append)
    lm.run()
    return done[0], issued


@settings(max_examples=80, deadline=None)
@given(size=st.integers(min_value=1, max_value=200 * MiB),
       chunk=st.integers(min_value=64 << 10, max_value=32 * MiB),
       edge=st.one_of(st.none(), st.integers(min_value=1, max_value=8 * MiB)))
def test_pieces_tile_the_path_and_never_exceed_a_chunk(size: int, chunk: int, edge: int | None) -> None:
    pieces = cut_path(size, chunk, edge_bytes=edge)
    assert sum(pieces) == size and all(0 < p <= chunk for p in pieces)


def test_a_relayed_path_starts_and_ends_with_small_pieces() -> None:
    assert cut_path(70 * MiB, 16 * MiB, edge_bytes=2 * MiB) == [2 * MiB, 16 * MiB, 16 * MiB, 16 * MiB,
                                                                16 * MiB, 2 * MiB, 2 * MiB]
    assert cut_path(3 * MiB, 16 * MiB, edge_bytes=2 * MiB) == [3 * MiB]  # too short to have edges
    assert cut_path(70 * MiB, 16 * MiB) == [16 * MiB] * 4 + [6 * MiB]


def test_only_relayed_paths_get_small_edges() -> None:
    settings = SchedulerSettings(chunk_bytes=16 * MiB, relay_edge_bytes=2 * MiB)
    _result, issued = run(make_route(H2D_PATHS, 256 * MiB), settings)
    by_path: dict[int, list[int]] = {}
    for c in sorted(issued, key=lambda c: c.offset_bytes):
        by_path.setdefault(c.path_index, []).append(c.size_bytes)
    assert by_path[0] == [16 * MiB] * 4
    for relayed in (1, 2, 3):
        assert by_path[relayed][0] == by_path[relayed][-1] == 2 * MiB


def test_every_path_of_a_split_transfer_gets_its_first_chunk_before_any_gets_a_second() -> None:
    _result, issued = run(make_route(H2D_PATHS, 256 * MiB), ENGINE.scheduler)
    first = issued[:4]
    assert sorted(c.path_index for c in first) == [0, 1, 2, 3]


def test_small_relay_edges_shorten_a_split_transfer() -> None:
    route = make_route(H2D_PATHS, 256 * MiB)
    plain, _ = run(route, SchedulerSettings(chunk_bytes=16 * MiB, max_inflight_chunks_per_link=2))
    edged, _ = run(route, ENGINE.scheduler)
    assert edged.duration_s < plain.duration_s


@pytest.mark.parametrize("paths", [H2D_PATHS, [((0, HOST), 1.0)] + [((0, r, HOST), 1.0) for r in (1, 2, 3)]],
                         ids=["h2d", "d2h"])
def test_256_mib_over_four_links_keeps_them_busy_to_the_end_in_the_link_model(paths: list) -> None:
    # The model has no Python issue costs (the planner's cost model accounts for those):
    # what is left is the pipeline, which must stay within 5% of four links' time.
    result, _ = run(make_route(paths, 256 * MiB), ENGINE.scheduler)
    ideal_s = 256 * MiB / (4 * 55 * GB)
    assert ideal_s / result.duration_s >= 0.95


def test_a_small_transfer_behind_a_bulk_one_waits_less_than_a_millisecond_with_engine_settings() -> None:
    link = LinkId("h2d:0")
    lm = linkmodel.LinkModel({link: linkmodel.LinkParams(55 * GB)}, issue_delay_s=20e-6)
    sched = TransferScheduler([LinkSpec(link, 55 * GB)], executor=lm, clock=lm, settings=ENGINE.scheduler)
    done: dict[str, TransferResult] = {}
    route = lambda n: make_route([((HOST, 0), 1.0)], n)  # noqa: E731
    sched.submit(TransferRequest("bulk", FunctionIdentity("wf", "b"), route(4 << 30)),
                 lambda r: done.__setitem__(r.transfer_id, r))
    lm.at(0.010, lambda: sched.submit(TransferRequest("small", FunctionIdentity("wf", "a"), route(MiB)),
                                      lambda r: done.__setitem__(r.transfer_id, r)))
    lm.run()
    assert done["small"].duration_s < 1e-3
    assert done["bulk"].rate_bytes_per_s >= 0.95 * 55 * GB


def test_a_sized_route_carries_exactly_the_given_bytes() -> None:
    route = sized_route([((HOST, 0), 5 * MiB), ((HOST, 1, 0), 0), ((HOST, 2, 0), 3 * MiB)])
    assert [p.size_bytes for p in route.paths] == [5 * MiB, 3 * MiB]  # the empty path is left out
    with pytest.raises(TransferError, match=r"paths\[1\].size_bytes"):
        sized_route([((HOST, 0), 5), ((HOST, 1, 0), -1)])
    with pytest.raises(TransferError, match="size_bytes: must be > 0"):
        sized_route([((HOST, 0), 0)])


def test_route_from_a_fitted_plan_uses_its_sizes() -> None:
    node = topology.builtin_node("lent-4xh100")
    plan = planner.plan_transfer(node, HOST, 0, 256 * MiB)
    route = route_from_plan(plan, 256 * MiB)
    assert tuple(p.size_bytes for p in route.paths) == plan.sizes_bytes
    unfitted = planner.plan_paths(node, HOST, 0)
    assert [p.size_bytes for p in route_from_plan(unfitted, 256 * MiB).paths] == [64 * MiB] * 4
