"""Out-of-distribution attacks on the ELBO (paper eq. 5; method.md, "Attack").

Every attack searches x' in B(x, eps) intersected with [0, 1]^D (``input_box``; the plain ball
when ``clip`` is off). ``eps`` is one radius or one per example (a tensor [B]).

- ``apgd_attack``: APGD (Croce & Hein, 2020) on the ELBO from one given start (``attack_starts``
  lists the usual ones: the clean input, the residual-sign corner, uniform points); it returns,
  per example, the best point of its own run, start included, by the objective it minimised.
- ``pgd_attack`` (fixed-step PGD, kept as a challenger) and ``latent_attack`` return, per example,
  the candidate with the lowest ELBO under the caller's noise draw (the common random numbers the
  certificate is audited with); the clean input is always one of their candidates, so they never
  report a higher ELBO than no attack.
- ``worst_of`` combines the candidates of several attacks.

Random numbers: every random draw (random starts, EOT noise, scoring draws) comes from the
``generator`` argument, which must live on the same device as ``x`` (``torch.Generator()`` for CPU
tensors, ``torch.Generator(device="cuda")`` for CUDA ones; ``worst_of`` also accepts a CPU one).
The same seed then gives the same result; ``None`` uses torch's global generator of that device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
from torch import Tensor

from .bounds import elbo, input_box, kl_divergence, per_example_radius
from .model import VAE
from .sensitivity import residual_sign_attack

Objective = Callable[[Tensor], Tensor]  # x' [B, ...] -> value to minimise per example [B]


def _uniform_in(lower: Tensor, upper: Tensor, generator: torch.Generator | None) -> Tensor:
    u = torch.rand(lower.shape, generator=generator, device=lower.device, dtype=lower.dtype)
    return lower + u * (upper - lower)


def _per_example(value: float | Tensor, x: Tensor, name: str) -> float | Tensor:
    """A float, or a tensor [B] shaped to broadcast against ``x`` [B, ...]; finite and >= 0."""
    try:
        return per_example_radius(value, x)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None


def _clip(x: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
    return torch.maximum(torch.minimum(x, upper), lower)


def _per_batch(mask: Tensor, like: Tensor) -> Tensor:
    """A [B] mask shaped to broadcast against ``like`` [B, ...]."""
    return mask.view(-1, *([1] * (like.dim() - 1)))


def _value_and_grad(objective: Objective, x: Tensor) -> tuple[Tensor, Tensor]:
    """objective(x) [B] and its gradient w.r.t. x only (autograd skips the weight gradients)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        value = objective(x)
        if value.shape != (x.shape[0],):
            raise ValueError(f"objective must return one value per example, shape ({x.shape[0]},), "
                             f"got {tuple(value.shape)}")
        (grad,) = torch.autograd.grad(value.sum(), x)
    return value.detach(), grad.detach()


def _sign_gradient_descent(
    objective: Objective,
    start: Tensor,
    lower: Tensor,
    upper: Tensor,
    steps: int,
    step_size: float | Tensor,
) -> Tensor:
    """l_inf PGD: x <- clip_box(x - step_size * sign(grad objective)), ``steps`` times.

    ``step_size`` is a float or broadcasts against ``start`` ([B, 1, ...] for one per example).
    """
    x_adv = start.detach()
    for _ in range(steps):
        _, grad = _value_and_grad(objective, x_adv)
        x_adv = _clip(x_adv - step_size * grad.sign(), lower, upper)
    return x_adv.detach()


def apgd_checkpoints(steps: int) -> list[int]:
    """After which steps APGD checks its progress: 22 % of ``steps``, then intervals shrinking by
    3 % of ``steps`` down to 6 % (p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)), rounded down
    as in Croce & Hein's ``autopgd_base.py``."""
    interval = max(int(0.22 * steps), 1)
    shrink, shortest = max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
    points, at = [], interval
    while at <= steps:
        points.append(at)
        interval = max(interval - shrink, shortest)
        at += interval
    return points


def apgd_minimize(
    objective: Objective,
    start: Tensor | None,
    lower: Tensor,
    upper: Tensor,
    *,
    steps: int,
    initial_step: float | Tensor,
    momentum: float = 0.75,
    rho: float = 0.75,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Minimise ``objective`` over the box [lower, upper] by l_inf APGD (Croce & Hein, 2020).

    Returns, per example, the best point seen and its objective value ([B, ...], [B]). The start
    counts: the result is never worse than ``objective(start)`` as evaluated there.

    As ``APGDAttack.attack_single_run`` in fra31/auto-attack (``autopgd_base.py``), for minimising:
    evaluate the start, then ``steps`` times
        z_{k+1} = P(x_k - eta sign(grad f(x_k))),
        x_{k+1} = P(x_k + alpha (z_{k+1} - x_k) + (1 - alpha)(x_k - x_{k-1}))   (alpha = 1 at k = 0),
    with P the projection on the box and alpha = ``momentum``; one objective-and-gradient
    evaluation per step (``steps + 1`` in all). At each checkpoint (``apgd_checkpoints``) the step
    eta of an example is halved, and its iterate (and gradient) reset to its best point, when
    f decreased from one step to the next on at most ``rho`` of the steps since the last checkpoint
    (``<=``, as the reference code), or when neither eta was halved at the last checkpoint nor the
    best value improved since. The best point is kept per example (strict improvement).

    ``start`` is clipped into the box; ``None`` draws a uniform start in it from ``generator``
    (on the box's device), the only random draw made here. ``initial_step`` (callers pass 2 eps) is
    a float or a tensor [B]. ``objective`` may be stochastic (e.g. an EOT average): the best point
    is then chosen by the values it returned. Everything inside the step loop is tensor arithmetic:
    no host synchronisation, so the loop runs asynchronously on a GPU.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not 0 < momentum <= 1 or not 0 <= rho <= 1:
        raise ValueError(f"need 0 < momentum <= 1 and 0 <= rho <= 1, got {momentum}, {rho}")
    lower, upper = lower.detach(), upper.detach()
    x = _uniform_in(lower, upper, generator) if start is None else _clip(start.detach(), lower, upper)
    step = _per_example(initial_step, x, "initial_step")
    per_example_shape = (x.shape[0], *([1] * (x.dim() - 1)))
    if isinstance(step, Tensor):
        step = step.expand(per_example_shape).clone()
    else:
        step = torch.full(per_example_shape, float(step), dtype=x.dtype, device=x.device)

    value, grad = _value_and_grad(objective, x)
    best_x, best_value, best_grad = x, value, grad
    x_prev, prev_value = x, value
    decreases = torch.zeros_like(value)  # steps since the last checkpoint on which f decreased
    best_at_check = best_value
    halved_at_check = torch.ones_like(value, dtype=torch.bool)  # as the reference: no stall test at the first
    checkpoints, last_check = set(apgd_checkpoints(steps)), 0

    for k in range(steps):
        alpha = momentum if k > 0 else 1.0
        z = _clip(x - step * grad.sign(), lower, upper)
        x_prev, x = x, _clip(x + alpha * (z - x) + (1 - alpha) * (x - x_prev), lower, upper)

        value, grad = _value_and_grad(objective, x)
        decreases = decreases + (value < prev_value).to(decreases.dtype)
        prev_value = value
        better = value < best_value
        best_value = torch.where(better, value, best_value)
        better = _per_batch(better, x)
        best_x, best_grad = torch.where(better, x, best_x), torch.where(better, grad, best_grad)

        if k + 1 in checkpoints:
            oscillating = decreases <= rho * (k + 1 - last_check)
            stalled = ~halved_at_check & (best_value >= best_at_check)
            halve = oscillating | stalled
            halved_at_check, best_at_check = halve, best_value
            decreases, last_check = torch.zeros_like(decreases), k + 1
            halve = _per_batch(halve, x)
            step = torch.where(halve, step / 2, step)
            x, grad = torch.where(halve, best_x, x), torch.where(halve, best_grad, grad)
    return best_x, best_value


def _eot_objective(model: VAE, noise: Tensor, eot_samples: int, sigma0: float,
                   generator: torch.Generator | None) -> Objective:
    """The ELBO of x' (target x' itself) to minimise: under ``noise`` when ``eot_samples == 1``,
    else averaged over ``eot_samples`` fresh draws per call, all in one batched forward pass."""
    if eot_samples < 1:
        raise ValueError(f"eot_samples must be >= 1, got {eot_samples}")
    if eot_samples == 1:
        def objective(x_adv: Tensor) -> Tensor:
            return elbo(model, x_adv, noise, sigma0)
    else:
        def objective(x_adv: Tensor) -> Tensor:
            batch = x_adv.shape[0]
            draws = torch.randn((eot_samples * batch, *noise.shape[1:]), generator=generator,
                                device=noise.device, dtype=noise.dtype)
            repeated = x_adv.repeat(eot_samples, *([1] * (x_adv.dim() - 1)))  # draw-major: [eot * B, ...]
            return elbo(model, repeated, draws, sigma0).view(eot_samples, batch).mean(0)
    return objective


def apgd_attack(
    model: VAE,
    x: Tensor,
    eps: float | Tensor,
    noise: Tensor,
    *,
    start: Tensor | None,
    steps: int = 100,
    eot_samples: int = 1,
    sigma0: float = 1.0,
    clip: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Minimise the ELBO of x' (reconstruction target x' itself) over ``input_box(x, eps, clip)``
    by APGD (``apgd_minimize``, initial step 2 eps) from ``start``   (paper eq. 5; method.md, "Attack").

    ``eot_samples == 1`` attacks the ELBO under the fixed ``noise`` (common random numbers);
    ``eot_samples > 1`` the ELBO averaged over that many fresh draws per step (from ``generator``),
    computed in one batched forward pass. Returns, per example, the best point of the run (start
    included) by that objective: with ``eot_samples == 1`` its ELBO under ``noise`` is never above
    the start's. ``start=None`` draws a uniform start from ``generator``; see ``attack_starts``.
    """
    box = input_box(x, eps, clip)
    objective = _eot_objective(model, noise, eot_samples, sigma0, generator)
    best_x, _ = apgd_minimize(objective, start, box.lower, box.upper, steps=steps, initial_step=2 * eps,
                              generator=generator)
    return best_x


def attack_starts(
    model: VAE,
    x: Tensor,
    eps: float | Tensor,
    *,
    random_starts: int,
    clip: bool = True,
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """Starting points for ``apgd_attack``: the clean input, the residual-sign corner
    (``residual_sign_attack``: each pixel at the end of its box farther from g(mu(x))), then
    ``random_starts`` uniform points of ``input_box(x, eps, clip)`` drawn from ``generator``."""
    if random_starts < 0:
        raise ValueError(f"random_starts must be >= 0, got {random_starts}")
    box = input_box(x, eps, clip)
    starts = [x.detach().clone(), residual_sign_attack(model, x, eps, clip)]
    starts += [_uniform_in(box.lower, box.upper, generator) for _ in range(random_starts)]
    return starts


def _restarted_attack(
    model: VAE,
    x: Tensor,
    eps: float | Tensor,
    noise: Tensor,
    objective: Objective,
    *,
    steps: int,
    step_size: float | Tensor,
    restarts: int,
    random_start: bool,
    sigma0: float,
    clip: bool,
    generator: torch.Generator | None,
) -> Tensor:
    """Run ``restarts`` PGD runs on ``objective``; keep per example the lowest ELBO(noise) seen."""
    if steps < 0 or restarts < 1:
        raise ValueError(f"need steps >= 0, restarts >= 1; got {steps}, {restarts}")
    step_size = _per_example(step_size, x, "step_size")
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
        best_elbo = torch.where(better, value, best_elbo)
        best_x = torch.where(_per_batch(better, x), x_adv, best_x)
    return best_x


def _default_step(eps: float | Tensor, steps: int) -> float | Tensor:
    return 2.5 * eps / max(steps, 1)


def pgd_attack(
    model: VAE,
    x: Tensor,
    eps: float | Tensor,
    noise: Tensor,
    *,
    steps: int = 100,
    step_size: float | Tensor | None = None,
    restarts: int = 1,
    random_start: bool = True,
    eot_samples: int = 1,
    sigma0: float = 1.0,
    clip: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Minimise the ELBO of x' (reconstruction target x' itself) by fixed-step l_inf PGD   (paper eq. 5).

    ``eot_samples == 1`` attacks the ELBO under the fixed ``noise`` (common random numbers);
    ``eot_samples > 1`` follows the gradient averaged over that many fresh noise draws per step
    (expectation over transformation), in one batched forward pass. ``step_size`` (a float or a
    tensor [B]) defaults to 2.5 * eps / steps (Madry et al.). Restarts are compared by the ELBO
    under ``noise``. A challenger to ``apgd_attack``, whose adaptive step it lacks.
    """
    objective = _eot_objective(model, noise, eot_samples, sigma0, generator)
    if step_size is None:
        step_size = _default_step(eps, steps)
    return _restarted_attack(
        model, x, eps, noise, objective, steps=steps, step_size=step_size, restarts=restarts,
        random_start=random_start, sigma0=sigma0, clip=clip, generator=generator,
    )


def latent_attack(
    model: VAE,
    x: Tensor,
    eps: float | Tensor,
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
        step_size = _default_step(eps, steps)
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
def mean_elbo_over(model: VAE, x: Tensor, draws: Tensor, sigma0: float = 1.0) -> Tensor:
    """Mean of the ELBO over the given noise draws [S, B, latent_dim]. [B]"""
    if draws.dim() != 3 or draws.shape[0] < 1:
        raise ValueError(f"draws must have shape (samples >= 1, batch, latent_dim), got {tuple(draws.shape)}")
    return torch.stack([elbo(model, x, draw, sigma0) for draw in draws]).mean(0)


def expected_elbo(
    model: VAE, x: Tensor, samples: int, sigma0: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    """Monte Carlo mean of the ELBO over ``samples`` fresh noise draws. [B]"""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    draws = torch.randn((samples, x.shape[0], model.latent_dim), generator=generator, device=x.device)
    return mean_elbo_over(model, x, draws, sigma0)


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
    score_noise: Tensor | None = None,
    score_samples: int = 8,
    sigma0: float = 1.0,
    generator: torch.Generator | None = None,
) -> WorstCase:
    """Combine attacks: per example, the candidate with the lowest ELBO.

    ``elbo`` scores every candidate with the same noise draws, ``score_noise`` [S, B, latent_dim]
    when given (so that other runs can score other attacks on the same draws), else
    ``score_samples`` draws from ``generator``. They are fresh with respect to the attacks, so an
    attack tuned to one draw is not over-credited. ``elbo_same_noise`` is the lowest ELBO under
    ``noise`` itself, the value the certificate for ``noise`` must stay below.
    """
    if not candidates:
        raise ValueError("worst_of needs at least one candidate")
    if score_noise is None:
        device = generator.device if generator is not None else candidates[0].device
        score_noise = torch.randn((score_samples, *noise.shape), generator=generator, device=device)
    score_noise = score_noise.to(candidates[0].device)
    candidate_elbos = torch.stack([mean_elbo_over(model, candidate, score_noise, sigma0) for candidate in candidates])
    same = torch.stack([elbo(model, candidate, noise, sigma0) for candidate in candidates])
    fresh_values, index = candidate_elbos.min(0)
    stacked = torch.stack(list(candidates))
    x_adv = stacked[index, torch.arange(stacked.shape[1], device=index.device)]
    return WorstCase(x_adv=x_adv, elbo=fresh_values, elbo_same_noise=same.min(0).values,
                     attack_index=index, candidate_elbos=candidate_elbos)
