"""Video: split -> face-0 .. face-3 (in parallel) -> recognition.

The paper's video workflow: a clip is decoded and split into chunks, faces are
detected in each chunk in parallel, and one function recognises an actor among all
the faces found (fan-out of different data, then fan-in). The four face functions
share one handler (``detect_faces``); ``split`` returns a dict keyed by them, and
``recognition`` receives their outputs as keyword arguments ``face_0`` .. ``face_3``.

On a CUDA machine with torch and torchvision the GPU functions run ResNet-18 based
networks with random weights on CUDA tensors; elsewhere NumPy stand-ins do
comparable-shape work and return arrays of the same shapes and dtypes.

Shapes at full scale (32 frames of 1080p, 4 chunks of 8 frames, 8 faces per frame):

    request          uint8   (32, 270, 480, 3)     low-res clip (stands in for a compressed stream)
    split -> face-i  uint8   (8, 1080, 1920, 3)    49,766,400 B each (~50 MB)
    face-i           float32 (64, 3, 160, 160)     19,660,800 B each (~20 MB: face crops)
    recognition      float32 (256,)                similarity of every face to the actor

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
from faastube_examples.shapes import round_to_multiple

FRAMES = 32
FACE_FUNCTIONS = ("face-0", "face-1", "face-2", "face-3")
FACES_PER_FRAME = 8
DECODE_FACTOR = 4
FULL_HEIGHT, FULL_WIDTH = 1080, 1920
FULL_CROP_SIZE = 160       # FaceNet-style input side
FULL_CELL = 16             # the face detector's output stride
EMBEDDING = 128
SEED = 0
MEAN = np.array([0.5, 0.5, 0.5], dtype=np.float32)
STD = np.array([0.5, 0.5, 0.5], dtype=np.float32)

# --- backend: torch on CUDA when present, NumPy stand-ins otherwise ------------------------------


def _build_model(torch: Any, torchvision: Any, name: str) -> Any:
    if name == "face-detector":
        trunk = torchvision.models.resnet18(weights=None)
        # ResNet-18 up to layer3: stride 16, 256 channels; a 1x1 head scores "face here".
        model = torch.nn.Sequential(trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool, trunk.layer1,
                                    trunk.layer2, trunk.layer3, torch.nn.Conv2d(256, 1, 1))
    elif name == "face-embedder":
        model = torchvision.models.resnet18(weights=None, num_classes=EMBEDDING)
    else:
        raise KeyError(name)
    return model


_backend = ExampleBackend(seed=SEED, build_model=_build_model)


# --- shapes ---------------------------------------------------------------------------------------


def crop_size(frame_width: int) -> int:
    return round_to_multiple(frame_width * FULL_CROP_SIZE / FULL_WIDTH, 8, minimum=8)


def cell_size(frame_width: int) -> int:
    return round_to_multiple(frame_width * FULL_CELL / FULL_WIDTH, 4, minimum=4)


def input_shape(scale: float) -> tuple[int, ...]:
    height = max(4, round(FULL_HEIGHT / DECODE_FACTOR * scale))
    width = max(4, round(FULL_WIDTH / DECODE_FACTOR * scale))
    return (FRAMES, height, width, 3)


def edge_shapes(request_shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Each function's output (shape, dtype) for a request of ``request_shape``."""
    frames, height, width, _ = request_shape
    height, width = height * DECODE_FACTOR, width * DECODE_FACTOR
    per_chunk = frames // len(FACE_FUNCTIONS)
    crop = crop_size(width)
    shapes: dict[str, tuple[tuple[int, ...], str]] = {
        "split": ((per_chunk, height, width, 3), "uint8"),
        "recognition": ((frames * FACES_PER_FRAME,), "float32"),
    }
    for name in FACE_FUNCTIONS:
        shapes[name] = ((per_chunk * FACES_PER_FRAME, 3, crop, crop), "float32")
    return shapes


def make_input(*, scale: float | None = None, seed: int = SEED) -> np.ndarray:
    """A request: a low-resolution uint8 clip that ``split`` expands to 1080p frames."""
    shape = input_shape(_backend.default_scale() if scale is None else scale)
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def _face_centres(heat: np.ndarray, cell: int) -> list[list[tuple[int, int]]]:
    """Per frame, the pixel centres of the FACES_PER_FRAME strongest cells."""
    n, _, cells_w = heat.shape
    top = np.argpartition(heat.reshape(n, -1), -FACES_PER_FRAME, axis=1)[:, -FACES_PER_FRAME:]
    return [[(int(c) // cells_w * cell + cell // 2, int(c) % cells_w * cell + cell // 2)
             for c in np.sort(top[f])] for f in range(n)]


def _window(centre: int, crop: int, limit: int) -> int:
    return min(max(centre - crop // 2, 0), limit - crop)


# --- handlers -------------------------------------------------------------------------------------


@function(shapes="rank")
def split(clip: Any) -> dict[str, np.ndarray]:
    """CPU: decode the clip to full-resolution frames and cut it into one chunk per face function."""
    frames = np.repeat(np.repeat(to_host(clip), DECODE_FACTOR, axis=1), DECODE_FACTOR, axis=2)
    chunks = np.array_split(frames, len(FACE_FUNCTIONS), axis=0)
    return dict(zip(FACE_FUNCTIONS, chunks, strict=True))


@function(shapes="rank")
def detect_faces(frames: Any) -> Any:
    """GPU: score face likelihood per cell and crop the strongest FACES_PER_FRAME per frame."""
    n, height, width, _ = frames.shape
    crop = crop_size(width)
    torch = _backend.torch()
    if torch is not None:
        x = as_cuda(torch, frames).permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.as_tensor(MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.as_tensor(STD, device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std
        with torch.no_grad():
            heat = _backend.model("face-detector", x.device.index)(x)[:, 0]
        stride = -(-height // heat.shape[1])
        centres = _face_centres(heat.float().cpu().numpy(), stride)
        crops = [x[f, :, _window(cy, crop, height):_window(cy, crop, height) + crop,
                   _window(cx, crop, width):_window(cx, crop, width) + crop]
                 for f in range(n) for cy, cx in centres[f]]
        return torch.stack(crops).contiguous()
    host = (to_host(frames).astype(np.float32) / 255.0 - MEAN) / STD
    cell = cell_size(width)
    rows, cols = height // cell, width // cell
    blocks = host[:, :rows * cell, :cols * cell].reshape(n, rows, cell, cols, cell, 3).mean(axis=(2, 4))
    heat = blocks @ _backend.weights("face-detector", (3,))
    out = np.empty((n * FACES_PER_FRAME, 3, crop, crop), dtype=np.float32)
    for f, frame_centres in enumerate(_face_centres(heat, cell)):
        for k, (cy, cx) in enumerate(frame_centres):
            y0, x0 = _window(cy, crop, height), _window(cx, crop, width)
            out[f * FACES_PER_FRAME + k] = host[f, y0:y0 + crop, x0:x0 + crop].transpose(2, 0, 1)
    return out


@function(shapes="rank")
def recognition(**faces: Any) -> Any:
    """GPU: embed every face (fan-in of all chunks) and score its similarity to the actor."""
    expected = {kwarg_name(name) for name in FACE_FUNCTIONS}
    if set(faces) != expected:
        raise TypeError(f"recognition expects the keyword arguments {sorted(expected)}, got {sorted(faces)}")
    ordered = [faces[kwarg_name(name)] for name in FACE_FUNCTIONS]
    actor = np.random.default_rng([SEED, 1]).standard_normal(EMBEDDING).astype(np.float32)
    actor /= np.linalg.norm(actor)
    torch = _backend.torch()
    if torch is not None:
        x = torch.cat([as_cuda(torch, f) for f in ordered])
        with torch.no_grad():
            embedding = torch.nn.functional.normalize(_backend.model("face-embedder", x.device.index)(x), dim=1)
            return (embedding @ torch.as_tensor(actor, device=x.device)).contiguous()
    x = np.concatenate([to_host(f) for f in ordered])
    m, channels, side, _ = x.shape
    grid = 4
    pooled = x.reshape(m, channels, grid, side // grid, grid, side // grid).mean(axis=(3, 5))
    embedding = pooled.reshape(m, -1) @ _backend.weights("face-embedder", (channels * grid * grid, EMBEDDING))
    embedding /= np.maximum(np.linalg.norm(embedding, axis=1, keepdims=True), 1e-12)
    return (embedding @ actor).astype(np.float32)
