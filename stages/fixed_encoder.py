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

import argparse
import sys
from pathlib import Path

import pandas as pd
import torch
from common import eps_value, load_params
from evaluate import BALLS, evaluation_noise, load_for_evaluation

from provae.attacks import mean_elbo_over
from provae.data import DataError
from provae.sensitivity import fixed_encoder_elbo_drop, residual_sign_attack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eps-train", required=True, type=eps_value)
    parser.add_argument("--seed", required=True, type=int)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--curve", required=True, help="evaluate's attack curves .csv")
    parser.add_argument("--out", required=True, help="one row per (ball, eps_attack), .csv")
    args = parser.parse_args()
    params = load_params()
    p, seed = params["evaluate"], args.seed

    loaded = load_for_evaluation(args.model, args.eps_train, seed, args.data, p["device"])
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
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False, float_format="%.6g")
    print(table.to_string(index=False))


if __name__ == "__main__":
    try:
        main()
    except (DataError, ValueError, KeyError) as error:
        sys.exit(f"fixed_encoder stage failed: {error}")
