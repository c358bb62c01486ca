"""The ELBO of one noise draw and its certified lower bound over an l_inf ball.

Notation follows ``shared/docs/method.md``: q(z|x) = N(mu, diag sigma^2), l = log sigma,
p(z) = N(0, I), p(x|z) = N(g(z), sigma0^2 I), z = mu + sigma * e for a noise draw e.
The constant -(D/2) log(2 pi sigma0^2) is dropped everywhere, as in the paper's Table 1.

Both ``elbo`` and ``elbo_lower_bound`` take the noise explicitly, so the certificate and the
value it certifies can be compared on the same draw (method.md, "Guarantee").
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .interval import Interval, interval_exp, overflow_to_vacuous, propagate
from .model import VAE


def _sum_per_example(t: Tensor) -> Tensor:
    return t.flatten(1).sum(1)


def _kl_term(log_sigma: Tensor) -> Tensor:
    """h(l) = exp(2l) - 2l, the sigma-dependent part of the KL (convex in l)."""
    return torch.exp(2 * log_sigma) - 2 * log_sigma


def kl_divergence(mu: Tensor, log_sigma: Tensor) -> Tensor:
    """KL(q(z|x) || p(z)) = 1/2 sum_j (mu_j^2 + sigma_j^2 - 2 log sigma_j - 1)   (method.md, Setting)."""
    return 0.5 * _sum_per_example(mu**2 + _kl_term(log_sigma) - 1)


def kl_upper_bound(mu: Interval, log_sigma: Interval) -> Tensor:
    """KL_U = 1/2 sum_j (max(mu_L^2, mu_U^2) + max(h(l_L), h(l_U)) - 1)   (method.md, step 2).

    Each term is convex in its own variable, so its maximum over an interval sits at an end
    (this agrees with the paper's eq. 18).
    """
    mu_sq = torch.maximum(mu.lower**2, mu.upper**2)
    h = torch.maximum(_kl_term(log_sigma.lower), _kl_term(log_sigma.upper))
    # h(+inf) evaluates as inf - inf = NaN; its value is +inf (and nothing else makes NaN here:
    # the interval ends are never NaN), so the bound becomes vacuous rather than NaN.
    h = torch.where(torch.isnan(h), math.inf, h)
    return 0.5 * _sum_per_example(mu_sq + h - 1)


def latent_sample(mu: Tensor, log_sigma: Tensor, noise: Tensor) -> Tensor:
    """Reparameterisation z = mu + sigma * e."""
    return mu + torch.exp(log_sigma) * noise


def latent_box(mu: Interval, log_sigma: Interval, noise: Tensor) -> Interval:
    """Box holding z = mu + sigma * e for all mu, log sigma in their intervals   (method.md, step 3).

    sigma * e is monotone in sigma with the sign of e, so its extremes are sigma_L e and sigma_U e.
    Ends that overflow (mu_L = -inf plus sigma_L e = +inf gives NaN) come out vacuous, never NaN.
    """
    sigma = interval_exp(log_sigma)
    low_scale, high_scale = sigma.lower * noise, sigma.upper * noise
    return overflow_to_vacuous(
        mu.lower + torch.minimum(low_scale, high_scale),
        mu.upper + torch.maximum(low_scale, high_scale),
    )


def reconstruction_error(target: Tensor, decoded: Tensor) -> Tensor:
    """||x - g(z)||^2 per example."""
    return _sum_per_example((target - decoded) ** 2)


def reconstruction_upper_bound(target: Interval, decoded: Interval) -> Tensor:
    """R_U = sum_i max((hi_i - g_L_i)^2, (g_U_i - lo_i)^2)   (method.md, step 5).

    The target itself is perturbed (it is the attacked x'), so x' - g ranges over
    [lo - g_U, hi - g_L] and its square is largest at one of those ends.
    """
    return _sum_per_example(torch.maximum((target.upper - decoded.lower) ** 2, (decoded.upper - target.lower) ** 2))


def input_box(x: Tensor, eps: float | Tensor, clip: bool = True) -> Interval:
    """B(x, eps) = {x' : ||x' - x||_inf <= eps}, intersected with [0, 1]^D when ``clip``.

    ``eps`` is one radius, or one per example (a tensor [B]): attacks batch several radii at once.
    """
    radius = per_example_radius(eps, x)
    lower, upper = x - radius, x + radius
    if clip:
        lower, upper = lower.clamp(0.0, 1.0), upper.clamp(0.0, 1.0)
    return Interval(lower, upper)


def per_example_radius(eps: float | Tensor, x: Tensor) -> float | Tensor:
    """``eps`` checked, and shaped to broadcast against ``x`` [B, ...] when it is a tensor [B]."""
    if not isinstance(eps, Tensor):
        check_eps(eps)
        return eps
    if eps.shape != (x.shape[0],):
        raise ValueError(f"per-example eps must have shape ({x.shape[0]},), got {tuple(eps.shape)}")
    if not bool(torch.isfinite(eps).all() & (eps >= 0).all()):
        raise ValueError("eps must be finite and >= 0 for every example")
    return eps.to(dtype=x.dtype, device=x.device).view(-1, *([1] * (x.dim() - 1)))


def check_eps(eps: float) -> None:
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")


def _check_noise(model: VAE, x: Tensor, noise: Tensor) -> None:
    expected = (x.shape[0], model.latent_dim)
    if tuple(noise.shape) != expected:
        raise ValueError(f"noise must have shape {expected} (batch, latent_dim), got {tuple(noise.shape)}")


def _log_likelihood_scale(sigma0: float) -> float:
    if not sigma0 > 0:
        raise ValueError(f"sigma0 must be > 0, got {sigma0!r}")
    return 1.0 / (2.0 * sigma0**2)


def elbo(model: VAE, x: Tensor, noise: Tensor, sigma0: float = 1.0) -> Tensor:
    """ELBO_e(x) = -||x - g(z)||^2 / (2 sigma0^2) - KL, z = mu + sigma e   (method.md, Setting). [B]"""
    _check_noise(model, x, noise)
    scale = _log_likelihood_scale(sigma0)
    mu, log_sigma = model.encode(x)
    decoded = model.decode(latent_sample(mu, log_sigma, noise))
    return -scale * reconstruction_error(x, decoded) - kl_divergence(mu, log_sigma)


def elbo_lower_bound(
    model: VAE, x: Tensor, eps: float | Tensor, noise: Tensor, sigma0: float = 1.0, clip: bool = True
) -> Tensor:
    """LB_e(x, eps) = -R_U / (2 sigma0^2) - KL_U   (method.md, steps 1-6). [B]

    For every x' in ``input_box(x, eps, clip)``: ``elbo(model, x', noise) >= LB``. The encoder
    bounds come from propagating the whole input box (not the paper's eq. 16-17 corner values,
    which do not bound a non-monotone network). The paper's eq. 21 combines the reconstruction
    terms with a min; a lower bound needs the max of eq. 20, subtracted, which is what this does.
    At eps = 0 this equals ``elbo`` exactly.
    """
    _check_noise(model, x, noise)
    scale = _log_likelihood_scale(sigma0)
    box = input_box(x, eps, clip)
    features = propagate(model.encoder, box)
    mu, log_sigma = propagate(model.mu_head, features), propagate(model.log_sigma_head, features)
    decoded = propagate(model.decoder, latent_box(mu, log_sigma, noise))
    return -scale * reconstruction_upper_bound(box, decoded) - kl_upper_bound(mu, log_sigma)
