"""The circular host ring allocator and the memfd-backed ring (unpinned here: no GPU)."""

from __future__ import annotations

import mmap
import os

import pytest
from faastube.errors import RetryableError
from faastube_bench.pinned_ring import PinnedHostRing, RingAllocator, RingFull, RingSlice
from faastube_sidecar.transfers.scheduler import TransferError


def test_allocations_go_round_the_ring_and_reuse_freed_space() -> None:
    ring = RingAllocator(16 << 10, align_bytes=4096)
    a = ring.allocate(4096)
    b = ring.allocate(5000)  # takes two pages
    c = ring.allocate(4096)
    assert (a.offset_bytes, b.offset_bytes, c.offset_bytes) == (0, 4096, 12288)
    with pytest.raises(RingFull):
        ring.allocate(8192)
    ring.free(a)
    d = ring.allocate(4096)  # wraps to the freed head
    assert d.offset_bytes == 0
    with pytest.raises(RingFull):
        ring.allocate(4096)  # wrapped: only [tail, head) counts, and it is empty


def test_out_of_order_frees_are_reclaimed_when_the_oldest_goes() -> None:
    ring = RingAllocator(12 << 10)
    a, b, c = (ring.allocate(4096) for _ in range(3))
    ring.free(b)
    with pytest.raises(RingFull):
        ring.allocate(4096)  # b's space is behind the live head a
    ring.free(a)
    assert ring.allocate(8192).offset_bytes == 0
    ring.free(c)
    assert ring.used_bytes == 8192


def test_ring_full_is_retryable_and_bad_calls_name_the_argument() -> None:
    ring = RingAllocator(4096)
    ring.allocate(1)
    with pytest.raises(RetryableError):
        ring.allocate(1)
    with pytest.raises(TransferError, match="size_bytes: must be > 0"):
        ring.allocate(0)
    with pytest.raises(TransferError, match="exceeds the ring's capacity"):
        ring.allocate(8192)
    with pytest.raises(TransferError, match="not allocated"):
        ring.free(RingSlice(999, 1))
    with pytest.raises(TransferError, match="align_bytes"):
        RingAllocator(4096, align_bytes=3)


def test_memfd_ring_is_visible_through_its_fd() -> None:
    with PinnedHostRing(1 << 20, register=False) as ring:
        assert not ring.pinned
        piece = ring.allocate(10_000)
        ring.view(piece)[:5] = list(b"hello")
        fd = os.dup(ring.fd)  # what another process would receive
        try:
            with mmap.mmap(fd, 1 << 20, mmap.MAP_SHARED, mmap.PROT_READ) as other:
                assert other[piece.offset_bytes:piece.offset_bytes + 5] == b"hello"
        finally:
            os.close(fd)
        assert ring.address_of(piece) == ring.address + piece.offset_bytes
        ring.free(piece)
    assert ring.is_closed
