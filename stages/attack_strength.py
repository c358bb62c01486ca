"""Attack-strength stage: can any other attack beat the attack curve?

Re-attacks the first `attack_strength.examples` images that `evaluate` attacked, at every
eps_attack > 0 and in both balls, with challengers: the curve's own attack with a bigger budget
(more APGD steps, more random starts, more EOT draws), fixed-step PGD as the project used before
APGD, the one-step residual-sign attack and the latent attack alone. Each challenger is scored
like the curve (fresh noise) and compared with the curve's own per-image values on the same
images. The stage fails, like the certificate audit, if a challenger lowers the mean attacked ELBO
by more than the tolerance: max(tolerance_nats, tolerance_relative x |curve|), or if either mean
is NaN. Cheaper settings are measured too (not gated): where they stay within the tolerance, the
curve's budget could shrink.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import pandas as pd
from common import per_model_stage, run_stage, write_csv

from provae.certificate_audit import attack_tolerance, challenger_beats_curve, excusable_beats
from provae.grid import GridModel
from provae.data import DataError
from provae.evaluation import BALLS, attacked_elbos, challenge, evaluation_noise, pairs_of
from provae.runtime import derived_seed, device_generator


def main() -> None:
    args, params, loaded = per_model_stage(__doc__.splitlines()[0], {
        "--per-example": "evaluate's per_example.npz (the curve per image)",
        "--out": "one row per (ball, eps_attack, challenger), .csv"}, model_list="attack_strength")
    evaluate, strength, seed = params["evaluate"], params["attack_strength"], args.seed
    model, sigma0 = loaded.model, loaded.meta["sigma0"]
    with np.load(args.per_example) as saved:
        curve = {key: saved[key] for key in saved.files}
    n = min(strength["examples"], curve["unclipped/elbo_attacked"].shape[1])
    images = loaded.test_images[:n]
    noise = evaluation_noise(n, model.latent_dim, seed, evaluate, images.device)
    eps_grid = pairs_of(images, curve["eps_attack"])[0]

    rows = []
    for ball, clip in BALLS.items():
        curve_values = curve[f"{ball}/elbo_attacked"][[list(curve["eps_attack"]).index(e) for e in eps_grid], :n]
        settings = [(name, setting, True) for name, setting in strength["challengers"].items()]
        settings += [(name, setting, False) for name, setting in strength.get("cheaper", {}).items()]
        for name, setting, gated in settings:
            p = {**evaluate, **setting}
            generator = device_generator(images.device, derived_seed(seed, f"challenger {name} {ball}"))
            started = time.perf_counter()
            values = attacked_elbos(challenge, model, images, eps_grid, noise, p, sigma0, clip, generator)
            seconds = time.perf_counter() - started
            for row, eps in enumerate(eps_grid):
                mean_curve, mean_challenger = float(curve_values[row].mean()), float(values[row].mean())
                tolerance = attack_tolerance(mean_curve, strength["tolerance_nats"], strength["tolerance_relative"])
                rows.append({"ball": ball, "eps_attack": eps, "challenger": name, "gated": gated, "curve": mean_curve,
                             "challenger_elbo": mean_challenger, "change": mean_challenger - mean_curve,
                             # How far the curve would fall with this challenger added as a candidate.
                             "change_if_added": float(np.minimum(values[row], curve_values[row]).mean()) - mean_curve,
                             "tolerance": tolerance,
                             "beats_curve": gated and challenger_beats_curve(mean_curve, mean_challenger, tolerance),
                             "seconds": round(seconds / len(eps_grid), 2)})
            print(f"{ball} {name}: " + ", ".join(f"{r['eps_attack']:g} {r['change']:+.2f}" for r in rows[-len(eps_grid):]),
                  flush=True)
    table = pd.DataFrame(rows)
    write_csv(args.out, table)
    beaten = table[table["beats_curve"]]
    if not len(beaten):
        return
    listing = beaten[["ball", "eps_attack", "challenger", "change", "tolerance"]].to_string(index=False)
    model = GridModel(loaded.meta["dataset"], args.eps_train, seed).id
    nan = beaten["change"].isna().any()  # nothing was measured there: never excused
    if not nan and excusable_beats(sorted(set(beaten["challenger"])), strength["budget_challengers"],
                       model in strength["upper_bound_models"]):
        print(f"\n*** UPPER BOUND: {model}'s attack curve is not converged; the report marks it where a larger "
              f"budget lowers it (attack_strength.upper_bound_models):\n{listing}\n", flush=True)
        return
    sys.exit("attack-strength check FAILED: a challenger beat the attack curve by more than the tolerance"
             + (" or its mean ELBO or the curve's is NaN" if nan else "") + ":\n" + listing)

if __name__ == "__main__":
    run_stage(main, "attack_strength", errors=(DataError,))
