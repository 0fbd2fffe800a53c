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

This module is light on purpose (it runs inside function images): NumPy only;
CuPy and torch are imported lazily, only when a value of theirs shows up.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

import numpy as np

from faastube import errors

logger = logging.getLogger(__name__)

Framework = Literal["auto", "numpy", "cupy", "torch"]
Passing = Literal["tube", "host-centric"]
FRAMEWORKS: tuple[str, ...] = ("auto", "numpy", "cupy", "torch")
PASSINGS: tuple[str, ...] = ("tube", "host-centric")

# The reader name of the request's input (what the entry function receives) and of
# the exit's output (what the gateway reads). Neither is a DNS-1123 label, so they
# cannot collide with a function's name.
REQUEST_INPUT = "$input"
GATEWAY_READER = "$gateway"

_OPTIONS_ATTR = "__faastube_function__"

F = TypeVar("F", bound=Callable[..., Any])


class HandlerFailed(errors.RetryableError):
    """The handler raised; the runtime may retry the call on the same inputs."""


class CallExpired(errors.RetryableError):
    """The call finished after its deadline: its outputs were dropped, its inputs kept."""


class HandlerContractError(errors.InvalidRequest):
    """The handler returned something the calling convention does not allow; fix the handler."""


@dataclass(frozen=True, slots=True)
class FunctionOptions:
    """What ``@faastube.function(...)`` declared about a handler."""

    framework: Framework = "auto"


def function(fn: F | None = None, *, framework: Framework = "auto") -> Any:
    """Mark a handler as a FaaSTube function; usable bare or with options.

    ``framework`` picks the array type the handler receives: ``"auto"`` (NumPy for host
    data, CuPy for GPU data), ``"numpy"`` (always host arrays; GPU data is copied to the
    host), ``"cupy"`` or ``"torch"`` (zero-copy views of the same memory via DLPack).
    """
    if framework not in FRAMEWORKS:
        raise errors.InvalidRequest(f"framework must be one of {', '.join(FRAMEWORKS)}, got {framework!r}")
    options = FunctionOptions(framework=framework)

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


def execute(client: DataClient, handler: Callable[..., Any], *, inputs: Mapping[str, str],
            readers: Sequence[str], device: int | None = None, passing: Passing = "tube",
            ttl_s: float | None = None, deadline: float | None = None,
            held: dict[str, Any] | None = None) -> Invocation:
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
    """
    if passing not in PASSINGS:
        raise errors.InvalidRequest(f"passing must be one of {', '.join(PASSINGS)}, got {passing!r}")
    held = {} if held is None else held
    options = options_of(handler)
    started = time.perf_counter()
    views: dict[str, Any] = {}
    arrays: dict[str, Any] = {}
    for name, ref in inputs.items():
        if ref in held:
            views[ref] = held.pop(ref)
            array = views[ref]
            if device is not None and isinstance(array, np.ndarray) and passing == "host-centric":
                import cupy

                with cupy.cuda.Device(device):
                    array = cupy.asarray(array)
        else:
            views[ref], array = _fetch(client, ref, device=device, passing=passing)
        arrays[name] = to_framework(array, options.framework, device=device)
    fetched = time.perf_counter()
    outputs: dict[str, str] = {}
    stored: list[str] = []
    output_bytes = 0
    result: Any = None
    groups: Any = None
    # Handlers may write outputs straight into pool memory with ``output()`` (tube passing only:
    # the host-centric baseline copies, as such platforms do).
    arena = _OutputArena(client, device) if passing == "tube" else None
    try:
        token = _ARENA.set(arena)
        try:
            result = call_handler(handler, arrays)
        except Exception as e:
            # the handler's frames would keep its input views (and their reads) alive
            traceback.clear_frames(e.__traceback__)
            raise HandlerFailed(f"handler {getattr(handler, '__name__', handler)!r} raised "
                                f"{type(e).__name__}: {e}") from e
        finally:
            _ARENA.reset(token)
        groups = route_outputs(result, readers)
        _synchronize([array for array, _ in groups])
        computed = time.perf_counter()
        for array, group_readers in groups:
            written = arena.take(array) if arena is not None else None
            if written is not None:
                # Already in pool memory (from ``output()``): publish it, no copy.
                ref = client.seal(written, consumers=len(group_readers), ttl=ttl_s)
            else:
                ref = _store(client, array, consumers=len(group_readers), ttl_s=ttl_s, passing=passing)
            stored.append(ref)
            output_bytes += int(array.nbytes)
            outputs.update({r: ref for r in group_readers})
        put_done = time.perf_counter()
        if arena is not None:
            arena.free_unused()
        if deadline is not None and time.monotonic() > deadline:
            raise CallExpired(f"call finished {time.monotonic() - deadline:.3f}s after its deadline")
    except BaseException:
        if arena is not None:
            arena.free_unused()
        discard(client, stored)
        held.update(views)  # keep the reads open (uncounted) for a retry
        # nothing but ``held`` may reference the views: the caller decides when reads end
        views.clear()
        arrays.clear()
        array = result = groups = None
        raise
    for ref in inputs.values():
        try:
            client.release(ref)
        except (errors.RefNotFound, errors.InvalidRequest) as e:
            logger.debug("release of input %s: %s", ref, e)
    del views, arrays, result, groups
    released = time.perf_counter()
    return Invocation(outputs=outputs,
                      timings=CallTimings(get_s=fetched - started, compute_s=computed - fetched,
                                          put_s=(put_done - computed) + (released - put_done)),
                      output_bytes=output_bytes, refs=tuple(stored))


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
    "GATEWAY_READER",
    "output",
    "REQUEST_INPUT",
    "CallExpired",
    "CallTimings",
    "DataClient",
    "FunctionOptions",
    "HandlerContractError",
    "HandlerFailed",
    "Invocation",
    "call_handler",
    "discard",
    "execute",
    "function",
    "kwarg_name",
    "options_of",
    "route_outputs",
    "to_framework",
    "to_storable",
]
