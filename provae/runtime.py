"""Seeding and device choice: one helper each, shared by stages, tests and benchmarks."""

from __future__ import annotations

import ctypes
import hashlib
import random

import torch


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python and torch; return a CPU generator for the caller's own draws."""
    random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` picks CUDA when present, else CPU; anything else must name an available device.

    On CUDA, float32 stays float32: TF32 (cuDNN's default for convolutions) rounds products to
    10-bit mantissas, and then a certificate computed on the GPU could differ from the same one
    recomputed on a CPU by far more than float32 rounding, which `make audit` relies on.
    """
    device = torch.device("cuda" if name == "auto" and torch.cuda.is_available() else "cpu" if name == "auto" else name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available; use 'auto' or 'cpu'")
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return device


def derived_seed(seed: int, purpose: str) -> int:
    """An independent seed per purpose (data order, noise, test subset, ...) from the one seed."""
    digest = hashlib.sha256(f"{seed}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def device_generator(device: torch.device, seed: int) -> torch.Generator:
    """A generator on ``device``: random draws made there stay reproducible without a host copy."""
    return torch.Generator(device=device).manual_seed(seed)


def reuse_freed_memory() -> bool:
    """On glibc, keep freed tensor buffers in the heap instead of handing them back to the OS.

    A training step allocates and frees many multi-megabyte activations; by default glibc serves
    each with mmap and unmaps it on free, so every step pays the page faults again. Raising the
    mmap and trim thresholds (mallopt) cut the proVAE CPU training step by about 15% here
    (benchmarks/step_times.py). Returns False, changing nothing, where libc is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
