"""Certify stage: the ELBO's certified lower bound by each bound method (IBP, and the tighter linear
relaxation of `provae.linear_bounds`) over the eps_attack grid, and each test image's certified
radius, for one trained model.

On the first `certify.examples` images that `evaluate` attacked, with `evaluate`'s own certificate
noise, in both balls:
- the certified bound LB_method(x, eps) at every eps_attack, beside `evaluate`'s attacked ELBO for
  the same noise: the audit (an attack below any method's bound fails the stage);
- in the headline ball, the certified radius: the largest eps (the largest eps_attack where it
  holds, then bisection towards the next one) with LB_method(x, eps) >= ELBO(x) - tau, for tau in
  nats and relative to |ELBO|. The ball of that radius is certified whether or not the bound falls
  monotonically in eps: only radii that were checked are kept.
The audit is `provae.certificate_audit`'s: a NaN bound or attacked ELBO fails it too.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch
from common import end_with_audit, per_model_stage, run_stage, write_csv

from provae.bounds import elbo, elbo_lower_bound
from provae.certificate_audit import audit_certificate
from provae.data import DataError
from provae.elbo_relaxation import elbo_relaxation_lower_bound
from provae.evaluation import BALLS, ball_name, evaluation_noise
from provae.linear_bounds import crown_elbo_lower_bound


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


def main() -> None:
    args, params, loaded = per_model_stage(__doc__.splitlines()[0], {
        "--per-example": "evaluate's per_example.npz", "--bounds": "one row per (ball, eps_attack, method), .csv",
        "--radii": "one row per (image, method, tau), .csv"}, device_params="certify")
    evaluate, p, seed = params["evaluate"], params["certify"], args.seed
    model, sigma0, headline = loaded.model, loaded.meta["sigma0"], ball_name(loaded.meta["clip"])
    with np.load(args.per_example) as saved:
        attacked = {key: saved[key] for key in saved.files}
    n = min(p["examples"], attacked["unclipped/elbo_attacked"].shape[1])
    x = loaded.test_images[:n]
    noise = evaluation_noise(n, model.latent_dim, seed, evaluate, x.device)["certificate"]
    with torch.no_grad():
        clean = elbo(model, x, noise, sigma0)
    eps_grid = [float(e) for e in attacked["eps_attack"]]

    rows, radii, audits = [], [], []
    for method in p["methods"]:
        bound = bound_method(method, p["intermediate"])
        at_headline = []
        for ball, clip in BALLS.items():
            for i, eps in enumerate(eps_grid):
                started = time.perf_counter()
                values = batched(bound, model, x, eps, noise, sigma0, clip, p["batch_size"])
                seconds = time.perf_counter() - started
                if ball == headline:
                    at_headline.append(values)
                values = values.cpu().numpy()
                attack = attacked[f"{ball}/elbo_attacked_same_noise"][i, :n]
                audits.append(audit_certificate(values, attack, evaluate["audit_tolerance"],
                                                f"{ball} ball, eps_attack {eps:g}, {method}"))
                rows.append({"ball": ball, "eps_attack": eps, "method": method, "bound": float(values.mean()),
                             "attacked_elbo": float(attack.mean()), "gap": float((attack - values).mean()),
                             "violations": audits[-1].violations, "seconds_per_image": seconds / n})
        taus = [("nats", t) for t in p["tau_nats"]] + [("relative", t) for t in p["tau_relative"]]
        for kind, tau in taus:
            floor = clean - (tau if kind == "nats" else tau * clean.abs())
            radius = certified_radius(bound, model, x, noise, floor, eps_grid, torch.stack(at_headline),
                                      p["bisection_steps"], sigma0, BALLS[headline], p["batch_size"]).cpu().numpy()
            radii += [{"image": j, "method": method, "tau": f"{tau:g} nats" if kind == "nats" else f"{tau:.0%} of |ELBO|",
                       "ball": headline, "radius": float(r)} for j, r in enumerate(radius)]
        print(f"{method}: " + ", ".join(f"{r['ball'][0]} {r['eps_attack']:g}: {r['bound']:.1f}" for r in rows
                                        if r["method"] == method), flush=True)
    write_csv(args.bounds, pd.DataFrame(rows))
    write_csv(args.radii, pd.DataFrame(radii))
    end_with_audit(audits, loaded.label, see=args.bounds)


if __name__ == "__main__":
    run_stage(main, "certify", errors=(DataError,))
