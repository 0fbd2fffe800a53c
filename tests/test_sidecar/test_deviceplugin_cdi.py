"""CDI names and the check that the node's CDI specs define the devices the plugin hands out.

The spec files are written the way ``nvidia-ctk cdi generate`` lays them out (kind, devices
named by index and by UUID, an ``all`` device), in YAML and in JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from faastube.errors import InvalidRequest
from faastube_sidecar.deviceplugin.cdi import CdiCheckedHealth, defined_devices, qualified_name
from faastube_sidecar.gpuhealth import FixedHealthSource, GpuHealth

UUID0 = "GPU-00000000-1111-2222-3333-444444444444"
UUID1 = "GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"


def nvidia_spec(*names: str, kind: str = "nvidia.com/gpu") -> dict:
    return {
        "cdiVersion": "0.5.0",
        "kind": kind,
        "devices": [{"name": n, "containerEdits": {"deviceNodes": [{"path": f"/dev/nvidia{i}"}]}}
                    for i, n in enumerate(names)],
        "containerEdits": {"env": ["NVIDIA_VISIBLE_DEVICES=void"],
                           "deviceNodes": [{"path": "/dev/nvidiactl"}]},
    }


def test_qualified_names_follow_the_cdi_rules():
    assert qualified_name("nvidia.com/gpu", UUID0) == f"nvidia.com/gpu={UUID0}"
    assert qualified_name("nvidia.com/gpu", "0") == "nvidia.com/gpu=0"
    for kind in ("nvidia.com", "/gpu", "nvidia.com/", "-nvidia.com/gpu", "nvidia.com/g.pu"):
        with pytest.raises(InvalidRequest, match="not vendor/class"):
            qualified_name(kind, "0")
    with pytest.raises(InvalidRequest, match="not a valid CDI device name"):
        qualified_name("nvidia.com/gpu", "gpu 0")


def test_every_spec_file_of_every_directory_counts(tmp_path: Path):
    etc, run = tmp_path / "etc-cdi", tmp_path / "run-cdi"
    etc.mkdir()
    run.mkdir()
    (etc / "nvidia.yaml").write_text(yaml.safe_dump(nvidia_spec("0", UUID0, "all")))
    (run / "other.json").write_text(json.dumps(nvidia_spec("1", kind="example.com/fpga")))
    (run / "notes.txt").write_text("not a spec")
    found = defined_devices([str(etc), str(run), str(tmp_path / "missing")])
    assert found == {"nvidia.com/gpu=0", f"nvidia.com/gpu={UUID0}", "nvidia.com/gpu=all",
                     "example.com/fpga=1"}


def test_a_broken_spec_does_not_hide_the_others(tmp_path: Path, caplog):
    (tmp_path / "a-broken.yaml").write_text("kind: [unclosed\n")
    (tmp_path / "b-no-devices.yaml").write_text("kind: nvidia.com/gpu\n")
    (tmp_path / "c-good.yaml").write_text(yaml.safe_dump(nvidia_spec(UUID1)))
    assert defined_devices([str(tmp_path)]) == {f"nvidia.com/gpu={UUID1}"}
    assert "a-broken.yaml" in caplog.text and "b-no-devices.yaml" in caplog.text


def test_a_gpu_without_a_cdi_device_is_unhealthy_until_a_spec_defines_it(tmp_path: Path):
    source = FixedHealthSource({UUID0: 1 << 30, UUID1: 2 << 30})
    checked = CdiCheckedHealth(source, spec_dirs=[str(tmp_path)], devices={
        UUID0: f"nvidia.com/gpu={UUID0}", UUID1: f"nvidia.com/gpu={UUID1}"})
    (tmp_path / "nvidia.yaml").write_text(yaml.safe_dump(nvidia_spec(UUID0)))
    states = checked.poll([UUID0, UUID1], timeout_s=0)
    assert states[UUID0] == GpuHealth(UUID0, True, "", 1 << 30)
    assert not states[UUID1].healthy
    assert states[UUID1].reason == f"CDI device nvidia.com/gpu={UUID1} is defined by no spec in {tmp_path}"
    assert states[UUID1].free_memory_bytes == 2 << 30

    (tmp_path / "nvidia.yaml").write_text(yaml.safe_dump(nvidia_spec(UUID0, UUID1)))
    assert all(s.healthy for s in checked.poll([UUID0, UUID1], timeout_s=0).values())


def test_an_nvml_failure_keeps_its_own_reason(tmp_path: Path):
    source = FixedHealthSource()
    source.set_health(UUID0, False, "critical XID 79")
    checked = CdiCheckedHealth(source, devices={UUID0: f"nvidia.com/gpu={UUID0}"}, spec_dirs=[str(tmp_path)])
    assert checked.poll([UUID0], timeout_s=0)[UUID0].reason == "critical XID 79"
