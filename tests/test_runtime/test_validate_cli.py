"""``faastube validate``: the document, the handlers' imports and signatures, make_input()."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from faastube import cli

WORKFLOW = """\
apiVersion: faastube.io/v1alpha1
kind: Workflow
metadata: {name: mine}
spec:
  slo: 500ms
  input: {shape: [4, 8], dtype: float32}
  functions:
    - {name: preprocess, handler: "functions:preprocess"}
    - {name: embed-a, handler: "functions:embed"}
    - {name: embed-b, handler: "functions:embed"}
    - {name: classify, handler: "functions:classify"}
  edges:
    - {from: preprocess, to: embed-a, size: 1KB}
    - {from: preprocess, to: embed-b, size: 1KB}
    - {from: embed-a, to: classify, size: 1KB}
    - {from: embed-b, to: classify, size: 1KB}
"""

GOOD = """\
import numpy as np

def make_input():
    return np.zeros((4, 8), np.float32)

def preprocess(x):
    return x

def embed(x):
    return x

def classify(embed_a, embed_b):
    return embed_a + embed_b
"""


def write(tmp_path: Path, functions: str, workflow: str = WORKFLOW) -> Path:
    (tmp_path / "functions.py").write_text(textwrap.dedent(functions))
    path = tmp_path / "workflow.yaml"
    path.write_text(workflow)
    return path


def test_a_good_workflow_exits_0_with_a_one_line_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, GOOD)
    assert cli.main(["validate", str(path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    assert out[0].startswith("OK: workflow 'mine': 4 functions, 4 edges")
    assert "make_input() gives [4, 8] float32" in out[0]


def test_every_handler_problem_is_listed_and_the_exit_is_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = """\
    import numpy as np

    def make_input():
        return np.zeros((4, 9), np.int64)

    def preprocess(x, y):             # called with one positional argument
        return x

    embed = 3                         # not callable

    def classify(embed_a, embed_c):   # fan-in names are embed_a and embed_b
        return embed_a
    """
    path = write(tmp_path, bad)
    assert cli.main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "6 problems" in err
    assert "function 'preprocess' handler 'functions:preprocess': takes (x, y) but is called with one positional" in err
    assert "function 'embed-a' handler 'functions:embed': module 'functions'" in err and "no callable 'embed'" in err
    assert "function 'embed-b'" in err
    assert "function 'classify'" in err and "keyword arguments embed_a, embed_b" in err
    assert "make_input(): returned shape [4, 9], but spec.input.shape is [4, 8]" in err
    assert "make_input(): returned dtype int64, but spec.input.dtype is float32" in err


def test_a_syntax_error_in_the_handler_module_names_its_file_and_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "def preprocess(x):\n    return x +\n")
    assert cli.main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "SyntaxError" in err and f"{tmp_path / 'functions.py'}:2" in err


def test_a_missing_module_and_a_make_input_that_is_not_an_array_are_reported(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    workflow = WORKFLOW.replace('handler: "functions:embed"}\n    - {name: embed-b',
                                'handler: "nosuchmodule_xyz:embed"}\n    - {name: embed-b')
    path = write(tmp_path, GOOD.replace("return np.zeros((4, 8), np.float32)", "return [1, 2]"), workflow)
    assert cli.main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "function 'embed-a' handler 'nosuchmodule_xyz:embed': cannot import module 'nosuchmodule_xyz'" in err
    assert "ModuleNotFoundError" in err
    assert "functions.make_input(): returned list, not a NumPy array" in err


def test_document_errors_are_reported_with_their_field_paths(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, GOOD, WORKFLOW.replace("slo: 500ms", "slo: fast"))
    assert cli.main(["validate", str(path)]) == 2
    assert "spec.slo" in capsys.readouterr().err


def test_a_workflow_without_make_input_says_run_needs_input(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, GOOD.replace("def make_input", "def _unused"))
    assert cli.main(["validate", str(path)]) == 0
    assert "no make_input() (faastube run will need --input)" in capsys.readouterr().out


@pytest.mark.parametrize("example", sorted(p.parent.name for p in Path("examples").glob("*/workflow.yaml")))
def test_every_example_validates_at_full_scale(example: str, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # On a CPU the examples' make_input() shrinks the request tenfold, below their spec.input.
    monkeypatch.setenv("FAASTUBE_EXAMPLE_SCALE", "1")
    assert cli.main(["validate", f"examples/{example}/workflow.yaml"]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("example", sorted(p.parent.name for p in Path("examples").glob("*/workflow.yaml")))
def test_every_example_validates_at_the_scale_a_cpu_machine_runs_it(example: str, capsys: pytest.CaptureFixture[str],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # Their handlers check shapes by rank, and so does make_input() (a tenth of spec.input here).
    monkeypatch.setenv("FAASTUBE_EXAMPLE_SCALE", "0.1")
    assert cli.main(["validate", f"examples/{example}/workflow.yaml"]) == 0, capsys.readouterr().err
