"""``faastube --help`` and the subcommands' help read as plain text, each with a description."""

from __future__ import annotations

import pytest
from faastube import cli
from faastube_bench.cli import BENCHMARKS


def help_of(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_the_top_level_help_has_no_rst_markup_and_lists_validate(capsys: pytest.CaptureFixture[str]) -> None:
    text = help_of([], capsys)
    assert "``" not in text and ":func:" not in text
    assert "FaaSTube: GPU data passing for serverless ML workflows." in text
    assert "validate" in text


@pytest.mark.parametrize("benchmark", sorted(BENCHMARKS))
def test_each_bench_subcommand_has_a_description(benchmark: str, capsys: pytest.CaptureFixture[str]) -> None:
    text = help_of(["bench", benchmark], capsys)
    assert BENCHMARKS[benchmark][1] in text
    assert "``" not in text


@pytest.mark.parametrize("command", sorted(cli.SUBCOMMANDS))
def test_no_subcommand_help_shows_rst_markup(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert "``" not in help_of([command], capsys)
