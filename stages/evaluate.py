"""Evaluate stage: certified bound and ELBO, the attack curves, the certificate audit, and the
arrays Figures 1, 2 and 4 show, for one trained model.

Both balls, always: the one the model was trained on gives the headline numbers, the other is
reported beside it (`provae.evaluation`). The audit (`provae.certificate_audit`) fails the stage
when an attacked ELBO falls below the certified bound for the same noise, or either is NaN.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from common import end_with_audit, per_model_stage, run_stage, write_csv, write_json, write_npz

from provae.data import DataError
from provae.evaluation import (BALLS, attack_curve, audit_curve, audit_records, ball_name, candidate_names,
                               certified_summary, curve_table, evaluation_noise, figure_arrays, posterior_usage)


def metric_key(name: str, value: float) -> str:
    """`attacked_elbo_eps0_05`: DVC joins nested keys with dots, so a key must not contain one."""
    return f"{name}{value:g}".replace(".", "_")


def main() -> None:
    started = time.time()
    args, params, loaded = per_model_stage(__doc__.splitlines()[0], {
        "--metrics": "flat per-model metrics .json", "--curve": "attack curves .csv, both balls",
        "--out": "folder: details, per-example values, figure arrays"})
    p, seed = params["evaluate"], args.seed
    eps_grid = [float(e) for e in p["eps_attack"]]
    if p["example_eps_attack"] not in eps_grid:
        raise ValueError(f"evaluate.example_eps_attack={p['example_eps_attack']} must be one of evaluate.eps_attack")
    model, meta, device = loaded.model, loaded.meta, loaded.device
    sigma0, headline = meta["sigma0"], ball_name(meta["clip"])
    train_images = loaded.data.images("train", device)[: p["bound_train_examples"]]
    test_images = loaded.test_images

    summary = certified_summary(model, train_images, test_images[: p["bound_test_examples"]], args.eps_train, p,
                                sigma0, seed)
    usage = posterior_usage(model, test_images[: p["bound_test_examples"]], p["batch_size"])

    attacked = test_images[: p["attack_examples"]]
    noise = evaluation_noise(attacked.shape[0], model.latent_dim, seed, p, device)
    names = candidate_names(p)
    per_example, tables, audits, example_adv = {"eps_attack": np.array(eps_grid)}, [], [], None
    for ball, clip in BALLS.items():
        arrays = attack_curve(model, attacked, noise, p, sigma0, clip, seed)
        x_adv = arrays.pop("x_adv")
        if ball == headline:
            example_adv = x_adv.get(p["example_eps_attack"], attacked)[: p["example_count"]]
        per_example.update({f"{ball}/{key}": value for key, value in arrays.items()})
        ball_audits = audit_curve(arrays, eps_grid, p["audit_tolerance"], ball)
        audits += ball_audits
        tables.append(curve_table(arrays, eps_grid, names, ball_audits, ball))
    curve = tables[0].merge(tables[1], on="eps_attack")
    per_example.update(audit_records(model, test_images[: p["audit_examples"]], args.eps_train, sigma0, seed))
    figures = figure_arrays(model, attacked[: p["example_count"]], example_adv, noise["scoring"], p["sample_count"],
                            sigma0, seed)

    out = Path(args.out)
    write_npz(out / "figure_arrays.npz", figures)
    write_npz(out / "per_example.npz", per_example)
    write_csv(args.curve, curve)
    violations = int(sum(curve[f"violations_{ball}"].sum() for ball in BALLS))
    other = "clipped" if headline == "unclipped" else "unclipped"
    curve_at = curve.set_index("eps_attack")
    write_json(args.metrics, {
        "lb_train": summary[f"lb_train_{headline}"], "lb_test": summary[f"lb_test_{headline}"],
        "elbo_train": summary["elbo_train"], "elbo_test": summary["elbo_test"],
        f"lb_test_{other}": summary[f"lb_test_{other}"], "kl_test": usage["kl"], "active_units": usage["active_units"],
        **{metric_key("attacked_elbo_eps", e): float(curve_at.loc[e, f"elbo_attacked_{headline}"]) for e in eps_grid},
        **{metric_key(f"attacked_elbo_{other}_eps", e): float(curve_at.loc[e, f"elbo_attacked_{other}"]) for e in eps_grid},
        "violations": violations,
    })
    write_json(out / "details.json", {
        "dataset": meta["dataset"], "data_label": meta["data_label"], "eps_train": args.eps_train, "seed": seed,
        "sigma0": sigma0, "headline_ball": headline, "train_clip": meta["clip"], "summary": summary,
        "attack_examples": int(attacked.shape[0]), "audit_examples": int(per_example["audit_elbo"].shape[0]),
        "candidates": names, "audit": {"violations": violations,
                                       "min_margin": float(min(curve[f"min_margin_{ball}"].min() for ball in BALLS)),
                                       "checked_eps_attack": eps_grid, "balls": list(BALLS)},
        "training": {"device": meta["device"], "seconds": meta["wall_time_s"], "torch": meta["torch"]},
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "seconds": round(time.time() - started, 1),
    })

    end_with_audit(audits, loaded.label, see=args.curve)
    print(f"{loaded.label}: LB test {summary[f'lb_test_{headline}']:.2f}, ELBO test {summary['elbo_test']:.2f}; audit passed "
          f"at every eps_attack, both balls ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    run_stage(main, "evaluate", errors=(DataError,))
