"""Attack-strength stage: can any other attack beat the attack curve?

Re-attacks the first `attack_strength.examples` images that `evaluate` attacked, at every
eps_attack > 0 and in both balls, with challengers: the curve's own attack with a bigger budget
(more APGD steps, more random starts, more EOT draws), fixed-step PGD as the project used before
APGD, the one-step residual-sign attack and the latent attack alone. Each challenger is scored
like the curve (fresh noise) and compared with the curve's own per-image values on the same
images. The stage fails, like the certificate audit, if a challenger lowers the mean attacked ELBO
by more than the tolerance: max(tolerance_nats, tolerance_relative x |curve|). Cheaper settings
are measured too (not gated): where they stay within the tolerance, the curve's budget could shrink.
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
from evaluate import BALLS, attack_pairs, evaluation_noise, load_for_evaluation, pairs_of

from provae.attacks import latent_attack, pgd_attack, worst_of
from provae.data import DataError
from provae.runtime import derived_seed, device_generator
from provae.sensitivity import residual_sign_attack

ONE_ATTACK = {  # challengers that are a single attack rather than the curve's attack with other settings
    # Fixed-step PGD as `evaluate` ran it before APGD: step 2.5 eps / steps (Madry et al.).
    "pgd": lambda model, x, eps, noise, p, sigma0, clip, g: pgd_attack(
        model, x, eps, noise, steps=p["pgd_steps"], restarts=p["pgd_restarts"], eot_samples=p["eot_samples"],
        sigma0=sigma0, clip=clip, generator=g),
    "residual_sign": lambda model, x, eps, noise, p, sigma0, clip, g: residual_sign_attack(model, x, eps, clip),
    "latent": lambda model, x, eps, noise, p, sigma0, clip, g: latent_attack(
        model, x, eps, noise, objective="kl", steps=p["latent_attack_steps"], sigma0=sigma0, clip=clip, generator=g),
}


def challenge(model, x, eps, noise, score_noise, p, sigma0: float, clip: bool, generator) -> torch.Tensor:
    """Per pair, the challenger's attacked ELBO, scored on the curve's own draws (never above the
    clean input's)."""
    method = p.get("method", "curve")
    if method == "curve":
        return attack_pairs(model, x, eps, noise, score_noise, p, sigma0, clip, generator)["elbo_attacked"]
    if method not in ONE_ATTACK:
        raise ValueError(f"unknown challenger method {method!r}; use 'curve' or one of {sorted(ONE_ATTACK)}")
    candidate = ONE_ATTACK[method](model, x, eps, noise, p, sigma0, clip, generator)
    return worst_of(model, [x, candidate], noise, score_noise=score_noise, sigma0=sigma0).elbo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eps-train", required=True, type=eps_value)
    parser.add_argument("--seed", required=True, type=int)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--per-example", required=True, help="evaluate's per_example.npz (the curve per image)")
    parser.add_argument("--out", required=True, help="one row per (ball, eps_attack, challenger), .csv")
    args = parser.parse_args()
    params = load_params()
    evaluate, strength, seed = params["evaluate"], params["attack_strength"], args.seed

    loaded = load_for_evaluation(args.model, args.eps_train, seed, args.data, evaluate["device"])
    model, sigma0 = loaded.model, loaded.meta["sigma0"]
    with np.load(args.per_example) as saved:
        curve = {key: saved[key] for key in saved.files}
    n = min(strength["examples"], curve["unclipped/elbo_attacked"].shape[1])
    images = loaded.test_images[:n]
    noise = evaluation_noise(n, model.latent_dim, seed, evaluate, images.device)
    eps_grid, pair_eps, pair_index = pairs_of(images, curve["eps_attack"])

    rows = []
    for ball, clip in BALLS.items():
        curve_values = curve[f"{ball}/elbo_attacked"][[list(curve["eps_attack"]).index(e) for e in eps_grid], :n]
        settings = [(name, setting, True) for name, setting in strength["challengers"].items()]
        settings += [(name, setting, False) for name, setting in strength.get("cheaper", {}).items()]
        for name, setting, gated in settings:
            p = {**evaluate, **setting}
            generator = device_generator(images.device, derived_seed(seed, f"challenger {name} {ball}"))
            started = time.perf_counter()
            chunks = []
            for i in range(0, pair_eps.shape[0], p["batch_size"]):
                index = pair_index[i : i + p["batch_size"]]
                chunks.append(challenge(model, images[index], pair_eps[i : i + p["batch_size"]], noise["certificate"][index],
                                        noise["scoring"][:, index], p, sigma0, clip, generator).cpu())
            values = torch.cat(chunks).view(len(eps_grid), n).numpy()
            seconds = time.perf_counter() - started
            for row, eps in enumerate(eps_grid):
                mean_curve, mean_challenger = float(curve_values[row].mean()), float(values[row].mean())
                tolerance = max(strength["tolerance_nats"], strength["tolerance_relative"] * abs(mean_curve))
                rows.append({"ball": ball, "eps_attack": eps, "challenger": name, "gated": gated, "curve": mean_curve,
                             "challenger_elbo": mean_challenger, "change": mean_challenger - mean_curve,
                             # How far the curve would fall with this challenger added as a candidate.
                             "change_if_added": float(np.minimum(values[row], curve_values[row]).mean()) - mean_curve,
                             "tolerance": tolerance, "beats_curve": gated and mean_challenger < mean_curve - tolerance,
                             "seconds": round(seconds / len(eps_grid), 2)})
            print(f"{ball} {name}: " + ", ".join(f"{r['eps_attack']:g} {r['change']:+.2f}" for r in rows[-len(eps_grid):]),
                  flush=True)
    table = pd.DataFrame(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False, float_format="%.6g")
    beaten = table[table["beats_curve"]]
    if len(beaten):
        sys.exit("attack-strength check FAILED: a challenger beat the attack curve by more than the tolerance:\n"
                 + beaten[["ball", "eps_attack", "challenger", "change", "tolerance"]].to_string(index=False))


if __name__ == "__main__":
    try:
        main()
    except (DataError, ValueError) as error:
        sys.exit(f"attack_strength stage failed: {error}")
