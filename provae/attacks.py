"""Out-of-distribution attacks on the ELBO (paper eq. 5; method.md, "Attack").

Every attack searches x' in B(x, eps) intersected with [0, 1]^D (``input_box``) and returns,
per example, the candidate with the lowest ELBO under the caller's noise draw (the common
random numbers the certificate is audited with). The clean input is always a candidate, so
an attack never reports a higher ELBO than no attack.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
from torch import Tensor

from .bounds import elbo, input_box, kl_divergence
from .model import VAE

Objective = Callable[[Tensor], Tensor]  # x' [B, ...] -> value to minimise per example [B]


def _uniform_in(lower: Tensor, upper: Tensor, generator: torch.Generator | None) -> Tensor:
    u = torch.rand(lower.shape, generator=generator, device=lower.device, dtype=lower.dtype)
    return lower + u * (upper - lower)


def _sign_gradient_descent(
    objective: Objective,
    start: Tensor,
    lower: Tensor,
    upper: Tensor,
    steps: int,
    step_size: float,
) -> Tensor:
    """l_inf PGD: x <- clip_box(x - step_size * sign(grad objective)), ``steps`` times."""
    x_adv = start.detach()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        # Only the input's gradient is needed: autograd then skips the weight gradients.
        (grad,) = torch.autograd.grad(objective(x_adv).sum(), x_adv)
        x_adv = torch.maximum(torch.minimum(x_adv.detach() - step_size * grad.sign(), upper), lower)
    return x_adv.detach()


def _restarted_attack(
    model: VAE,
    x: Tensor,
    eps: float,
    noise: Tensor,
    objective: Objective,
    *,
    steps: int,
    step_size: float,
    restarts: int,
    random_start: bool,
    sigma0: float,
    clip: bool,
    generator: torch.Generator | None,
) -> Tensor:
    """Run ``restarts`` PGD runs on ``objective``; keep per example the lowest ELBO(noise) seen."""
    if steps < 0 or restarts < 1 or step_size < 0:
        raise ValueError(f"need steps >= 0, restarts >= 1, step_size >= 0; got {steps}, {restarts}, {step_size}")
    box = input_box(x, eps, clip)
    best_x = x.detach().clone()
    with torch.no_grad():
        best_elbo = elbo(model, best_x, noise, sigma0)
    for _ in range(restarts):
        start = _uniform_in(box.lower, box.upper, generator) if random_start else x
        x_adv = _sign_gradient_descent(objective, start, box.lower, box.upper, steps, step_size)
        with torch.no_grad():
            value = elbo(model, x_adv, noise, sigma0)
        better = value < best_elbo
        best_x[better], best_elbo[better] = x_adv[better], value[better]
    return best_x


def pgd_attack(
    model: VAE,
    x: Tensor,
    eps: float,
    noise: Tensor,
    *,
    steps: int = 100,
    step_size: float | None = None,
    restarts: int = 1,
    random_start: bool = True,
    eot_samples: int = 1,
    sigma0: float = 1.0,
    clip: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Minimise the ELBO of x' (reconstruction target x' itself) by l_inf PGD   (paper eq. 5).

    ``eot_samples == 1`` attacks the ELBO under the fixed ``noise`` (common random numbers);
    ``eot_samples > 1`` follows the gradient averaged over that many fresh noise draws per step
    (expectation over transformation). ``step_size`` defaults to 2.5 * eps / steps (Madry et al.).
    Restarts are compared by the ELBO under ``noise``.
    """
    if eot_samples < 1:
        raise ValueError(f"eot_samples must be >= 1, got {eot_samples}")
    if step_size is None:
        step_size = 2.5 * eps / max(steps, 1)

    if eot_samples == 1:
        def objective(x_adv: Tensor) -> Tensor:
            return elbo(model, x_adv, noise, sigma0)
    else:
        def objective(x_adv: Tensor) -> Tensor:
            draws = torch.randn(
                (eot_samples, *noise.shape), generator=generator, device=noise.device, dtype=noise.dtype
            )
            return torch.stack([elbo(model, x_adv, draw, sigma0) for draw in draws]).mean(0)

    return _restarted_attack(
        model, x, eps, noise, objective, steps=steps, step_size=step_size, restarts=restarts,
        random_start=random_start, sigma0=sigma0, clip=clip, generator=generator,
    )


def latent_attack(
    model: VAE,
    x: Tensor,
    eps: float,
    noise: Tensor,
    *,
    objective: Literal["kl", "mu_shift"] = "kl",
    steps: int = 100,
    step_size: float | None = None,
    restarts: int = 1,
    random_start: bool = True,
    sigma0: float = 1.0,
    clip: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Push the encoder's output away: maximise KL(q(z|x')||p(z)) or ||mu(x') - mu(x)||^2.

    A different search direction from ``pgd_attack`` (it ignores the decoder), scored like it by
    the ELBO under ``noise``.
    """
    if step_size is None:
        step_size = 2.5 * eps / max(steps, 1)
    with torch.no_grad():
        clean_mu, _ = model.encode(x)

    if objective == "kl":
        def negated(x_adv: Tensor) -> Tensor:
            return -kl_divergence(*model.encode(x_adv))
    elif objective == "mu_shift":
        def negated(x_adv: Tensor) -> Tensor:
            return -((model.encode(x_adv)[0] - clean_mu) ** 2).sum(1)
    else:
        raise ValueError(f"unknown latent attack objective {objective!r}; use 'kl' or 'mu_shift'")

    return _restarted_attack(
        model, x, eps, noise, negated, steps=steps, step_size=step_size, restarts=restarts,
        random_start=random_start, sigma0=sigma0, clip=clip, generator=generator,
    )


@torch.no_grad()
def expected_elbo(
    model: VAE, x: Tensor, samples: int, sigma0: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    """Monte Carlo mean of the ELBO over ``samples`` fresh noise draws. [B]"""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    total = torch.zeros(x.shape[0], device=x.device)
    for _ in range(samples):
        noise = torch.randn((x.shape[0], model.latent_dim), generator=generator, device=x.device)
        total += elbo(model, x, noise, sigma0)
    return total / samples


@dataclass(frozen=True)
class WorstCase:
    """Per example: the strongest attack's input and its ELBO, two ways."""

    x_adv: Tensor  # [B, ...] the candidate with the lowest fresh-noise ELBO
    elbo: Tensor  # [B] its ELBO, fresh noise averaged over the scoring draws
    elbo_same_noise: Tensor  # [B] lowest ELBO under the certificate's noise over all candidates
    attack_index: Tensor  # [B] which candidate gave ``x_adv``
    candidate_elbos: Tensor  # [n_candidates, B] every candidate's fresh-noise ELBO (same draws)


@torch.no_grad()
def worst_of(
    model: VAE,
    candidates: Sequence[Tensor],
    noise: Tensor,
    *,
    score_samples: int = 8,
    sigma0: float = 1.0,
    generator: torch.Generator | None = None,
) -> WorstCase:
    """Combine attacks: per example, the candidate with the lowest ELBO.

    ``elbo`` scores each candidate with the same ``score_samples`` fresh noise draws (fresh, so
    that an attack tuned to one draw is not over-credited); ``elbo_same_noise`` is the lowest
    ELBO under ``noise`` itself, the value the certificate for ``noise`` must stay below.
    """
    if not candidates:
        raise ValueError("worst_of needs at least one candidate")
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    fresh, same = [], []
    for candidate in candidates:
        # The same draws for every candidate: a fair comparison between attacks.
        shared = torch.Generator(device=candidate.device).manual_seed(seed)
        fresh.append(expected_elbo(model, candidate, score_samples, sigma0, shared))
        same.append(elbo(model, candidate, noise, sigma0))
    candidate_elbos = torch.stack(fresh)
    fresh_values, index = candidate_elbos.min(0)
    stacked = torch.stack(list(candidates))
    x_adv = stacked[index, torch.arange(stacked.shape[1], device=index.device)]
    return WorstCase(x_adv=x_adv, elbo=fresh_values, elbo_same_noise=torch.stack(same).min(0).values,
                     attack_index=index, candidate_elbos=candidate_elbos)
