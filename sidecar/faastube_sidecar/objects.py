"""The object table: what each ref names, who owns it, where its bytes are, and when it dies.

Pure bookkeeping (no I/O, no backend): the data-plane service decides, this module
remembers. An object is released when it is freed, when its declared consumers have
all finished reading it, or at its expiry; its memory goes back to the pool only
once no reader still holds a zero-copy view of it (a *lease*), so releasing an object
never pulls memory out from under a reader.
"""

from __future__ import annotations

import enum
import heapq
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field

from faastube import errors

from faastube_sidecar.identity import Identity
from faastube_sidecar.pool import Allocation

REF_PREFIX = "ft-"
_REF_CHARS = 26          # 130 random bits in base32, lower-case


def new_ref() -> str:
    import base64

    return REF_PREFIX + base64.b32encode(secrets.token_bytes(17)).decode()[:_REF_CHARS].lower()


_REF_PATTERN = re.compile(rf"{REF_PREFIX}[a-z2-7]{{{_REF_CHARS}}}")


def check_ref(ref: str) -> None:
    if _REF_PATTERN.fullmatch(ref) is None:
        raise errors.InvalidRequest(f"malformed ref {ref!r:.60}: expected '{REF_PREFIX}' and {_REF_CHARS} base32 characters")


class State(str, enum.Enum):
    WRITING = "writing"
    SEALED = "sealed"


@dataclass(eq=False)
class ObjectRecord:
    ref: str
    owner: Identity
    nbytes: int
    dtype: str
    shape: tuple[int, ...]
    state: State
    replicas: dict[str, Allocation]          # location -> allocation
    writer_session: int | None
    created_s: float
    expiry_s: float
    consumers_left: int | None = None        # None: no declared consumers
    leases: dict[int, int] = field(default_factory=dict)   # session id -> open zero-copy views
    released: bool = False                   # gone from the table; memory waits for leases and copies
    copies_in_flight: int = 0                # replicas being written, or copies reading from us
    pending: dict[str, int | None] = field(default_factory=dict)   # location being copied to -> wait GPU

    def busy(self) -> bool:
        """Memory can't be freed while a reader holds a view or a copy touches it."""
        return bool(self.leases) or self.copies_in_flight > 0

    @property
    def origin(self) -> str:
        return next(iter(self.replicas))

    def lease_count(self) -> int:
        return sum(self.leases.values())


class ObjectTable:
    """ref -> ObjectRecord, with an expiry heap."""

    def __init__(self) -> None:
        self._objects: dict[str, ObjectRecord] = {}
        self._expiry: list[tuple[float, str]] = []
        # Released objects whose memory is still leased by a reader.
        self.draining: dict[str, ObjectRecord] = {}

    def __len__(self) -> int:
        return len(self._objects)

    def __iter__(self) -> Iterator[ObjectRecord]:
        return iter(self._objects.values())

    def add(self, record: ObjectRecord) -> None:
        self._objects[record.ref] = record
        heapq.heappush(self._expiry, (record.expiry_s, record.ref))

    def lookup(self, ref: str) -> ObjectRecord:
        check_ref(ref)
        record = self._objects.get(ref)
        if record is None:
            raise errors.RefNotFound(ref, "unknown, freed, consumed or expired")
        return record

    def set_expiry(self, record: ObjectRecord, expiry_s: float) -> None:
        record.expiry_s = expiry_s
        heapq.heappush(self._expiry, (expiry_s, record.ref))

    def remove(self, record: ObjectRecord) -> bool:
        """Take the record out of the table. True if its memory can be freed now."""
        self._objects.pop(record.ref, None)
        record.released = True
        if record.busy():
            self.draining[record.ref] = record
            return False
        self.draining.pop(record.ref, None)
        return True

    def expired(self, now_s: float) -> list[ObjectRecord]:
        out: list[ObjectRecord] = []
        while self._expiry and self._expiry[0][0] <= now_s:
            expiry_s, ref = heapq.heappop(self._expiry)
            record = self._objects.get(ref)
            # Stale heap entries (expiry moved, or object gone) are skipped.
            if record is not None and record.expiry_s == expiry_s:
                out.append(record)
        return out

    def find_leased(self, ref: str) -> ObjectRecord | None:
        return self._objects.get(ref) or self.draining.get(ref)
