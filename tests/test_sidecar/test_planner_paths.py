"""Contention-aware path selection on every simulated topology."""

from __future__ import annotations

import itertools

import pytest
from faastube_sidecar.transfers import planner
from faastube_sidecar.transfers.planner import HOST, LinkUsage, PathCatalog, Plan, PlanError
from faastube_spec import topology
from faastube_spec.topology import GBPS, NodeTopology

TOPOLOGIES = ("dgx1-v100", "dgx-a100", "dgx-h100", "4x-a10", "8x-l40s", "lent-4xh100")
Endpoint = planner.Endpoint


def endpoint_pairs(node: NodeTopology) -> list[tuple[Endpoint, Endpoint]]:
    gpus: list[Endpoint] = list(node.gpu_indices)
    pairs = list(itertools.permutations(gpus, 2))
    pairs += [(HOST, g) for g in gpus] + [(g, HOST) for g in gpus]
    return pairs


def assert_valid_hops(node: NodeTopology, plan: Plan, src: Endpoint, dst: Endpoint) -> None:
    for path in plan.paths:
        assert path.hops[0] == src and path.hops[-1] == dst
        assert len(set(path.hops)) == len(path.hops), f"path revisits a vertex: {path.hops}"
        for u, v in zip(path.hops, path.hops[1:]):
            if u == HOST or v == HOST:
                continue  # every GPU has its own PCIe link to the host
            link = node.link(int(u), int(v))
            assert link is not None, f"{path.hops}: no link {u}-{v}"
            assert link.kind == "nvlink" or link.p2p, f"{path.hops}: {u}-{v} cannot copy P2P"


def assert_within_capacity(catalog: PathCatalog, usage: LinkUsage) -> None:
    for key, used in usage.items():
        assert used <= catalog.capacity_bytes_per_s(key) * (1 + 1e-9), \
            f"{key}: {used / GBPS} GB/s > {catalog.capacity_bytes_per_s(key) / GBPS} GB/s"


@pytest.mark.parametrize("name", TOPOLOGIES)
def test_every_plan_uses_real_links_and_never_exceeds_a_link_capacity(name: str) -> None:
    node = topology.builtin_node(name)
    catalog = PathCatalog.for_topology(node)
    for src, dst in endpoint_pairs(node):
        plan = planner.plan_paths(node, src, dst)
        assert plan.paths and not plan.contended
        assert plan.total_bandwidth_bytes_per_s == pytest.approx(
            sum(p.bandwidth_bytes_per_s for p in plan.paths))
        assert_valid_hops(node, plan, src, dst)
        assert_within_capacity(catalog, LinkUsage().with_plan(plan))
        for path in plan.paths:
            assert path.bottleneck in path.links


@pytest.mark.parametrize("name", TOPOLOGIES)
def test_concurrent_plans_admitted_one_after_another_stay_within_capacity(name: str) -> None:
    node = topology.builtin_node(name)
    catalog = PathCatalog.for_topology(node)
    usage = LinkUsage()
    transfers: list[tuple[Endpoint, Endpoint]] = [(0, 1), (HOST, 1), (1, HOST), (1, 0), (HOST, 0)]
    for src, dst in transfers:
        plan = planner.plan_paths(node, src, dst, usage=usage)
        assert_valid_hops(node, plan, src, dst)
        if not plan.contended:
            usage = usage.with_plan(plan)
            assert_within_capacity(catalog, usage)


@pytest.mark.parametrize("name", ["dgx-a100", "dgx-h100", "lent-4xh100"])
def test_nvswitch_pairs_use_only_the_direct_link(name: str) -> None:
    node = topology.builtin_node(name)
    for a, b in itertools.permutations(node.gpu_indices, 2):
        plan = planner.plan_paths(node, a, b)
        assert [p.hops for p in plan.paths] == [(a, b)]
        assert plan.total_bandwidth_bytes_per_s == node.nvlink_port_bandwidth_bytes_per_s(a)


def test_dgx1_pairs_without_nvlink_get_nvlink_relay_paths_not_pcie() -> None:
    node = topology.builtin_node("dgx1-v100")
    no_nvlink = [(l.a, l.b) for l in node.links if l.kind == "pcie"]
    assert len(no_nvlink) == 12
    for a, b in no_nvlink:
        for src, dst in ((a, b), (b, a)):
            plan = planner.plan_paths(node, src, dst)
            assert all(len(p.hops) >= 3 and HOST not in p.hops for p in plan.paths)
            for path in plan.paths:
                for u, v in zip(path.hops, path.hops[1:]):
                    link = node.link(int(u), int(v))
                    assert link is not None and link.kind == "nvlink"
            # Far more than the ~8 GB/s PCIe path, and at least two parallel relays.
            assert plan.total_bandwidth_bytes_per_s >= 48 * GBPS
            assert len(plan.paths) >= 2


def test_dgx1_gpu0_to_gpu5_prefers_the_two_hop_relays_through_common_neighbours() -> None:
    node = topology.builtin_node("dgx1-v100")
    plan = planner.plan_paths(node, 0, 5)
    two_hop = [p.hops for p in plan.paths if len(p.hops) == 3]
    assert set(two_hop) == {(0, 1, 5), (0, 4, 5)}
    assert [len(p.hops) for p in plan.paths] == sorted(len(p.hops) for p in plan.paths)


def test_dgx1_direct_pair_keeps_its_link_and_adds_relays_up_to_the_egress() -> None:
    node = topology.builtin_node("dgx1-v100")
    plan = planner.plan_paths(node, 0, 3)  # NV2: 48 GB/s direct
    assert plan.paths[0].hops == (0, 3)
    assert plan.paths[0].bandwidth_bytes_per_s == 48 * GBPS
    egress = sum(l.bandwidth_bytes_per_s for l in node.links if l.kind == "nvlink" and 0 in (l.a, l.b))
    assert 48 * GBPS < plan.total_bandwidth_bytes_per_s <= egress


def test_host_to_gpu_on_lent_4xh100_uses_all_four_pcie_links() -> None:
    node = topology.builtin_node("lent-4xh100")
    for target in node.gpu_indices:
        plan = planner.plan_paths(node, HOST, target)
        first_gpus = {p.hops[1] for p in plan.paths}
        assert first_gpus == set(node.gpu_indices)
        assert plan.paths[0].hops == (HOST, target)
        assert plan.total_bandwidth_bytes_per_s == pytest.approx(4 * 53 * GBPS)
        back = planner.plan_paths(node, target, HOST)  # GPU -> host is the mirror image
        assert {p.hops[-2] for p in back.paths} == set(node.gpu_indices)


def test_host_to_gpu_on_4x_a10_uses_only_the_targets_pcie_link() -> None:
    node = topology.builtin_node("4x-a10")
    catalog = PathCatalog.for_topology(node)
    for target in node.gpu_indices:
        plan = planner.plan_paths(node, HOST, target)
        assert [p.hops for p in plan.paths] == [(HOST, target)]
        assert plan.total_bandwidth_bytes_per_s == 25 * GBPS
        # No relay behind the target's switch (nor any other: PCIe-only relays re-enter
        # the target's own link) is even a candidate.
        assert [c.hops for c in catalog.candidates(HOST, target)] == [(HOST, target)]


def test_host_relays_behind_the_targets_pcie_switch_are_skipped() -> None:
    l40s = topology.builtin_node("8x-l40s")  # bridge partners share a PCIe switch
    cat = PathCatalog.for_topology(l40s)
    assert cat.skipped_relays(HOST, 0) == (1,)
    assert [p.hops for p in planner.plan_paths(l40s, HOST, 0).paths] == [(HOST, 0)]
    dgx1 = topology.builtin_node("dgx1-v100")  # GPU 1 shares sw0 with GPU 0
    cat = PathCatalog.for_topology(dgx1)
    assert cat.skipped_relays(HOST, 0) == (1,)
    assert all(c.hops[1] != 1 for c in cat.candidates(HOST, 0))
    plan = planner.plan_paths(dgx1, HOST, 0)
    relays = [p.hops[1] for p in plan.paths[1:]]
    assert 1 not in relays and relays
    # GPUs 2 and 3 share switch sw1's uplink: only one of them gets bandwidth.
    assert len({2, 3} & set(relays)) == 1


def test_a_second_transfer_gets_less_when_the_first_holds_shared_links() -> None:
    node = topology.builtin_node("lent-4xh100")
    first = planner.plan_paths(node, HOST, 0)
    usage = LinkUsage().with_plan(first)
    alone = planner.plan_paths(node, 1, 2)
    assert alone.total_bandwidth_bytes_per_s == 390 * GBPS
    # GPU 1's NVLink port already forwards 53 GB/s of the first transfer to GPU 0.
    second = planner.plan_paths(node, 1, 2, usage=usage)
    assert second.total_bandwidth_bytes_per_s == pytest.approx((390 - 53) * GBPS)
    # Once the first transfer ends its links are free again.
    assert planner.plan_paths(node, 1, 2, usage=usage.without_plan(first)) == alone


def test_contention_on_dgx1_moves_a_transfer_off_busy_links_first() -> None:
    node = topology.builtin_node("dgx1-v100")
    incumbent = planner.plan_paths(node, 0, 5, max_paths=1)  # takes 0 -> 1 -> 5
    assert [p.hops for p in incumbent.paths] == [(0, 1, 5)]
    usage = LinkUsage().with_plan(incumbent)
    plan = planner.plan_paths(node, 0, 5, usage=usage, max_paths=1)
    assert [p.hops for p in plan.paths] == [(0, 4, 5)]  # the idle relay, not the busy one
    alone = planner.plan_paths(node, 0, 1)
    shared = planner.plan_paths(node, 0, 1, usage=usage)
    assert shared.total_bandwidth_bytes_per_s < alone.total_bandwidth_bytes_per_s
    assert_within_capacity(PathCatalog.for_topology(node), usage.with_plan(shared))


def test_a_saturated_path_gives_an_equal_share_and_marks_the_plan_contended() -> None:
    node = topology.builtin_node("4x-a10")
    first = planner.plan_paths(node, HOST, 2)
    second = planner.plan_paths(node, HOST, 2, usage=LinkUsage().with_plan(first))
    assert second.contended
    assert [p.hops for p in second.paths] == [(HOST, 2)]
    assert second.total_bandwidth_bytes_per_s == pytest.approx(25 * GBPS / 2)


def test_max_paths_caps_the_number_of_paths() -> None:
    node = topology.builtin_node("lent-4xh100")
    plan = planner.plan_paths(node, HOST, 0, max_paths=2)
    assert len(plan.paths) == 2 and plan.paths[0].hops == (HOST, 0)


def test_pcie_pairs_without_p2p_are_staged_through_host_memory_at_the_pair_rate() -> None:
    node = topology.builtin_node("4x-a10")
    same_switch = planner.plan_paths(node, 0, 1)
    assert [p.hops for p in same_switch.paths] == [(0, 1)]
    cross = planner.plan_paths(node, 1, 3)
    assert [p.hops for p in cross.paths] == [(1, HOST, 3)]
    assert cross.total_bandwidth_bytes_per_s == 9 * GBPS


@pytest.mark.parametrize(("src", "dst", "message"), [
    (0, 0, "dst: same endpoint as src"),
    (HOST, HOST, "dst: same endpoint as src"),
    (0, 9, "dst: node 'lent-4xh100' has no GPU 9"),
    ("gpu0", 1, "src: expected a GPU index or 'host'"),
    (True, 1, "src: expected a GPU index or 'host'"),
])
def test_bad_endpoints_are_rejected_with_the_argument_name(
        src: Endpoint, dst: Endpoint, message: str) -> None:
    node = topology.builtin_node("lent-4xh100")
    with pytest.raises(PlanError, match=message):
        planner.plan_paths(node, src, dst)  # type: ignore[arg-type]


def test_bad_options_and_usage_are_rejected() -> None:
    node = topology.builtin_node("lent-4xh100")
    with pytest.raises(PlanError, match="max_paths: must be an integer >= 1"):
        planner.plan_paths(node, 0, 1, max_paths=0)
    with pytest.raises(PlanError, match=r"usage\[\('host', 0\)\]: must be a finite rate"):
        LinkUsage({(HOST, 0): -1.0})


def test_the_catalog_is_built_once_per_topology_object() -> None:
    node = topology.builtin_node("dgx-h100")
    assert PathCatalog.for_topology(node) is PathCatalog.for_topology(node)
    fresh = topology.builtin_node("dgx-h100")
    assert fresh == node  # the cached catalog does not take part in equality
    assert PathCatalog.for_topology(fresh) is not PathCatalog.for_topology(node)


def test_links_are_directed_so_opposite_transfers_do_not_contend() -> None:
    node = topology.builtin_node("dgx1-v100")
    forward = planner.plan_paths(node, 0, 3)
    usage = LinkUsage().with_plan(forward)
    backward = planner.plan_paths(node, 3, 0, usage=usage)
    assert backward.total_bandwidth_bytes_per_s == forward.total_bandwidth_bytes_per_s
    assert not backward.contended
    h2d = planner.plan_paths(topology.builtin_node("4x-a10"), HOST, 0)
    d2h = planner.plan_paths(topology.builtin_node("4x-a10"), 0, HOST,
                             usage=LinkUsage().with_plan(h2d))
    assert d2h.total_bandwidth_bytes_per_s == 25 * GBPS and not d2h.contended


def test_link_usage_adds_and_removes_plans_and_counts_flows() -> None:
    node = topology.builtin_node("lent-4xh100")
    a = planner.plan_paths(node, HOST, 0)
    b = planner.plan_paths(node, 2, 3, usage=LinkUsage().with_plan(a))
    usage = LinkUsage().with_plan(a).with_plan(b)
    assert usage[(HOST, 0)] == 53 * GBPS and usage.flows((HOST, 0)) == 1
    port = (2, planner.NVLINK_PORT)  # a relays through GPU 2, b starts there
    assert usage.flows(port) == 2
    assert usage[port] == pytest.approx(390 * GBPS)  # b got what a left of the port
    assert dict(usage.without_plan(a).without_plan(b)) == {}
    assert (HOST, 0) not in LinkUsage()


def test_rebalancing_moves_an_incumbent_off_the_newcomers_only_link() -> None:
    node = topology.builtin_node("lent-4xh100")
    incumbent = planner.plan_paths(node, HOST, 0)  # holds all four PCIe links
    contended = planner.plan_paths(node, HOST, 1, usage=LinkUsage().with_plan(incumbent))
    assert contended.contended
    result = planner.plan_with_rebalance(node, HOST, 1, incumbents={"t0": incumbent})
    assert not result.plan.contended
    assert [p.hops for p in result.plan.paths] == [(HOST, 1)]
    assert result.plan.total_bandwidth_bytes_per_s == 53 * GBPS
    moved = result.moved["t0"]
    assert {p.hops for p in moved.paths} == {(HOST, 0), (HOST, 2, 0), (HOST, 3, 0)}
    usage = LinkUsage().with_plan(moved).with_plan(result.plan)
    assert_within_capacity(PathCatalog.for_topology(node), usage)


def test_rebalancing_keeps_an_incumbent_that_has_no_other_path() -> None:
    node = topology.builtin_node("4x-a10")
    incumbent = planner.plan_paths(node, HOST, 2)
    result = planner.plan_with_rebalance(node, HOST, 2, incumbents={"t0": incumbent})
    assert result.moved == {} and result.plan.contended
    # GPU 3 shares switch sw1's uplink with GPU 2; GPU 0 is behind sw0 and idle.
    assert planner.plan_with_rebalance(node, HOST, 3, incumbents={"t0": incumbent}).plan.contended
    idle = planner.plan_with_rebalance(node, HOST, 0, incumbents={"t0": incumbent})
    assert idle.moved == {} and not idle.plan.contended
