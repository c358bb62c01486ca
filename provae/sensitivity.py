"""How much of an attack's damage needs no encoder: the Gaussian likelihood's own sensitivity to
its input, with the latent code of the clean input held fixed.

Kept apart from ``bounds`` and ``attacks``: an analysis of trained models, not part of training or
of the attack curve.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .bounds import (_check_noise, _log_likelihood_scale, input_box, latent_sample, reconstruction_error,
                     reconstruction_upper_bound)
from .interval import Interval
from .model import VAE


def fixed_encoder_elbo_drop(
    model: VAE, x: Tensor, eps: float, noise: Tensor, sigma0: float = 1.0, clip: bool = True
) -> Tensor:
    """max over x' in B(x, eps) of ELBO_e(x) - [-||x' - g(z)||^2 / (2 sigma0^2) - KL], z from x.   [B]

    The fall of the ELBO when only the likelihood's target moves: x' is scored against the clean
    input's own latent code and reconstruction, as if the encoder ignored the perturbation. Exact,
    because x' then enters only ||x' - g||^2, whose maximum over the box is R_U with a point
    decoder (method.md, step 5). An attack that also moves z can add to it; a model whose encoder
    does ignore the perturbation still loses this much.
    """
    _check_noise(model, x, noise)
    scale = _log_likelihood_scale(sigma0)
    mu, log_sigma = model.encode(x)
    decoded = model.decode(latent_sample(mu, log_sigma, noise))
    worst = reconstruction_upper_bound(input_box(x, eps, clip), Interval.point(decoded))
    return scale * (worst - reconstruction_error(x, decoded))


def residual_sign_attack(model: VAE, x: Tensor, eps: float | Tensor, clip: bool = True) -> Tensor:
    """x' = the corner of B(x, eps) farthest, pixel by pixel, from the clean reconstruction g(mu(x)).

    One step, no gradient: the input that maximises ||x' - g||^2 with the reconstruction held
    fixed (the argmax behind ``fixed_encoder_elbo_drop`` at the posterior mean). Scored with the
    true, re-encoded ELBO, it is a cross-check on PGD.
    """
    box = input_box(x, eps, clip)
    with torch.no_grad():
        reconstruction = model(x)
    return torch.where((box.upper - reconstruction).abs() >= (reconstruction - box.lower).abs(), box.upper, box.lower)
