"""The dataset registry and every mirror format it reads, through the data stage's CLI code.

Each format gets a small generated mirror in torchvision's raw layout; the data stage
(`stages/data.py`, run in-process through runpy, once in a subprocess) prepares it, and the
prepared images then train a freshly made model for one step.
"""

import gzip
import hashlib
import json
import os
import pickle
import runpy
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from provae import EpsSchedule, make_model, train_epoch
from provae.data import DataError, check_dataset_name, load_prepared, prepare, read_idx_gz, read_mirror
from provae.datasets import (CANONICAL_CIFAR10_MD5, CANONICAL_CIFAR100_MD5, CANONICAL_FASHION_MNIST_MD5,
                             CANONICAL_KMNIST_MD5, CANONICAL_SVHN_MD5, DatasetSpec, MirrorLayout, dataset_names,
                             get_dataset, register, unregister)
from provae.model import DATASET_CONFIGS

from conftest import (write_cifar10_jpeg_folder, write_cifar_pickle_folder, write_idx_gz_folder, write_sha256sums,
                      write_svhn_folder)

ROOT = Path(__file__).resolve().parent.parent
STAGE = ROOT / "stages" / "data.py"
sys.path.insert(0, str(ROOT / "stages"))  # the stage's own `from common import ...`


# (id, dataset, mirror folder, writer, one file of the layout, label of a fixture: not the canonical bytes)
FORMATS = [
    ("mnist-idx", "mnist", "mnist", write_idx_gz_folder, "t10k-labels-idx1-ubyte.gz", "MNIST (non-canonical files)"),
    ("fashion-idx", "fashion_mnist", "fashion_mnist", write_idx_gz_folder, "train-images-idx3-ubyte.gz",
     "Fashion-MNIST (non-canonical files)"),
    ("kmnist-idx", "kmnist", "kmnist", write_idx_gz_folder, "t10k-images-idx3-ubyte.gz", "KMNIST (non-canonical files)"),
    ("svhn-mat", "svhn", "svhn", write_svhn_folder, "test_32x32.mat", "SVHN (non-canonical files)"),
    ("cifar100-pickle", "cifar100", "cifar-100-python", partial(write_cifar_pickle_folder, kind="cifar100"), "train",
     "CIFAR-100 (non-canonical files)"),
    ("cifar10-pickle", "cifar10", "cifar-10-batches-py", partial(write_cifar_pickle_folder, kind="cifar10"),
     "data_batch_3", "CIFAR-10 (non-canonical files)"),
    ("cifar10-jpeg", "cifar10", "cifar10-jpeg", write_cifar10_jpeg_folder, "cifar10.npz", "CIFAR-10 (JPEG copy)"),
]
FORMAT_IDS = [f[0] for f in FORMATS]


def run_data_stage(monkeypatch, dataset: str, mirror: Path, out: Path) -> str | None:
    """`python stages/data.py ...` in this process (so test-registered entries are seen);
    returns the stage's exit message, or None on success."""
    monkeypatch.setenv("PROVAE_DATA_MIRROR", str(mirror))
    monkeypatch.setattr(sys, "argv", ["data.py", "--dataset", dataset, "--out", str(out),
                                      "--provenance", str(out.with_suffix(".json")),
                                      "--download-root", str(out.parent / "downloads")])
    try:
        runpy.run_path(str(STAGE), run_name="__main__")
    except SystemExit as exit:
        return str(exit.code)
    return None


def one_training_step(dataset: str, images: torch.Tensor) -> None:
    """make_model from the registry, then one step of train_epoch on the certified bound."""
    torch.manual_seed(0)
    model = make_model(dataset)
    assert model.config.image_shape == get_dataset(dataset).image_shape == tuple(images.shape[1:])
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    stats = train_epoch(model, optimizer, [images], EpsSchedule(0.01, 0, 1), epoch=1, steps_per_epoch=1,
                        generator=torch.Generator().manual_seed(0))
    assert np.isfinite(stats["objective"]) and stats["eps"] == pytest.approx(0.01)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("case", FORMATS, ids=FORMAT_IDS)
def test_each_format_goes_through_the_stage_and_trains(case, tmp_path, monkeypatch):
    _, dataset, folder, writer, _, label = case
    expected = writer(tmp_path / "mirror" / folder)
    out = tmp_path / "out" / f"{dataset}.npz"
    assert run_data_stage(monkeypatch, dataset, tmp_path / "mirror", out) is None

    data = load_prepared(out)
    spec = get_dataset(dataset)
    for split in ("train", "test"):
        images, labels = expected[split]
        assert np.array_equal(getattr(data, f"{split}_images").numpy(), images)  # orientation and order kept
        assert np.array_equal(getattr(data, f"{split}_labels").numpy(), labels)
    provenance = json.loads(out.with_suffix(".json").read_text())
    assert provenance == data.provenance
    assert provenance["label"] == label and provenance["dataset"] == dataset and provenance["source"] == "mirror"
    assert provenance["genuine"] is False and provenance["jpeg_copy"] == (folder == "cifar10-jpeg")
    assert provenance["counts"] == {"train": 20, "test": 10}
    assert len(provenance["train_class_counts"]) == spec.num_classes
    assert len(provenance["train_pixels"]["mean"]) == spec.image_shape[0]
    assert provenance["files"] and all(r.get("sha256") or r.get("sha256_gz") for r in provenance["files"].values())

    again = tmp_path / "again" / f"{dataset}.npz"
    assert run_data_stage(monkeypatch, dataset, tmp_path / "mirror", again) is None
    assert again.read_bytes() == out.read_bytes()  # byte-reproducible: DVC sees no change

    one_training_step(dataset, data.images("train")[:4])


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "missing"])
@pytest.mark.parametrize("case", FORMATS, ids=FORMAT_IDS)
def test_a_damaged_file_is_named_and_earlier_outputs_survive(case, damage, tmp_path, monkeypatch):
    _, dataset, folder, writer, target_name, _ = case
    writer(tmp_path / "mirror" / folder)
    target = tmp_path / "mirror" / folder / target_name
    raw = target.read_bytes()
    if damage == "flipped byte":
        target.write_bytes(raw[: len(raw) // 2] + bytes([raw[len(raw) // 2] ^ 0xFF]) + raw[len(raw) // 2 + 1:])
    elif damage == "truncated":
        target.write_bytes(raw[: len(raw) // 2])
    else:
        target.unlink()
    out = tmp_path / "out" / f"{dataset}.npz"
    out.parent.mkdir()
    out.write_bytes(b"earlier output")
    out.with_suffix(".json").write_text("earlier provenance")

    message = run_data_stage(monkeypatch, dataset, tmp_path / "mirror", out)
    assert message is not None and str(target) in message
    assert ("is missing" if damage == "missing" else "does not match its SHA-256") in message
    assert out.read_bytes() == b"earlier output"
    assert out.with_suffix(".json").read_text() == "earlier provenance"
    assert not list(out.parent.glob("*.partial"))


def resign(path: Path, payload: bytes) -> None:
    """Replace a mirror file and update SHA256SUMS, so the format checks behind the checksum are reached."""
    path.write_bytes(payload)
    write_sha256sums(path.parent)


def svhn_with_labels(folder: Path, labels: np.ndarray) -> None:
    from scipy.io import savemat

    savemat(folder / "train_32x32.mat", {"X": np.zeros((32, 32, 3, len(labels)), np.uint8), "y": labels[:, None]})
    write_sha256sums(folder)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo should never run",))


@pytest.mark.parametrize("dataset, folder, writer, damage, message", [
    ("kmnist", "kmnist", write_idx_gz_folder,
     lambda f: resign(f / "t10k-images-idx3-ubyte.gz", (f / "t10k-images-idx3-ubyte.gz").read_bytes()[:-20]),
     "t10k-images-idx3-ubyte.gz is not a valid gzip file"),
    ("kmnist", "kmnist", write_idx_gz_folder,
     lambda f: resign(f / "train-images-idx3-ubyte.gz",
                      gzip.compress(gzip.decompress((f / "train-images-idx3-ubyte.gz").read_bytes())[:-5])),
     r"train-images-idx3-ubyte.gz: header says shape \(20, 28, 28\)"),
    ("fashion_mnist", "fashion_mnist", partial(write_idx_gz_folder, size=16), None,
     r"expected \(N, 1, 28, 28\)"),
    ("mnist", "mnist", write_idx_gz_folder, lambda f: (f / "SHA256SUMS").write_text(
        "\n".join(line for line in (f / "SHA256SUMS").read_text().splitlines() if "t10k-labels" not in line)),
     "SHA256SUMS has no entry for t10k-labels-idx1-ubyte.gz"),
    ("svhn", "svhn", write_svhn_folder,
     lambda f: resign(f / "test_32x32.mat", (f / "test_32x32.mat").read_bytes()[:300]),
     "test_32x32.mat is not a readable MATLAB file"),
    ("svhn", "svhn", write_svhn_folder, lambda f: svhn_with_labels(f, np.array([1, 0, 3], np.uint8)),
     r"train_32x32.mat: labels outside 1..10 \(label 10 means 0\)"),
    ("svhn", "svhn", write_svhn_folder, lambda f: svhn_with_labels(f, np.array([1, 11], np.uint8)),
     "train_32x32.mat: labels outside 1..10"),
    ("cifar100", "cifar-100-python", partial(write_cifar_pickle_folder, kind="cifar100"),
     lambda f: resign(f / "test", pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "fine_labels": [3, 100]})),
     r"CIFAR-100 test \(.*test\): labels outside 0..99"),
    ("cifar100", "cifar-100-python", partial(write_cifar_pickle_folder, kind="cifar100"),
     lambda f: resign(f / "train", (f / "train").read_bytes()[:1000]), "train is not a readable CIFAR batch"),
    ("cifar100", "cifar-100-python", partial(write_cifar_pickle_folder, kind="cifar100"),
     lambda f: resign(f / "train", pickle.dumps({"data": Evil(), "fine_labels": []})), "refusing to load posix.system"),
    ("cifar10", "cifar-10-batches-py", partial(write_cifar_pickle_folder, kind="cifar10"),
     lambda f: resign(f / "data_batch_2", pickle.dumps({"data": np.zeros((2, 1024), np.uint8), "labels": [0, 1]})),
     r"data_batch_2: 'data' should be uint8 \(n, 3072\)"),
    ("cifar10", "cifar10-jpeg", write_cifar10_jpeg_folder,
     lambda f: resign(f / "cifar10.npz", (f / "cifar10.npz").read_bytes()[:5000]), "cifar10.npz lacks the arrays"),
], ids=["gzip-truncated", "idx-length", "wrong-image-shape", "no-checksum-entry", "mat-truncated", "svhn-label-0",
        "svhn-label-11", "cifar100-label-100", "pickle-truncated", "pickle-foreign-global", "cifar-row-size",
        "npz-truncated"])
def test_format_checks_behind_the_checksum(dataset, folder, writer, damage, message, tmp_path):
    if os.name != "posix" and "posix" in message:
        pytest.skip("os.system's module is named per platform")
    writer(tmp_path / folder)
    if damage is not None:
        damage(tmp_path / folder)
    with pytest.raises(DataError, match=message):
        prepare(dataset, tmp_path, tmp_path / "downloads")


def test_cifar10_prefers_the_genuine_batches_over_the_jpeg_copy(tmp_path):
    write_cifar10_jpeg_folder(tmp_path / "cifar10-jpeg", seed=1)
    batches = write_cifar_pickle_folder(tmp_path / "cifar-10-batches-py", kind="cifar10", seed=2)
    data = prepare("cifar10", tmp_path, tmp_path / "downloads")
    assert np.array_equal(data.train_images.numpy(), batches["train"][0])
    assert data.provenance["jpeg_copy"] is False and "data_batch_1" in data.provenance["files"]
    with pytest.raises(DataError, match="has no folder cifar-10-batches-py/ or cifar10-jpeg/ for cifar10"):
        prepare("cifar10", tmp_path / "elsewhere", tmp_path)


@pytest.fixture
def grey16():
    """A dataset registered by the test only: 16x16 grey images in the MNIST family's IDX files."""
    spec = register(DatasetSpec("grey16", "Grey-16", (1, 16, 16), 10,
                                mirrors=(MirrorLayout("grey16", "idx_gz", {"canonical_md5": {}}),)))
    yield spec
    unregister("grey16")


def test_a_dataset_registered_elsewhere_needs_no_stage_code(grey16, tmp_path, monkeypatch):
    expected = write_idx_gz_folder(tmp_path / "mirror" / "grey16", size=16)
    assert "grey16" in dataset_names() and DATASET_CONFIGS["grey16"].image_size == 16
    check_dataset_name("grey16")
    out = tmp_path / "grey16.npz"
    assert run_data_stage(monkeypatch, "grey16", tmp_path / "mirror", out) is None
    data = load_prepared(out)
    assert np.array_equal(data.test_images.numpy(), expected["test"][0])
    assert data.provenance["label"] == "Grey-16 (non-canonical files)"
    one_training_step("grey16", data.images("train")[:4])
    with pytest.raises(DataError, match="grey16 has no torchvision download"):
        prepare("grey16", None, tmp_path)


def test_registry_rejects_bad_entries_and_unknown_names(monkeypatch, tmp_path):
    layout = (MirrorLayout("x", partial(read_idx_gz, canonical_md5={})),)  # a reader function, not a name
    for shape in [(1, 28, 30), (3, 30, 30), (1, 28)]:
        with pytest.raises(ValueError, match="x:"):
            DatasetSpec("x", "X", shape, 10, mirrors=layout)
    with pytest.raises(ValueError, match="torchvision class or at least one mirror"):
        DatasetSpec("x", "X", (1, 28, 28), 10)
    with pytest.raises(ValueError, match="read must name a reader"):
        MirrorLayout("x", 3)
    unknown_reader = DatasetSpec("x", "X", (1, 28, 28), 10, mirrors=(MirrorLayout("x", "idx_zip"),))
    (tmp_path / "x").mkdir()
    with pytest.raises(ValueError, match="unknown reader 'idx_zip'; known: \\['cifar_pickle', 'idx_gz'"):
        read_mirror(unknown_reader, tmp_path)
    with pytest.raises(ValueError, match="already registered"):
        register(DatasetSpec("mnist", "MNIST", (1, 28, 28), 10, mirrors=layout))
    assert get_dataset("mnist").label == "MNIST"  # untouched

    known = str(dataset_names())
    for call in (lambda: check_dataset_name("imagenet"), lambda: make_model("imagenet"),
                 lambda: prepare("imagenet", tmp_path, tmp_path)):
        with pytest.raises(ValueError, match="unknown dataset 'imagenet'") as error:
            call()
        assert known in str(error.value)
    assert "imagenet" not in DATASET_CONFIGS
    message = run_data_stage(monkeypatch, "imagenet", tmp_path, tmp_path / "x.npz")
    assert "unknown dataset 'imagenet'" in message and "'svhn'" in message


def test_the_networks_follow_the_image_shapes():
    assert {name: (c.in_channels, c.image_size, c.feature_dim) for name, c in DATASET_CONFIGS.items()} == {
        "mnist": (1, 28, 3136), "fashion_mnist": (1, 28, 3136), "kmnist": (1, 28, 3136),
        "svhn": (3, 32, 4096), "cifar10": (3, 32, 4096), "cifar100": (3, 32, 4096)}
    assert get_dataset("cifar100").num_classes == 100


def test_reference_checksums_agree_with_torchvision():
    """The MD5s that mark mirror files as genuine are the ones torchvision checks its downloads with."""
    from torchvision import datasets

    assert {name: get_dataset(name).torchvision_class for name in dataset_names()} == {
        "mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST, "kmnist": datasets.KMNIST,
        "svhn": datasets.SVHN, "cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}
    assert dict(datasets.FashionMNIST.resources) == CANONICAL_FASHION_MNIST_MD5
    assert dict(datasets.KMNIST.resources) == CANONICAL_KMNIST_MD5
    assert {name: md5 for _, name, md5 in (datasets.SVHN.split_list[s] for s in ("train", "test"))} == CANONICAL_SVHN_MD5
    assert dict(datasets.CIFAR10.train_list + datasets.CIFAR10.test_list) == CANONICAL_CIFAR10_MD5
    assert dict(datasets.CIFAR100.train_list + datasets.CIFAR100.test_list) == CANONICAL_CIFAR100_MD5


class FakeTorchvision:
    """Stands in for a torchvision dataset class (no network here): records how it was called."""

    calls = []

    def __init__(self, root, download=False, train=None, split=None):
        FakeTorchvision.calls.append({"download": download, "train": train, "split": split})
        n = 6 if train or split == "train" else 3
        self.data = self.make(n)
        self.labels = self.targets = torch.arange(n) % 10


@pytest.mark.parametrize("name, layout", [("mnist", "NHW"), ("cifar10", "NHWC"), ("svhn", "NCHW")])
def test_torchvision_download_path(name, layout, tmp_path, monkeypatch):
    from torchvision import datasets

    spec = get_dataset(name)
    c, h, w = spec.image_shape
    rng = np.random.default_rng(0)
    made = {}

    def make(self, n):
        images = rng.integers(0, 256, (n, c, h, w), dtype=np.uint8)
        made[n] = images
        return {"NHW": lambda: torch.from_numpy(images[:, 0]), "NHWC": lambda: images.transpose(0, 2, 3, 1),
                "NCHW": lambda: images}[layout]()

    fake = type("Fake", (FakeTorchvision,), {"make": make})
    monkeypatch.setattr(FakeTorchvision, "calls", [])
    monkeypatch.setattr(datasets, spec.torchvision, fake)
    data = prepare(name, None, tmp_path)
    assert np.array_equal(data.train_images.numpy(), made[6]) and np.array_equal(data.test_images.numpy(), made[3])
    assert data.provenance == {**data.provenance, "source": "torchvision", "genuine": True, "label": spec.label}
    by_split = name == "svhn"
    assert FakeTorchvision.calls == [{"download": True, "train": None if by_split else t, "split": s if by_split else None}
                                     for t, s in ((True, "train"), (False, "test"))]

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(datasets, spec.torchvision, offline)
    with pytest.raises(DataError, match="Offline\\? Point PROVAE_DATA_MIRROR at a mirror"):
        prepare(name, None, tmp_path)


def test_the_stage_runs_a_new_format_in_a_fresh_process(tmp_path):
    """One real `python stages/data.py` (a new interpreter imports scipy and the registry itself)."""
    write_svhn_folder(tmp_path / "mirror" / "svhn")
    out = tmp_path / "svhn.npz"
    env = {**os.environ, "PROVAE_DATA_MIRROR": str(tmp_path / "mirror")}
    result = subprocess.run([sys.executable, str(STAGE), "--dataset", "svhn", "--out", str(out), "--provenance",
                             str(tmp_path / "svhn.json"), "--download-root", str(tmp_path / "dl")],
                            cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "SVHN (non-canonical files): {'train': 20, 'test': 10} from mirror" in result.stdout
    assert load_prepared(out).train_images.shape == (20, 3, 32, 32)


MIRROR = Path(os.environ.get("PROVAE_DATA_MIRROR") or ROOT.parent / "shared" / "data")


def locked_md5(stage: str) -> dict[str, str]:
    lock = yaml.safe_load((ROOT / "dvc.lock").read_text())
    return {Path(out["path"]).suffix: out["md5"] for out in lock["stages"][stage]["outs"]}


@pytest.mark.parametrize("dataset, folder", [("mnist", "mnist"), ("cifar10", "cifar10-jpeg")])
def test_shared_mirror_gives_the_bytes_recorded_in_dvc_lock(dataset, folder, tmp_path, monkeypatch):
    """The registry refactor must not change MNIST's or CIFAR-10's prepared files or provenance."""
    if not (MIRROR / folder / "SHA256SUMS").is_file():
        pytest.skip(f"no {folder}/ mirror at {MIRROR}")
    if dataset == "cifar10" and (MIRROR / "cifar-10-batches-py").exists():
        pytest.skip("this mirror holds the genuine CIFAR-10 batches, not the JPEG copy dvc.lock records")
    out = tmp_path / f"{dataset}.npz"
    assert run_data_stage(monkeypatch, dataset, MIRROR, out) is None
    md5 = {suffix: hashlib.md5(path.read_bytes()).hexdigest() for suffix, path in
           ((".npz", out), (".json", out.with_suffix(".json")))}
    assert md5 == locked_md5(f"data@{dataset}")
