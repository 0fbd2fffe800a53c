"""Traffic monitoring: decode -> preprocess -> detection -> postprocess -> recognition.

The paper's traffic workflow (YOLO detection, then ResNet recognition of persons
and cars). Each handler is a plain function over arrays. On a CUDA machine with
torch and torchvision, the GPU functions run torchvision networks with random
weights (nothing is downloaded) on CUDA tensors; elsewhere they run NumPy
stand-ins that do comparable-shape work and return arrays of the same shapes and
dtypes, so the data passed along every edge is the same either way.

Shapes at full scale (N = 21 frames, K = 11 objects per frame):

    request      uint8   (21, 270, 480, 3)     low-res clip (stands in for a compressed stream)
    decode       uint8   (21, 1080, 1920, 3)   130,636,800 B  (~130 MB)
    preprocess   float32 (21, 3, 736, 736)     136,507,392 B  (~137 MB)
    detection    float32 (21, 4, 736, 736)     182,009,856 B  (~182 MB: RGB + objectness heatmap)
    postprocess  float32 (231, 3, 224, 224)    139,087,872 B  (~139 MB: object crops)
    recognition  float32 (231, 1000)           logits per crop

Handlers derive their output shapes from their inputs; only ``make_input`` reads the
scale (``FAASTUBE_EXAMPLE_SCALE``), so every function of a run agrees on shapes.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np
from faastube.sdk import function

FRAMES = 21
OBJECTS_PER_FRAME = 11
DECODE_FACTOR = 4          # the "compressed" request is the clip at 1/4 resolution
FULL_HEIGHT, FULL_WIDTH = 1080, 1920
FULL_DETECT_SIZE = 736     # detector input side, a multiple of 32 (the backbone's stride)
FULL_CROP_SIZE = 224       # recognition input side
HEAT_STRIDE = 8            # the detector's output stride
CLASSES = 1000
SEED = 0
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

# --- backend: torch on CUDA when present, NumPy stand-ins otherwise ------------------------------


@functools.cache
def _torch() -> Any:
    """torch, when GPU handlers should run on CUDA; None for the NumPy stand-ins.

    ``FAASTUBE_EXAMPLE_BACKEND`` = ``auto`` (default), ``torch`` (fail if unusable) or ``numpy``.
    Read on first use, not at import, so tests and the runtime can set it first.
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
    if name == "detector":
        trunk = torchvision.models.resnet18(weights=None)
        # ResNet-18 up to layer2: stride 8, 128 channels; a 1x1 head scores objectness per cell.
        model = torch.nn.Sequential(trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool,
                                    trunk.layer1, trunk.layer2, torch.nn.Conv2d(128, 1, 1))
    elif name == "recognizer":
        model = torchvision.models.resnet50(weights=None, num_classes=CLASSES)
    else:
        raise KeyError(name)
    return model.eval().to(f"cuda:{device}")


# --- shapes ---------------------------------------------------------------------------------------


def _multiple(value: float, multiple: int, *, minimum: int) -> int:
    return max(minimum, multiple * round(value / multiple))


def detect_size(frame_width: int) -> int:
    return _multiple(frame_width * FULL_DETECT_SIZE / FULL_WIDTH, 32, minimum=32)


def crop_size(detect_side: int) -> int:
    return _multiple(detect_side * FULL_CROP_SIZE / FULL_DETECT_SIZE, 8, minimum=8)


def input_shape(scale: float) -> tuple[int, ...]:
    height = max(1, round(FULL_HEIGHT / DECODE_FACTOR * scale))
    width = max(1, round(FULL_WIDTH / DECODE_FACTOR * scale))
    return (FRAMES, height, width, 3)


def edge_shapes(request_shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Each function's output (shape, dtype) for a request of ``request_shape``."""
    frames, height, width, _ = request_shape
    height, width = height * DECODE_FACTOR, width * DECODE_FACTOR
    side = detect_size(width)
    crop = crop_size(side)
    return {
        "decode": ((frames, height, width, 3), "uint8"),
        "preprocess": ((frames, 3, side, side), "float32"),
        "detection": ((frames, 4, side, side), "float32"),
        "postprocess": ((frames * OBJECTS_PER_FRAME, 3, crop, crop), "float32"),
        "recognition": ((frames * OBJECTS_PER_FRAME, CLASSES), "float32"),
    }


def make_input(*, scale: float | None = None, seed: int = SEED) -> np.ndarray:
    """A request: a low-resolution uint8 clip that ``decode`` expands to 1080p frames."""
    shape = input_shape(default_scale() if scale is None else scale)
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


# --- handlers -------------------------------------------------------------------------------------


@function
def decode(clip: Any) -> np.ndarray:
    """CPU: expand the clip to full-resolution RGB frames (a codec's output size and layout)."""
    clip = _host(clip)
    return np.repeat(np.repeat(clip, DECODE_FACTOR, axis=1), DECODE_FACTOR, axis=2)


@function
def preprocess(frames: Any) -> Any:
    """GPU: resize to the detector's square input, scale to [0, 1] and normalise, NCHW float32."""
    _frames_n, height, width, _ = frames.shape
    side = detect_size(width)
    torch = _torch()
    if torch is not None:
        x = _cuda(torch, frames).permute(0, 3, 1, 2).float().div_(255.0)
        with torch.no_grad():
            x = torch.nn.functional.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
        mean = torch.as_tensor(MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.as_tensor(STD, device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).contiguous()
    frames = _host(frames)
    rows = np.arange(side) * height // side
    cols = np.arange(side) * width // side
    resized = frames[:, rows][:, :, cols].astype(np.float32) / 255.0
    normalised = (resized - MEAN) / STD
    return np.ascontiguousarray(normalised.transpose(0, 3, 1, 2))


@function
def detection(images: Any) -> Any:
    """GPU: dense objectness at stride 8, upsampled and stacked on the image as a 4th channel."""
    torch = _torch()
    if torch is not None:
        x = _cuda(torch, images)
        with torch.no_grad():
            logits = _model("detector", x.device.index)(x)
            heat = torch.sigmoid(torch.nn.functional.interpolate(
                logits, size=x.shape[-2:], mode="bilinear", align_corners=False))
            return torch.cat([x, heat], dim=1).contiguous()
    x = _host(images)
    n, channels, side, _ = x.shape
    cells = side // HEAT_STRIDE
    # A stride-8 patch convolution: each 8x8x3 patch -> one objectness logit.
    patches = x.reshape(n, channels, cells, HEAT_STRIDE, cells, HEAT_STRIDE).transpose(0, 2, 4, 1, 3, 5)
    logits = patches.reshape(n, cells, cells, -1) @ _weights("detector", (channels * HEAT_STRIDE**2,))
    heat = 1.0 / (1.0 + np.exp(-logits))
    heat = np.repeat(np.repeat(heat, HEAT_STRIDE, axis=1), HEAT_STRIDE, axis=2)
    return np.concatenate([x, heat[:, None].astype(np.float32)], axis=1)


@function
def postprocess(detections: Any) -> np.ndarray:
    """CPU: take the K strongest cells per frame and crop a recognition-sized window around each."""
    x = _host(detections)
    n, _, side, _ = x.shape
    crop = crop_size(side)
    heat = x[:, 3, HEAT_STRIDE // 2::HEAT_STRIDE, HEAT_STRIDE // 2::HEAT_STRIDE]
    cells = heat.shape[-1]
    top = np.argpartition(heat.reshape(n, -1), -OBJECTS_PER_FRAME, axis=1)[:, -OBJECTS_PER_FRAME:]
    crops = np.empty((n * OBJECTS_PER_FRAME, 3, crop, crop), dtype=np.float32)
    for frame in range(n):
        for k, cell in enumerate(np.sort(top[frame])):
            row, col = divmod(int(cell), cells)
            y0 = min(max(row * HEAT_STRIDE + HEAT_STRIDE // 2 - crop // 2, 0), side - crop)
            x0 = min(max(col * HEAT_STRIDE + HEAT_STRIDE // 2 - crop // 2, 0), side - crop)
            crops[frame * OBJECTS_PER_FRAME + k] = x[frame, :3, y0:y0 + crop, x0:x0 + crop]
    return crops


@function
def recognition(crops: Any) -> Any:
    """GPU: classify every crop (ResNet-50 on CUDA; a pooled linear classifier on a CPU)."""
    torch = _torch()
    if torch is not None:
        x = _cuda(torch, crops)
        with torch.no_grad():
            return _model("recognizer", x.device.index)(x).contiguous()
    x = _host(crops)
    m, channels, side, _ = x.shape
    grid = 4
    pooled = x.reshape(m, channels, grid, side // grid, grid, side // grid).mean(axis=(3, 5))
    return pooled.reshape(m, -1) @ _weights("recognizer", (channels * grid * grid, CLASSES))
