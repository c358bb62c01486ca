"""Evaluate stage: certified bound and ELBO, the attack curve, the certificate audit, and the
arrays Figures 1, 2 and 4 show, for one trained model."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from common import eps_value, load_params, write_json

from provae.attacks import expected_elbo, latent_attack, pgd_attack, worst_of
from provae.bounds import elbo_lower_bound, kl_divergence
from provae.data import DataError, PreparedData, load_prepared
from provae.model import load_checkpoint
from provae.runtime import resolve_device, reuse_freed_memory, seed_everything
from provae.training import mean_bound_and_elbo


ATTACK_NAMES = ("none", "pgd", "latent")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    meta: dict
    device: torch.device
    data: PreparedData
    test_images: torch.Tensor  # in the seeded order: `evaluate` attacks the first ones


def load_for_evaluation(model_path, eps_train: float, data_path, device_name: str, seed: int) -> LoadedModel:
    """The checkpoint, checked to be the eps_train model asked for, on its device, with its data.
    `attack_strength` loads through here too, so it re-attacks exactly `evaluate`'s images."""
    reuse_freed_memory()
    seed_everything(seed)
    device = resolve_device(device_name)
    checkpoint = load_checkpoint(model_path, map_location=device)
    model, meta = checkpoint.model.to(device), checkpoint.metadata
    if meta["eps_train"] != eps_train:
        raise ValueError(f"{model_path} was trained at eps {meta['eps_train']}, not {eps_train}")
    data = load_prepared(data_path)
    order = torch.randperm(data.test_images.shape[0], generator=torch.Generator().manual_seed(seed))
    return LoadedModel(model, meta, device, data, data.images("test", device)[order])


def attack_batch(model, x, eps, p, meta, generator) -> dict[str, torch.Tensor]:
    """Every attack at one eps on one batch: per-example ELBOs, the certificate and the winner."""
    sigma0, clip = meta["sigma0"], meta["clip"]
    noise = torch.randn((x.shape[0], model.latent_dim), generator=generator).to(x.device)
    device_generator = generator if x.device.type == "cpu" else None
    candidates = [x]
    if eps > 0:
        candidates.append(pgd_attack(model, x, eps, noise, steps=p["pgd_steps"], restarts=p["pgd_restarts"],
                                     step_size=p["pgd_step_factor"] * eps / max(p["pgd_steps"], 1),
                                     eot_samples=p["eot_samples"], sigma0=sigma0, clip=clip, generator=device_generator))
        if p["latent_attack_steps"] > 0:
            candidates.append(latent_attack(model, x, eps, noise, objective="kl", steps=p["latent_attack_steps"],
                                            sigma0=sigma0, clip=clip, generator=device_generator))
    worst = worst_of(model, candidates, noise, score_samples=p["score_samples"], sigma0=sigma0, generator=generator)
    with torch.no_grad():
        return {
            "elbo_clean": worst.candidate_elbos[0],  # scored with the same draws as the attacks
            **{f"elbo_{name}": worst.candidate_elbos[i] for i, name in enumerate(ATTACK_NAMES[1 : len(candidates)], 1)},
            "elbo_attacked": worst.elbo,
            "elbo_attacked_same_noise": worst.elbo_same_noise,
            # The certificate for the same noise, at this eps: it holds at every eps, so audit them all.
            "bound": elbo_lower_bound(model, x, eps, noise, sigma0, clip),
            "winner": worst.attack_index,
            "x_adv": worst.x_adv,
        }


def attack_curve(model, images, p, meta, seed) -> tuple[pd.DataFrame, torch.Tensor]:
    """One row per eps_attack: mean ELBOs and bound, audit violations, which attack won how often."""
    rows, example_adv = [], None
    for eps in p["eps_attack"]:
        generator = torch.Generator().manual_seed(seed)  # the same draws at every eps: smoother curves
        batches = [attack_batch(model, images[i : i + p["batch_size"]], eps, p, meta, generator)
                   for i in range(0, images.shape[0], p["batch_size"])]
        result = {key: torch.cat([batch[key] for batch in batches]) for key in batches[0]}
        if eps == p["example_eps_attack"]:
            example_adv = result["x_adv"][: p["example_count"]]
        margin = result["elbo_attacked_same_noise"] - result["bound"]
        rows.append({
            "eps_attack": eps,
            **{key: value.mean().item() for key, value in result.items() if key.startswith(("elbo", "bound"))},
            "violations": int((margin < -p["audit_tolerance"] * result["bound"].abs()).sum()),
            "min_margin": margin.min().item(),
            **{f"won_by_{name}": int((result["winner"] == i).sum()) for i, name in enumerate(ATTACK_NAMES)},
        })
    return pd.DataFrame(rows), example_adv


def posterior_usage(model, images, batch_size: int, threshold: float = 0.01) -> dict:
    """Mean KL(q(z|x) || p(z)) and the active latent units: dims whose posterior mean varies across
    inputs, Var_x E_q[z_j] > threshold (Burda et al., 2016). Few active units is posterior collapse."""
    with torch.no_grad():
        encoded = [model.encode(images[i : i + batch_size]) for i in range(0, images.shape[0], batch_size)]
    mu = torch.cat([m for m, _ in encoded])
    kl = torch.cat([kl_divergence(m, log_sigma) for m, log_sigma in encoded])
    return {"kl": kl.mean().item(), "active_units": int((mu.var(0) > threshold).sum())}


def to_uint8(images: torch.Tensor) -> np.ndarray:
    return (images.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--eps-train", required=True, type=eps_value)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--metrics", required=True, help="metrics .json")
    parser.add_argument("--curve", required=True, help="attack curve .csv")
    parser.add_argument("--arrays", required=True, help="images for the figures, .npz")
    args = parser.parse_args()
    params = load_params()
    p, seed = params["evaluate"], params["seed"]
    if p["example_eps_attack"] not in p["eps_attack"]:
        raise ValueError(f"evaluate.example_eps_attack={p['example_eps_attack']} must be one of evaluate.eps_attack")

    loaded = load_for_evaluation(args.model, args.eps_train, args.data, p["device"], seed)
    model, meta, device = loaded.model, loaded.meta, loaded.device
    train_images = loaded.data.images("train", device)[: p["bound_train_examples"]]
    test_images = loaded.test_images

    def certified(images):
        return mean_bound_and_elbo(model, images, args.eps_train, noise_samples=p["noise_samples"], sigma0=meta["sigma0"],
                                   clip=meta["clip"], generator=torch.Generator(device).manual_seed(seed))

    on_train, on_test = certified(train_images), certified(test_images[: p["bound_test_examples"]])
    usage = posterior_usage(model, test_images[: p["bound_test_examples"]], p["batch_size"])
    attacked = test_images[: p["attack_examples"]]
    curve, example_adv = attack_curve(model, attacked, p, meta, seed)

    examples = attacked[: p["example_count"]]
    prior_noise = torch.randn((p["sample_count"], model.latent_dim), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        def score(x):
            return expected_elbo(model, x, p["score_samples"], meta["sigma0"],
                                 torch.Generator(device).manual_seed(seed)).cpu().numpy()

        arrays = {
            "clean": to_uint8(examples), "attacked": to_uint8(example_adv),
            "clean_reconstruction": to_uint8(model(examples)), "attacked_reconstruction": to_uint8(model(example_adv)),
            "clean_elbo": score(examples), "attacked_elbo": score(example_adv),
            "prior_samples": to_uint8(model.decode(prior_noise.to(device))),
        }
    for path in (args.arrays, args.curve):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(args.arrays, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    curve.to_csv(args.curve, index=False, float_format="%.6g")

    violations = int(curve["violations"].sum())
    write_json(args.metrics, {
        "dataset": meta["dataset"], "data_label": meta["data_label"], "eps_train": args.eps_train,
        "sigma0": meta["sigma0"], "clip": meta["clip"],
        "lb_train": on_train["bound"], "elbo_train": on_train["elbo"],
        "lb_test": on_test["bound"], "elbo_test": on_test["elbo"],
        "kl_test": usage["kl"], "active_units": usage["active_units"],
        "attack_examples": int(attacked.shape[0]),
        "audit": {"violations": violations, "min_margin": float(curve["min_margin"].min()),
                  "checked_eps_attack": list(p["eps_attack"])},
    })
    if violations:
        sys.exit(f"certificate audit FAILED: {violations} attacked ELBOs fell below the certified bound "
                 f"(see {args.curve}); the bound or the attack is wrong")
    print(f"{meta['data_label']} eps_train={args.eps_train:g}: LB test {on_test['bound']:.2f}, "
          f"ELBO test {on_test['elbo']:.2f}; audit passed at every eps_attack")


if __name__ == "__main__":
    try:
        main()
    except (DataError, ValueError) as error:
        sys.exit(f"evaluate stage failed: {error}")
