"""Reading, verifying and storing the datasets (the data stage's I/O; no maths here).

Sources, in order of preference for users:
1. the genuine download through torchvision, which checks the archives' MD5 sums;
2. a local mirror folder (for offline machines) laid out like ``shared/data``:
   ``mnist/`` with the four IDX ``.gz`` files, and ``cifar10-jpeg/cifar10.npz``, each folder
   with a ``SHA256SUMS`` file. The CIFAR-10 mirror is a lossy JPEG copy and is labelled so.

Whatever is read is verified (checksums, IDX headers and lengths, shapes, label ranges) and
described in a provenance record (source, hashes, counts, pixel statistics).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

MIRROR_ENV = "PROVAE_DATA_MIRROR"
DATASETS = ("mnist", "cifar10")
NUM_CLASSES = 10

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# MD5 of the uncompressed canonical MNIST files (as torchvision and LeCun's site publish them).
CANONICAL_MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
CIFAR10_JPEG_FILE = "cifar10.npz"
LABELS = {"mnist": "MNIST", "cifar10": "CIFAR-10", "cifar10-jpeg": "CIFAR-10 (JPEG copy)"}


class DataError(RuntimeError):
    """Missing, corrupt or unexpected dataset files."""


@dataclass
class PreparedData:
    """uint8 images [N, C, H, W] and int64 labels [N] per split, plus where they came from."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    provenance: dict

    def images(self, split: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """Float images in [0, 1] for ``split`` ("train" or "test")."""
        if split not in ("train", "test"):
            raise ValueError(f"unknown split {split!r}; use 'train' or 'test'")
        return getattr(self, f"{split}_images").to(device=device, dtype=torch.float32) / 255.0


def check_dataset_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {list(DATASETS)}")


def _digest(data: bytes, algorithm: str) -> str:
    return hashlib.new(algorithm, data).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, read in blocks (prepared files run to hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_verified(folder: Path, name: str) -> bytes:
    """Read ``folder/name`` and check it against ``folder/SHA256SUMS``."""
    sums_path = folder / "SHA256SUMS"
    if not sums_path.is_file():
        raise DataError(f"{sums_path} is missing: a mirror folder must list the SHA-256 of its files")
    expected = {}
    for line in sums_path.read_text().splitlines():
        if line.strip():
            digest, filename = line.split(maxsplit=1)
            expected[filename.lstrip("*")] = digest
    path = folder / name
    if not path.is_file():
        raise DataError(f"{path} is missing")
    if name not in expected:
        raise DataError(f"{sums_path} has no entry for {name}")
    data = path.read_bytes()
    if _digest(data, "sha256") != expected[name]:
        raise DataError(f"{path} does not match its SHA-256 in {sums_path}: the file is corrupt or truncated")
    return data


def parse_idx(raw: bytes, name: str) -> np.ndarray:
    """Decode an uncompressed IDX file of unsigned bytes, checking its header against its length."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{name} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != header + int(np.prod(shape)):
        raise DataError(f"{name}: header says shape {shape}, but the file has {len(raw) - header} data bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _check_split(name: str, images: np.ndarray, labels: np.ndarray, image_shape: tuple[int, ...]) -> None:
    if images.ndim != 4 or images.shape[1:] != image_shape:
        raise DataError(f"{name}: images have shape {images.shape}, expected (N, {', '.join(map(str, image_shape))})")
    if labels.shape != (images.shape[0],):
        raise DataError(f"{name}: {labels.shape[0]} labels for {images.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DataError(f"{name}: labels outside 0..{NUM_CLASSES - 1}")


def read_mnist_mirror(folder: Path) -> tuple[dict[str, np.ndarray], dict]:
    arrays, files = {}, {}
    for split, (image_file, label_file) in MNIST_FILES.items():
        decoded = {}
        for base in (image_file, label_file):
            packed = _read_verified(folder, base + ".gz")
            try:
                raw = gzip.decompress(packed)
            except (OSError, EOFError) as error:
                raise DataError(f"{folder / (base + '.gz')} is not a valid gzip file: {error}") from error
            md5 = _digest(raw, "md5")
            files[base] = {"sha256_gz": _digest(packed, "sha256"), "md5": md5, "canonical": md5 == CANONICAL_MNIST_MD5[base]}
            decoded[base] = parse_idx(raw, base)
        arrays[f"{split}_images"] = decoded[image_file][:, None]
        arrays[f"{split}_labels"] = decoded[label_file]
        _check_split(f"MNIST {split}", arrays[f"{split}_images"], arrays[f"{split}_labels"], (1, 28, 28))
    genuine = all(f["canonical"] for f in files.values())
    return arrays, {"source": "mirror", "files": files, "genuine": genuine, "jpeg_copy": False,
                    "label": LABELS["mnist"] if genuine else "MNIST (non-canonical files)"}


def read_cifar10_jpeg_mirror(folder: Path) -> tuple[dict[str, np.ndarray], dict]:
    packed = _read_verified(folder, CIFAR10_JPEG_FILE)
    try:
        with np.load(folder / CIFAR10_JPEG_FILE) as npz:
            raw = {key: npz[key] for key in ("x_train", "y_train", "x_test", "y_test")}
    except (KeyError, ValueError, OSError) as error:
        raise DataError(f"{folder / CIFAR10_JPEG_FILE} lacks the arrays x_train/y_train/x_test/y_test: {error}") from error
    arrays = {}
    for split, suffix in (("train", "train"), ("test", "test")):
        images = raw[f"x_{suffix}"]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise DataError(f"CIFAR-10 {split}: expected uint8 (N, 32, 32, 3), got {images.dtype} {images.shape}")
        arrays[f"{split}_images"] = images.transpose(0, 3, 1, 2)  # HWC -> CHW
        arrays[f"{split}_labels"] = raw[f"y_{suffix}"].astype(np.int64).reshape(-1)
        _check_split(f"CIFAR-10 {split}", arrays[f"{split}_images"], arrays[f"{split}_labels"], (3, 32, 32))
    provenance = {"source": "mirror", "files": {CIFAR10_JPEG_FILE: {"sha256": _digest(packed, "sha256")}},
                  "genuine": False, "jpeg_copy": True, "label": LABELS["cifar10-jpeg"]}
    return arrays, provenance


def download_torchvision(name: str, root: Path) -> tuple[dict[str, np.ndarray], dict]:
    """The genuine datasets through torchvision (it verifies the archives' MD5 on download)."""
    from torchvision import datasets  # heavy import, only needed on this path

    cls = {"mnist": datasets.MNIST, "cifar10": datasets.CIFAR10}[name]
    arrays = {}
    try:
        for split in ("train", "test"):
            ds = cls(str(root), train=split == "train", download=True)
            images = np.asarray(ds.data)
            arrays[f"{split}_images"] = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
            arrays[f"{split}_labels"] = np.asarray(ds.targets, dtype=np.int64)
    except (RuntimeError, OSError) as error:  # torchvision raises RuntimeError on failed downloads
        raise DataError(
            f"downloading {name} with torchvision failed ({error}). Offline? Point {MIRROR_ENV} at a mirror folder "
            f"(see README, 'Data')."
        ) from error
    shape = (1, 28, 28) if name == "mnist" else (3, 32, 32)
    for split in ("train", "test"):
        _check_split(f"{name} {split}", arrays[f"{split}_images"], arrays[f"{split}_labels"], shape)
    return arrays, {"source": "torchvision", "files": {}, "genuine": True, "jpeg_copy": False, "label": LABELS[name]}


def pixel_statistics(images: np.ndarray) -> dict:
    """Per-channel mean and std of [0, 1] pixels, computed in float64."""
    scaled = images.astype(np.float64) / 255.0
    return {"mean": scaled.mean(axis=(0, 2, 3)).round(4).tolist(), "std": scaled.std(axis=(0, 2, 3)).round(4).tolist()}


def prepare(name: str, mirror: str | os.PathLike | None, download_root: str | os.PathLike) -> PreparedData:
    """Read ``name`` from ``mirror`` (if given) or torchvision, verify it and describe it."""
    check_dataset_name(name)
    if mirror:
        mirror = Path(mirror)
        folder = mirror / ("mnist" if name == "mnist" else "cifar10-jpeg")
        if not folder.is_dir():
            raise DataError(f"mirror {mirror} has no folder {folder.name}/ for {name}")
        arrays, provenance = (read_mnist_mirror if name == "mnist" else read_cifar10_jpeg_mirror)(folder)
    else:
        arrays, provenance = download_torchvision(name, Path(download_root))
    provenance.update(
        dataset=name,
        counts={split: int(arrays[f"{split}_images"].shape[0]) for split in ("train", "test")},
        train_class_counts=np.bincount(arrays["train_labels"], minlength=NUM_CLASSES).tolist(),
        train_pixels=pixel_statistics(arrays["train_images"]),
    )
    tensors = {key: torch.from_numpy(np.array(value, order="C")) for key, value in arrays.items()}
    return PreparedData(**tensors, provenance=provenance)


def save_prepared(data: PreparedData, path: str | os.PathLike) -> None:
    """Write an uncompressed .npz, byte-for-byte reproducible, atomically (no half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    arrays = {key: value.numpy() for key, value in data.__dict__.items() if key != "provenance"}
    with open(partial, "wb") as handle:
        np.savez(handle, provenance=np.array(json.dumps(data.provenance, sort_keys=True)), **arrays)
    partial.replace(path)


def load_prepared(path: str | os.PathLike) -> PreparedData:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prepared data {path} is missing: run the data stage first (dvc repro)")
    with np.load(path) as npz:
        provenance = json.loads(str(npz["provenance"]))
        tensors = {key: torch.from_numpy(npz[key]) for key in npz.files if key != "provenance"}
    return PreparedData(**tensors, provenance=provenance)
