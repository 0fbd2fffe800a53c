"""Routes, path labels and validation of the transfer scheduler; multi-path in the link model."""

from __future__ import annotations

import pytest
from faastube_sidecar.transfers import linkmodel
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
    describe_route,
    make_route,
)

GB = 1e9
LINKS = node_links(range(4), pcie_bandwidth_bytes_per_s=55 * GB, p2p_bandwidth_bytes_per_s=390 * GB)
KINDS = {spec.link: spec.kind for spec in LINKS}


def model_for(links: list[LinkSpec]) -> linkmodel.LinkModel:
    return linkmodel.LinkModel({s.link: linkmodel.LinkParams(s.bandwidth_bytes_per_s) for s in links})


@pytest.mark.parametrize(("paths", "label"), [
    ([((HOST, 0), 1.0)], "h2d-direct"),
    ([((HOST, 0), 1.0), ((HOST, 1, 0), 1.0), ((HOST, 2, 0), 1.0), ((HOST, 3, 0), 1.0)],
     "h2d-multipath[0,1,2,3]"),
    ([((1, HOST), 1.0)], "d2h-direct"),
    ([((1, HOST), 1.0), ((1, 2, HOST), 1.0)], "d2h-multipath[1,2]"),
    ([((0, 1), 1.0)], "nvlink-direct"),
    ([((0, 2, 1), 1.0)], "nvlink-relay[2]"),
    ([((0, 1), 2.0), ((0, 2, 1), 1.0), ((0, 3, 1), 1.0)], "nvlink-multipath[direct,2,3]"),
])
def test_routes_are_labelled_by_the_path_they_take(paths: list, label: str) -> None:
    assert describe_route(make_route(paths, 64 << 20), KINDS) == label


def test_gpu_to_gpu_over_pcie_is_labelled_pcie() -> None:
    kinds = {LinkId("p2p:0->1"): "pcie"}
    assert describe_route(make_route([((0, 1), 1.0)], 1 << 20), kinds) == "pcie"  # type: ignore[arg-type]


def test_bytes_are_split_by_bandwidth_share_and_aligned() -> None:
    route = make_route([((HOST, 0), 3.0), ((HOST, 1, 0), 1.0)], 100 << 20)
    assert [p.size_bytes for p in route.paths] == [75 << 20, 25 << 20]
    assert route.size_bytes == 100 << 20
    tiny = make_route([((HOST, 0), 1.0), ((HOST, 1, 0), 1.0)], 4096)
    assert len(tiny.paths) == 1  # a share too small for a page is dropped


@pytest.mark.parametrize(("paths", "size", "message"), [
    ([], 10, "paths: at least one path"),
    ([((HOST, 0), 1.0)], 0, "size_bytes: must be > 0"),
    ([((HOST, 0), -1.0)], 10, "paths[0].bandwidth"),
    ([((HOST,), 1.0)], 10, "paths[0]: needs at least"),
    ([((HOST, -2), 1.0)], 10, "paths[0][1]"),
    ([((HOST, 0), 1.0), ((HOST, 1), 1.0)], 1 << 20, "route.paths[1]: goes host -> 1"),
    ([((0, 0), 1.0)], 10, "paths[0].hops[0]: hop: GPU 0 -> itself"),
    ([((0, HOST, 1), 1.0)], 10, "relays must be GPUs"),
])
def test_malformed_routes_name_the_wrong_field(paths: list, size: int, message: str) -> None:
    with pytest.raises(TransferError, match=message.replace("[", r"\[").replace("]", r"\]")):
        make_route(paths, size)


def test_requests_are_validated_before_queueing() -> None:
    model = model_for(LINKS)
    sched = TransferScheduler(LINKS, executor=model, clock=model)
    route = make_route([((HOST, 0), 1.0)], 1 << 20)
    ident = FunctionIdentity("wf", "f")
    with pytest.raises(TransferError, match="slo_s"):
        sched.submit(TransferRequest("t", ident, route, slo_s=-1.0))
    with pytest.raises(TransferError, match="expected_compute_s"):
        sched.submit(TransferRequest("t", ident, route, slo_s=1.0, expected_compute_s=float("nan")))
    with pytest.raises(TransferError, match="identity"):
        sched.submit(TransferRequest("t", FunctionIdentity("", "f"), route))
    with pytest.raises(TransferError, match="unknown link 'h2d:7'"):
        sched.submit(TransferRequest("t", ident, make_route([((HOST, 7), 1.0)], 1 << 20)))
    sched.submit(TransferRequest("t", ident, route))
    with pytest.raises(TransferError, match="already in progress"):
        sched.submit(TransferRequest("t", ident, route))
    model.run()
    assert not sched.busy


def test_scheduler_rejects_bad_link_tables_and_settings() -> None:
    model = model_for(LINKS)
    with pytest.raises(TransferError, match=r"links\[1\].link: duplicate"):
        TransferScheduler([LINKS[0], LINKS[0]], executor=model, clock=model)
    with pytest.raises(TransferError, match=r"links\[0\].bandwidth_bytes_per_s"):
        TransferScheduler([LinkSpec(LinkId("h2d:0"), 0.0)], executor=model, clock=model)
    with pytest.raises(TransferError, match="max_inflight_chunks_per_link"):
        SchedulerSettings(max_inflight_chunks_per_link=0)


def run_h2d(paths: list, size: int) -> TransferResult:
    model = model_for(LINKS)
    sched = TransferScheduler(LINKS, executor=model, clock=model,
                              settings=SchedulerSettings(chunk_bytes=16 << 20))
    done: list[TransferResult] = []
    sched.submit(TransferRequest("t", FunctionIdentity("wf", "f"), make_route(paths, size)), done.append)
    model.run()
    return done[0]


def test_multipath_host_to_gpu_harvests_the_other_gpus_pcie_links() -> None:
    single = run_h2d([((HOST, 0), 1.0)], 1 << 30)
    multi = run_h2d([((HOST, 0), 1.0)] + [((HOST, r, 0), 1.0) for r in (1, 2, 3)], 1 << 30)
    assert multi.path_label == "h2d-multipath[0,1,2,3]"
    assert multi.rate_bytes_per_s / single.rate_bytes_per_s >= 3.5


def test_relay_paths_queue_on_their_narrowest_link() -> None:
    model = model_for(LINKS)
    sched = TransferScheduler(LINKS, executor=model, clock=model)
    sched.submit(TransferRequest("t", FunctionIdentity("wf", "f"),
                                 make_route([((HOST, 1, 0), 1.0)], 32 << 20)))
    model.run()
    counted = {k: v for k, v in sched.link_bytes().items() if v}
    assert counted == {LinkId("h2d:1"): 32 << 20}
    assert model.busy_s[LinkId("p2p:1->0")] > 0  # the NVLink hop still ran
