"""Evaluate stage: certified bound and ELBO, the attack curves, the certificate audit, and the
arrays Figures 1, 2 and 4 show, for one trained model.

Two threat models, both always: the ball the model was trained on (the paper's unclipped ball of
eq. 15 by default) gives the headline numbers, and the other one is reported beside it. A point
of the clipped ball (valid images, [0, 1]^D) is also in the unclipped one, so the unclipped
certificate bounds the clipped curve too; the clipped certificate is the tighter one there.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from common import eps_value, load_params, write_json

from provae.attacks import apgd_attack, attack_starts, latent_attack, mean_elbo_over, worst_of
from provae.bounds import elbo, elbo_lower_bound, kl_divergence
from provae.data import DataError, PreparedData, load_prepared
from provae.model import load_checkpoint
from provae.runtime import derived_seed, device_generator, resolve_device, reuse_freed_memory, seed_everything
from provae.training import mean_bound_and_elbo

BALLS = {"unclipped": False, "clipped": True}  # name -> clip the ball to [0, 1]^D


def ball_name(clip: bool) -> str:
    return "clipped" if clip else "unclipped"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    meta: dict
    device: torch.device
    data: PreparedData
    test_images: torch.Tensor  # in the seeded order: `evaluate` attacks the first ones


def load_for_evaluation(model_path, eps_train: float, seed: int, data_path, device_name: str) -> LoadedModel:
    """The checkpoint, checked to be the (eps_train, seed) model asked for, on its device, with its data.
    `attack_strength`, `fixed_encoder`, `certify` and `make audit` load through here too, so they
    see exactly `evaluate`'s images."""
    reuse_freed_memory()
    seed_everything(seed)
    device = resolve_device(device_name)
    checkpoint = load_checkpoint(model_path, map_location=device)
    model, meta = checkpoint.model.to(device), checkpoint.metadata
    for key, expected in (("eps_train", eps_train), ("seed", seed)):
        if meta.get(key) != expected:
            raise ValueError(f"{model_path} was trained with {key}={meta.get(key)}, not {expected}")
    data = load_prepared(data_path)
    order = torch.randperm(data.test_images.shape[0], generator=torch.Generator().manual_seed(seed))
    return LoadedModel(model, meta, device, data, data.images("test", device)[order])


def seeded_noise(n: int, latent_dim: int, seed: int, purpose: str, device, samples: int | None = None):
    """Noise draws per example [n, latent_dim] (or [samples, n, latent_dim]), made on the CPU: the
    same numbers on every device, and for an image whichever stage (or `make audit`) draws them."""
    generator = torch.Generator().manual_seed(derived_seed(seed, purpose))
    shape = (n, latent_dim) if samples is None else (samples, n, latent_dim)
    return torch.randn(shape, generator=generator).to(device)


def evaluation_noise(n: int, latent_dim: int, seed: int, p: dict, device) -> dict[str, torch.Tensor]:
    """The certificate's draw and the scoring draws of the first ``n`` attacked images."""
    return {"certificate": seeded_noise(p["attack_examples"], latent_dim, seed, "certificate noise", device)[:n],
            "scoring": seeded_noise(p["attack_examples"], latent_dim, seed, "scoring noise", device,
                                         p["score_samples"])[:, :n]}


def attack_pairs(model, x, eps, noise, score_noise, p, sigma0: float, clip: bool, generator) -> dict[str, torch.Tensor]:
    """Every attack on a batch of (image, eps_attack) pairs, eps_attack > 0: per-pair ELBOs, the
    certificate for the same noise, and the winning input. ``score_noise`` [S, B, latent] scores
    every candidate; ``generator`` (on x's device) draws the attacks' random numbers.

    Candidates: the clean input, APGD from each start (clean, the residual-sign corner, random
    points), the residual-sign corner itself, and the latent (KL) attack. Per pair the curve takes
    the one with the lowest ELBO under fresh noise (`worst_of`); the audit takes the lowest under
    the certificate's own noise.
    """
    starts = attack_starts(model, x, eps, random_starts=p["random_starts"], clip=clip, generator=generator)
    candidates = [x, starts[1]]
    candidates += [apgd_attack(model, x, eps, noise, start=start, steps=p["apgd_steps"], eot_samples=p["eot_samples"],
                               sigma0=sigma0, clip=clip, generator=generator) for start in starts]
    if p["latent_attack_steps"] > 0:
        candidates.append(latent_attack(model, x, eps, noise, objective="kl", steps=p["latent_attack_steps"],
                                        sigma0=sigma0, clip=clip, generator=generator))
    worst = worst_of(model, candidates, noise, score_noise=score_noise, sigma0=sigma0)
    with torch.no_grad():
        return {"elbo_clean": worst.candidate_elbos[0], "elbo_attacked": worst.elbo,
                "elbo_attacked_same_noise": worst.elbo_same_noise,
                "bound": elbo_lower_bound(model, x, eps, noise, sigma0, clip),
                "winner": worst.attack_index, "x_adv": worst.x_adv}


def candidate_names(p) -> list[str]:
    starts = ["clean", "residual_sign", *[f"random{i}" for i in range(p["random_starts"])]]
    return ["none", "residual_sign", *[f"apgd_from_{s}" for s in starts]] + (["latent"] if p["latent_attack_steps"] > 0 else [])


def pairs_of(images: torch.Tensor, eps_grid) -> tuple[list[float], torch.Tensor, torch.Tensor]:
    """Every (image, eps_attack > 0) pair, eps-major: the attacked radii, each pair's eps and image index."""
    attacked = [float(e) for e in eps_grid if e > 0]
    n = images.shape[0]
    return (attacked, torch.tensor(attacked, device=images.device).repeat_interleave(n),
            torch.arange(n, device=images.device).repeat(len(attacked)))


def attack_curve(model, images, noise: dict, p, sigma0: float, clip: bool, seed: int) -> dict[str, np.ndarray]:
    """Per (eps_attack, image): clean and attacked ELBO, the certificate, the winner. Arrays [n_eps, n].

    All eps_attack > 0 are attacked together, ``p["batch_size"]`` (image, eps) pairs at a time,
    each image with the same certificate and scoring draws at every eps: smoother curves.
    """
    eps_grid = [float(e) for e in p["eps_attack"]]
    attacked, pair_eps, pair_index = pairs_of(images, eps_grid)
    n = images.shape[0]
    generator = device_generator(images.device, derived_seed(seed, f"attack {ball_name(clip)}"))
    chunks = []
    for start in range(0, pair_eps.shape[0], p["batch_size"]):
        index, eps = pair_index[start : start + p["batch_size"]], pair_eps[start : start + p["batch_size"]]
        chunks.append(attack_pairs(model, images[index], eps, noise["certificate"][index], noise["scoring"][:, index],
                                   p, sigma0, clip, generator))
    pairs = {key: torch.cat([chunk[key] for chunk in chunks]) for key in chunks[0]} if chunks else {}

    with torch.no_grad():
        clean_scores = mean_elbo_over(model, images, noise["scoring"], sigma0)
        clean_same_noise = elbo(model, images, noise["certificate"], sigma0)
    result = {key: [] for key in ("elbo_clean", "elbo_attacked", "elbo_attacked_same_noise", "bound", "winner")}
    x_adv = {}
    for eps in eps_grid:
        if eps == 0:
            row = {"elbo_clean": clean_scores, "elbo_attacked": clean_scores, "elbo_attacked_same_noise": clean_same_noise,
                   "bound": clean_same_noise, "winner": torch.zeros(n, dtype=torch.long, device=images.device)}
        else:
            at = slice(attacked.index(eps) * n, (attacked.index(eps) + 1) * n)
            row = {key: value[at] for key, value in pairs.items()}
            x_adv[eps] = row.pop("x_adv")
        for key in result:
            result[key].append(row[key].detach().cpu())
    arrays = {key: torch.stack(values).numpy() for key, values in result.items()}
    arrays["x_adv"] = x_adv
    return arrays


def curve_table(arrays: dict, eps_grid, names: list[str], tolerance: float, ball: str) -> pd.DataFrame:
    """One row per eps_attack: mean ELBOs and bound, audit violations, which candidate won how often.
    Every column but eps_attack carries the ball's name (``elbo_attacked_clipped``), so the two
    balls sit side by side in one file (`dvc plots` draws one line per column)."""
    rows = []
    for i, eps in enumerate(eps_grid):
        margin = arrays["elbo_attacked_same_noise"][i] - arrays["bound"][i]
        rows.append({
            **{key: float(arrays[key][i].mean()) for key in ("elbo_clean", "elbo_attacked", "bound")},
            "violations": int((margin < -tolerance * np.abs(arrays["bound"][i])).sum()),
            "min_margin": float(margin.min()),
            **{f"won_by_{name}": int((arrays["winner"][i] == j).sum()) for j, name in enumerate(names)},
        })
    table = pd.DataFrame(rows).add_suffix(f"_{ball}")
    table.insert(0, "eps_attack", eps_grid)
    return table


def posterior_usage(model, images, batch_size: int, threshold: float = 0.01) -> dict:
    """Mean KL(q(z|x) || p(z)) and the active latent units: dims whose posterior mean varies across
    inputs, Var_x E_q[z_j] > threshold (Burda et al., 2016). Few active units is posterior collapse."""
    with torch.no_grad():
        encoded = [model.encode(images[i : i + batch_size]) for i in range(0, images.shape[0], batch_size)]
    mu = torch.cat([m for m, _ in encoded])
    kl = torch.cat([kl_divergence(m, log_sigma) for m, log_sigma in encoded])
    return {"kl": kl.mean().item(), "active_units": int((mu.var(0) > threshold).sum())}


def audit_records(model, images, eps_train: float, sigma0: float, seed: int) -> dict[str, np.ndarray]:
    """Per-example ELBO and certificate at eps_train (both balls) on a few test images, with noise
    drawn on the CPU: `make audit` recomputes exactly these on any machine."""
    noise = seeded_noise(images.shape[0], model.latent_dim, seed, "audit noise", images.device)
    with torch.no_grad():
        records = {"audit_elbo": elbo(model, images, noise, sigma0)}
        for ball, clip in BALLS.items():
            records[f"audit_lb_{ball}"] = elbo_lower_bound(model, images, eps_train, noise, sigma0, clip)
    return {key: value.cpu().numpy() for key, value in records.items()}


def metric_key(name: str, value: float) -> str:
    """`attacked_elbo_eps0_05`: DVC joins nested keys with dots, so a key must not contain one."""
    return f"{name}{value:g}".replace(".", "_")


def to_uint8(images: torch.Tensor) -> np.ndarray:
    return (images.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eps-train", required=True, type=eps_value)
    parser.add_argument("--seed", required=True, type=int)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--metrics", required=True, help="flat per-model metrics .json")
    parser.add_argument("--curve", required=True, help="attack curves .csv, both balls")
    parser.add_argument("--out", required=True, help="folder: details, per-example values, figure arrays")
    args = parser.parse_args()
    params = load_params()
    p, seed = params["evaluate"], args.seed
    eps_grid = [float(e) for e in p["eps_attack"]]
    if p["example_eps_attack"] not in eps_grid:
        raise ValueError(f"evaluate.example_eps_attack={p['example_eps_attack']} must be one of evaluate.eps_attack")

    started = time.time()
    loaded = load_for_evaluation(args.model, args.eps_train, seed, args.data, p["device"])
    model, meta, device = loaded.model, loaded.meta, loaded.device
    sigma0, headline = meta["sigma0"], ball_name(meta["clip"])
    train_images = loaded.data.images("train", device)[: p["bound_train_examples"]]
    test_images = loaded.test_images

    summary = {}
    for ball, clip in BALLS.items():
        for split, images in (("train", train_images), ("test", test_images[: p["bound_test_examples"]])):
            values = mean_bound_and_elbo(model, images, args.eps_train, noise_samples=p["noise_samples"], sigma0=sigma0,
                                         clip=clip, generator=device_generator(device, derived_seed(seed, "bound noise")))
            summary[f"lb_{split}_{ball}"], summary[f"elbo_{split}"] = values["bound"], values["elbo"]
    usage = posterior_usage(model, test_images[: p["bound_test_examples"]], p["batch_size"])

    attacked = test_images[: p["attack_examples"]]
    noise = evaluation_noise(attacked.shape[0], model.latent_dim, seed, p, device)
    names = candidate_names(p)
    per_example, tables, example_adv = {"eps_attack": np.array(eps_grid)}, [], None
    for ball, clip in BALLS.items():
        arrays = attack_curve(model, attacked, noise, p, sigma0, clip, seed)
        x_adv = arrays.pop("x_adv")
        if ball == headline:
            example_adv = x_adv.get(p["example_eps_attack"], attacked)[: p["example_count"]]
        per_example.update({f"{ball}/{key}": value for key, value in arrays.items()})
        tables.append(curve_table(arrays, eps_grid, names, p["audit_tolerance"], ball))
    curve = tables[0].merge(tables[1], on="eps_attack")
    per_example.update(audit_records(model, test_images[: p["audit_examples"]], args.eps_train, sigma0, seed))

    examples = attacked[: p["example_count"]]
    prior_noise = torch.randn((p["sample_count"], model.latent_dim), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        def score(x):  # the curve's own scoring draws
            return mean_elbo_over(model, x, noise["scoring"][:, : x.shape[0]], sigma0).cpu().numpy()

        figure_arrays = {
            "clean": to_uint8(examples), "attacked": to_uint8(example_adv),
            "clean_reconstruction": to_uint8(model(examples)), "attacked_reconstruction": to_uint8(model(example_adv)),
            "clean_elbo": score(examples), "attacked_elbo": score(example_adv),
            "prior_samples": to_uint8(model.decode(prior_noise.to(device))),
        }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "figure_arrays.npz", "wb") as handle:
        np.savez_compressed(handle, **figure_arrays)
    with open(out / "per_example.npz", "wb") as handle:
        np.savez_compressed(handle, **per_example)
    Path(args.curve).parent.mkdir(parents=True, exist_ok=True)
    curve.to_csv(args.curve, index=False, float_format="%.6g")

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
    if violations:
        sys.exit(f"certificate audit FAILED: {violations} attacked ELBOs fell below the certified bound "
                 f"(see {args.curve}); the bound or the attack is wrong")
    print(f"{meta['data_label']} eps_train={args.eps_train:g} seed={seed}: LB test {summary[f'lb_test_{headline}']:.2f}, "
          f"ELBO test {summary['elbo_test']:.2f}; audit passed at every eps_attack, both balls "
          f"({time.time() - started:.0f} s)")


if __name__ == "__main__":
    try:
        main()
    except (DataError, ValueError) as error:
        sys.exit(f"evaluate stage failed: {error}")
