"""Attack-strength stage: is the attack curve's attack strong enough?

Re-attacks a fixed subset of the test images (the first ones `evaluate` attacks) at each
eps_attack with stronger settings than `evaluate` uses -- more PGD steps, more restarts,
gradients averaged over noise draws -- and records the attacked ELBO for each setting. If the
strongest setting lowers it by little, the attack curve is not an artefact of a weak attack.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from common import eps_value, load_params
from evaluate import attack_batch, load_for_evaluation

from provae.data import DataError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eps-train", required=True, type=eps_value)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True, help="one row per (eps_attack, setting), .csv")
    args = parser.parse_args()
    params = load_params()
    evaluate, strength, seed = params["evaluate"], params["attack_strength"], params["seed"]

    loaded = load_for_evaluation(args.model, args.eps_train, args.data, evaluate["device"], seed)
    model, meta = loaded.model, loaded.meta
    images = loaded.test_images[: strength["examples"]]

    rows = []
    for eps in strength["eps_attack"]:
        # {} first: the setting `evaluate` itself uses, the baseline the stronger ones are compared to.
        for setting in [{}, *strength["settings"]]:
            p = {**evaluate, **setting}
            generator = torch.Generator().manual_seed(seed)
            started = time.perf_counter()
            result = attack_batch(model, images, eps, p, meta, generator)
            rows.append({
                "eps_attack": eps, **{key: p[key] for key in ("pgd_steps", "pgd_restarts", "eot_samples")},
                "elbo_clean": result["elbo_clean"].mean().item(),
                "elbo_attacked": result["elbo_attacked"].mean().item(),
                "bound": result["bound"].mean().item(),
                "seconds": round(time.perf_counter() - started, 1),
            })
            print(", ".join(f"{key} {value:.4g}" for key, value in rows[-1].items()), flush=True)
    table = pd.DataFrame(rows)
    # Negative where a stronger setting found a lower ELBO than `evaluate`'s own setting did.
    baseline = table.groupby("eps_attack")["elbo_attacked"].transform("first")
    table["change_vs_evaluate"] = table["elbo_attacked"] - baseline
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False, float_format="%.6g")


if __name__ == "__main__":
    try:
        main()
    except (DataError, ValueError) as error:
        sys.exit(f"attack_strength stage failed: {error}")
