"""hack/containers_conf.py: the two podman settings go in, everything else stays."""

from __future__ import annotations

import importlib.util
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("containers_conf", ROOT / "hack" / "containers_conf.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("containers_conf", module)
    spec.loader.exec_module(module)
    return module


conf = _load()
WANTED = {"containers": {"default_ulimits": ["nofile=20000:20000", "nproc=32768:32768"]},
          "engine": {"runtime": "runc"}}


def _settings(text: str) -> dict:
    parsed = tomllib.loads(text)
    return {section: {key: parsed[section][key] for key in keys} for section, keys in WANTED.items()}


def test_an_empty_file_gets_both_sections() -> None:
    after = conf.with_settings("", conf.SETTINGS)
    assert _settings(after) == WANTED


def test_existing_values_are_replaced_and_the_rest_of_the_file_is_kept() -> None:
    before = (
        "# an administrator's comment\n"
        "[containers]\n"
        "log_driver = \"k8s-file\"\n"
        "default_ulimits = [\n"
        "  \"nofile=1024:1024\",\n"
        "]\n"
        "pids_limit = 2048\n"
        "\n"
        "[network]\n"
        "network_backend = \"netavark\"\n"
        "\n"
        "[engine]\n"
        "runtime = \"crun\"   # the default\n"
        "events_logger = \"file\"\n")
    after = conf.with_settings(before, conf.SETTINGS)
    parsed = tomllib.loads(after)
    assert _settings(after) == WANTED
    assert parsed["containers"]["log_driver"] == "k8s-file"
    assert parsed["containers"]["pids_limit"] == 2048
    assert parsed["network"]["network_backend"] == "netavark"
    assert parsed["engine"]["events_logger"] == "file"
    assert "# an administrator's comment" in after
    assert "nofile=1024" not in after


def test_a_missing_key_goes_into_its_existing_section() -> None:
    after = conf.with_settings("[engine]\nevents_logger = \"file\"\n\n[network]\n", conf.SETTINGS)
    assert _settings(after) == WANTED
    assert after.count("[engine]") == 1


def test_a_second_run_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "containers.conf"
    path.write_text("[engine]\nruntime = \"crun\"\n")
    assert conf.main([str(path)]) == 0
    once = path.read_text()
    assert conf.main([str(path)]) == 0
    assert path.read_text() == once and _settings(once) == WANTED


def test_a_file_that_is_not_toml_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "containers.conf"
    path.write_text("[engine\nruntime = \n")
    with pytest.raises(tomllib.TOMLDecodeError):
        conf.main([str(path)])
    assert path.read_text() == "[engine\nruntime = \n"
