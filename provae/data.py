"""Reading, verifying and storing the datasets (the data stage's I/O; no maths here).

Which datasets exist, and where each one comes from, is the registry's business
(:mod:`provae.datasets`). Sources, in order of preference for users:
1. the genuine download through torchvision, which checks the archives' MD5 sums;
2. a local mirror folder (for offline machines, ``$PROVAE_DATA_MIRROR``) laid out like
   ``shared/data``: one folder per dataset holding torchvision's raw files (or, for CIFAR-10,
   the lossy JPEG copy ``cifar10-jpeg/cifar10.npz``, labelled so) and a ``SHA256SUMS`` file.

Whatever is read is verified (checksums, file headers and lengths, shapes, label ranges) and
described in a provenance record (source, hashes, counts, pixel statistics). The readers below
are generic in the file format; the file names and reference checksums come from the registry,
whose mirror layouts name their reader (``READERS``) and pass it those as options.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from provae.datasets import DatasetSpec, MirrorLayout, Reader, get_dataset
from provae.files import atomic_write

MIRROR_ENV = "PROVAE_DATA_MIRROR"
SPLITS = ("train", "test")

# The MNIST family's IDX files, as torchvision downloads them (each gzipped, ``.gz`` added).
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DataError(RuntimeError):
    """Missing, corrupt or unexpected dataset files."""


@dataclass
class PreparedData:
    """uint8 images [N, C, H, W] and integer labels [N] per split, plus where they came from.

    Labels are int64, except from IDX files (the MNIST family), where they stay uint8 as stored.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    provenance: dict

    def images(self, split: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """Float images in [0, 1] for ``split`` ("train" or "test")."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use 'train' or 'test'")
        return getattr(self, f"{split}_images").to(device=device, dtype=torch.float32) / 255.0


def check_dataset_name(name: str) -> None:
    """Raise ``ValueError("unknown dataset 'name'; known: [...]")`` unless ``name`` is registered."""
    get_dataset(name)


def _digest(data: bytes, algorithm: str) -> str:
    return hashlib.new(algorithm, data).hexdigest()


def _read_verified(folder: Path, name: str) -> bytes:
    """Read ``folder/name`` and check it against ``folder/SHA256SUMS``."""
    sums_path = folder / "SHA256SUMS"
    if not sums_path.is_file():
        raise DataError(f"{sums_path} is missing: a mirror folder must list the SHA-256 of its files")
    expected = {}
    for line in sums_path.read_text().splitlines():
        if line.strip():
            try:
                digest, filename = line.split(maxsplit=1)
            except ValueError:
                raise DataError(f"{sums_path}: malformed line {line!r} (expected '<sha256>  <file>')") from None
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


def check_split(spec: DatasetSpec, split: str, images: np.ndarray, labels: np.ndarray, source: str = "") -> None:
    """Shapes against the registry's image shape, one label per image, labels in 0..classes-1."""
    where = f"{spec.label} {split}" + (f" ({source})" if source else "")
    if images.ndim != 4 or images.shape[1:] != spec.image_shape:
        raise DataError(f"{where}: images have shape {images.shape}, "
                        f"expected (N, {', '.join(map(str, spec.image_shape))})")
    if labels.shape != (images.shape[0],):
        raise DataError(f"{where}: {labels.shape[0] if labels.ndim else 'no'} labels for {images.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise DataError(f"{where}: labels outside 0..{spec.num_classes - 1}")


# --- readers: (folder, spec, **options) -> (arrays, {"files": ..., "genuine": ...}); the registry names them ---


def parse_idx(raw: bytes, name: str) -> np.ndarray:
    """Decode an uncompressed IDX file of unsigned bytes, checking its header against its length."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{name} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{name}: the file ends inside its {ndim}-dimensional IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != header + int(np.prod(shape)):
        raise DataError(f"{name}: header says shape {shape}, but the file has {len(raw) - header} data bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def read_idx_gz(folder: Path, spec: DatasetSpec, *, canonical_md5: Mapping[str, str]) -> tuple[dict, dict]:
    """The MNIST family: four gzipped IDX files (``IDX_FILES`` + ``.gz``).

    ``canonical_md5`` maps a file name to its published MD5, either of the uncompressed file
    (``train-images-idx3-ubyte``, as for MNIST) or of the ``.gz`` (as torchvision lists them);
    a ``.gz`` entry also records ``md5_gz`` in the provenance. Images [N, H, W] gain a channel axis.
    """
    arrays, files = {}, {}
    for split, (image_file, label_file) in IDX_FILES.items():
        decoded = {}
        for base in (image_file, label_file):
            packed = _read_verified(folder, base + ".gz")
            try:
                raw = gzip.decompress(packed)
            except (OSError, EOFError) as error:
                raise DataError(f"{folder / (base + '.gz')} is not a valid gzip file: {error}") from error
            md5 = _digest(raw, "md5")
            record = {"sha256_gz": _digest(packed, "sha256"), "md5": md5, "canonical": md5 == canonical_md5.get(base)}
            if base + ".gz" in canonical_md5:
                record["md5_gz"] = _digest(packed, "md5")
                record["canonical"] = record["canonical"] or record["md5_gz"] == canonical_md5[base + ".gz"]
            files[base] = record
            decoded[base] = parse_idx(raw, str(folder / (base + ".gz")))
        images = decoded[image_file]
        arrays[f"{split}_images"] = images[:, None] if images.ndim == 3 else images
        arrays[f"{split}_labels"] = decoded[label_file]
        check_split(spec, split, arrays[f"{split}_images"], arrays[f"{split}_labels"],
                    f"{folder / (image_file + '.gz')}, {label_file}.gz")
    return arrays, {"files": files, "genuine": all(f["canonical"] for f in files.values())}


def read_svhn_mat(folder: Path, spec: DatasetSpec, *, files: Mapping[str, str],
                  canonical_md5: Mapping[str, str]) -> tuple[dict, dict]:
    """SVHN's MATLAB files (``files``: split -> name): ``X`` uint8 [H, W, C, N], ``y`` [N, 1] in 1..10.

    As torchvision maps it, label 10 is the digit 0 (generally: label ``num_classes`` means 0).
    """
    from scipy.io import loadmat  # optional, like torchvision's SVHN (scipy reads .mat files)

    arrays, records = {}, {}
    for split in SPLITS:
        name = files[split]
        path = folder / name
        raw = _read_verified(folder, name)
        try:
            mat = loadmat(io.BytesIO(raw))
            x, y = mat["X"], mat["y"]
        except KeyError as error:
            raise DataError(f"{path} lacks the variable {error} (expected X and y)") from error
        except Exception as error:  # scipy raises many types on malformed files
            raise DataError(f"{path} is not a readable MATLAB file: {type(error).__name__}: {error}") from error
        if x.dtype != np.uint8 or x.ndim != 4:
            raise DataError(f"{path}: X should be uint8 (H, W, C, N), got {x.dtype} {x.shape}")
        if not np.issubdtype(y.dtype, np.integer) and not np.issubdtype(y.dtype, np.floating):
            raise DataError(f"{path}: y has dtype {y.dtype}, expected integer labels")
        labels = y.reshape(-1)
        if labels.size and (labels.min() < 1 or labels.max() > spec.num_classes or np.any(labels != np.round(labels))):
            raise DataError(f"{path}: labels outside 1..{spec.num_classes} (label {spec.num_classes} means 0)")
        labels = labels.astype(np.int64)
        labels[labels == spec.num_classes] = 0
        arrays[f"{split}_images"] = x.transpose(3, 2, 0, 1)  # HWCN -> NCHW
        arrays[f"{split}_labels"] = labels
        check_split(spec, split, arrays[f"{split}_images"], labels, str(path))
        md5 = _digest(raw, "md5")
        records[name] = {"sha256": _digest(raw, "sha256"), "md5": md5, "canonical": md5 == canonical_md5.get(name)}
    return arrays, {"files": records, "genuine": all(r["canonical"] for r in records.values())}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a pickle naming any other global
    (which could run code) is refused. Enough for CIFAR's python batches."""

    ALLOWED = {
        ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"), ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if module.startswith("numpy.core."):  # numpy 1's module path, as in the original files
            module = "numpy._core." + module[len("numpy.core."):]
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are expected")
        return super().find_class(module, name)


def read_cifar_pickle(folder: Path, spec: DatasetSpec, *, files: Mapping[str, tuple[str, ...]], label_key: str,
                      canonical_md5: Mapping[str, str]) -> tuple[dict, dict]:
    """CIFAR's python batches (``files``: split -> batch names): dicts with ``data`` uint8 [n, C*H*W]
    (channel planes, row-major) and ``label_key`` ("labels" for CIFAR-10, "fine_labels" for CIFAR-100)."""
    arrays, records = {}, {}
    size = int(np.prod(spec.image_shape))
    for split in SPLITS:
        images, labels = [], []
        for name in files[split]:
            path = folder / name
            raw = _read_verified(folder, name)
            try:
                entry = _ArrayUnpickler(io.BytesIO(raw), encoding="latin1").load()
            except Exception as error:  # truncated or foreign pickles raise many types
                raise DataError(f"{path} is not a readable CIFAR batch: {type(error).__name__}: {error}") from error
            if not isinstance(entry, dict) or "data" not in entry or label_key not in entry:
                found = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
                raise DataError(f"{path} should hold a dict with 'data' and {label_key!r}, found {found}")
            data = entry["data"]
            if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != size:
                found = f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}"
                raise DataError(f"{path}: 'data' should be uint8 (n, {size}), got {found}")
            try:
                batch_labels = np.asarray(entry[label_key], dtype=np.int64).reshape(-1)
            except (TypeError, ValueError) as error:
                raise DataError(f"{path}: {label_key!r} is not a list of integers ({error})") from error
            if batch_labels.shape[0] != data.shape[0]:
                raise DataError(f"{path}: {batch_labels.shape[0]} labels for {data.shape[0]} images")
            check_split(spec, split, data.reshape(-1, *spec.image_shape), batch_labels, str(path))
            images.append(data.reshape(-1, *spec.image_shape))
            labels.append(batch_labels)
            md5 = _digest(raw, "md5")
            records[name] = {"sha256": _digest(raw, "sha256"), "md5": md5, "canonical": md5 == canonical_md5.get(name)}
        arrays[f"{split}_images"] = np.concatenate(images)
        arrays[f"{split}_labels"] = np.concatenate(labels)
    return arrays, {"files": records, "genuine": all(r["canonical"] for r in records.values())}


def read_image_npz(folder: Path, spec: DatasetSpec, *, filename: str) -> tuple[dict, dict]:
    """One ``.npz`` with uint8 ``x_train``/``x_test`` [N, H, W, C] and ``y_train``/``y_test``
    (e.g. the CIFAR-10 JPEG copy). No published checksum exists for such a file: never genuine."""
    path = folder / filename
    packed = _read_verified(folder, filename)
    try:
        with np.load(io.BytesIO(packed)) as npz:
            raw = {key: npz[key] for key in ("x_train", "y_train", "x_test", "y_test")}
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise DataError(f"{path} lacks the arrays x_train/y_train/x_test/y_test: {error}") from error
    arrays = {}
    channels, height, width = spec.image_shape
    for split in SPLITS:
        images = raw[f"x_{split}"]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != channels:
            raise DataError(f"{spec.label} {split} ({path}): expected uint8 (N, {height}, {width}, {channels}), "
                            f"got {images.dtype} {images.shape}")
        arrays[f"{split}_images"] = images.transpose(0, 3, 1, 2)  # HWC -> CHW
        arrays[f"{split}_labels"] = raw[f"y_{split}"].astype(np.int64).reshape(-1)
        check_split(spec, split, arrays[f"{split}_images"], arrays[f"{split}_labels"], str(path))
    return arrays, {"files": {filename: {"sha256": _digest(packed, "sha256")}}, "genuine": False}


# The readers a mirror layout can name (``MirrorLayout.read``): provae.datasets imports none of them.
READERS: dict[str, Reader] = {"idx_gz": read_idx_gz, "svhn_mat": read_svhn_mat, "cifar_pickle": read_cifar_pickle,
                              "image_npz": read_image_npz}


def reader_of(layout: MirrorLayout) -> Reader:
    """The function that reads ``layout``: the reader it names, or the one it holds."""
    if callable(layout.read):
        return layout.read
    if layout.read not in READERS:
        raise ValueError(f"mirror layout {layout.folder!r} names an unknown reader {layout.read!r}; "
                         f"known: {sorted(READERS)}")
    return READERS[layout.read]


# --- the two sources ---


def _to_nchw(images: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """torchvision keeps images as [N, H, W] (grey), [N, H, W, C] (CIFAR) or [N, C, H, W] (SVHN)."""
    if images.ndim == 3:
        return images[:, None]
    if images.ndim == 4 and images.shape[1:] != shape and images.shape[1:] == (shape[1], shape[2], shape[0]):
        return images.transpose(0, 3, 1, 2)
    return images


def download_torchvision(spec: DatasetSpec, root: Path) -> tuple[dict[str, np.ndarray], dict]:
    """The genuine dataset through torchvision (it verifies the archives' MD5 on download)."""
    if spec.torchvision is None:
        raise DataError(f"{spec.name} has no torchvision download: point {MIRROR_ENV} at a mirror folder "
                        f"holding {' or '.join(layout.folder + '/' for layout in spec.mirrors)}")
    from torchvision import datasets  # heavy import, only needed on this path

    cls = getattr(datasets, spec.torchvision)
    arrays = {}
    try:
        for split in SPLITS:
            kwargs = {"split": split} if spec.torchvision_split == "split" else {"train": split == "train"}
            ds = cls(str(root), download=True, **kwargs, **dict(spec.torchvision_kwargs))
            arrays[f"{split}_images"] = _to_nchw(np.asarray(ds.data), spec.image_shape)
            arrays[f"{split}_labels"] = np.asarray(ds.targets if hasattr(ds, "targets") else ds.labels, dtype=np.int64)
    except (RuntimeError, OSError, ImportError) as error:  # torchvision raises RuntimeError on failed downloads
        raise DataError(
            f"downloading {spec.name} with torchvision failed ({error}). Offline? Point {MIRROR_ENV} at a mirror "
            f"folder (see README, 'Data')."
        ) from error
    for split in SPLITS:
        check_split(spec, split, arrays[f"{split}_images"], arrays[f"{split}_labels"],
                    f"torchvision {spec.torchvision}")
    return arrays, {"source": "torchvision", "files": {}, "genuine": True, "jpeg_copy": False, "label": spec.label}


def read_mirror(spec: DatasetSpec, mirror: Path) -> tuple[dict[str, np.ndarray], dict]:
    """The first of ``spec.mirrors`` whose folder exists under ``mirror`` (no fallback if it is broken)."""
    for layout in spec.mirrors:
        folder = mirror / layout.folder
        if folder.is_dir():
            arrays, found = reader_of(layout)(folder, spec, **layout.options)
            label = layout.label or (spec.label if found["genuine"] else f"{spec.label} (non-canonical files)")
            return arrays, {"source": "mirror", **found, "jpeg_copy": layout.jpeg_copy, "label": label}
    folders = " or ".join(layout.folder + "/" for layout in spec.mirrors) or "(no mirror layout registered)"
    raise DataError(f"mirror {mirror} has no folder {folders} for {spec.name}")


def pixel_statistics(images: np.ndarray) -> dict:
    """Per-channel mean and std of [0, 1] pixels, computed in float64."""
    scaled = images.astype(np.float64) / 255.0
    return {"mean": scaled.mean(axis=(0, 2, 3)).round(4).tolist(), "std": scaled.std(axis=(0, 2, 3)).round(4).tolist()}


def prepare(name: str, mirror: str | os.PathLike | None, download_root: str | os.PathLike) -> PreparedData:
    """Read ``name`` from ``mirror`` (if given) or torchvision, verify it and describe it."""
    spec = get_dataset(name)
    if mirror:
        arrays, provenance = read_mirror(spec, Path(mirror))
    else:
        arrays, provenance = download_torchvision(spec, Path(download_root))
    provenance.update(
        dataset=name,
        counts={split: int(arrays[f"{split}_images"].shape[0]) for split in SPLITS},
        train_class_counts=np.bincount(arrays["train_labels"], minlength=spec.num_classes).tolist(),
        train_pixels=pixel_statistics(arrays["train_images"]),
    )
    tensors = {key: torch.from_numpy(np.array(value, order="C")) for key, value in arrays.items()}
    return PreparedData(**tensors, provenance=provenance)


def save_prepared(data: PreparedData, path: str | os.PathLike) -> None:
    """Write an uncompressed .npz, byte-for-byte reproducible, atomically (no half-written file)."""
    arrays = {key: value.numpy() for key, value in data.__dict__.items() if key != "provenance"}
    with atomic_write(path, "wb") as handle:
        np.savez(handle, provenance=np.array(json.dumps(data.provenance, sort_keys=True)), **arrays)


def load_prepared(path: str | os.PathLike) -> PreparedData:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prepared data {path} is missing: run the data stage first (dvc repro)")
    with np.load(path) as npz:
        provenance = json.loads(str(npz["provenance"]))
        tensors = {key: torch.from_numpy(npz[key]) for key in npz.files if key != "provenance"}
    return PreparedData(**tensors, provenance=provenance)
