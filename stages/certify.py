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
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from common import eps_value, load_params
from evaluate import BALLS, evaluation_noise, load_for_evaluation

from provae.bounds import elbo, elbo_lower_bound
from provae.data import DataError
from provae.linear_bounds import crown_elbo_lower_bound


def bound_method(name: str, intermediate: str):
    """LB(model, x, eps, noise, sigma0, clip) for a method named in params."""
    if name == "ibp":
        return elbo_lower_bound
    if name == "crown":
        return lambda model, x, eps, noise, sigma0, clip: crown_elbo_lower_bound(
            model, x, eps, noise, sigma0, clip, intermediate=intermediate)
    raise ValueError(f"unknown bound method {name!r}; use 'ibp' or 'crown'")


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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eps-train", required=True, type=eps_value)
    parser.add_argument("--seed", required=True, type=int)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--per-example", required=True, help="evaluate's per_example.npz")
    parser.add_argument("--bounds", required=True, help="one row per (ball, eps_attack, method), .csv")
    parser.add_argument("--radii", required=True, help="one row per (image, method, tau), .csv")
    args = parser.parse_args()
    params = load_params()
    evaluate, p, seed = params["evaluate"], params["certify"], args.seed

    loaded = load_for_evaluation(args.model, args.eps_train, seed, args.data, p["device"])
    model, sigma0, headline = loaded.model, loaded.meta["sigma0"], "clipped" if loaded.meta["clip"] else "unclipped"
    with np.load(args.per_example) as saved:
        attacked = {key: saved[key] for key in saved.files}
    n = min(p["examples"], attacked["unclipped/elbo_attacked"].shape[1])
    x = loaded.test_images[:n]
    noise = evaluation_noise(n, model.latent_dim, seed, evaluate, x.device)["certificate"]
    with torch.no_grad():
        clean = elbo(model, x, noise, sigma0)
    eps_grid = [float(e) for e in attacked["eps_attack"]]

    rows, radii = [], []
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
                margin = attack - values
                rows.append({"ball": ball, "eps_attack": eps, "method": method, "bound": float(values.mean()),
                             "attacked_elbo": float(attack.mean()), "gap": float(margin.mean()),
                             "violations": int((margin < -evaluate["audit_tolerance"] * np.abs(values)).sum()),
                             "seconds_per_image": seconds / n})
        taus = [("nats", t) for t in p["tau_nats"]] + [("relative", t) for t in p["tau_relative"]]
        for kind, tau in taus:
            floor = clean - (tau if kind == "nats" else tau * clean.abs())
            radius = certified_radius(bound, model, x, noise, floor, eps_grid, torch.stack(at_headline),
                                      p["bisection_steps"], sigma0, BALLS[headline], p["batch_size"]).cpu().numpy()
            radii += [{"image": j, "method": method, "tau": f"{tau:g} nats" if kind == "nats" else f"{tau:.0%} of |ELBO|",
                       "ball": headline, "radius": float(r)} for j, r in enumerate(radius)]
        print(f"{method}: " + ", ".join(f"{r['ball'][0]} {r['eps_attack']:g}: {r['bound']:.1f}" for r in rows
                                        if r["method"] == method), flush=True)
    table = pd.DataFrame(rows)
    for path, frame in ((args.bounds, table), (args.radii, pd.DataFrame(radii))):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(path, index=False, float_format="%.6g")
    violations = int(table["violations"].sum())
    if violations:
        sys.exit(f"certificate audit FAILED: {violations} attacked ELBOs fell below a certified bound "
                 f"(see {args.bounds}); a bound method or the attack is wrong")


if __name__ == "__main__":
    try:
        main()
    except (DataError, ValueError) as error:
        sys.exit(f"certify stage failed: {error}")
