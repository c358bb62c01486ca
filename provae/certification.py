"""The certification protocol the `certify` and `certify_elbo` stages share: each bound method's
certified lower bound of the ELBO over the eps_attack grid, audited against `evaluate`'s attacks for
the same noise, and each image's certified radius.

For one model, on images that `evaluate` attacked, with `evaluate`'s certificate noise:
- the certified bound LB_method(x, eps) at every eps_attack of each ball, beside the attacked ELBO
  for the same noise: the audit (an attack below any method's bound, or a NaN, fails it);
- in the headline ball, the certified radius: the largest eps (the largest eps_attack where it
  holds, then bisection towards the next one) with LB_method(x, eps) >= ELBO(x) - tau, for tau in
  nats and relative to |ELBO|. The ball of that radius is certified whether or not the bound falls
  monotonically in eps: only radii that were checked are kept.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from provae.bounds import elbo, elbo_lower_bound
from provae.certificate_audit import CertificateAudit, audit_certificate
from provae.elbo_relaxation import elbo_relaxation_lower_bound
from provae.evaluation import BALLS
from provae.linear_bounds import crown_elbo_lower_bound

METHODS = ("ibp", "crown", "elbo")


def bound_method(name: str, intermediate: str):
    """LB(model, x, eps, noise, sigma0, clip) for a method named in params."""
    if name == "ibp":
        return elbo_lower_bound
    if name == "crown":
        return lambda model, x, eps, noise, sigma0, clip: crown_elbo_lower_bound(
            model, x, eps, noise, sigma0, clip, intermediate=intermediate)
    if name == "elbo":  # the ELBO itself as the specification, whole-VAE boxes, optimised lines
        return lambda model, x, eps, noise, sigma0, clip: elbo_relaxation_lower_bound(
            model, x, eps, noise, sigma0, clip, decoder_boxes="input", slope_steps=80, intermediate=intermediate)
    raise ValueError(f"unknown bound method {name!r}; use 'ibp', 'crown' or 'elbo'")


@torch.no_grad()
def batched(bound, model, x, eps, noise, sigma0: float, clip: bool, batch_size: int) -> torch.Tensor:
    """The bound over ``x`` in batches; ``eps`` a float or one per image."""
    parts = []
    for i in range(0, x.shape[0], batch_size):
        radius = eps if not isinstance(eps, torch.Tensor) else eps[i : i + batch_size]
        parts.append(bound(model, x[i : i + batch_size], radius, noise[i : i + batch_size], sigma0, clip))
    return torch.cat(parts)


def certified_radius(bound, model, x, noise, floor: torch.Tensor, eps_grid: list[float], grid_bounds: torch.Tensor,
                     steps: int, sigma0: float, clip: bool, batch_size: int) -> torch.Tensor:
    """Per image, the largest checked eps with bound >= ``floor``: the largest point of ``eps_grid``
    where it holds (``grid_bounds`` [n_eps, B], computed already), then ``steps`` bisections towards
    the next grid point. [B]"""
    grid = torch.tensor(eps_grid, device=x.device)
    holds = grid_bounds >= floor  # [n_eps, B]; eps 0 holds: the bound is the ELBO there
    last = (holds.float() * torch.arange(1, len(eps_grid) + 1, device=x.device)[:, None]).argmax(0)
    certified = grid[last]
    failed = grid[(last + 1).clamp(max=len(eps_grid) - 1)]
    open_ = last + 1 < len(eps_grid)  # images that hold at the largest eps need no bisection
    for _ in range(steps):
        middle = (certified + failed) / 2
        ok = batched(bound, model, x, middle, noise, sigma0, clip, batch_size) >= floor
        certified = torch.where(ok & open_, middle, certified)
        failed = torch.where(ok | ~open_, failed, middle)
    return certified


def tau_floors(clean: torch.Tensor, tau_nats, tau_relative) -> list[tuple[str, torch.Tensor]]:
    """(label, ELBO(x) - tau) per tau: in nats, then relative to |ELBO(x)|."""
    return ([(f"{tau:g} nats", clean - tau) for tau in tau_nats]
            + [(f"{tau:.0%} of |ELBO|", clean - tau * clean.abs()) for tau in tau_relative])


@dataclass
class Certificates:
    """What one model's certification found: rows of bounds.csv and radii.csv, and the audits."""

    bounds: list[dict] = field(default_factory=list)
    radii: list[dict] = field(default_factory=list)
    audits: list[CertificateAudit] = field(default_factory=list)


def certify_model(model, x: torch.Tensor, noise: torch.Tensor, attacked: dict, eps_grid: list[float], p: dict,
                  balls: list[str], headline: str, sigma0: float, audit_tolerance: float) -> Certificates:
    """Every method of ``p["methods"]`` on ``x`` (the first images `evaluate` attacked, with its
    certificate ``noise``) at every eps of ``eps_grid`` in each ball of ``balls``, audited against
    ``attacked`` (`evaluate`'s per_example arrays, '<ball>/elbo_attacked_same_noise' [n_eps, >= B]);
    radii in the ``headline`` ball, which must be among ``balls``. ``p``: certify's settings."""
    unknown = [b for b in balls if b not in BALLS]
    if unknown or headline not in balls:
        raise ValueError(f"balls {list(balls)}: each must be one of {list(BALLS)}, and the headline ball "
                         f"{headline!r} among them (its radii are certified)")
    n = x.shape[0]
    with torch.no_grad():
        clean = elbo(model, x, noise, sigma0)
    found = Certificates()
    for method in p["methods"]:
        bound = bound_method(method, p["intermediate"])
        at_headline = []
        for ball in balls:
            for i, eps in enumerate(eps_grid):
                started = time.perf_counter()
                values = batched(bound, model, x, eps, noise, sigma0, BALLS[ball], p["batch_size"])
                seconds = time.perf_counter() - started
                if ball == headline:
                    at_headline.append(values)
                values = values.cpu().numpy()
                attack = attacked[f"{ball}/elbo_attacked_same_noise"][i, :n]
                found.audits.append(audit_certificate(values, attack, audit_tolerance,
                                                      f"{ball} ball, eps_attack {eps:g}, {method}"))
                found.bounds.append({"ball": ball, "eps_attack": eps, "method": method, "bound": float(values.mean()),
                                     "attacked_elbo": float(attack.mean()), "gap": float((attack - values).mean()),
                                     "violations": found.audits[-1].violations, "seconds_per_image": seconds / n})
        for tau, floor in tau_floors(clean, p["tau_nats"], p["tau_relative"]):
            radius = certified_radius(bound, model, x, noise, floor, eps_grid, torch.stack(at_headline),
                                      p["bisection_steps"], sigma0, BALLS[headline], p["batch_size"]).cpu().numpy()
            found.radii += [{"image": j, "method": method, "tau": tau, "ball": headline, "radius": float(r)}
                            for j, r in enumerate(radius)]
        print(f"{method}: " + ", ".join(f"{r['ball'][0]} {r['eps_attack']:g}: {r['bound']:.1f}" for r in found.bounds
                                        if r["method"] == method), flush=True)
    return found


def first_attacked(attacked: dict, examples: int) -> int:
    """How many images to certify: ``examples``, or fewer if `evaluate` attacked fewer."""
    return int(min(examples, np.asarray(attacked["unclipped/elbo_attacked"]).shape[1]))
