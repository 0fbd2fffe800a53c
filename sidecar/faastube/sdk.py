"""The function SDK: the ``@faastube.function`` decorator and the handler calling convention.

A handler is a plain Python function over arrays; it never sees refs, sockets or
the sidecar. The runtime (``execute``) does the data passing around it: it gets
the inputs by ref, calls the handler, puts the outputs with the number of their
downstream readers as ``consumers``, and releases its inputs only once the outputs
are stored (so a failed call can be retried on the same inputs).

Calling convention (also in docs/runtime.md):

* One input (the request's input for the entry function, or the output of the
  only predecessor): the handler is called with it as the one positional argument.
* Several predecessors (fan-in): keyword arguments named by predecessor, with
  ``-`` replaced by ``_`` (``classify-a`` -> ``classify_a``).
* Return one array: every reader (each successor, and the gateway for the exit
  function) reads that one stored object.
* Return a dict ``{successor name: array}``: each successor gets its own array
  (fan-out of different data); the keys must be exactly the readers.
* Return a tuple of arrays: the i-th goes to the i-th reader, readers in the
  order of the workflow's edges (the exit's gateway reader last).

Batches (``execute_batch``; the function has a ``batch`` policy in the workflow): a
``batch="stack"`` handler (the default) gets each input as the requests' arrays
concatenated along axis 0 and returns outputs whose axis 0 is split back, request by
request; a ``batch="list"`` handler gets lists of the requests' arrays and returns a
list of per-request results. Warm-up (``run_warmup_hook``, ``warm_up_call``): the
handler's ``warmup`` hook, then a call on zeros whose outputs are discarded.

This module is light on purpose (it runs inside function images): NumPy only;
CuPy and torch are imported lazily, only when a value of theirs shows up.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import numpy as np

from faastube import batches, errors, protocol

logger = logging.getLogger(__name__)

Framework = Literal["auto", "numpy", "cupy", "torch"]
Passing = Literal["tube", "host-centric"]
BatchMode = Literal["stack", "list"]
ShapeCheck = Literal["exact", "rank"]
FRAMEWORKS: tuple[str, ...] = ("auto", "numpy", "cupy", "torch")
PASSINGS: tuple[str, ...] = ("tube", "host-centric")
BATCH_MODES: tuple[str, ...] = ("stack", "list")
SHAPE_CHECKS: tuple[str, ...] = ("exact", "rank")

# The reader name of the request's input (what the entry function receives) and of
# the exit's output (what the gateway reads). Neither is a DNS-1123 label, so they
# cannot collide with a function's name.
REQUEST_INPUT = "$input"
GATEWAY_READER = "$gateway"

_OPTIONS_ATTR = "__faastube_function__"

F = TypeVar("F", bound=Callable[..., Any])


class HandlerError(errors.FaastubeError):
    """The handler raised; the message names the error and where (``file:line`` in the handler's
    module). Whether a retry may help is the subclass: ``HandlerFailed`` or
    ``HandlerFailedPermanently``."""


class HandlerFailed(HandlerError, errors.RetryableError):
    """The handler raised an error that another attempt may not (``RuntimeError``, ``OSError``,
    ``MemoryError``, ...); the runtime may retry the call on the same inputs."""


class HandlerFailedPermanently(HandlerError):
    """The handler raised an error that another attempt on the same inputs would raise again
    (``DETERMINISTIC_ERRORS``: a failed assertion, a wrong type or value, a missing key or
    attribute); not retried. Fix the handler or the request."""


# Errors of a handler's own logic: the same inputs give the same error, so retrying is waste.
DETERMINISTIC_ERRORS: tuple[type[BaseException], ...] = (
    AssertionError, TypeError, ValueError, LookupError, AttributeError, NameError,
    ZeroDivisionError, NotImplementedError)
# How much of a handler's error message a call's error carries (the gateway's reply repeats it).
MAX_HANDLER_MESSAGE_CHARS = 500


class InputLost(errors.RetryableError):
    """An input held by another node can't be read: that node's sidecar died or can't be
    reached. Retrying this call can't help (the object is gone with its node); the gateway
    starts the request over."""


class CallExpired(errors.RetryableError):
    """The call finished after its deadline: its outputs were dropped, its inputs kept."""


class HandlerContractError(errors.InvalidRequest):
    """The handler returned something the calling convention does not allow; fix the handler."""


class OutputMismatch(HandlerContractError):
    """An output's shape or dtype differs from what its out-edge declares; fix the producer
    (or the edge). Raised before the output is published, so no consumer sees it."""


# An output this many times larger, or smaller, than its edge's declared ``size`` is logged
# (once per function): placement and pool sizing plan with the declared size.
SIZE_WARNING_FACTOR = 4.0


@dataclass(frozen=True, slots=True)
class EdgeDeclaration:
    """What the workflow declares about the edge from a function to one reader."""

    size_bytes: int
    shape: tuple[int, ...] | None = None
    dtype: str | None = None


class OutputChecks:
    """Checks a function's outputs against its out-edges, per request, before they are stored.

    A declared ``shape``/``dtype`` must match exactly (``OutputMismatch`` names the edge);
    bytes far from a declared ``size`` (``SIZE_WARNING_FACTOR``) are logged at WARNING, once
    per instance (a worker holds one for its function).
    """

    def __init__(self, function: str, edges: Mapping[str, EdgeDeclaration]) -> None:
        self.function = function
        self.edges = dict(edges)
        self._size_warned = False

    def check(self, array: Any, readers: Sequence[str], *, mode: ShapeCheck = "exact") -> None:
        """Raise ``OutputMismatch`` if ``array`` is not what its edges to ``readers`` declare
        (``mode="rank"``: only its dtype and number of dimensions are compared)."""
        shape = tuple(int(d) for d in getattr(array, "shape", ()))
        try:
            dtype = np.dtype(getattr(array, "dtype", None)).name
        except TypeError:
            dtype = str(getattr(array, "dtype", "?"))
        for reader in readers:
            edge = self.edges.get(reader)
            if edge is None:
                continue
            matches = (shape == edge.shape if mode == "exact"
                       else edge.shape is not None and len(shape) == len(edge.shape))
            if edge.shape is not None and (not matches or dtype != edge.dtype):
                raise OutputMismatch(
                    f"output of {self.function!r} for edge {self.function} -> {reader}: got shape "
                    f"{list(shape)} of {dtype}, but the edge declares shape {list(edge.shape)} of "
                    f"{edge.dtype}; fix the handler of {self.function!r} or the edge's shape/dtype")
            nbytes = int(getattr(array, "nbytes", 0))
            if (edge.shape is None and edge.size_bytes > 0 and not self._size_warned
                    and not edge.size_bytes / SIZE_WARNING_FACTOR <= nbytes <= edge.size_bytes * SIZE_WARNING_FACTOR):
                self._size_warned = True
                logger.warning("output of %r for edge %s -> %s is %d bytes, but the edge declares size "
                               "%d bytes (placement and pool sizing use the declared size); logged once "
                               "per function", self.function, self.function, reader, nbytes, edge.size_bytes)


class WarmupFailed(errors.FaastubeError):
    """The warmup hook or the warm-up call raised: the function cannot serve; fix it and restart."""


@dataclass(frozen=True, slots=True)
class FunctionOptions:
    """What ``@faastube.function(...)`` declared about a handler."""

    framework: Framework = "auto"
    # Called once, on the handler's thread, before the worker reports ready (load models here).
    warmup: Callable[[WarmupContext], Any] | None = None
    batch: BatchMode = "stack"
    # How outputs are checked against their out-edges' declared shape and dtype.
    shapes: ShapeCheck = "exact"


def function(fn: F | None = None, *, framework: Framework = "auto",
             warmup: Callable[[WarmupContext], Any] | None = None, batch: BatchMode = "stack",
             shapes: ShapeCheck = "exact") -> Any:
    """Mark a handler as a FaaSTube function; usable bare or with options.

    ``framework`` picks the array type the handler receives: ``"auto"`` (NumPy for host
    data, CuPy for GPU data), ``"numpy"`` (always host arrays; GPU data is copied to the
    host), ``"cupy"`` or ``"torch"`` (zero-copy views of the same memory via DLPack).

    ``warmup(context)`` runs once in the worker, on the handler's thread and before the
    worker reports ready, with a ``WarmupContext`` (the function's device and framework):
    load models, build caches. A warm-up call of the handler on zeros follows (when the
    workflow gives its inputs' shapes).

    ``batch`` says how the handler receives a batch when the workflow gives the function a
    ``batch`` policy: ``"stack"`` (default; each input is the requests' arrays concatenated
    along axis 0, and each output is split back along axis 0) or ``"list"`` (each input is a
    list of the requests' arrays, and the handler returns a list of per-request results;
    no copies). A ``"list"`` handler always receives lists, a batch of one without a policy.

    ``shapes`` says how each output is checked against its out-edge's ``shape`` and ``dtype``
    (when the workflow declares them), per request and before it is stored: ``"exact"``
    (default; a mismatch fails the call with ``OutputMismatch``, naming the edge) or
    ``"rank"`` (only the dtype and number of dimensions: for handlers whose sizes follow
    their input's, like the examples', whose edges declare full resolution).
    """
    if framework not in FRAMEWORKS:
        raise errors.InvalidRequest(f"framework must be one of {', '.join(FRAMEWORKS)}, got {framework!r}")
    if batch not in BATCH_MODES:
        raise errors.InvalidRequest(f"batch must be one of {', '.join(BATCH_MODES)}, got {batch!r}")
    if warmup is not None and not callable(warmup):
        raise errors.InvalidRequest(f"warmup must be a callable taking a WarmupContext, got {warmup!r}")
    if shapes not in SHAPE_CHECKS:
        raise errors.InvalidRequest(f"shapes must be one of {', '.join(SHAPE_CHECKS)}, got {shapes!r}")
    options = FunctionOptions(framework=framework, warmup=warmup, batch=batch, shapes=shapes)

    def mark(handler: F) -> F:
        if not callable(handler):
            raise errors.InvalidRequest(f"@faastube.function needs a callable, got {handler!r}")
        setattr(handler, _OPTIONS_ATTR, options)
        return handler

    return mark(fn) if fn is not None else mark


def options_of(handler: Callable[..., Any]) -> FunctionOptions:
    """The declared options; undecorated plain functions get the defaults."""
    options = getattr(handler, _OPTIONS_ATTR, None)
    return options if isinstance(options, FunctionOptions) else FunctionOptions()


def kwarg_name(function_name: str) -> str:
    """The keyword a fan-in handler receives a predecessor's output under."""
    return function_name.replace("-", "_")


# --- array conversions --------------------------------------------------------------------------

def _module_root(value: Any) -> str:
    return type(value).__module__.split(".", 1)[0]


def is_gpu_array(value: Any) -> bool:
    if _module_root(value) == "torch":
        return bool(value.is_cuda)
    return hasattr(value, "__cuda_array_interface__")


def _torch_to_storable(value: Any) -> Any:
    if value.is_cuda:
        import cupy

        return cupy.from_dlpack(value.detach().contiguous())
    return value.detach().contiguous().numpy()


def to_storable(value: Any) -> Any:
    """A NumPy or CuPy array viewing the same memory (torch tensors are converted zero-copy)."""
    if isinstance(value, np.ndarray):
        return value
    root = _module_root(value)
    if root == "torch":
        return _torch_to_storable(value)
    if root == "cupy":
        return value
    if hasattr(value, "__cuda_array_interface__"):
        import cupy

        return cupy.asarray(value)
    if hasattr(value, "__array_interface__") or isinstance(value, np.generic):
        return np.asarray(value)
    raise HandlerContractError(f"a handler output must be an array (NumPy, CuPy, torch or DLPack), "
                               f"got {type(value).__name__}")


def to_framework(array: Any, framework: Framework, *, device: int | None) -> Any:
    """Present a fetched array (NumPy or CuPy) as the framework the handler asked for."""
    if framework == "auto":
        return array
    if framework == "numpy":
        return array if isinstance(array, np.ndarray) else array.get()
    if framework == "cupy":
        import cupy

        if isinstance(array, np.ndarray):
            with cupy.cuda.Device(device or 0):
                return cupy.asarray(array)
        return array
    import torch

    if isinstance(array, np.ndarray):
        return torch.from_numpy(array)
    return torch.from_dlpack(array)


def _synchronize(outputs: Sequence[Any]) -> None:
    """Wait for queued GPU work so compute time is measured, not just launched."""
    if any(_module_root(v) == "cupy" for v in outputs):
        import cupy

        cupy.cuda.get_current_stream().synchronize()
    torch = sys.modules.get("torch")
    if torch is not None and any(_module_root(v) == "torch" and v.is_cuda for v in outputs):
        torch.cuda.synchronize()


# --- the calling convention ---------------------------------------------------------------------

def call_handler(handler: Callable[..., Any], inputs: Mapping[str, Any]) -> Any:
    """Call ``handler`` on its inputs (keyed by predecessor, or ``REQUEST_INPUT``)."""
    if len(inputs) == 1:
        (value,) = inputs.values()
        return handler(value)
    return handler(**{kwarg_name(name): value for name, value in inputs.items()})


def route_outputs(result: Any, readers: Sequence[str]) -> list[tuple[Any, tuple[str, ...]]]:
    """Group a handler's result into (array, readers of that array) pairs.

    A function without readers (a sink other than the exit) stores nothing.
    """
    if not readers:
        return []
    if isinstance(result, Mapping):
        keys = set(result)
        if keys != set(readers):
            missing = sorted(set(readers) - keys)
            extra = sorted(str(k) for k in keys - set(readers))
            raise HandlerContractError(
                f"a dict result must have exactly one entry per reader {sorted(readers)}; "
                f"missing {missing}, unexpected {extra}")
        return [(to_storable(result[r]), (r,)) for r in readers]
    if isinstance(result, tuple):
        if len(result) != len(readers):
            raise HandlerContractError(f"a tuple result must have one array per reader "
                                       f"({len(readers)}: {list(readers)}), got {len(result)}")
        return [(to_storable(v), (r,)) for v, r in zip(result, readers)]
    return [(to_storable(result), tuple(readers))]


# --- outputs written straight into pool memory ---------------------------------------------------

class _OutputArena:
    """Pool memory handed out by ``output()`` during one call, until it is sealed or freed."""

    def __init__(self, client: Any, device: int | None) -> None:
        self.client = client
        self.device = device
        self.pending: list[Any] = []          # faastube.client.Writable

    def take(self, array: Any) -> Any | None:
        """The pending allocation whose array *is* ``array`` (then it is no longer pending)."""
        for i, writable in enumerate(self.pending):
            if writable.array is array:
                return self.pending.pop(i)
        return None

    def free_unused(self) -> None:
        for writable in self.pending:
            try:
                self.client.free(writable)      # never sealed: back to this client's arena
            except errors.FaastubeError as e:
                logger.debug("could not free an unused output: %s", e)
        self.pending.clear()


_ARENA: contextvars.ContextVar[_OutputArena | None] = contextvars.ContextVar("faastube_output_arena",
                                                                             default=None)


def output(shape: int | Sequence[int], dtype: Any = np.float32) -> Any:
    """An array for a handler to write its result into, then return, with no copy.

    Inside a call run by the runtime (tube passing) it is pool memory: pinned shared
    memory for a CPU function, the function's GPU pool for a GPU function; returning
    it publishes it without copying (a returned array that is not from ``output`` is
    copied into the pool as usual). Anywhere else (tests, host-centric passing) it is
    a plain NumPy array, so handlers run unchanged outside the runtime.
    """
    arena = _ARENA.get()
    dims = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(d) for d in shape)
    if arena is None or not hasattr(arena.client, "empty"):
        return np.empty(dims, dtype)
    writable = arena.client.empty(dims, dtype, device="cpu" if arena.device is None else arena.device)
    arena.pending.append(writable)
    return writable.array


# --- one invocation against the data plane -------------------------------------------------------

class DataClient(Protocol):
    """The part of ``faastube.client.Client`` an invocation needs (contract 4)."""

    def get(self, ref: str, *, device: int | str | None = None, copy: bool = False) -> Any: ...

    def put(self, array: Any, *, consumers: int | None = None, ttl: float | None = None) -> str: ...

    def release(self, ref: str) -> None: ...

    def free(self, ref: Any) -> None: ...

    # Used only for ``output()`` (it falls back to plain arrays where ``empty`` is missing).
    def empty(self, shape: Sequence[int], dtype: Any = ..., *, device: int | str | None = None) -> Any: ...

    def seal(self, writable: Any, *, consumers: int | None = None, ttl: float | None = None) -> str: ...


@dataclass(frozen=True, slots=True)
class CallTimings:
    get_s: float
    compute_s: float
    put_s: float


@dataclass(frozen=True, slots=True)
class Invocation:
    """What one handler call produced: reader name -> ref, and where the time went."""

    outputs: Mapping[str, str]
    timings: CallTimings
    output_bytes: int = 0
    refs: tuple[str, ...] = field(default=())
    batch_size: int = 1  # calls in the handler call that produced the outputs (compute_s is that call's)


def _fetch(client: DataClient, ref: str, *, device: int | None, passing: Passing) -> tuple[Any, Any]:
    """(the store's view, holding the read open; the array the handler computes on)."""
    if device is None:
        view = client.get(ref, device="cpu")
        return view, view
    if passing == "host-centric":
        # INFless-style: the store hands out host memory, and the function copies it to
        # its GPU itself, from pageable memory.
        import cupy

        view = client.get(ref, device="cpu")
        with cupy.cuda.Device(device):
            array = cupy.asarray(view)
            cupy.cuda.get_current_stream().synchronize()
        return view, array
    view = client.get(ref, device=device)
    return view, view


def _store(client: DataClient, array: Any, *, consumers: int, ttl_s: float | None,
           passing: Passing) -> str:
    if passing == "host-centric" and not isinstance(array, np.ndarray):
        array = array.get()  # device -> pageable host, then into the host store
    return client.put(array, consumers=consumers, ttl=ttl_s)


@dataclass(frozen=True, slots=True)
class Call:
    """One request's call in a batch: its input refs (name -> ref), its deadline
    (``time.monotonic()``; past it the caller has given up on the call), and the views
    kept open for its retry (ref -> view, owned by the caller; see ``execute``)."""

    inputs: Mapping[str, str]
    deadline: float | None = None
    held: dict[str, Any] = field(default_factory=dict)


def execute(client: DataClient, handler: Callable[..., Any], *, inputs: Mapping[str, str],
            readers: Sequence[str], device: int | None = None, passing: Passing = "tube",
            ttl_s: float | None = None, deadline: float | None = None,
            held: dict[str, Any] | None = None, checks: OutputChecks | None = None) -> Invocation:
    """Get ``inputs`` (name -> ref), call ``handler``, put its outputs, release the inputs.

    ``device`` is the GPU this function runs on (``None``: a CPU function, which gets
    host arrays). Inputs are released only after every output is stored; if anything
    fails, outputs stored so far are freed.

    A read counts toward an object's ``consumers`` when it ends, and a view that is
    garbage collected ends its read. So that a failed call can be retried on the same
    inputs, the views of a failed call are parked in ``held`` (ref -> view, owned by
    the caller) instead of being dropped, and the next call on those refs reuses them.
    ``deadline`` (``time.monotonic()``): past it, the caller has given up on this call,
    so its outputs are freed rather than handed to no one.

    This is ``execute_batch`` of one call, raising its error.
    """
    (outcome,) = execute_batch(client, handler, [Call(inputs, deadline, {} if held is None else held)],
                               readers=readers, device=device, passing=passing, ttl_s=ttl_s, checks=checks)
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def execute_batch(client: DataClient, handler: Callable[..., Any], calls: Sequence[Call], *,
                  readers: Sequence[str], device: int | None = None, passing: Passing = "tube",
                  ttl_s: float | None = None, checks: OutputChecks | None = None) -> list[Invocation | Exception]:
    """Run several requests' calls of one function in as few handler calls as they allow.

    Returns, per call in order, its ``Invocation`` or the error that failed it alone; each
    call's inputs, outputs, reads and retries are handled as ``execute`` handles one call's.
    A call past its deadline before it starts fails with ``CallExpired`` without running.

    How the handler receives a batch is its ``@function(batch=...)``:

    * ``"stack"`` (default): each input is the requests' arrays concatenated along axis 0
      (one gather copy; a batch of one is passed as is, with no copy), and each output is
      split back along axis 0 by the requests' row counts (``batches.split_rows``). Calls are
      grouped by what stacks (per input: dtype, trailing shape, array type), one handler
      call per group; a call with a scalar input, or inputs of different row counts, runs
      alone.
    * ``"list"``: each input is a list of the requests' arrays (zero-copy views, as for a
      single call) and the handler returns a list with one result per request.

    If a batched handler call raises, or its result cannot be split back, its requests are
    run again one by one, so that only a failing request fails.
    """
    if passing not in PASSINGS:
        raise errors.InvalidRequest(f"passing must be one of {', '.join(PASSINGS)}, got {passing!r}")
    run = _BatchRun(client, handler, readers=tuple(readers), device=device, passing=passing, ttl_s=ttl_s,
                    checks=checks)
    outcomes = run.run(calls)
    # An error's traceback keeps its frames, and each frame its callers' (f_back), alive for as
    # long as the error lives; those frames held the calls, their views and their ``held`` dicts.
    # Clear them now that they have returned, and drop this frame's own reference to the calls,
    # so that only ``held`` keeps a failed call's reads open (and the caller can end them).
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            _clear_traceback_frames(outcome)
    del calls
    return outcomes


def _clear_traceback_frames(exc: BaseException) -> None:
    """Clear the locals of every finished frame an error (and its causes) keeps alive."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        tb = current.__traceback__
        while tb is not None:
            frame: Any = tb.tb_frame
            while frame is not None:
                try:
                    frame.clear()
                except RuntimeError:
                    break  # still executing: so are its callers
                frame = frame.f_back
            tb = tb.tb_next
        current = current.__cause__ or current.__context__


@dataclass(eq=False, slots=True)
class _Pending:
    """A call of a batch on its way: its fetched inputs until it succeeds or fails."""

    call: Call
    views: dict[str, Any] = field(default_factory=dict)   # ref -> the store's view (holds the read)
    arrays: dict[str, Any] = field(default_factory=dict)  # input name -> the array computed on
    get_s: float = 0.0
    failed_compute_s: float = 0.0  # a batch it was in that failed before it ran alone
    outcome: Invocation | Exception | None = None

    def fail(self, exc: Exception) -> None:
        self.call.held.update(self.views)  # keep the reads open (uncounted) for a retry
        self.views.clear()
        self.arrays.clear()
        self.outcome = exc


@dataclass(slots=True)
class _Computed:
    per_request: list[list[tuple[Any, tuple[str, ...]]]]  # per call: (array, its readers)
    gather_s: float
    compute_s: float


class _BatchRun:
    """One ``execute_batch``: fetch, partition, compute, publish."""

    def __init__(self, client: DataClient, handler: Callable[..., Any], *, readers: tuple[str, ...],
                 device: int | None, passing: Passing, ttl_s: float | None,
                 checks: OutputChecks | None = None) -> None:
        self.client = client
        self.checks = checks
        self.handler = handler
        self.options = options_of(handler)
        self.readers = readers
        self.device = device
        self.passing: Passing = passing
        self.ttl_s = ttl_s

    def run(self, calls: Sequence[Call]) -> list[Invocation | Exception]:
        pendings = [_Pending(call) for call in calls]
        try:
            ready: list[_Pending] = []
            for p in pendings:
                if p.call.deadline is not None and time.monotonic() > p.call.deadline:
                    p.outcome = CallExpired("the call waited past its deadline before it could start")
                    continue
                try:
                    self._fetch(p)
                except Exception as e:  # noqa: BLE001 - a missing or unreadable input fails its call only
                    p.fail(e)
                    continue
                ready.append(p)
            for group in self._partition(ready):
                self._run_group(group)
        except BaseException:
            for p in pendings:
                if p.outcome is None:
                    p.fail(errors.FaastubeError("interrupted"))
            raise
        outcomes: list[Invocation | Exception] = []
        for p in pendings:
            if p.outcome is None:  # every path sets one; keep the type honest
                p.fail(errors.FaastubeError("internal: the call got no outcome"))
            outcomes.append(p.outcome)  # type: ignore[arg-type]
        return outcomes

    # --- inputs -----------------------------------------------------------------------------

    def _fetch(self, p: _Pending) -> None:
        started = time.perf_counter()
        array_of: dict[str, Any] = {}  # ref -> array: a ref named twice is read once
        for name, ref in p.call.inputs.items():
            if ref in array_of:
                pass
            elif ref in p.call.held:
                p.views[ref] = p.call.held.pop(ref)
                array_of[ref] = p.views[ref]
                if self.device is not None and isinstance(array_of[ref], np.ndarray) \
                        and self.passing == "host-centric":
                    import cupy

                    with cupy.cuda.Device(self.device):
                        array_of[ref] = cupy.asarray(array_of[ref])
            else:
                try:
                    p.views[ref], array_of[ref] = _fetch(self.client, ref, device=self.device, passing=self.passing)
                except errors.Unavailable as e:
                    # Our own sidecar gone (a closed client) is not the input's node gone.
                    node = protocol.ref_node(ref)
                    if node is None or node == getattr(self.client, "node", None) or \
                            getattr(self.client, "closed", False):
                        raise
                    raise InputLost(f"input {name!r} ({ref}) is held by node {node}, which can't be read "
                                    f"from: {e}") from e
            p.arrays[name] = array_of[ref]
        p.get_s = time.perf_counter() - started

    def _partition(self, ready: list[_Pending]) -> list[list[_Pending]]:
        """Groups of calls run in one handler call each, in order of their first call."""
        if self.options.batch == "list" or len(ready) <= 1:
            return [ready] if ready else []
        groups: dict[Hashable, list[_Pending]] = {}
        alone: list[list[_Pending]] = []
        order: list[Hashable | int] = []
        for p in ready:
            key = batches.stack_key(p.arrays)
            if key is None:
                order.append(len(alone))
                alone.append([p])
                continue
            if key not in groups:
                groups[key] = []
                order.append(key)
            groups[key].append(p)
        return [alone[k] if isinstance(k, int) else groups[k] for k in order]

    def _handler_inputs(self, group: list[_Pending]) -> dict[str, Any]:
        names = list(group[0].arrays)
        framework = self.options.framework
        if self.options.batch == "list":
            return {n: [to_framework(p.arrays[n], framework, device=self.device) for p in group] for n in names}
        if len(group) == 1:
            return {n: to_framework(group[0].arrays[n], framework, device=self.device) for n in names}
        return {n: to_framework(batches.concatenate([p.arrays[n] for p in group]), framework, device=self.device)
                for n in names}

    # --- compute ----------------------------------------------------------------------------

    def _run_group(self, group: list[_Pending]) -> None:
        arena = _OutputArena(self.client, self.device) if self.passing == "tube" else None
        started = time.perf_counter()
        computed: _Computed | None = None
        try:
            try:
                computed = self.compute(group, arena)
            except Exception as e:  # noqa: BLE001 - the handler's error, or a result that does not split
                if len(group) == 1:
                    group[0].fail(e)
                    return
                logger.info("a batch of %d calls of %s failed (%s: %s); running them one by one", len(group),
                            getattr(self.handler, "__name__", self.handler), type(e).__name__, e)
            else:
                for p, outputs in zip(group, computed.per_request, strict=True):
                    self._publish(p, outputs, arena, computed=computed, batch_size=len(group))
                return
        finally:
            if arena is not None:
                arena.free_unused()
        # Outside the except block: a request's own error must not carry the batch's as context.
        failed_s = time.perf_counter() - started
        for p in group:
            p.failed_compute_s += failed_s
            self._run_group([p])

    def compute(self, group: list[_Pending], arena: _OutputArena | None) -> _Computed:
        """Call the handler once for ``group``; its outputs per call, synchronised, not stored."""
        gathered = time.perf_counter()
        inputs = self._handler_inputs(group)
        started = time.perf_counter()
        token = _ARENA.set(arena)
        try:
            result = _invoke(self.handler, inputs)
        finally:
            _ARENA.reset(token)
            inputs.clear()
        per_request = self._route(group, result)
        del result
        _synchronize([array for outputs in per_request for array, _ in outputs])
        return _Computed(per_request=per_request, gather_s=started - gathered,
                         compute_s=time.perf_counter() - started)

    def _route(self, group: list[_Pending], result: Any) -> list[list[tuple[Any, tuple[str, ...]]]]:
        if self.options.batch == "list":
            if not isinstance(result, list) or len(result) != len(group):
                got = f"a list of {len(result)}" if isinstance(result, list) else type(result).__name__
                raise HandlerContractError(f"a handler with batch='list' must return a list with one result "
                                           f"per request ({len(group)}), got {got}")
            return [[(array, rs) for array, rs in route_outputs(r, self.readers)] for r in result]
        groups = route_outputs(result, self.readers)
        if len(group) == 1:
            return [groups]
        rows = [batches.rows_of(p.arrays) for p in group]
        per_request: list[list[tuple[Any, tuple[str, ...]]]] = [[] for _ in group]
        for array, group_readers in groups:
            try:
                pieces = batches.split_rows(array, rows)
            except batches.NotSplittable as e:
                raise HandlerContractError(str(e)) from None
            for outputs, piece in zip(per_request, pieces, strict=True):
                outputs.append((piece, group_readers))
        return per_request

    # --- outputs ----------------------------------------------------------------------------

    def _publish(self, p: _Pending, outputs: list[tuple[Any, tuple[str, ...]]], arena: _OutputArena | None,
                 *, computed: _Computed, batch_size: int) -> None:
        started = time.perf_counter()
        stored: list[str] = []
        refs_of: dict[str, str] = {}
        output_bytes = 0
        try:
            if self.checks is not None:  # every output, before any is published
                for array, group_readers in outputs:
                    self.checks.check(array, group_readers, mode=self.options.shapes)
            for array, group_readers in outputs:
                written = arena.take(array) if arena is not None else None
                if written is not None:
                    # Already in pool memory (from ``output()``): publish it, no copy.
                    ref = self.client.seal(written, consumers=len(group_readers), ttl=self.ttl_s)
                else:
                    ref = _store(self.client, array, consumers=len(group_readers), ttl_s=self.ttl_s,
                                 passing=self.passing)
                stored.append(ref)
                output_bytes += int(array.nbytes)
                refs_of.update({r: ref for r in group_readers})
            deadline = p.call.deadline
            if deadline is not None and time.monotonic() > deadline:
                raise CallExpired(f"call finished {time.monotonic() - deadline:.3f}s after its deadline")
        except Exception as e:  # noqa: BLE001 - storing one request's outputs fails that request only
            discard(self.client, stored)
            p.fail(e)
            return
        finally:
            outputs.clear()
        for ref in p.call.inputs.values():
            try:
                self.client.release(ref)
            except (errors.RefNotFound, errors.InvalidRequest) as e:
                logger.debug("release of input %s: %s", ref, e)
        p.views.clear()
        p.arrays.clear()
        p.outcome = Invocation(outputs=refs_of,
                               timings=CallTimings(get_s=p.get_s + computed.gather_s,
                                                   compute_s=computed.compute_s + p.failed_compute_s,
                                                   put_s=time.perf_counter() - started),
                               output_bytes=output_bytes, refs=tuple(stored), batch_size=batch_size)


def _invoke(handler: Callable[..., Any], inputs: dict[str, Any]) -> Any:
    """The handler's call, its error as a ``HandlerError`` naming where it was raised (frames
    cleared: they hold input views)."""
    try:
        return call_handler(handler, inputs)
    except Exception as e:
        where = handler_location(handler, e.__traceback__)
        traceback.clear_frames(e.__traceback__)
        kind = HandlerFailedPermanently if isinstance(e, DETERMINISTIC_ERRORS) else HandlerFailed
        message = str(e)
        if len(message) > MAX_HANDLER_MESSAGE_CHARS:
            message = message[:MAX_HANDLER_MESSAGE_CHARS] + f"... ({len(message)} characters)"
        at = f" at {where}" if where else ""
        raise kind(f"handler {getattr(handler, '__name__', handler)!r} raised "
                   f"{type(e).__name__}{at}: {message}") from e


def handler_location(handler: Callable[..., Any], tb: Any) -> str | None:
    """``file:line`` where an error left the handler's own code: the innermost frame of the
    traceback in the handler's module, else the innermost one outside this package (a
    handler defined elsewhere than its module's file); None without a traceback."""
    frames = traceback.extract_tb(tb)
    if not frames:
        return None
    code = getattr(inspect.unwrap(handler), "__code__", None)
    home = code.co_filename if code is not None else None
    ours = str(Path(__file__).resolve().parent) + os.sep
    mine = [f for f in frames if home is not None and f.filename == home]
    outside = [f for f in frames if not str(Path(f.filename).resolve()).startswith(ours)]
    frame = (mine or outside or frames)[-1]
    return f"{frame.filename}:{frame.lineno}"


# --- warm-up ------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class WarmupContext:
    """What a ``warmup`` hook is told: where its function runs and what it computes with."""

    function: str
    device: int | None  # this process's CUDA ordinal of the function's GPU; None for a CPU function
    framework: Framework  # "auto" resolved: "numpy" for a CPU function, "cupy" for a GPU function
    passing: Passing = "tube"


def run_warmup_hook(handler: Callable[..., Any], context: WarmupContext) -> bool:
    """Run the handler's ``warmup`` hook, if it declares one; whether one ran.

    Call it on the thread that will run the handler (bound to the function's GPU).
    Raises ``WarmupFailed`` with the hook's error.
    """
    hook = options_of(handler).warmup
    if hook is None:
        return False
    try:
        hook(context)
    except Exception as e:
        traceback.clear_frames(e.__traceback__)
        raise WarmupFailed(f"the warmup hook {getattr(hook, '__name__', hook)!r} of "
                           f"{context.function!r} raised {type(e).__name__}: {e}") from e
    return True


def warm_up_call(client: DataClient, handler: Callable[..., Any], *,
                 inputs: Mapping[str, tuple[Sequence[int], str]], readers: Sequence[str],
                 device: int | None = None, passing: Passing = "tube", requests: int = 1) -> None:
    """Call the handler through its real path on zeros: ``inputs`` is name -> (shape, dtype) of
    one request's input; ``requests`` such requests are batched as the handler's ``batch`` mode
    says. The outputs are checked against the calling convention and discarded, never published;
    what the handler took from ``output()`` is freed. Raises ``WarmupFailed``.
    """
    if passing not in PASSINGS:
        raise errors.InvalidRequest(f"passing must be one of {', '.join(PASSINGS)}, got {passing!r}")
    run = _BatchRun(client, handler, readers=tuple(readers), device=device, passing=passing, ttl_s=None)
    group = [_Pending(Call({})) for _ in range(requests)]
    for p in group:
        p.arrays = {name: batches.zeros(shape, dtype, device=device) for name, (shape, dtype) in inputs.items()}
    arena = _OutputArena(client, device) if passing == "tube" else None
    try:
        computed = run.compute(group, arena)
        computed.per_request.clear()
    except Exception as e:
        _clear_traceback_frames(e)
        raise WarmupFailed(f"the warm-up call failed: {e}") from e
    finally:
        if arena is not None:
            arena.free_unused()
        group.clear()


def discard(client: DataClient, refs: Sequence[str]) -> None:
    """Free refs, ignoring those already gone (consumed, expired or freed by someone else)."""
    for ref in refs:
        try:
            client.free(ref)
        except errors.RefNotFound:
            pass
        except errors.FaastubeError as e:
            logger.warning("could not free %s: %s", ref, e)


__all__ = [
    "BATCH_MODES",
    "GATEWAY_READER",
    "output",
    "REQUEST_INPUT",
    "BatchMode",
    "SHAPE_CHECKS",
    "ShapeCheck",
    "Call",
    "CallExpired",
    "CallTimings",
    "DataClient",
    "FunctionOptions",
    "DETERMINISTIC_ERRORS",
    "EdgeDeclaration",
    "OutputChecks",
    "OutputMismatch",
    "HandlerContractError",
    "HandlerError",
    "HandlerFailed",
    "HandlerFailedPermanently",
    "Invocation",
    "WarmupContext",
    "WarmupFailed",
    "call_handler",
    "discard",
    "execute",
    "execute_batch",
    "function",
    "kwarg_name",
    "options_of",
    "route_outputs",
    "run_warmup_hook",
    "to_framework",
    "to_storable",
    "warm_up_call",
]
