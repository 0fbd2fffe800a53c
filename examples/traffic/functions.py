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

The backend helpers shared by the four examples (backend choice, host and CUDA views,
seeded stand-in weights, the model cache) live in ``faastube_examples.backend``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from faastube.sdk import function, output
from faastube_examples.backend import ExampleBackend, as_cuda, to_host
from faastube_examples.shapes import round_to_multiple

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


def _build_model(torch: Any, torchvision: Any, name: str) -> Any:
    if name == "detector":
        trunk = torchvision.models.resnet18(weights=None)
        # ResNet-18 up to layer2: stride 8, 128 channels; a 1x1 head scores objectness per cell.
        model = torch.nn.Sequential(trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool,
                                    trunk.layer1, trunk.layer2, torch.nn.Conv2d(128, 1, 1))
    elif name == "recognizer":
        model = torchvision.models.resnet50(weights=None, num_classes=CLASSES)
    else:
        raise KeyError(name)
    return model


_backend = ExampleBackend(seed=SEED, build_model=_build_model)


# --- shapes ---------------------------------------------------------------------------------------


def detect_size(frame_width: int) -> int:
    return round_to_multiple(frame_width * FULL_DETECT_SIZE / FULL_WIDTH, 32, minimum=32)


def crop_size(detect_side: int) -> int:
    return round_to_multiple(detect_side * FULL_CROP_SIZE / FULL_DETECT_SIZE, 8, minimum=8)


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
    shape = input_shape(_backend.default_scale() if scale is None else scale)
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


# --- handlers -------------------------------------------------------------------------------------


@function(shapes="rank")
def decode(clip: Any) -> np.ndarray:
    """CPU: expand the clip to full-resolution RGB frames (a codec's output size and layout)."""
    clip = to_host(clip)
    n, h, w, c = clip.shape
    # Decode straight into pool memory: under the runtime the 130 MB of frames are
    # published without a copy (faastube.output is a plain array elsewhere).
    frames = output((n, h * DECODE_FACTOR, w * DECODE_FACTOR, c), clip.dtype)
    frames.reshape(n, h, DECODE_FACTOR, w, DECODE_FACTOR, c)[...] = clip[:, :, None, :, None, :]
    return frames


@function(shapes="rank")
def preprocess(frames: Any) -> Any:
    """GPU: resize to the detector's square input, scale to [0, 1] and normalise, NCHW float32."""
    _frames_n, height, width, _ = frames.shape
    side = detect_size(width)
    torch = _backend.torch()
    if torch is not None:
        x = as_cuda(torch, frames).permute(0, 3, 1, 2).float().div_(255.0)
        with torch.no_grad():
            x = torch.nn.functional.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
        mean = torch.as_tensor(MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.as_tensor(STD, device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).contiguous()
    frames = to_host(frames)
    rows = np.arange(side) * height // side
    cols = np.arange(side) * width // side
    resized = frames[:, rows][:, :, cols].astype(np.float32) / 255.0
    normalised = (resized - MEAN) / STD
    return np.ascontiguousarray(normalised.transpose(0, 3, 1, 2))


@function(shapes="rank")
def detection(images: Any) -> Any:
    """GPU: dense objectness at stride 8, upsampled and stacked on the image as a 4th channel."""
    torch = _backend.torch()
    if torch is not None:
        x = as_cuda(torch, images)
        with torch.no_grad():
            logits = _backend.model("detector", x.device.index)(x)
            heat = torch.sigmoid(torch.nn.functional.interpolate(
                logits, size=x.shape[-2:], mode="bilinear", align_corners=False))
            return torch.cat([x, heat], dim=1).contiguous()
    x = to_host(images)
    n, channels, side, _ = x.shape
    cells = side // HEAT_STRIDE
    # A stride-8 patch convolution: each 8x8x3 patch -> one objectness logit.
    patches = x.reshape(n, channels, cells, HEAT_STRIDE, cells, HEAT_STRIDE).transpose(0, 2, 4, 1, 3, 5)
    logits = patches.reshape(n, cells, cells, -1) @ _backend.weights("detector", (channels * HEAT_STRIDE**2,))
    heat = 1.0 / (1.0 + np.exp(-logits))
    heat = np.repeat(np.repeat(heat, HEAT_STRIDE, axis=1), HEAT_STRIDE, axis=2)
    return np.concatenate([x, heat[:, None].astype(np.float32)], axis=1)


@function(shapes="rank")
def postprocess(detections: Any) -> np.ndarray:
    """CPU: take the K strongest cells per frame and crop a recognition-sized window around each."""
    x = to_host(detections)
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


@function(shapes="rank")
def recognition(crops: Any) -> Any:
    """GPU: classify every crop (ResNet-50 on CUDA; a pooled linear classifier on a CPU)."""
    torch = _backend.torch()
    if torch is not None:
        x = as_cuda(torch, crops)
        with torch.no_grad():
            return _backend.model("recognizer", x.device.index)(x).contiguous()
    x = to_host(crops)
    m, channels, side, _ = x.shape
    grid = 4
    pooled = x.reshape(m, channels, grid, side // grid, grid, side // grid).mean(axis=(3, 5))
    return pooled.reshape(m, -1) @ _backend.weights("recognizer", (channels * grid * grid, CLASSES))
