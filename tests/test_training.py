import platform

import pytest
import torch

from provae import (
    EpsSchedule, NonFiniteLossError, elbo, load_checkpoint, load_model, make_model, minibatches,
    save_checkpoint, train_epoch,
)
from provae.runtime import reuse_freed_memory
from provae.training import mean_bound_and_elbo, training_objective

from conftest import small_model, synthetic_images


def test_schedule_warms_up_then_ramps_linearly():
    schedule = EpsSchedule(eps_train=0.1, warmup_epochs=2, ramp_epochs=4)
    assert [schedule(p) for p in (0, 1.9, 2)] == [0.0, 0.0, 0.0]
    assert schedule(4) == pytest.approx(0.05)
    assert schedule(6) == pytest.approx(0.1) and schedule(50) == pytest.approx(0.1)


def test_schedule_without_ramp_jumps_after_warmup():
    schedule = EpsSchedule(eps_train=0.02, warmup_epochs=1)
    assert schedule(0.5) == 0.0 and schedule(1.0) == 0.02


@pytest.mark.parametrize("kwargs", [{"eps_train": -0.1}, {"eps_train": 0.1, "ramp_epochs": -1}])
def test_schedule_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        EpsSchedule(**kwargs)


def test_training_raises_the_objective():
    model, data = small_model(), synthetic_images(256)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    schedule = EpsSchedule(eps_train=0.02, warmup_epochs=1, ramp_epochs=1)
    g = torch.Generator().manual_seed(0)
    before = mean_bound_and_elbo(model, data, 0.02, generator=torch.Generator().manual_seed(1))
    for epoch in range(4):
        stats = train_epoch(model, optimizer, minibatches(data, 64, g), schedule, epoch=epoch, steps_per_epoch=4, generator=g)
    after = mean_bound_and_elbo(model, data, 0.02, generator=torch.Generator().manual_seed(1))
    assert stats["eps"] == pytest.approx(0.02)
    assert after["bound"] > before["bound"] + 0.5
    assert after["elbo"] >= after["bound"]


def test_nan_during_training_names_epoch_and_batch():
    model = small_model()
    data = synthetic_images(8)
    data[5, 0, 0, 0] = float("nan")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    batches = [data[:4], data[4:]]
    with pytest.raises(NonFiniteLossError, match=r"epoch 3, batch 1"):
        train_epoch(model, optimizer, batches, EpsSchedule(0.0), epoch=3, steps_per_epoch=2)
    # The bad batch touched no parameter (the first, clean one did).
    optimizer.zero_grad()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_clean_weight_mixes_bound_and_elbo():
    model, x = small_model(), synthetic_images(4)
    noise = torch.randn(4, model.latent_dim)
    with torch.no_grad():
        bound = training_objective(model, x, 0.05, noise, 1.0, clean_weight=0.0)
        clean = training_objective(model, x, 0.05, noise, 1.0, clean_weight=1.0)
        half = training_objective(model, x, 0.05, noise, 1.0, clean_weight=0.5)
    torch.testing.assert_close(half, (bound + clean) / 2)
    torch.testing.assert_close(clean, elbo(model, x, noise))
    with pytest.raises(ValueError, match="clean_weight"):
        training_objective(model, x, 0.05, noise, 1.0, clean_weight=1.5)


@pytest.mark.parametrize("dataset, shape", [("mnist", (1, 28, 28)), ("cifar10", (3, 32, 32))])
def test_paper_architecture_shapes(dataset, shape):
    model = make_model(dataset)
    assert model.latent_dim == 50 and model.config.image_shape == shape
    mu, log_sigma = model.encode(torch.rand(2, *shape))
    assert mu.shape == log_sigma.shape == (2, 50)
    decoded = model.decode(mu)
    assert decoded.shape == (2, *shape) and ((decoded >= 0) & (decoded <= 1)).all()
    assert model.config.feature_dim == {"mnist": 3136, "cifar10": 4096}[dataset]


def test_unknown_dataset_is_rejected():
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        make_model("imagenet")


def test_checkpoint_round_trip(tmp_path):
    model = small_model(seed=4)
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, {"eps_train": 0.05, "seed": 4})
    checkpoint = load_checkpoint(path)
    assert checkpoint.model.config == model.config
    assert checkpoint.metadata == {"eps_train": 0.05, "seed": 4}
    x = synthetic_images(3)
    torch.testing.assert_close(load_model(path)(x), model(x))


def test_reuse_freed_memory_applies_on_glibc_only():
    assert reuse_freed_memory() is (platform.libc_ver()[0] == "glibc")
