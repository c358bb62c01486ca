import gzip
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

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
