"""Where an example's GPU functions compute: torch on CUDA when present, NumPy stand-ins otherwise.

Each example module builds its own ``ExampleBackend``, so its caches (the backend choice, the
stand-in weights, the torch models) live and die with that module: a test that loads an
example afresh after changing ``FAASTUBE_EXAMPLE_BACKEND`` gets a fresh choice. Environment
variables are read on first use, never at import, so tests and the runtime can set them first.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

BACKEND_ENV = "FAASTUBE_EXAMPLE_BACKEND"
SCALE_ENV = "FAASTUBE_EXAMPLE_SCALE"

# (torch, torchvision, name) -> an nn.Module on the CPU; raises KeyError for an unknown name.
ModelBuilder = Callable[[Any, Any, str], Any]

_UNSET: Any = object()


def select_torch() -> Any:
    """torch, when GPU handlers should run on CUDA; None for the NumPy stand-ins.

    ``FAASTUBE_EXAMPLE_BACKEND`` = ``auto`` (default), ``torch`` (fail if unusable) or ``numpy``.
    Uncached: ``ExampleBackend.torch`` caches it per example.
    """
    choice = os.environ.get(BACKEND_ENV, "auto")
    if choice not in ("auto", "torch", "numpy"):
        raise ValueError(f"FAASTUBE_EXAMPLE_BACKEND must be auto, torch or numpy, got {choice!r}")
    if choice == "numpy":
        return None
    try:
        import torch
        import torchvision  # noqa: F401  (the GPU path needs both)
    except ImportError:
        if choice == "torch":
            raise
        return None
    if not torch.cuda.is_available():
        if choice == "torch":
            raise RuntimeError("FAASTUBE_EXAMPLE_BACKEND=torch but no CUDA device is visible")
        return None
    return torch


def to_host(array: Any) -> np.ndarray:
    """``array`` as a NumPy array: NumPy as is, torch tensors and CuPy arrays copied to the host."""
    if isinstance(array, np.ndarray):
        return array
    if hasattr(array, "detach"):
        return np.asarray(array.detach().cpu().numpy())
    return np.asarray(array.get())  # CuPy


def as_cuda(torch: Any, array: Any) -> Any:
    """A CUDA tensor viewing ``array`` (CuPy/DLPack: zero-copy; NumPy: copied to the device)."""
    if isinstance(array, torch.Tensor):
        return array if array.is_cuda else array.cuda()
    if isinstance(array, np.ndarray):
        return torch.from_numpy(array).cuda()
    return torch.from_dlpack(array)


class ExampleBackend:
    """One example's backend choice, seeded stand-in weights and cached torch models.

    ``seed`` seeds both the NumPy stand-in weights and ``torch.manual_seed`` before a
    model is built; ``build_model`` makes the example's architectures (random weights,
    nothing downloaded).
    """

    def __init__(self, *, seed: int, build_model: ModelBuilder) -> None:
        self.seed = seed
        self._build_model = build_model
        self._torch: Any = _UNSET
        self._weights: dict[tuple[str, tuple[int, ...]], np.ndarray] = {}
        self._models: dict[tuple[str, int], Any] = {}

    def torch(self) -> Any:
        """torch, when GPU handlers should run on CUDA; None for the NumPy stand-ins.

        Chosen by ``select_torch`` on first use, then kept (a failed choice is not kept).
        """
        if self._torch is _UNSET:
            self._torch = select_torch()
        return self._torch

    def default_scale(self) -> float:
        """``FAASTUBE_EXAMPLE_SCALE``, else 1.0 on a CUDA machine and 0.1 (linear) on a CPU."""
        raw = os.environ.get(SCALE_ENV)
        if raw is None:
            return 1.0 if self.torch() is not None else 0.1
        value = float(raw)
        if not 0 < value <= 1:
            raise ValueError(f"FAASTUBE_EXAMPLE_SCALE must be in (0, 1], got {raw!r}")
        return value

    def weights(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """Fixed stand-in weights for ``name``: seeded normal, scaled by 1/sqrt(shape[0])."""
        key = (name, shape)
        cached = self._weights.get(key)
        if cached is None:
            rng = np.random.default_rng([self.seed, sum(map(ord, name))])
            cached = (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)
            self._weights[key] = cached
        return cached

    def model(self, name: str, device: int) -> Any:
        """The torch model ``name`` in eval mode on ``cuda:{device}``, built once per device."""
        key = (name, device)
        cached = self._models.get(key)
        if cached is None:
            torch = self.torch()
            import torchvision

            torch.manual_seed(self.seed)
            cached = self._build_model(torch, torchvision, name).eval().to(f"cuda:{device}")
            self._models[key] = cached
        return cached
