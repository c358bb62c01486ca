"""The fixed-encoder drop (exact worst case with the latent code held) and the residual-sign attack."""

import pytest
import torch

from conftest import small_model, synthetic_images
from provae.bounds import input_box, reconstruction_error
from provae.sensitivity import fixed_encoder_elbo_drop, residual_sign_attack


def fixed_code_drop(model, x, x_attacked, sigma0):
    """ELBO(x) minus the ELBO of x_attacked scored against x's own reconstruction (noise 0)."""
    with torch.no_grad():
        decoded = model(x)
        return (reconstruction_error(x_attacked, decoded) - reconstruction_error(x, decoded)) / (2 * sigma0**2)


@pytest.mark.parametrize("clip", [True, False])
def test_the_drop_is_the_maximum_over_the_ball_and_the_residual_corner_attains_it(clip):
    torch.manual_seed(0)
    model, x, eps, sigma0 = small_model(), synthetic_images(8), 0.1, 0.7
    zero_noise = torch.zeros(x.shape[0], model.latent_dim)
    with torch.no_grad():
        drop = fixed_encoder_elbo_drop(model, x, eps, zero_noise, sigma0, clip)
    box = input_box(x, eps, clip)
    for _ in range(200):
        inside = box.lower + torch.rand_like(x) * (box.upper - box.lower)
        assert (fixed_code_drop(model, x, inside, sigma0) <= drop + 1e-5).all()
    corner = residual_sign_attack(model, x, eps, clip)
    assert box.contains(corner)
    assert torch.allclose(fixed_code_drop(model, x, corner, sigma0), drop, rtol=1e-5, atol=1e-5)


def test_no_perturbation_no_drop():
    model, x = small_model(), synthetic_images(4)
    with torch.no_grad():
        drop = fixed_encoder_elbo_drop(model, x, 0.0, torch.randn(4, model.latent_dim))
    assert torch.equal(drop, torch.zeros(4))
