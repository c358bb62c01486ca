"""Certify stage: the ELBO's certified lower bound by each bound method (IBP, and the tighter linear
relaxation of `provae.linear_bounds`) over the eps_attack grid, and each test image's certified
radius, for one trained model.

On the first `certify.examples` images that `evaluate` attacked, with `evaluate`'s own certificate
noise, in both balls, by `provae.certification`'s protocol: the certified bound at every eps_attack
beside `evaluate`'s attacked ELBO for the same noise (the audit: an attack below any method's bound,
or a NaN, fails the stage), and in the headline ball each image's certified radius.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from common import end_with_audit, per_model_stage, run_stage, write_csv

from provae.certification import certify_model, first_attacked
from provae.data import DataError
from provae.evaluation import BALLS, ball_name, evaluation_noise


def main() -> None:
    args, params, loaded = per_model_stage(__doc__.splitlines()[0], {
        "--per-example": "evaluate's per_example.npz", "--bounds": "one row per (ball, eps_attack, method), .csv",
        "--radii": "one row per (image, method, tau), .csv"}, device_params="certify")
    evaluate, p = params["evaluate"], params["certify"]
    with np.load(args.per_example) as saved:
        attacked = {key: saved[key] for key in saved.files}
    n = first_attacked(attacked, p["examples"])
    x = loaded.test_images[:n]
    noise = evaluation_noise(n, loaded.model.latent_dim, args.seed, evaluate, x.device)["certificate"]
    found = certify_model(loaded.model, x, noise, attacked, [float(e) for e in attacked["eps_attack"]], p, list(BALLS),
                          ball_name(loaded.meta["clip"]), loaded.meta["sigma0"], evaluate["audit_tolerance"])
    write_csv(args.bounds, pd.DataFrame(found.bounds))
    write_csv(args.radii, pd.DataFrame(found.radii))
    end_with_audit(found.audits, loaded.label, see=args.bounds)


if __name__ == "__main__":
    run_stage(main, "certify", errors=(DataError,))
