"""Handler failures point at the fix: the error names the handler's file:line, deterministic
errors are not retried, a module that does not import is one line with its place, a wrong
output shape is the producer's error (naming the edge), and a failed run keeps its logs."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from faastube import sdk
from faastube_runtime import handlers
from faastube_spec.workflow import load_workflow
from runtime_doubles import MemoryStore

FIXTURE = Path(__file__).parent / "errors_fixture"
HANDLERS = FIXTURE / "errfunctions.py"


def _line_of(marker: str) -> int:
    lines = HANDLERS.read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if marker in line)


# --- the SDK: where, and whether to retry ----------------------------------------------------

def _helper(x: np.ndarray) -> np.ndarray:
    raise KeyError("no such label")


def test_a_handler_error_names_the_file_and_line_it_left_the_handler_at() -> None:
    store = MemoryStore()
    ref = store.put(np.arange(3), consumers=1)

    def handler(x: np.ndarray) -> np.ndarray:
        return _helper(x)  # the last frame in this module is _helper's raise

    with pytest.raises(sdk.HandlerError) as caught:
        sdk.execute(store, handler, inputs={"a": ref}, readers=["b"])
    raise_line = _helper.__code__.co_firstlineno + 1
    assert f"raised KeyError at {__file__}:{raise_line}: " in str(caught.value)


@pytest.mark.parametrize("error, retryable", [
    (AssertionError("no"), False), (TypeError("no"), False), (ValueError("no"), False),
    (KeyError("no"), False), (RuntimeError("no"), True), (OSError("no"), True), (MemoryError("no"), True),
])
def test_deterministic_handler_errors_are_permanent_and_others_retryable(error: Exception, retryable: bool) -> None:
    store = MemoryStore()
    ref = store.put(np.arange(3), consumers=1)

    def handler(x: np.ndarray) -> np.ndarray:
        raise error

    with pytest.raises(sdk.HandlerError) as caught:
        sdk.execute(store, handler, inputs={"a": ref}, readers=["b"])
    assert isinstance(caught.value, sdk.HandlerFailed) is retryable
    assert isinstance(caught.value, sdk.HandlerFailedPermanently) is not retryable


def test_a_long_handler_message_is_cut() -> None:
    store = MemoryStore()
    ref = store.put(np.arange(3), consumers=1)

    def handler(x: np.ndarray) -> np.ndarray:
        raise RuntimeError("x" * 100_000)

    with pytest.raises(sdk.HandlerFailed) as caught:
        sdk.execute(store, handler, inputs={"a": ref}, readers=["b"])
    assert len(str(caught.value)) < sdk.MAX_HANDLER_MESSAGE_CHARS + 300
    assert "(100000 characters)" in str(caught.value)


# --- outputs against their edges ---------------------------------------------------------------

def test_an_output_of_the_wrong_shape_fails_the_producer_naming_the_edge_and_publishes_nothing() -> None:
    store = MemoryStore()
    ref = store.put(np.arange(3), consumers=1)
    checks = sdk.OutputChecks("embed", {"classify": sdk.EdgeDeclaration(64, (2, 8), "float32")})
    with pytest.raises(sdk.OutputMismatch, match=r"edge embed -> classify: got shape \[3, 8\] of float32, "
                                                 r"but the edge declares shape \[2, 8\] of float32"):
        sdk.execute(store, lambda x: np.zeros((3, 8), np.float32), inputs={"a": ref}, readers=["classify"],
                    checks=checks)
    with pytest.raises(sdk.OutputMismatch, match=r"got shape \[2, 8\] of float64"):
        sdk.execute(store, lambda x: np.zeros((2, 8)), inputs={"a": ref}, readers=["classify"], checks=checks)
    assert list(store.objects) == [ref]  # only the input, kept for a retry
    inv = sdk.execute(store, lambda x: np.zeros((2, 8), np.float32), inputs={"a": ref}, readers=["classify"],
                      checks=checks)
    assert store.get(inv.outputs["classify"]).shape == (2, 8)


def test_a_rank_checked_handler_may_change_extents_but_not_rank_or_dtype() -> None:
    store = MemoryStore()
    ref = store.put(np.arange(3), consumers=1)
    checks = sdk.OutputChecks("embed", {"classify": sdk.EdgeDeclaration(64, (2, 8), "float32")})

    @sdk.function(shapes="rank")
    def scaled(x: np.ndarray) -> np.ndarray:
        return np.zeros((5, 4), np.float32)

    @sdk.function(shapes="rank")
    def flat(x: np.ndarray) -> np.ndarray:
        return np.zeros(16, np.float32)

    inv = sdk.execute(store, scaled, inputs={"a": ref}, readers=["classify"], checks=checks)
    assert store.get(inv.outputs["classify"]).shape == (5, 4)
    ref = store.put(np.arange(3), consumers=1)
    with pytest.raises(sdk.OutputMismatch, match=r"got shape \[16\] of float32"):
        sdk.execute(store, flat, inputs={"a": ref}, readers=["classify"], checks=checks)
    with pytest.raises(Exception, match="shapes must be one of exact, rank"):
        sdk.function(shapes="loose")  # type: ignore[arg-type]


def test_output_bytes_far_from_the_edges_size_are_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    checks = sdk.OutputChecks("embed", {"classify": sdk.EdgeDeclaration(1000)})
    with caplog.at_level(logging.WARNING, logger="faastube.sdk"):
        checks.check(np.zeros(1000, np.uint8), ["classify"])  # as declared
        checks.check(np.zeros(300, np.uint8), ["classify"])   # within a factor of 4
        assert not caplog.records
        checks.check(np.zeros(10_000, np.uint8), ["classify"])
        checks.check(np.zeros(10, np.uint8), ["classify"])
    assert len(caplog.records) == 1
    assert "embed -> classify is 10000 bytes, but the edge declares size 1000 bytes" in caplog.text


# --- handler modules that do not import ------------------------------------------------------

def test_a_syntax_error_in_a_handler_module_is_one_line_with_its_place(tmp_path: Path) -> None:
    (tmp_path / "workflow.yaml").write_text(
        (FIXTURE / "workflow.yaml").read_text().replace("errfunctions:embed", "broken:embed"))
    (tmp_path / "errfunctions.py").write_text(HANDLERS.read_text())
    (tmp_path / "broken.py").write_text("import numpy\n\ndef embed(x):\n    return x +\n")
    workflow = load_workflow(tmp_path / "workflow.yaml")
    with pytest.raises(handlers.HandlerNotFound) as caught:
        handlers.load_handler(workflow, workflow.function("embed"))
    message = str(caught.value)
    assert "\n" not in message
    assert f"{tmp_path / 'broken.py'}:4: SyntaxError: invalid syntax" in message


def test_an_import_error_inside_a_handler_module_names_the_import_line(tmp_path: Path) -> None:
    (tmp_path / "workflow.yaml").write_text(
        (FIXTURE / "workflow.yaml").read_text().replace("errfunctions:embed", "importer:embed"))
    (tmp_path / "importer.py").write_text("import os\nimport no_such_module_for_faastube_tests\n")
    workflow = load_workflow(tmp_path / "workflow.yaml")
    with pytest.raises(handlers.HandlerNotFound,
                       match=re.escape(f"{tmp_path / 'importer.py'}:2: ModuleNotFoundError: "
                                       "No module named 'no_such_module_for_faastube_tests'")):
        handlers.load_handler(workflow, workflow.function("embed"))


def _run(workflow: Path, *args: str, state: Path, tag: float | None = None) -> subprocess.CompletedProcess[str]:
    extra: list[str] = []
    if tag is not None:
        np.save(state.parent / "in.npy", np.array([tag, 0, 0, 0], dtype=np.float32))
        extra = ["--input", str(state.parent / "in.npy")]
    return subprocess.run(
        [sys.executable, "-m", "faastube.cli", "run", str(workflow), "--backend", "host", "--concurrency", "1",
         *extra, *args],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "ERRTEST_STATE_DIR": str(state)})


@pytest.mark.parametrize("module", ["entry", "middle"])
def test_faastube_run_reports_a_broken_handler_module_in_one_line_with_exit_code_2(
        tmp_path: Path, module: str) -> None:
    text = (FIXTURE / "workflow.yaml").read_text()
    target = "errfunctions:pre" if module == "entry" else "errfunctions:embed"
    (tmp_path / "workflow.yaml").write_text(text.replace(target, "broken:" + target.split(":")[1]))
    (tmp_path / "errfunctions.py").write_text(HANDLERS.read_text())
    (tmp_path / "broken.py").write_text("def pre(x):\n    return x\n\ndef embed(x):\n    return x +\n")
    state = tmp_path / "state"
    state.mkdir()
    done = _run(tmp_path / "workflow.yaml", "--requests", "1", state=state)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"{tmp_path / 'broken.py'}:5: SyntaxError: invalid syntax" in done.stderr
    assert "Traceback" not in done.stderr


# --- end to end: the gateway's error, retries, logs ---------------------------------------------

def test_an_assertion_in_a_handler_fails_once_with_its_place_and_the_logs_are_kept(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    done = _run(FIXTURE / "workflow.yaml", "--requests", "1", "--retries", "2", state=state, tag=1)
    assert done.returncode == 1, done.stdout + done.stderr
    line = _line_of("EMBED-ASSERT-LINE")
    assert ("function 'embed' failed after 1 attempt(s)" in done.stderr
            and f"raised AssertionError at {HANDLERS}:{line}: embeddings must not be computed for tag 1"
            in done.stderr), done.stderr
    assert len(list(state.glob("embed-*"))) == 1  # not retried
    kept = re.search(r"its logs are kept in (\S+) ", done.stderr)
    assert kept is not None, done.stderr
    log = Path(kept.group(1)) / "fn-embed-0.log"
    assert "Traceback" in log.read_text() and "AssertionError" in log.read_text()
    assert not list(Path(kept.group(1)).glob("*.sock"))


def test_a_runtime_error_is_still_retried(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    done = _run(FIXTURE / "workflow.yaml", "--requests", "1", "--retries", "2", state=state, tag=3)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "function 'embed' failed after 3 attempt(s)" in done.stderr
    assert f"raised RuntimeError at {HANDLERS}:" in done.stderr
    assert len(list(state.glob("embed-*"))) == 3


def test_a_wrong_output_shape_fails_the_producer_not_the_consumer(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    done = _run(FIXTURE / "workflow.yaml", "--requests", "1", state=state, tag=2)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "function 'embed' failed after 1 attempt(s)" in done.stderr
    assert "edge embed -> classify: got shape [3, 8] of float32, but the edge declares shape [2, 8]" in done.stderr
    assert not list(state.glob("classify-*"))


def test_a_successful_run_leaves_no_logs_behind(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    done = _run(FIXTURE / "workflow.yaml", "--requests", "2", state=state, tag=5)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "logs are kept" not in done.stderr
    assert len(list(state.glob("classify-*"))) == 2
