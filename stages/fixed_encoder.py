"""Fixed-encoder stage: how much of the attacked ELBO's fall would remain with an encoder that
ignores the perturbation?

For the images `evaluate` attacks, in both balls and at each eps_attack, three falls of the mean ELBO:
- fixed_encoder_drop: the worst input in the ball scored against the clean input's own latent
  code (`fixed_encoder_elbo_drop`, exact);
- attack_drop: what `evaluate`'s attacks found (its curve);
- residual_sign_drop: the true ELBO (re-encoded) at that worst input (`residual_sign_attack`),
  the one-step attack that is also one of APGD's starts.
Where the first two agree, the model loses no more than the Gaussian likelihood's own
sensitivity to its input: a loss no encoder certificate removes, and one that grows with how
far the reconstructions are from the inputs.
"""

from __future__ import annotations

import pandas as pd
import torch
from common import per_model_stage, run_stage, write_csv

from provae.attacks import mean_elbo_over
from provae.data import DataError
from provae.evaluation import BALLS, evaluation_noise
from provae.sensitivity import fixed_encoder_elbo_drop, residual_sign_attack


def main() -> None:
    args, params, loaded = per_model_stage(__doc__.splitlines()[0], {
        "--curve": "evaluate's attack curves .csv", "--out": "one row per (ball, eps_attack), .csv"})
    p, seed = params["evaluate"], args.seed
    model, sigma0 = loaded.model, loaded.meta["sigma0"]
    images = loaded.test_images[: p["attack_examples"]]
    attacked = pd.read_csv(args.curve).set_index("eps_attack")
    draws = evaluation_noise(images.shape[0], model.latent_dim, seed, p, images.device)["scoring"]

    def score(x):  # evaluate's own scoring draws: common random numbers with its curve
        return mean_elbo_over(model, x, draws, sigma0)

    rows = []
    with torch.no_grad():
        clean = score(images)
        for ball, clip in BALLS.items():
            for eps in p["eps_attack"]:
                fixed = torch.stack([fixed_encoder_elbo_drop(model, images, eps, noise, sigma0, clip)
                                     for noise in draws]).mean(0)
                residual_sign = score(residual_sign_attack(model, images, eps, clip))
                curve = attacked.loc[eps]
                rows.append({"ball": ball, "eps_attack": eps, "fixed_encoder_drop": fixed.mean().item(),
                             "attack_drop": curve[f"elbo_clean_{ball}"] - curve[f"elbo_attacked_{ball}"],
                             "residual_sign_drop": (clean - residual_sign).mean().item()})
    table = pd.DataFrame(rows)
    table["share_fixed_encoder"] = table["fixed_encoder_drop"] / table["attack_drop"].where(table["attack_drop"] > 0)
    write_csv(args.out, table)
    print(table.to_string(index=False))


if __name__ == "__main__":
    run_stage(main, "fixed_encoder", errors=(DataError, KeyError))
