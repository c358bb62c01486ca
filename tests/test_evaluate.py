"""The evaluate stage's posterior diagnostic (active units and KL), which the sigma0 sweep reads."""

import torch

from provae.evaluation import posterior_usage

from conftest import small_model, synthetic_images


def test_a_collapsed_posterior_has_no_active_units_and_zero_kl():
    model = small_model()
    with torch.no_grad():
        for head in (model.mu_head, model.log_sigma_head):
            head.weight.zero_()
            head.bias.zero_()
    usage = posterior_usage(model, synthetic_images(64), batch_size=16)
    assert usage == {"kl": 0.0, "active_units": 0}


def test_a_mean_that_follows_the_input_counts_as_active():
    model = small_model()
    with torch.no_grad():
        model.mu_head.weight.mul_(100.0)  # every latent mean now varies strongly across inputs
    images = synthetic_images(64)
    usage = posterior_usage(model, images, batch_size=16)
    assert usage["active_units"] == model.latent_dim
    mu, log_sigma = model.encode(images)
    expected_kl = (0.5 * (mu**2 + torch.exp(2 * log_sigma) - 2 * log_sigma - 1).sum(1)).mean()
    assert abs(usage["kl"] - expected_kl.item()) < 1e-4 * expected_kl.item()
