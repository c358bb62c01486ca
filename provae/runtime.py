"""Seeding and device choice: one helper each, shared by stages, tests and benchmarks."""

from __future__ import annotations

import random

import torch


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python and torch; return a CPU generator for the caller's own draws."""
    random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` picks CUDA when present, else CPU; anything else must name an available device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use 'auto' or 'cpu'")
    return device
