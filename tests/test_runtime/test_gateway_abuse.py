"""Hostile clients against the gateway over a real socket (issue 9): each attack gets a 4xx that
names what was wrong, or a closed connection, and leaves nothing held behind.

Requests are written by hand on raw connections, so a test controls exactly which bytes
arrive and when (a head without its body, half a body, a body one byte at a time).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
from faastube_runtime import bodies, dag
from faastube_runtime.gateway import GatewayConfig
from faastube_runtime.local import LocalOptions, LocalRuntime
from faastube_spec.workflow import load_workflow

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]

FIXTURE = Path(__file__).parent / "gateway_fixture" / "workflow.yaml"
MAX_BODY_BYTES = 1 << 20
MAX_INPUT_BYTES = 3 << 19   # 1.5 MiB: one body at the limit, and half of another
MAX_IN_FLIGHT = 3
HEADER_TIMEOUT_S = 1.0
IDLE_TIMEOUT_S = 0.5
BODY_TIMEOUT_S = 2.0
PROMPT_S = 0.4              # an answer that needs no body comes well before any timeout


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def runtime(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalRuntime]:
    os.environ["GWTEST_STATE_DIR"] = str(tmp_path_factory.mktemp("gwabuse"))
    limits = bodies.ReadLimits(max_body_bytes=MAX_BODY_BYTES, header_timeout_s=HEADER_TIMEOUT_S,
                               body_idle_timeout_s=IDLE_TIMEOUT_S, body_timeout_s=BODY_TIMEOUT_S)
    options = LocalOptions(backend="host", gateway=GatewayConfig(
        policy=dag.DagPolicy(request_timeout_s=10, call_timeout_s=5, max_retries=0),
        max_in_flight=MAX_IN_FLIGHT, max_input_bytes_in_flight=MAX_INPUT_BYTES, limits=limits))
    async with LocalRuntime(load_workflow(FIXTURE), options) as rt:
        yield rt


def npy(array: np.ndarray, version: tuple[int, int] | None = None) -> bytes:
    buffer = io.BytesIO()
    if version is None:
        np.save(buffer, array)
    else:
        np.lib.format.write_array(buffer, array, version=version)
    return buffer.getvalue()


def npy_with_header(header: dict[str, object] | bytes, data: bytes = b"") -> bytes:
    """An .npy body with the header given (which need not match the data)."""
    text = header if isinstance(header, bytes) else repr(header).encode()
    text += b" " * (-(len(text) + 11) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + data


def head(*, length: int | None, content_type: str = "application/x-npy", path: str = "/invoke",
         extra: str = "") -> bytes:
    framing = "Transfer-Encoding: chunked\r\n" if length is None else f"Content-Length: {length}\r\n"
    return (f"POST {path} HTTP/1.1\r\nHost: gateway\r\nContent-Type: {content_type}\r\n{framing}{extra}"
            "\r\n").encode()


def chunked(*parts: bytes, end: bool = True) -> bytes:
    out = b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in parts if p)
    return out + (b"0\r\n\r\n" if end else b"")


@dataclass
class Answer:
    status: int          # 0: the connection closed without an answer
    message: str
    headers: dict[str, str]
    seconds: float       # from the last byte sent
    closed: bool         # the gateway closed the connection after answering


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, rt: LocalRuntime) -> Connection:
        host, port = rt.url.removeprefix("http://").rsplit(":", 1)
        return cls(*await asyncio.open_connection(host, int(port)))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self, *, within_s: float = 10.0) -> Answer:
        sent = time.monotonic()
        try:
            async with asyncio.timeout(within_s):
                raw_head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return Answer(0, "", {}, time.monotonic() - sent, True)
        seconds = time.monotonic() - sent
        lines = raw_head.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        message = json.loads(body)["message"] if body.startswith(b"{") else body.decode(errors="replace")
        return Answer(int(lines[0].split()[1]), message, headers, seconds,
                      closed=headers.get("connection", "").lower() == "close")

    async def closed_within(self, seconds: float) -> bool:
        try:
            async with asyncio.timeout(seconds):
                while await self.reader.read(65536):
                    pass
        except TimeoutError:
            return False
        except ConnectionError:
            pass
        return True

    def close(self) -> None:
        self.writer.close()


async def exchange(rt: LocalRuntime, data: bytes, *, within_s: float = 10.0) -> Answer:
    conn = await Connection.open(rt)
    try:
        await conn.send(data)
        return await conn.answer(within_s=within_s)
    finally:
        conn.close()


async def until(condition: object, *, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.01)


async def assert_nothing_held(rt: LocalRuntime) -> None:
    """No slot, no input bytes, no pool object left behind; and the gateway still serves."""
    assert rt.gateway is not None
    await until(lambda: rt.gateway.in_flight == 0)
    assert rt.gateway.input_bytes_in_flight == 0
    await rt.drain()
    stats = rt.pool_stats()
    assert stats["objects"] == 0, stats
    answer = await exchange(rt, head(length=len(body := npy(np.array([1.0, 2.0])))) + body)
    assert answer.status == 200, answer


# --- refused from the head alone, before any body is read ---------------------------------------


async def test_a_declared_length_over_the_limit_gets_413_without_sending_the_body(runtime: LocalRuntime) -> None:
    answer = await exchange(runtime, head(length=MAX_BODY_BYTES + 1))
    assert answer.status == 413 and answer.seconds < PROMPT_S
    assert answer.message == (f"body: Content-Length {MAX_BODY_BYTES + 1} is over the limit of "
                              f"{MAX_BODY_BYTES} bytes for an array")
    json_answer = await exchange(runtime, head(length=1 << 20, content_type="application/json"))
    assert json_answer.status == 413 and "for a JSON ref request" in json_answer.message
    await assert_nothing_held(runtime)


@pytest.mark.parametrize(("content_type", "extra", "message"), [
    ("text/plain", "", "Content-Type 'text/plain': send an .npy array as application/x-npy"),
    ("multipart/form-data; boundary=x", "", "Content-Type 'multipart/form-data'"),
    ("application/x-www-form-urlencoded", "", "Content-Type 'application/x-www-form-urlencoded'"),
    ("application/x-npy", "Content-Encoding: gzip\r\n", "Content-Encoding 'gzip': the gateway takes "
                                                        "uncompressed bodies only"),
])
async def test_a_wrong_content_type_or_encoding_gets_415(runtime: LocalRuntime, content_type: str, extra: str,
                                                         message: str) -> None:
    body = npy(np.zeros(4))
    answer = await exchange(runtime, head(length=len(body), content_type=content_type, extra=extra) + body)
    assert answer.status == 415 and message in answer.message


async def test_a_full_gateway_answers_503_before_reading_a_body(runtime: LocalRuntime) -> None:
    # uploads that stall half way hold their slots: the gateway admits before it reads
    body = npy(np.zeros(1000))
    holders = [await Connection.open(runtime) for _ in range(MAX_IN_FLIGHT)]
    for conn in holders:
        await conn.send(head(length=len(body)) + body[:len(body) // 2])
    assert runtime.gateway is not None
    await until(lambda: runtime.gateway.in_flight == MAX_IN_FLIGHT)
    answer = await exchange(runtime, head(length=len(body)))  # the head only: no body is needed
    assert answer.status == 503 and answer.seconds < PROMPT_S
    assert answer.message == f"{MAX_IN_FLIGHT} requests in flight (limit {MAX_IN_FLIGHT}); retry later"
    assert answer.headers["retry-after"] == "1"
    for conn in holders:
        assert (await conn.answer()).status == 408
        conn.close()
    await assert_nothing_held(runtime)


async def test_inputs_over_the_in_flight_budget_get_503_before_their_data_is_read(runtime: LocalRuntime) -> None:
    big = npy(np.zeros((MAX_BODY_BYTES - 128) // 8))
    holder = await Connection.open(runtime)
    await holder.send(head(length=len(big)) + big[:4096])   # its header reserves ~1 MiB
    assert runtime.gateway is not None
    await until(lambda: runtime.gateway.input_bytes_in_flight > 0)
    second = npy(np.zeros(80_000))                           # 640 kB more than the budget has
    answer = await exchange(runtime, head(length=len(second)) + second[:128])
    assert answer.status == 503 and answer.seconds < PROMPT_S
    assert "inputs of the requests in flight hold 1048448 bytes; 640000 more would pass the limit of " \
           f"{MAX_INPUT_BYTES}" in answer.message
    assert (await holder.answer()).status == 408
    holder.close()
    await assert_nothing_held(runtime)


# --- .npy bodies that lie -----------------------------------------------------------------------


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_an_npy_header_claiming_an_absurd_size_gets_413_before_allocating(runtime: LocalRuntime,
                                                                              framing: str) -> None:
    body = npy_with_header({"descr": "<f8", "fortran_order": False, "shape": (10**12,)}, b"\0" * 16)
    data = head(length=len(body)) + body if framing == "content-length" else head(length=None) + chunked(body)
    answer = await exchange(runtime, data)
    assert answer.status == 413
    assert answer.message == ("body: the .npy header declares shape (1000000000000,) of <f8 (8000000000000 "
                              f"bytes), over the limit of {MAX_BODY_BYTES} bytes per body")
    await assert_nothing_held(runtime)


async def test_an_npy_header_claiming_more_than_the_body_has_gets_400(runtime: LocalRuntime) -> None:
    body = npy_with_header({"descr": "<f8", "fortran_order": False, "shape": (1000,)}, b"\0" * 80)
    answer = await exchange(runtime, head(length=len(body)) + body)
    assert answer.status == 400
    assert answer.message == ("body: the .npy header declares shape (1000,) of <f8 (8000 bytes), but the body "
                              "is truncated: 80 bytes follow the header")


async def test_a_chunked_body_that_ends_early_or_runs_on_gets_400(runtime: LocalRuntime) -> None:
    body = npy(np.arange(100.0))
    short = await exchange(runtime, head(length=None) + chunked(body[:-80]))
    assert short.status == 400
    assert short.message.startswith("body: ended after 848 bytes, 80 bytes short of the array the .npy header "
                                    "declares (shape (100,) of <f8 (800 bytes))")
    long = await exchange(runtime, head(length=None) + chunked(body, b"trailing"))
    assert long.status == 400 and long.message == "body: more bytes follow the array the .npy header declares"
    await assert_nothing_held(runtime)


@pytest.mark.parametrize(("header", "message"), [
    ({"descr": "|O", "fortran_order": False, "shape": (2,)}, "dtype '|O' is not accepted"),
    ({"descr": "<U4", "fortran_order": False, "shape": (2,)}, "dtype '<U4' is not accepted"),
    ({"descr": "<f8", "fortran_order": False, "shape": (1,) * 40}, "40 dimensions; at most 32"),
    ({"descr": "<f8", "fortran_order": False, "shape": (-3,)}, "has dimension -3"),
])
async def test_npy_headers_the_data_plane_would_refuse_get_400(runtime: LocalRuntime, header: dict[str, object],
                                                               message: str) -> None:
    body = npy_with_header(header, b"\0" * 32)
    answer = await exchange(runtime, head(length=len(body)) + body)
    assert answer.status == 400 and message in answer.message
    # the array never reached the data plane: the gateway's client is not poisoned for later requests
    await assert_nothing_held(runtime)


@pytest.mark.parametrize(("body", "message"), [
    (b"", "body: empty; send an .npy array or JSON"),
    (b"not numpy at all", "body: not a valid .npy array: it does not start with b'\\x93NUMPY'"),
    (b"\x93NUM", "ends inside the .npy preamble"),
    (b"\x93NUMPY\x07\x00", ".npy format version 7.0 is not supported"),
    (b"\x93NUMPY\x02\x00" + (60_000).to_bytes(4, "little") + b"{" * 64,
     "the .npy header says it is 60000 bytes long; at most 10000"),
    (npy_with_header({"descr": "<f8", "fortran_order": False, "shape": (10**30,)}),
     "the .npy header has a number of 31 digits; no dimension has more than 19"),
    (npy_with_header(b"{'descr': '<f8', 'fortran_order': False, 'shape': (" + b"7" * 5000 + b",)}"),
     "the .npy header has a number of 5000 digits"),
])
async def test_malformed_npy_bodies_get_400_naming_the_problem(runtime: LocalRuntime, body: bytes,
                                                               message: str) -> None:
    answer = await exchange(runtime, head(length=len(body)) + body)
    assert answer.status == 400, answer
    assert message in answer.message


@pytest.mark.parametrize("array", [
    np.asfortranarray(np.arange(6.0).reshape(2, 3)),
    np.arange(4.0).astype(">f8"),
])
@pytest.mark.parametrize("version", [(1, 0), (2, 0), (3, 0)])
async def test_unusual_but_valid_npy_bodies_are_served(runtime: LocalRuntime, array: np.ndarray,
                                                       version: tuple[int, int]) -> None:
    body = npy(array, version)
    answer_conn = await Connection.open(runtime)
    await answer_conn.send(head(length=len(body)) + body)
    raw_head = await answer_conn.reader.readuntil(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in raw_head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    output = np.load(io.BytesIO(await answer_conn.reader.readexactly(length)))
    answer_conn.close()
    assert raw_head.startswith(b"HTTP/1.1 200")
    np.testing.assert_array_equal(output, 5 * (array + 1))   # the fixture: (x+1)*2 + (x+1)*3


# --- JSON bodies ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "message"), [
    (b'{"ref": ' + b"[" * 3000 + b"]" * 3000 + b"}", "body: JSON nested deeper than 4 levels"),
    (b'{"ref": ' + b"9" * 5000 + b"}", "body: a number in the JSON has more than 4300 digits"),
    (b'{"ref": "ft-x"', "body: not valid JSON"),
    (b"\xff\xfe", "body: JSON must be UTF-8"),
])
async def test_hostile_json_gets_400_naming_the_problem(runtime: LocalRuntime, body: bytes, message: str) -> None:
    answer = await exchange(runtime, head(length=len(body), content_type="application/json") + body)
    assert answer.status == 400 and message in answer.message


async def test_a_chunked_json_body_over_its_limit_gets_413(runtime: LocalRuntime) -> None:
    answer = await exchange(runtime, head(length=None, content_type="application/json")
                            + chunked(b" " * (bodies.MAX_REF_BODY_BYTES + 1), b"{}"))
    assert answer.status == 413
    assert answer.message == f"body: over the limit of {bodies.MAX_REF_BODY_BYTES} bytes for a JSON ref request"


# --- slow and vanishing clients ---------------------------------------------------------------------


async def test_a_half_sent_upload_gets_408_and_its_connection_closed(runtime: LocalRuntime) -> None:
    body = npy(np.zeros(100_000))
    conn = await Connection.open(runtime)
    await conn.send(head(length=len(body)) + body[:len(body) // 2])
    answer = await conn.answer()
    assert answer.status == 408 and answer.closed
    assert IDLE_TIMEOUT_S <= answer.seconds < IDLE_TIMEOUT_S + 1.0
    assert answer.message == (f"body: nothing arrived for {IDLE_TIMEOUT_S:g} s ({len(body) // 2} of "
                              f"{len(body)} bytes arrived)")
    assert await conn.closed_within(0.5)  # at once, not after aiohttp's lingering time
    conn.close()
    await assert_nothing_held(runtime)


async def test_a_body_trickling_in_gets_408_at_the_body_timeout(runtime: LocalRuntime) -> None:
    body = npy(np.zeros(1000))
    conn = await Connection.open(runtime)
    await conn.send(head(length=len(body)))
    started = time.monotonic()
    answer_task = asyncio.ensure_future(conn.answer())
    for i in range(len(body)):
        if answer_task.done():
            break
        await conn.send(body[i:i + 1])
        await asyncio.sleep(IDLE_TIMEOUT_S / 5)
    answer = await answer_task
    assert answer.status == 408
    assert answer.message.startswith(f"body: not complete within {BODY_TIMEOUT_S:g} s (")
    assert BODY_TIMEOUT_S <= time.monotonic() - started < BODY_TIMEOUT_S + 1.0
    conn.close()
    await assert_nothing_held(runtime)


async def test_a_client_that_vanishes_mid_upload_leaves_nothing_held(runtime: LocalRuntime) -> None:
    body = npy(np.zeros(100_000))
    conn = await Connection.open(runtime)
    await conn.send(head(length=len(body)) + body[:len(body) // 3])
    assert runtime.gateway is not None
    await until(lambda: runtime.gateway.input_bytes_in_flight > 0)
    conn.writer.transport.abort()
    await assert_nothing_held(runtime)


async def test_a_body_cut_short_by_the_client_closes_the_connection_and_leaves_nothing_held(
        runtime: LocalRuntime) -> None:
    body = npy(np.zeros(100_000))
    conn = await Connection.open(runtime)
    await conn.send(head(length=len(body)) + body[:len(body) // 2])
    conn.writer.write_eof()  # the rest of the declared body never comes
    assert await conn.closed_within(IDLE_TIMEOUT_S / 2)
    conn.close()
    await assert_nothing_held(runtime)


async def test_a_connection_without_a_complete_head_is_closed_at_the_header_timeout(
        runtime: LocalRuntime) -> None:
    silent, partial = await Connection.open(runtime), await Connection.open(runtime)
    await partial.send(b"POST /invoke HTTP/1.1\r\nHost: gateway\r\nContent-Le")
    started = time.monotonic()
    assert await silent.closed_within(HEADER_TIMEOUT_S + 1.0)
    assert await partial.closed_within(HEADER_TIMEOUT_S + 1.0)
    assert time.monotonic() - started >= HEADER_TIMEOUT_S - 0.2
    silent.close()
    partial.close()


async def test_a_keep_alive_connection_idle_past_the_header_timeout_is_closed(runtime: LocalRuntime) -> None:
    body = npy(np.array([1.0]))
    conn = await Connection.open(runtime)
    await conn.send(head(length=len(body)) + body)
    assert (await conn.answer()).status == 200
    await conn.send(b"POST /invoke HTTP/1.1\r\n")  # the next request's head never completes
    assert await conn.closed_within(HEADER_TIMEOUT_S + 1.0)
    conn.close()


@pytest.mark.parametrize("data", [
    b"POST /invoke HTTP/1.1\r\nHost: gateway\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
    b"POST /invoke HTTP/1.1\r\nHost: gateway\r\nContent-Length: lots\r\n\r\n",
    b"POST /invoke HTTP/1.1\r\nHost: gateway\r\nContent-Length: -5\r\n\r\n",
    b"NOT HTTP AT ALL\r\n\r\n",
])
async def test_malformed_heads_get_400_from_the_http_layer(runtime: LocalRuntime, data: bytes) -> None:
    answer = await exchange(runtime, data)
    assert answer.status == 400
