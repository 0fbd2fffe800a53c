"""Torch architectures more than one example builds (random weights, nothing downloaded).

Each takes the ``torch`` module the backend chose, so importing this module imports no torch.
"""

from __future__ import annotations

from typing import Any


def dncnn_denoiser(torch: Any) -> Any:
    """DnCNN-style: a few 3x3 convolutions estimate the noise, which the caller subtracts."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(inplace=True),
        torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(inplace=True),
        torch.nn.Conv2d(32, 3, 3, padding=1))
