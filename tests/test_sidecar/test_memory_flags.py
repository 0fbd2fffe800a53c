"""The memory policy's flags: what they become, and the combinations refused (exit 2, naming the flag)."""

from __future__ import annotations

import argparse

import pytest
from faastube_sidecar import cli
from faastube_sidecar.dataplane import DEFAULT_MEMORY_POLICY

MiB = 1 << 20


def parse(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="faastube sidecar")
    cli.add_arguments(parser)
    return parser.parse_args(["--socket", "/tmp/unused.sock", "--backend", "host", *flags])


def refused(capsys: pytest.CaptureFixture[str], *flags: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.settings_from(parse(*flags))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_the_default_is_the_static_pool_measured_on_gpus() -> None:
    settings = cli.settings_from(parse())
    assert settings.memory == DEFAULT_MEMORY_POLICY
    assert (settings.memory.name, settings.memory.floor_bytes, settings.memory.cap_share) == \
        ("static", 300 * MiB, 0.5)
    assert settings.simulated_gpus == 0


def test_memory_flags_become_the_policy() -> None:
    m = cli.settings_from(parse("--memory-policy", "lru", "--pool-floor", "1Gi", "--pool-cap-share", "25%",
                                "--evict-wait", "500ms", "--restore-ahead", "4")).memory
    assert (m.name, m.floor_bytes, m.cap_share, m.evict_wait_s, m.restore_ahead) == ("lru", 1 << 30, 0.25, 0.5, 4)
    s = cli.settings_from(parse("--simulated-gpus", "2", "--simulated-gpu-memory", "1Gi",
                                "--simulated-gpu-busy", "900Mi"))
    assert (s.simulated_gpus, s.simulated_gpu_bytes, s.simulated_gpu_busy_bytes) == (2, 1 << 30, 900 * MiB)


@pytest.mark.parametrize(("flags", "message"), [
    (("--memory-policy", "elastic+lru"), "invalid choice: 'elastic+lru'"),
    (("--pool-cap-share", "0"), "must be in (0, 1]"),
    (("--pool-cap-share", "150%"), "must be in (0, 1]"),
    (("--pool-cap-share", "half"), "not a fraction"),
    (("--restore-ahead", "-1"), "must be >= 0"),
    (("--memory-policy", "static", "--pool-floor", "1Gi"), "--pool-floor has no effect with --memory-policy static"),
    (("--memory-policy", "static", "--pool-cap-share", "0.3"), "--pool-cap-share has no effect"),
    (("--simulated-gpu-memory", "1Gi"), "--simulated-gpu-memory has no effect without --simulated-gpus"),
    (("--simulated-gpus", "1", "--simulated-gpu-memory", "1Gi", "--simulated-gpu-busy", "2Gi"),
     "--simulated-gpu-busy is more than a simulated GPU's memory"),
])
def test_bad_memory_flags_exit_2_naming_the_flag(capsys: pytest.CaptureFixture[str], flags: tuple[str, ...],
                                                 message: str) -> None:
    assert message in refused(capsys, *flags)


def test_simulated_gpus_need_the_host_backend(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse("--simulated-gpus", "2")
    args.backend = "cuda"
    with pytest.raises(SystemExit):
        cli.settings_from(args)
    assert "--simulated-gpus needs --backend host" in capsys.readouterr().err
