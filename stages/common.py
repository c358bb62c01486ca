"""What every stage script needs: its params, JSON output, and one name per model."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
from pathlib import Path

import yaml


def load_params(path: str | os.PathLike = "params.yaml") -> dict:
    with open(path) as handle:
        return yaml.safe_load(handle)


def write_json(path: str | os.PathLike, payload: dict) -> None:
    """Atomic write: an interrupted stage never leaves a truncated file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    partial.replace(path)


def eps_value(text: str) -> float:
    """argparse type for eps: a finite number >= 0, with a message naming the problem."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"eps must be a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"eps must be finite and >= 0, got {text!r}")
    return value


def model_name(eps_train: float) -> str:
    return "VAE" if eps_train == 0 else f"proVAE eps_train={eps_train:g}"


def file_md5(path: str | os.PathLike) -> str:
    """MD5 of a file's bytes: the hash `dvc.lock` records, so a checkpoint can name the data it saw."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
