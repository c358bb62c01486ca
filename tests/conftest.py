import os

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
