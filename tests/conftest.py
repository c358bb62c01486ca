import gzip
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from provae import EpsSchedule, make_model, minibatches, train_epoch

os.environ.setdefault("DVC_NO_ANALYTICS", "1")


def synthetic_images(n: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    """Blurry blobs in [0, 1] with some saturated pixels (exercises clipping at 0 and 1)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.rand((n, 2, 1, 1), generator=g) * size
    grid = torch.arange(size, dtype=torch.float32)
    dist2 = (grid.view(1, size, 1) - centers[:, 0]) ** 2 + (grid.view(1, 1, size) - centers[:, 1]) ** 2
    images = torch.exp(-dist2 / 4.0) * 1.3
    return images.clamp(0, 1).unsqueeze(1)


def small_model(seed: int = 0):
    torch.manual_seed(seed)
    return make_model("mnist", image_size=8, latent_dim=4, channels=(4, 8))


@pytest.fixture(scope="session")
def trained_small_model():
    """A small VAE trained briefly on the certified bound at eps = 0.05 (warm-up, then ramp)."""
    model = small_model()
    data = synthetic_images(256)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    schedule = EpsSchedule(eps_train=0.05, warmup_epochs=2, ramp_epochs=3)
    g = torch.Generator().manual_seed(1)
    for epoch in range(8):
        train_epoch(model, optimizer, minibatches(data, 64, g), schedule, epoch=epoch, steps_per_epoch=4, generator=g)
    model.eval()
    return model, synthetic_images(32, seed=99)


def write_idx_mirror(folder: Path, n_train: int = 600, n_test: int = 200) -> Path:
    """A small MNIST-shaped mirror: IDX files, gzipped, with SHA256SUMS."""
    mnist = folder / "mnist"
    mnist.mkdir(parents=True)
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images = (synthetic_images(n, size=28, seed=seed)[:, 0].numpy() * 255).astype(np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        payloads = {
            f"{prefix}-images-idx3-ubyte": bytes([0, 0, 8, 3]) + np.array([n, 28, 28], ">u4").tobytes() + images.tobytes(),
            f"{prefix}-labels-idx1-ubyte": bytes([0, 0, 8, 1]) + np.array([n], ">u4").tobytes() + labels.tobytes(),
        }
        for name, payload in payloads.items():
            (mnist / f"{name}.gz").write_bytes(gzip.compress(payload, mtime=0))
    sums = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}" for p in sorted(mnist.glob("*.gz"))]
    (mnist / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    return folder


# --- mirror fixtures for every registered format (tests/test_datasets.py); each writer returns the
# images [N, C, H, W] uint8 and labels [N] it stored, per split, to compare with what is read back ---


def write_sha256sums(folder: Path) -> None:
    """SHA256SUMS over every other file in ``folder``, in `sha256sum` format."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != "SHA256SUMS")
    (folder / "SHA256SUMS").write_text("".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n" for p in files))


def random_split_arrays(n_train: int, n_test: int, shape: tuple[int, int, int], num_classes: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    return {split: (rng.integers(0, 256, (n, *shape), dtype=np.uint8), np.arange(n, dtype=np.int64) % num_classes)
            for split, n in (("train", n_train), ("test", n_test))}


def write_idx_gz_folder(folder: Path, n_train: int = 20, n_test: int = 10, size: int = 28, seed: int = 0) -> dict:
    """The MNIST family's four gzipped IDX files (torchvision's raw names) and SHA256SUMS."""
    folder.mkdir(parents=True)
    arrays = random_split_arrays(n_train, n_test, (1, size, size), seed=seed)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = arrays[split]
        n = images.shape[0]
        payloads = {
            f"{prefix}-images-idx3-ubyte": bytes([0, 0, 8, 3]) + np.array([n, size, size], ">u4").tobytes() + images.tobytes(),
            f"{prefix}-labels-idx1-ubyte": bytes([0, 0, 8, 1]) + np.array([n], ">u4").tobytes() + labels.astype(np.uint8).tobytes(),
        }
        for name, payload in payloads.items():
            (folder / f"{name}.gz").write_bytes(gzip.compress(payload, mtime=0))
    write_sha256sums(folder)
    return arrays


def write_svhn_folder(folder: Path, n_train: int = 20, n_test: int = 10, seed: int = 0) -> dict:
    """SVHN's train_32x32.mat / test_32x32.mat: X uint8 [32, 32, 3, N], y uint8 [N, 1] with 10 for the digit 0."""
    from scipy.io import savemat

    folder.mkdir(parents=True)
    arrays = random_split_arrays(n_train, n_test, (3, 32, 32), seed=seed)
    for split, (images, labels) in arrays.items():
        y = np.where(labels == 0, 10, labels).astype(np.uint8)[:, None]
        savemat(folder / f"{split}_32x32.mat", {"X": images.transpose(2, 3, 1, 0), "y": y})
    write_sha256sums(folder)
    return arrays


def py2_cifar_pickle(data: np.ndarray, labels: list[int], label_key: str = "labels") -> bytes:
    """A dict pickled as Python 2's cPickle (protocol 2) wrote CIFAR's original batches: str keys and the
    array's bytes as (SHORT_)BINSTRING, numpy 1's module path ``numpy.core.multiarray``. uint8 data only."""
    import struct

    def text(raw: bytes) -> bytes:
        return (b"U" + bytes([len(raw)]) + raw) if len(raw) < 256 else (b"T" + struct.pack("<i", len(raw)) + raw)

    assert data.dtype == np.uint8 and all(0 <= label < 256 for label in labels)
    shape = b"".join(b"J" + struct.pack("<i", n) for n in data.shape) + (b"\x86" if data.ndim == 2 else b"\x85")
    dtype = (b"cnumpy\ndtype\n" + text(b"u1") + b"K\x00K\x01\x87R(K\x03" + text(b"|")
             + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + text(b"b") + b"\x87R"
             + b"(K\x01" + shape + dtype + b"\x89" + text(data.tobytes()) + b"tb")
    label_list = b"](" + b"".join(b"K" + bytes([label]) for label in labels) + b"e"
    return b"\x80\x02}(" + text(b"data") + array + text(label_key.encode()) + label_list + b"u."


def write_cifar_pickle_folder(folder: Path, kind: str = "cifar10", n_train: int = 20, n_test: int = 10,
                              seed: int = 0) -> dict:
    """CIFAR's python batches: ``cifar-10-batches-py`` (data_batch_1..5, test_batch, "labels"), pickled the
    way the original files were (Python 2), or ``cifar-100-python`` (train, test, "fine_labels"), pickled
    by this Python and numpy (as a re-pickled copy would be)."""
    import pickle

    folder.mkdir(parents=True)
    num_classes = 100 if kind == "cifar100" else 10
    arrays = random_split_arrays(n_train, n_test, (3, 32, 32), num_classes, seed=seed)
    if kind == "cifar100":
        batches = {"train": [("train", slice(None))], "test": [("test", slice(None))]}
    else:
        step = -(-n_train // 5)
        batches = {"train": [(f"data_batch_{i + 1}", slice(i * step, (i + 1) * step)) for i in range(5)],
                   "test": [("test_batch", slice(None))]}
    for split, entries in batches.items():
        images, labels = arrays[split]
        for name, part in entries:
            data, batch_labels = images[part].reshape(-1, 3072), labels[part].tolist()
            if kind == "cifar100":
                entry = {"batch_label": f"{name} of the fixture", "data": data, "fine_labels": batch_labels,
                         "coarse_labels": [label // 5 for label in batch_labels],
                         "filenames": [f"img_{i}.png" for i in range(len(batch_labels))]}
                (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
            else:
                (folder / name).write_bytes(py2_cifar_pickle(data, batch_labels))
    write_sha256sums(folder)
    return arrays


def write_cifar10_jpeg_folder(folder: Path, n_train: int = 20, n_test: int = 10, seed: int = 0) -> dict:
    """The CIFAR-10 JPEG copy's layout: cifar10.npz with x_train/x_test uint8 [N, 32, 32, 3], y_train/y_test."""
    folder.mkdir(parents=True)
    arrays = random_split_arrays(n_train, n_test, (3, 32, 32), seed=seed)
    with open(folder / "cifar10.npz", "wb") as handle:
        np.savez(handle, **{f"{key}_{split}": value for split, (images, labels) in arrays.items()
                            for key, value in (("x", images.transpose(0, 2, 3, 1)), ("y", labels.astype(np.uint8)))})
    write_sha256sums(folder)
    return arrays


# --- end-to-end helpers: the project copied into a fresh git + DVC repository ---

ROOT = Path(__file__).resolve().parent.parent
PROJECT_FILES = ["provae", "stages", "scripts", "profiles", "references", "dvc.yaml", "params.yaml",
                 "pyproject.toml", ".gitignore", ".dvcignore",
                 # committed inputs of the report stage that no stage writes
                 "reports/REPRODUCTION.md.j2", "reports/training_length", "reports/certify_elbo/README.md"]

def run(args, cwd, env, check=True):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}")
    return result



@pytest.fixture(scope="session")
def mirror(tmp_path_factory):
    configured = os.environ.get("PROVAE_DATA_MIRROR") or ROOT.parent / "shared" / "data"
    if (Path(configured) / "mnist" / "SHA256SUMS").is_file():
        return Path(configured).resolve()
    return write_idx_mirror(tmp_path_factory.mktemp("mirror"))


@pytest.fixture(scope="session")
def env(mirror):
    bin_dir = Path(sys.executable).parent
    return {**os.environ, "DVC_NO_ANALYTICS": "1", "PROVAE_DATA_MIRROR": str(mirror),
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "GIT_AUTHOR_NAME": "test",
            "GIT_AUTHOR_EMAIL": "test@example.com", "GIT_COMMITTER_NAME": "test",
            "GIT_COMMITTER_EMAIL": "test@example.com"}


def copy_project(repo: Path, env: dict, profile: str = "tiny") -> Path:
    """The project's files in a fresh git + DVC repository, with a parameter profile applied, committed."""
    for name in PROJECT_FILES:
        source = ROOT / name
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, repo / name)
    run([sys.executable, "scripts/profile.py", profile, "--write"], repo, env)
    run(["git", "init", "-q"], repo, env)
    run(["dvc", "init", "-q"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", f"{profile} profile"], repo, env)
    return repo


# The tiny profile's model that the optional per-model stages list in `listed_project`.
LISTED = {"mnist-0.05-0": {"dataset": "mnist", "eps": 0.05, "seed": 0}}
LISTED_EXAMPLES = 2  # certify_elbo.examples there: the ELBO relaxation costs seconds per image


@pytest.fixture(scope="session")
def listed_project(tmp_path_factory, env):
    """The tiny profile with `LISTED` on `bound_training.models` and `certify_elbo.models`, reproduced
    once for every test of those stages (a few minutes on 2 CPU cores) and committed. -> (repo, env,
    params, the output of `dvc repro`). Tests that change it put it back."""
    env = {**env, "OMP_NUM_THREADS": "1"}  # faster on 2 cores (README, "Scale-out")
    repo = copy_project(tmp_path_factory.mktemp("listed") / "repo", env)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["bound_training"]["models"] = params["certify_elbo"]["models"] = LISTED
    params["certify_elbo"]["examples"] = LISTED_EXAMPLES
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    output = run(["dvc", "repro"], repo, env).stdout
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "listed models"], repo, env)
    return repo, env, params, output

