"""Certify-ELBO stage: the ELBO itself as the certify specification (method `elbo`,
`provae.elbo_relaxation`) beside IBP and the box-wise relaxation, for one model of
`certify_elbo.models`.

The `elbo` method costs 1-4 s per image and eps on 2 CPU cores, so it runs on fewer images than
`certify` (the first `certify_elbo.examples` it certifies) and in the model's headline ball only,
by the same protocol (`provae.certification`) and with certify's other settings. Every method of
`certify_elbo.methods` runs on the same images, so the share of the gap each closes is comparable
within this stage's files (never with certify's, which average more images).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from common import end_with_audit, per_model_stage, run_stage, write_csv

from provae.certification import certify_model, first_attacked
from provae.data import DataError
from provae.evaluation import ball_name, evaluation_noise


def main() -> None:
    args, params, loaded = per_model_stage(__doc__.splitlines()[0], {
        "--per-example": "evaluate's per_example.npz", "--bounds": "one row per (eps_attack, method), .csv",
        "--radii": "one row per (image, method, tau), .csv"}, device_params="certify", model_list="certify_elbo")
    evaluate, own = params["evaluate"], params["certify_elbo"]
    p = {**params["certify"], "methods": own["methods"]}
    with np.load(args.per_example) as saved:
        attacked = {key: saved[key] for key in saved.files}
    n = first_attacked(attacked, min(own["examples"], params["certify"]["examples"]))
    x = loaded.test_images[:n]
    # The first n of certify's noise draws: the same images and noise as certify's first n rows.
    noise = evaluation_noise(n, loaded.model.latent_dim, args.seed, evaluate, x.device)["certificate"]
    headline = ball_name(loaded.meta["clip"])
    found = certify_model(loaded.model, x, noise, attacked, [float(e) for e in attacked["eps_attack"]], p, [headline],
                          headline, loaded.meta["sigma0"], evaluate["audit_tolerance"])
    write_csv(args.bounds, pd.DataFrame(found.bounds))
    write_csv(args.radii, pd.DataFrame(found.radii))
    end_with_audit(found.audits, loaded.label, see=args.bounds)


if __name__ == "__main__":
    run_stage(main, "certify_elbo", errors=(DataError,))
