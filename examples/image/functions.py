"""Image: denoise -> three classifiers in parallel -> aggregation.

The paper's image workflow: one denoised batch is read by three classifiers at
once (one stored object with three readers, fan-out of the same data), and an
ensemble step averages their class probabilities (fan-in: ``aggregate`` receives
keyword arguments ``classify_resnet18``, ``classify_resnet50``, ``classify_mobilenet``).

On a CUDA machine with torch and torchvision the GPU functions run torchvision
ResNet-18, ResNet-50 and MobileNetV3-Large with random weights (nothing is
downloaded) on CUDA tensors; elsewhere NumPy stand-ins do comparable-shape work and
return arrays of the same shapes and dtypes.

Shapes at full scale (a batch of 64 ImageNet-sized images):

    request              uint8   (64, 224, 224, 3)
    denoise              float32 (64, 3, 224, 224)   38,535,168 B (~38.5 MB), read by 3 classifiers
    classify-*           float32 (64, 1000)          256,000 B each: logits
    aggregate            float32 (64, 1000)          ensemble class probabilities

Handlers derive their output shapes from their inputs; only ``make_input`` reads the
scale (``FAASTUBE_EXAMPLE_SCALE``).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np
from faastube.sdk import function, kwarg_name

BATCH = 64
FULL_SIDE = 224
CLASSES = 1000
CLASSIFIERS = ("classify-resnet18", "classify-resnet50", "classify-mobilenet")
# The stand-ins pool to a different grid per model, so the three disagree like real models do.
STAND_IN_GRIDS = {"resnet18": 2, "resnet50": 4, "mobilenet": 8}
SEED = 0
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

# --- backend: torch on CUDA when present, NumPy stand-ins otherwise ------------------------------


@functools.cache
def _torch() -> Any:
    """torch, when GPU handlers should run on CUDA; None for the NumPy stand-ins.

    ``FAASTUBE_EXAMPLE_BACKEND`` = ``auto`` (default), ``torch`` (fail if unusable) or ``numpy``.
    """
    choice = os.environ.get("FAASTUBE_EXAMPLE_BACKEND", "auto")
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


def default_scale() -> float:
    """``FAASTUBE_EXAMPLE_SCALE``, else 1.0 on a CUDA machine and 0.1 (linear) on a CPU."""
    raw = os.environ.get("FAASTUBE_EXAMPLE_SCALE")
    if raw is None:
        return 1.0 if _torch() is not None else 0.1
    value = float(raw)
    if not 0 < value <= 1:
        raise ValueError(f"FAASTUBE_EXAMPLE_SCALE must be in (0, 1], got {raw!r}")
    return value


def _host(array: Any) -> np.ndarray:
    if isinstance(array, np.ndarray):
        return array
    if hasattr(array, "detach"):
        return np.asarray(array.detach().cpu().numpy())
    return np.asarray(array.get())  # CuPy


def _cuda(torch: Any, array: Any) -> Any:
    """A CUDA tensor viewing ``array`` (CuPy/DLPack: zero-copy; NumPy: copied to the device)."""
    if isinstance(array, torch.Tensor):
        return array if array.is_cuda else array.cuda()
    if isinstance(array, np.ndarray):
        return torch.from_numpy(array).cuda()
    return torch.from_dlpack(array)


@functools.cache
def _weights(name: str, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng([SEED, sum(map(ord, name))])
    return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)


@functools.cache
def _model(name: str, device: int) -> Any:
    torch = _torch()
    import torchvision

    torch.manual_seed(SEED)
    if name == "denoiser":
        # DnCNN-style: a few 3x3 convolutions estimate the noise, which is subtracted.
        model = torch.nn.Sequential(
            torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(inplace=True),
            torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(inplace=True),
            torch.nn.Conv2d(32, 3, 3, padding=1))
    elif name == "resnet18":
        model = torchvision.models.resnet18(weights=None, num_classes=CLASSES)
    elif name == "resnet50":
        model = torchvision.models.resnet50(weights=None, num_classes=CLASSES)
    elif name == "mobilenet":
        model = torchvision.models.mobilenet_v3_large(weights=None, num_classes=CLASSES)
    else:
        raise KeyError(name)
    return model.eval().to(f"cuda:{device}")


# --- shapes ---------------------------------------------------------------------------------------


def input_shape(scale: float) -> tuple[int, ...]:
    side = 8 * max(2, round(FULL_SIDE / 8 * scale))
    return (BATCH, side, side, 3)


def edge_shapes(request_shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Each function's output (shape, dtype) for a request of ``request_shape``."""
    batch, height, width, _ = request_shape
    shapes: dict[str, tuple[tuple[int, ...], str]] = {
        "denoise": ((batch, 3, height, width), "float32"),
        "aggregate": ((batch, CLASSES), "float32"),
    }
    for name in CLASSIFIERS:
        shapes[name] = ((batch, CLASSES), "float32")
    return shapes


def make_input(*, scale: float | None = None, seed: int = SEED) -> np.ndarray:
    """A request: a batch of uint8 RGB images."""
    shape = input_shape(default_scale() if scale is None else scale)
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def _classify(model: str, images: Any) -> Any:
    torch = _torch()
    if torch is not None:
        x = _cuda(torch, images)
        with torch.no_grad():
            return _model(model, x.device.index)(x).contiguous()
    x = _host(images)
    n, channels, side, _ = x.shape
    grid = STAND_IN_GRIDS[model]
    pooled = x.reshape(n, channels, grid, side // grid, grid, side // grid).mean(axis=(3, 5))
    return pooled.reshape(n, -1) @ _weights(model, (channels * grid * grid, CLASSES))


# --- handlers -------------------------------------------------------------------------------------


@function
def denoise(images: Any) -> Any:
    """GPU: NHWC uint8 -> normalised NCHW float32 with the estimated noise removed."""
    torch = _torch()
    if torch is not None:
        x = _cuda(torch, images).permute(0, 3, 1, 2).float().div_(255.0)
        with torch.no_grad():
            x = (x - 0.1 * _model("denoiser", x.device.index)(x)).clamp_(0, 1)
        mean = torch.as_tensor(MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.as_tensor(STD, device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).contiguous()
    x = _host(images).astype(np.float32) / 255.0
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    side_h, side_w = x.shape[1:3]
    smooth = sum(padded[:, dy:dy + side_h, dx:dx + side_w] for dy in range(3) for dx in range(3)) / 9.0
    return np.ascontiguousarray(((smooth - MEAN) / STD).astype(np.float32).transpose(0, 3, 1, 2))


@function
def classify_resnet18(images: Any) -> Any:
    """GPU: ResNet-18 logits."""
    return _classify("resnet18", images)


@function
def classify_resnet50(images: Any) -> Any:
    """GPU: ResNet-50 logits."""
    return _classify("resnet50", images)


@function
def classify_mobilenet(images: Any) -> Any:
    """GPU: MobileNetV3-Large logits."""
    return _classify("mobilenet", images)


@function
def aggregate(**logits: Any) -> np.ndarray:
    """CPU: average the classifiers' softmax probabilities (a soft-voting ensemble)."""
    expected = {kwarg_name(name) for name in CLASSIFIERS}
    if set(logits) != expected:
        raise TypeError(f"aggregate expects the keyword arguments {sorted(expected)}, got {sorted(logits)}")
    total = np.zeros((), dtype=np.float64)
    for name in CLASSIFIERS:
        z = _host(logits[kwarg_name(name)]).astype(np.float64)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        total = total + z / z.sum(axis=1, keepdims=True)
    return (total / len(CLASSIFIERS)).astype(np.float32)
