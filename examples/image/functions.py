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

The backend helpers shared by the four examples (backend choice, host and CUDA views,
seeded stand-in weights, the model cache) live in ``faastube_examples.backend``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from faastube.sdk import function, kwarg_name
from faastube_examples.backend import ExampleBackend, as_cuda, to_host
from faastube_examples.models import dncnn_denoiser

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


def _build_model(torch: Any, torchvision: Any, name: str) -> Any:
    if name == "denoiser":
        model = dncnn_denoiser(torch)
    elif name == "resnet18":
        model = torchvision.models.resnet18(weights=None, num_classes=CLASSES)
    elif name == "resnet50":
        model = torchvision.models.resnet50(weights=None, num_classes=CLASSES)
    elif name == "mobilenet":
        model = torchvision.models.mobilenet_v3_large(weights=None, num_classes=CLASSES)
    else:
        raise KeyError(name)
    return model


_backend = ExampleBackend(seed=SEED, build_model=_build_model)


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
    shape = input_shape(_backend.default_scale() if scale is None else scale)
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def _classify(model: str, images: Any) -> Any:
    torch = _backend.torch()
    if torch is not None:
        x = as_cuda(torch, images)
        with torch.no_grad():
            return _backend.model(model, x.device.index)(x).contiguous()
    x = to_host(images)
    n, channels, side, _ = x.shape
    grid = STAND_IN_GRIDS[model]
    pooled = x.reshape(n, channels, grid, side // grid, grid, side // grid).mean(axis=(3, 5))
    return pooled.reshape(n, -1) @ _backend.weights(model, (channels * grid * grid, CLASSES))


# --- handlers -------------------------------------------------------------------------------------


@function(shapes="rank")
def denoise(images: Any) -> Any:
    """GPU: NHWC uint8 -> normalised NCHW float32 with the estimated noise removed."""
    torch = _backend.torch()
    if torch is not None:
        x = as_cuda(torch, images).permute(0, 3, 1, 2).float().div_(255.0)
        with torch.no_grad():
            x = (x - 0.1 * _backend.model("denoiser", x.device.index)(x)).clamp_(0, 1)
        mean = torch.as_tensor(MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.as_tensor(STD, device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).contiguous()
    x = to_host(images).astype(np.float32) / 255.0
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    side_h, side_w = x.shape[1:3]
    smooth = sum(padded[:, dy:dy + side_h, dx:dx + side_w] for dy in range(3) for dx in range(3)) / 9.0
    return np.ascontiguousarray(((smooth - MEAN) / STD).astype(np.float32).transpose(0, 3, 1, 2))


@function(shapes="rank")
def classify_resnet18(images: Any) -> Any:
    """GPU: ResNet-18 logits."""
    return _classify("resnet18", images)


@function(shapes="rank")
def classify_resnet50(images: Any) -> Any:
    """GPU: ResNet-50 logits."""
    return _classify("resnet50", images)


@function(shapes="rank")
def classify_mobilenet(images: Any) -> Any:
    """GPU: MobileNetV3-Large logits."""
    return _classify("mobilenet", images)


@function(shapes="rank")
def aggregate(**logits: Any) -> np.ndarray:
    """CPU: average the classifiers' softmax probabilities (a soft-voting ensemble)."""
    expected = {kwarg_name(name) for name in CLASSIFIERS}
    if set(logits) != expected:
        raise TypeError(f"aggregate expects the keyword arguments {sorted(expected)}, got {sorted(logits)}")
    total = np.zeros((), dtype=np.float64)
    for name in CLASSIFIERS:
        z = to_host(logits[kwarg_name(name)]).astype(np.float64)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        total = total + z / z.sum(axis=1, keepdims=True)
    return (total / len(CLASSIFIERS)).astype(np.float32)
