"""The planner's cost model: small transfers take the direct link, large ones every path that pays."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from faastube_sidecar.transfers import planner
from faastube_sidecar.transfers.planner import HOST, CostModel, PathCatalog, Plan, PlanError
from faastube_spec import topology
from faastube_spec.topology import NodeTopology

MiB = 1 << 20
GiB = 1 << 30
SIZES = [MiB << k for k in range(0, 13, 2)]  # 1 MiB .. 4 GiB
RECORDED = Path(__file__).resolve().parents[2] / "bench" / "results" / "topology-lent-4xh100-discovered.yaml"


def recorded_lent_box() -> NodeTopology:
    return topology.load_topology(RECORDED).nodes[0]


# Boxes where host transfers have NVLink relays: the simulated ones and the recorded one.
MULTIPATH_HOSTS = {name: (lambda n=name: topology.builtin_node(n))
                   for name in ("lent-4xh100", "dgx-h100", "dgx-a100", "dgx1-v100")}
MULTIPATH_HOSTS["recorded-lent-4xh100"] = recorded_lent_box
SINGLE_PATH_HOSTS = ("4x-a10", "8x-l40s")


def fit(node: NodeTopology, src: planner.Endpoint, dst: planner.Endpoint, nbytes: int,
        cost: CostModel = planner.DEFAULT_COST) -> Plan:
    return planner.plan_transfer(node, src, dst, nbytes, cost=cost)


def direct_estimate_s(node: NodeTopology, src: planner.Endpoint, dst: planner.Endpoint, nbytes: int,
                      cost: CostModel = planner.DEFAULT_COST) -> float:
    first = planner.plan_paths(node, src, dst).paths[0]
    return cost.copy_latency_s + nbytes / first.bandwidth_bytes_per_s


@pytest.mark.parametrize("name", sorted(MULTIPATH_HOSTS))
@pytest.mark.parametrize("direction", ["h2d", "d2h"])
def test_host_transfers_take_the_direct_link_when_small_and_every_path_when_large(
        name: str, direction: str) -> None:
    node = MULTIPATH_HOSTS[name]()
    for gpu in node.gpu_indices:
        src, dst = (HOST, gpu) if direction == "h2d" else (gpu, HOST)
        idle = planner.plan_paths(node, src, dst)
        assert len(idle.paths) > 1
        for small in (64 << 10, MiB):
            plan = fit(node, src, dst, small)
            assert plan.direct and plan.paths[0].hops == ((HOST, gpu) if direction == "h2d" else (gpu, HOST))
            assert plan.sizes_bytes == (small,)
        for large in (256 * MiB, GiB, 4 * GiB):
            plan = fit(node, src, dst, large)
            assert [p.hops for p in plan.paths] == [p.hops for p in idle.paths]


@pytest.mark.parametrize("name", SINGLE_PATH_HOSTS)
def test_boxes_without_nvlink_relays_use_one_link_at_every_size(name: str) -> None:
    node = topology.builtin_node(name)
    for size in SIZES:
        assert fit(node, HOST, 0, size).direct
        assert fit(node, 0, HOST, size).direct


@pytest.mark.parametrize("name", ["lent-4xh100", "dgx-h100", "dgx-a100"])
def test_nvswitch_pairs_stay_on_their_direct_link_at_every_size(name: str) -> None:
    node = topology.builtin_node(name)
    for a, b in itertools.permutations(node.gpu_indices[:4], 2):
        for size in (MiB, 4 * GiB):
            assert fit(node, a, b, size).direct


def test_a_dgx1_pair_without_nvlink_is_never_given_a_direct_copy() -> None:
    node = topology.builtin_node("dgx1-v100")
    unlinked = [(a, b) for a, b in itertools.permutations(node.gpu_indices, 2)
                if node.link(a, b) is None or node.link(a, b).kind != "nvlink"]
    for a, b in unlinked:
        for size in (MiB, GiB):
            plan = fit(node, a, b, size)
            assert not plan.direct and all(len(p.hops) > 2 for p in plan.paths)


@pytest.mark.parametrize("name", sorted(MULTIPATH_HOSTS))
def test_a_plan_is_never_expected_to_be_slower_than_the_direct_copy(name: str) -> None:
    node = MULTIPATH_HOSTS[name]()
    for size in SIZES + [3 * MiB + 1, 20 * MiB - 3]:
        for src, dst in ((HOST, 0), (0, HOST)):
            plan = fit(node, src, dst, size)
            assert plan.expected_s is not None
            assert plan.expected_s <= direct_estimate_s(node, src, dst, size) * (1 + 1e-12)


@pytest.mark.parametrize("name", sorted(MULTIPATH_HOSTS))
def test_sizes_cover_the_transfer_are_aligned_and_relays_carry_less(name: str) -> None:
    node = MULTIPATH_HOSTS[name]()
    size = GiB + 12345
    plan = fit(node, HOST, 0, size)
    assert sum(plan.sizes_bytes) == size and len(plan.sizes_bytes) == len(plan.paths)
    assert all(n > 0 for n in plan.sizes_bytes)
    assert all(n % 4096 == 0 for n in plan.sizes_bytes[1:])
    # Of two paths with the same bandwidth, the one that starts later carries fewer bytes.
    latencies = planner.path_latencies_s(plan, catalog=PathCatalog.for_topology(node))
    for i, j in itertools.combinations(range(len(plan.paths)), 2):
        if plan.paths[i].bandwidth_bytes_per_s == plan.paths[j].bandwidth_bytes_per_s:
            early, late = (i, j) if latencies[i] <= latencies[j] else (j, i)
            assert plan.sizes_bytes[early] > plan.sizes_bytes[late] - 4096


@pytest.mark.parametrize("name", sorted(MULTIPATH_HOSTS))
def test_the_split_threshold_is_the_crossover_and_the_choice_never_flips_back(name: str) -> None:
    node = MULTIPATH_HOSTS[name]()
    base = planner.plan_paths(node, HOST, 0)
    catalog = PathCatalog.for_topology(node)
    threshold = planner.split_threshold_bytes(base, catalog=catalog)
    assert threshold is not None and MiB < threshold < 64 * MiB
    assert planner.fit_plan(base, threshold - 1, catalog=catalog).direct
    assert not planner.fit_plan(base, threshold, catalog=catalog).direct
    paths = [len(planner.fit_plan(base, n, catalog=catalog).paths) for n in range(threshold, 8 * GiB, 7 * MiB)]
    assert paths == sorted(paths)


def test_fixed_costs_move_the_crossover() -> None:
    node = topology.builtin_node("lent-4xh100")
    base = planner.plan_paths(node, HOST, 0)
    catalog = PathCatalog.for_topology(node)
    cheap = CostModel(copy_latency_s=0, engine_overhead_s=0, path_issue_s=0, hop_latency_s=0,
                      min_speedup=1.0)
    dear = CostModel(engine_overhead_s=1e-3)
    default = planner.split_threshold_bytes(base, catalog=catalog)
    low = planner.split_threshold_bytes(base, catalog=catalog, cost=cheap)
    high = planner.split_threshold_bytes(base, catalog=catalog, cost=dear)
    assert low is not None and default is not None and high is not None
    assert low < default < high
    # Without fixed costs, equal links share equally (up to the relays' edge hop).
    sizes = planner.fit_plan(base, GiB, catalog=catalog, cost=cheap).sizes_bytes
    assert max(sizes) - min(sizes) < 0.01 * GiB


def test_a_path_that_could_not_start_before_the_others_finish_is_left_out() -> None:
    node = topology.builtin_node("lent-4xh100")
    base = planner.plan_paths(node, HOST, 0)
    slow_start = CostModel(path_issue_s=2e-3, min_speedup=1.0)  # the 4th path starts 6 ms late
    plan = planner.fit_plan(base, 256 * MiB, catalog=PathCatalog.for_topology(node), cost=slow_start)
    assert 1 < len(plan.paths) < len(base.paths)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"copy_latency_s": -1.0}, "copy_latency_s: must be finite and >= 0"),
    ({"engine_overhead_s": float("nan")}, "engine_overhead_s"),
    ({"min_speedup": 0.5}, "min_speedup: must be finite and >= 1"),
    ({"relay_edge_bytes": 0}, "relay_edge_bytes: must be an integer >= 1"),
])
def test_bad_costs_are_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        CostModel(**kwargs)


def test_bad_fit_arguments_are_rejected() -> None:
    node = topology.builtin_node("lent-4xh100")
    catalog = PathCatalog.for_topology(node)
    with pytest.raises(PlanError, match="nbytes: must be an integer >= 1"):
        planner.fit_plan(planner.plan_paths(node, HOST, 0), 0, catalog=catalog)
    with pytest.raises(PlanError, match="has no path"):
        planner.fit_plan(Plan(paths=(), total_bandwidth_bytes_per_s=0.0), 10, catalog=catalog)
