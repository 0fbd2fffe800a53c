"""``faastube run``'s progress: a bar with rate, ETA and live latency on a terminal; lines elsewhere."""

from __future__ import annotations

import io

from faastube_runtime.loadgen import RequestResult
from faastube_runtime.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def results(count: int, *, failing: int = 0) -> list[RequestResult]:
    return [RequestResult(index=i, status=500 if i < failing else 200, latency_s=0.010 + i / 1000,
                          breakdown=None) for i in range(count)]


def test_a_pipe_gets_ten_plain_lines_with_counts_and_latency() -> None:
    out = io.StringIO()
    shown = Progress(20, stream=out)
    for r in results(20, failing=2):
        shown(r)
    shown.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 10 and "\r" not in out.getvalue()
    assert lines[-1].startswith("  20/20 requests done, 2 failed; p50 ")
    assert "p99 " in lines[-1] and lines[-1].endswith(" ms")


def test_a_terminal_gets_a_bar_with_rate_eta_and_latency() -> None:
    out = Terminal()
    shown = Progress(5, stream=out)
    for r in results(5, failing=1):
        shown(r)
    shown.close()
    text = out.getvalue()
    assert "\r" in text and "5/5" in text
    assert "req/s" in text or "s/req" in text           # the rate
    assert "<" in text                                  # elapsed<remaining: the ETA
    assert "1 failed, p50 " in text and "p99 " in text  # the live latency


def test_no_answer_yet_is_said_in_words() -> None:
    out = io.StringIO()
    shown = Progress(1, stream=out)
    shown(results(1, failing=1)[0])
    assert "1/1 requests done, 1 failed; no answer yet" in out.getvalue()
