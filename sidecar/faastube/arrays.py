"""Array interop: see what an array is and where its bytes live, without copying.

Accepted: NumPy arrays, CuPy arrays, torch tensors (CPU or CUDA), and anything
speaking DLPack, ``__cuda_array_interface__`` or ``__array_interface__``. GPU data
is described by its device pointer and is never staged through host memory.
CuPy and torch are imported only when such an array shows up.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from faastube import errors

_DLPACK_CPU = 1
_DLPACK_CUDA = 2


@dataclass(frozen=True, slots=True)
class HostArray:
    array: np.ndarray           # C-contiguous


@dataclass(frozen=True, slots=True)
class CudaArray:
    ptr: int
    nbytes: int
    dtype: np.dtype
    shape: tuple[int, ...]
    device: int                 # this process's CUDA ordinal
    keepalive: Any              # holds the memory while we copy from it
    stream: int = 0             # the stream its producer works on: copies are queued there


def _contiguous(a: np.ndarray) -> np.ndarray:
    # np.ascontiguousarray turns 0-d arrays into 1-d ones: keep the shape.
    a = np.asarray(a)
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def _torch_tensor(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def describe(obj: Any) -> HostArray | CudaArray:
    """Where obj's bytes are, as a contiguous array (copying only to make it contiguous)."""
    if isinstance(obj, np.ndarray):
        return HostArray(_contiguous(obj))
    cupy_module = sys.modules.get("cupy")
    if cupy_module is not None and type(obj) is cupy_module.ndarray and obj.flags.c_contiguous:
        # The common case, read from the array's attributes (its interface dict costs more).
        device = obj.data.device_id
        return CudaArray(obj.data.ptr, obj.nbytes, obj.dtype, obj.shape, device, obj,
                         _current_stream(cupy_module, device))
    if _torch_tensor(obj):
        obj = obj.detach()
        if obj.device.type == "cpu":
            return HostArray(_contiguous(obj.numpy()))
        obj = obj.contiguous()
        import torch

        # torch's allocator reuses memory in order on the tensor's current stream: copy on it.
        stream = int(torch.cuda.current_stream(obj.device).cuda_stream)
        described = _describe_cuda(obj)
        return CudaArray(described.ptr, described.nbytes, described.dtype, described.shape, described.device,
                         described.keepalive, stream)
    if hasattr(obj, "__cuda_array_interface__"):
        return _describe_cuda(obj)
    if hasattr(obj, "__dlpack_device__"):
        device_type, _ = obj.__dlpack_device__()
        if device_type == _DLPACK_CPU:
            return HostArray(_contiguous(np.from_dlpack(obj)))
        if device_type == _DLPACK_CUDA:
            import cupy

            return _describe_cuda(cupy.from_dlpack(obj))
        raise errors.InvalidRequest(f"unsupported DLPack device type {device_type} (CPU and CUDA only)")
    if hasattr(obj, "__array_interface__") or hasattr(obj, "__array__"):
        return HostArray(_contiguous(np.asarray(obj)))
    raise errors.InvalidRequest(
        f"cannot pass a {type(obj).__name__}: expected a NumPy/CuPy array, a torch tensor, or an object "
        "with __dlpack__, __cuda_array_interface__ or __array_interface__")


def _describe_cuda(obj: Any) -> CudaArray:
    cai = obj.__cuda_array_interface__
    shape = tuple(int(d) for d in cai["shape"])
    dtype = np.dtype(cai["typestr"])
    strides = cai.get("strides")
    if strides is not None and strides != _c_strides(shape, dtype.itemsize):
        import cupy

        obj = cupy.ascontiguousarray(cupy.asarray(obj))
        return _describe_cuda(obj)
    ptr = int(cai["data"][0])
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    device = _device_of(ptr)
    stream = cai.get("stream")
    if not isinstance(stream, int) or isinstance(stream, bool) or stream <= 0:
        # No stream named (1 and 2 are CUDA's legacy and per-thread default streams, usable as they
        # are): CuPy's current stream of that device.
        import cupy

        stream = _current_stream(cupy, device)
    return CudaArray(ptr, nbytes, dtype, shape, device, obj, stream)


def _current_stream(cupy: Any, device: int) -> int:
    if cupy.cuda.runtime.getDevice() == device:
        return int(cupy.cuda.get_current_stream().ptr)
    with cupy.cuda.Device(device):
        return int(cupy.cuda.get_current_stream().ptr)


def _c_strides(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    strides, step = [], itemsize
    for dim in reversed(shape):
        strides.append(step)
        step *= dim
    return tuple(reversed(strides))


def _device_of(ptr: int) -> int:
    import cupy

    if ptr == 0:
        return int(cupy.cuda.runtime.getDevice())
    return int(cupy.cuda.runtime.pointerGetAttributes(ptr).device)
