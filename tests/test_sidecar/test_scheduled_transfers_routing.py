"""Which copies the CUDA backend hands to the transfer engine: a pure decision over the topology."""

from __future__ import annotations

import pytest
from faastube_sidecar.backends.cuda_transfers import is_single_direct
from faastube_sidecar.transfers import planner
from faastube_spec import topology


def _direct(name: str, src: int | str, dst: int | str) -> bool:
    node = topology.builtin(name).nodes[0]
    return is_single_direct(planner.plan_paths(node, src, dst))


@pytest.mark.parametrize("name", ["dgx-h100", "dgx-a100", "lent-4xh100"])
def test_fully_linked_boxes_copy_gpu_to_gpu_over_the_direct_link(name) -> None:
    node = topology.builtin(name).nodes[0]
    for a in node.gpu_indices:
        for b in node.gpu_indices:
            if a != b:
                assert _direct(name, a, b)


def test_a_dgx1_pair_without_nvlink_goes_through_relays() -> None:
    node = topology.builtin("dgx1-v100").nodes[0]
    unlinked = [(a, b) for a in node.gpu_indices for b in node.gpu_indices
                if a < b and (node.link(a, b) is None or node.link(a, b).kind != "nvlink")]
    assert unlinked, "the DGX-1 model has pairs without NVLink"
    for a, b in unlinked:
        assert not _direct("dgx1-v100", a, b)


def test_host_to_gpu_on_the_lent_box_is_spread_over_several_links() -> None:
    assert not _direct("lent-4xh100", "host", 0)
