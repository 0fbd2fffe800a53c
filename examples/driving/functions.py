"""Driving: denoise -> segmentation -> blur.

The paper's driving workflow: clean up camera frames, segment them semantically
(19 Cityscapes classes), then blur people for privacy and colour the output by
class. All three are GPU functions. On a CUDA machine with torch and torchvision
they run on CUDA tensors (a small DnCNN-style denoiser and DeepLabV3-MobileNetV3,
random weights, nothing downloaded); elsewhere NumPy stand-ins do comparable-shape
work and return arrays of the same shapes and dtypes.

Shapes at full scale (N = 4 frames of 1024 x 2048, the Cityscapes resolution):

    request       uint8   (4, 1024, 2048, 3)   noisy camera frames
    denoise       float32 (4, 3, 1024, 2048)   100,663,296 B (~101 MB)
    segmentation  float32 (4, 4, 1024, 2048)   134,217,728 B (~134 MB: RGB + class id)
    blur          uint8   (4, 1024, 2048, 3)   the coloured, privacy-blurred frames

Handlers derive their output shapes from their inputs; only ``make_input`` reads the
scale (``FAASTUBE_EXAMPLE_SCALE``).

The backend helpers shared by the four examples (backend choice, host and CUDA views,
seeded stand-in weights, the model cache) live in ``faastube_examples.backend``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from faastube.sdk import function
from faastube_examples.backend import ExampleBackend, as_cuda, to_host
from faastube_examples.models import dncnn_denoiser

FRAMES = 4
FULL_HEIGHT, FULL_WIDTH = 1024, 2048
CLASSES = 19               # Cityscapes train ids
PRIVATE_CLASSES = (11, 12)  # person, rider: blurred in the output
PATCH = 8                  # the stand-in segmenter's patch side
BLUR_RADIUS = 4            # a (2r+1) x (2r+1) box blur
SEED = 0
# Cityscapes colours by train id.
PALETTE = np.array([
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70),
    (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32)], dtype=np.float32) / 255.0

# --- backend: torch on CUDA when present, NumPy stand-ins otherwise ------------------------------


def _build_model(torch: Any, torchvision: Any, name: str) -> Any:
    if name == "denoiser":
        model = dncnn_denoiser(torch)
    elif name == "segmenter":
        model = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(
            weights=None, weights_backbone=None, num_classes=CLASSES, aux_loss=False)
    else:
        raise KeyError(name)
    return model


_backend = ExampleBackend(seed=SEED, build_model=_build_model)


# --- shapes ---------------------------------------------------------------------------------------


def input_shape(scale: float) -> tuple[int, ...]:
    height = PATCH * max(4, round(FULL_HEIGHT / PATCH * scale))
    width = PATCH * max(4, round(FULL_WIDTH / PATCH * scale))
    return (FRAMES, height, width, 3)


def edge_shapes(request_shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Each function's output (shape, dtype) for a request of ``request_shape``."""
    frames, height, width, _ = request_shape
    return {
        "denoise": ((frames, 3, height, width), "float32"),
        "segmentation": ((frames, 4, height, width), "float32"),
        "blur": ((frames, height, width, 3), "uint8"),
    }


def make_input(*, scale: float | None = None, seed: int = SEED) -> np.ndarray:
    """A request: noisy uint8 camera frames (a smooth gradient scene plus noise)."""
    frames, height, width, _ = input_shape(_backend.default_scale() if scale is None else scale)
    rng = np.random.default_rng(seed)
    ys = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    xs = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    scene = 0.5 * ys + 0.3 * xs + np.array([0.1, 0.2, 0.15], dtype=np.float32)
    noisy = scene[None] + rng.normal(0, 0.08, size=(frames, height, width, 3)).astype(np.float32)
    return (np.clip(noisy, 0, 1) * 255).astype(np.uint8)


def _box_blur(x: np.ndarray, radius: int, axes: tuple[int, int]) -> np.ndarray:
    """Mean over a (2r+1)^2 window via cumulative sums (edges replicate)."""
    out = x.astype(np.float32)
    for axis in axes:
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius + 1, radius)
        summed = np.cumsum(np.pad(out, pad, mode="edge"), axis=axis)
        n = out.shape[axis]
        hi = np.take(summed, np.arange(2 * radius + 1, 2 * radius + 1 + n), axis=axis)
        lo = np.take(summed, np.arange(0, n), axis=axis)
        out = ((hi - lo) / (2 * radius + 1)).astype(np.float32)
    return out


# --- handlers -------------------------------------------------------------------------------------


@function(shapes="rank")
def denoise(frames: Any) -> Any:
    """GPU: NHWC uint8 -> NCHW float32 in [0, 1] with the estimated noise removed."""
    torch = _backend.torch()
    if torch is not None:
        x = as_cuda(torch, frames).permute(0, 3, 1, 2).float().div_(255.0)
        with torch.no_grad():
            return (x - 0.1 * _backend.model("denoiser", x.device.index)(x)).clamp_(0, 1).contiguous()
    x = to_host(frames).astype(np.float32) / 255.0
    return np.ascontiguousarray(_box_blur(x, 1, axes=(1, 2)).transpose(0, 3, 1, 2))


@function(shapes="rank")
def segmentation(images: Any) -> Any:
    """GPU: per-pixel class (19 classes), stacked on the image as a 4th channel."""
    torch = _backend.torch()
    if torch is not None:
        x = as_cuda(torch, images)
        with torch.no_grad():
            logits = _backend.model("segmenter", x.device.index)(x)["out"]
            classes = logits.argmax(dim=1, keepdim=True).float()
            return torch.cat([x, classes], dim=1).contiguous()
    x = to_host(images)
    n, channels, height, width = x.shape
    patches = x.reshape(n, channels, height // PATCH, PATCH, width // PATCH, PATCH).transpose(0, 2, 4, 1, 3, 5)
    logits = patches.reshape(n, height // PATCH, width // PATCH, -1) @ \
        _backend.weights("segmenter", (channels * PATCH * PATCH, CLASSES))
    classes = np.repeat(np.repeat(logits.argmax(axis=-1), PATCH, axis=1), PATCH, axis=2)
    return np.concatenate([x, classes[:, None].astype(np.float32)], axis=1)


@function(shapes="rank")
def blur(segmented: Any) -> Any:
    """GPU: blur people, tint every pixel by its class colour, return NHWC uint8 frames."""
    torch = _backend.torch()
    if torch is not None:
        x = as_cuda(torch, segmented)
        with torch.no_grad():
            rgb, classes = x[:, :3], x[:, 3:].long()
            blurred = torch.nn.functional.avg_pool2d(rgb, 2 * BLUR_RADIUS + 1, stride=1,
                                                     padding=BLUR_RADIUS, count_include_pad=False)
            private = torch.zeros_like(classes, dtype=torch.bool)
            for cls in PRIVATE_CLASSES:
                private |= classes == cls
            rgb = torch.where(private, blurred, rgb)
            palette = torch.as_tensor(PALETTE, device=x.device)
            colour = palette[classes[:, 0]].permute(0, 3, 1, 2)
            out = (0.6 * rgb + 0.4 * colour).clamp_(0, 1).mul_(255).to(torch.uint8)
            return out.permute(0, 2, 3, 1).contiguous()
    x = to_host(segmented)
    rgb = x[:, :3]
    classes = x[:, 3].astype(np.int64)
    blurred = _box_blur(rgb, BLUR_RADIUS, axes=(2, 3))
    private = np.isin(classes, PRIVATE_CLASSES)[:, None]
    rgb = np.where(private, blurred, rgb)
    colour = PALETTE[classes].transpose(0, 3, 1, 2)
    out = np.clip(0.6 * rgb + 0.4 * colour, 0, 1) * 255
    return np.ascontiguousarray(out.astype(np.uint8).transpose(0, 2, 3, 1))
