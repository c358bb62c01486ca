"""The evaluation protocol every per-model stage shares: which images, which noise, which attacks.

`evaluate` draws the attack curve with it; `attack_strength`, `attack_budget`, `fixed_encoder`,
`certify` and `make audit` load the model and draw the noise through the same functions, so they
see exactly `evaluate`'s images and random numbers (common random numbers for every comparison).

Two threat models, both always: the ball the model was trained on (the paper's unclipped ball of
eq. 15 by default) gives the headline numbers, and the other one is reported beside it. A point
of the clipped ball (valid images, [0, 1]^D) is also in the unclipped one, so the unclipped
certificate bounds the clipped curve too; the clipped certificate is the tighter one there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from provae.attacks import apgd_attack, attack_starts, latent_attack, mean_elbo_over, pgd_attack, worst_of
from provae.bounds import elbo, elbo_lower_bound, kl_divergence
from provae.certificate_audit import CertificateAudit, audit_certificate
from provae.data import PreparedData, load_prepared
from provae.model import load_checkpoint
from provae.runtime import derived_seed, device_generator, resolve_device, reuse_freed_memory, seed_everything
from provae.sensitivity import residual_sign_attack
from provae.training import mean_bound_and_elbo

BALLS = {"unclipped": False, "clipped": True}  # name -> clip the ball to [0, 1]^D


def ball_name(clip: bool) -> str:
    return "clipped" if clip else "unclipped"


# --- the model, its images and the noise ---


@dataclass
class LoadedModel:
    model: torch.nn.Module
    meta: dict
    device: torch.device
    data: PreparedData
    test_images: torch.Tensor  # in the seeded order: `evaluate` attacks the first ones

    @property
    def label(self) -> str:
        """How messages name the model: `MNIST eps_train=0.05 seed=0`."""
        return f"{self.meta['data_label']} eps_train={self.meta['eps_train']:g} seed={self.meta['seed']}"


def load_for_evaluation(model_path, eps_train: float, seed: int, data_path, device_name: str) -> LoadedModel:
    """The checkpoint, checked to be the (eps_train, seed) model asked for, on its device, with its data."""
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


# --- the attacks ---


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


def pair_batches(images: torch.Tensor, eps_grid, noise: dict, batch_size: int) -> Iterator[tuple]:
    """``batch_size`` (image, eps_attack > 0) pairs at a time, eps-major, each image with its own
    certificate and scoring draws at every eps: (x, eps, certificate noise, scoring noise)."""
    _, pair_eps, pair_index = pairs_of(images, eps_grid)
    for start in range(0, pair_eps.shape[0], batch_size):
        index = pair_index[start : start + batch_size]
        yield images[index], pair_eps[start : start + batch_size], noise["certificate"][index], noise["scoring"][:, index]


# attack(model, x, eps, noise, score_noise, p, sigma0, clip, generator) -> per-pair attacked ELBO [B]
PairAttack = Callable[..., torch.Tensor]


def attacked_elbos(attack: PairAttack, model, images, eps_grid, noise: dict, p, sigma0: float, clip: bool,
                   generator) -> np.ndarray:
    """Per (eps_attack > 0, image): the attacked ELBO that ``attack`` finds, [n_eps, n] on the CPU."""
    chunks = [attack(model, x, eps, certificate, scoring, p, sigma0, clip, generator).cpu()
              for x, eps, certificate, scoring in pair_batches(images, eps_grid, noise, p["batch_size"])]
    return torch.cat(chunks).view(len(pairs_of(images, eps_grid)[0]), images.shape[0]).numpy()


def attack_curve(model, images, noise: dict, p, sigma0: float, clip: bool, seed: int) -> dict[str, np.ndarray]:
    """Per (eps_attack, image): clean and attacked ELBO, the certificate, the winner. Arrays [n_eps, n].

    All eps_attack > 0 are attacked together, ``p["batch_size"]`` (image, eps) pairs at a time,
    each image with the same certificate and scoring draws at every eps: smoother curves.
    """
    eps_grid = [float(e) for e in p["eps_attack"]]
    attacked = pairs_of(images, eps_grid)[0]
    n = images.shape[0]
    generator = device_generator(images.device, derived_seed(seed, f"attack {ball_name(clip)}"))
    chunks = [attack_pairs(model, x, eps, certificate, scoring, p, sigma0, clip, generator)
              for x, eps, certificate, scoring in pair_batches(images, eps_grid, noise, p["batch_size"])]
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


# Challengers of the curve that are a single attack rather than the curve's attack with other settings.
ONE_ATTACK = {
    # Fixed-step PGD as `evaluate` ran it before APGD: step 2.5 eps / steps (Madry et al.).
    "pgd": lambda model, x, eps, noise, p, sigma0, clip, g: pgd_attack(
        model, x, eps, noise, steps=p["pgd_steps"], restarts=p["pgd_restarts"], eot_samples=p["eot_samples"],
        sigma0=sigma0, clip=clip, generator=g),
    "residual_sign": lambda model, x, eps, noise, p, sigma0, clip, g: residual_sign_attack(model, x, eps, clip),
    "latent": lambda model, x, eps, noise, p, sigma0, clip, g: latent_attack(
        model, x, eps, noise, objective="kl", steps=p["latent_attack_steps"], sigma0=sigma0, clip=clip, generator=g),
}


def challenge(model, x, eps, noise, score_noise, p, sigma0: float, clip: bool, generator) -> torch.Tensor:
    """Per pair, a challenger's attacked ELBO (``p["method"]``: the curve's own attack with ``p``'s
    settings, or one of ``ONE_ATTACK``), scored on the curve's own draws (never above the clean input's)."""
    method = p.get("method", "curve")
    if method == "curve":
        return attack_pairs(model, x, eps, noise, score_noise, p, sigma0, clip, generator)["elbo_attacked"]
    if method not in ONE_ATTACK:
        raise ValueError(f"unknown challenger method {method!r}; use 'curve' or one of {sorted(ONE_ATTACK)}")
    candidate = ONE_ATTACK[method](model, x, eps, noise, p, sigma0, clip, generator)
    return worst_of(model, [x, candidate], noise, score_noise=score_noise, sigma0=sigma0).elbo


# --- what `evaluate` reports ---


def audit_curve(arrays: dict, eps_grid, tolerance: float, ball: str) -> list[CertificateAudit]:
    """The certificate audit of an attack curve (`attack_curve`'s arrays), one per eps_attack."""
    return [audit_certificate(arrays["bound"][i], arrays["elbo_attacked_same_noise"][i], tolerance,
                              f"{ball} ball, eps_attack {eps:g}") for i, eps in enumerate(eps_grid)]


def curve_table(arrays: dict, eps_grid, names: list[str], audits: list[CertificateAudit], ball: str) -> pd.DataFrame:
    """One row per eps_attack: mean ELBOs and bound, audit violations (`audit_curve`), which
    candidate won how often. Every column but eps_attack carries the ball's name
    (``elbo_attacked_clipped``), so the two balls sit side by side in one file (`dvc plots` draws
    one line per column)."""
    rows = []
    for i, audit in enumerate(audits):
        rows.append({
            **{key: float(arrays[key][i].mean()) for key in ("elbo_clean", "elbo_attacked", "bound")},
            "violations": audit.violations,
            "min_margin": audit.min_margin,
            **{f"won_by_{name}": int((arrays["winner"][i] == j).sum()) for j, name in enumerate(names)},
        })
    table = pd.DataFrame(rows).add_suffix(f"_{ball}")
    table.insert(0, "eps_attack", eps_grid)
    return table


def certified_summary(model, train_images, test_images, eps_train: float, p, sigma0: float, seed: int) -> dict:
    """Mean certified bound at eps_train (both balls) and ELBO, on train and test images."""
    summary = {}
    for ball, clip in BALLS.items():
        for split, images in (("train", train_images), ("test", test_images)):
            values = mean_bound_and_elbo(model, images, eps_train, noise_samples=p["noise_samples"], sigma0=sigma0,
                                         clip=clip, generator=device_generator(images.device,
                                                                               derived_seed(seed, "bound noise")))
            summary[f"lb_{split}_{ball}"], summary[f"elbo_{split}"] = values["bound"], values["elbo"]
    return summary


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


def to_uint8(images: torch.Tensor) -> np.ndarray:
    return (images.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def figure_arrays(model, examples, attacked, scoring_noise, sample_count: int, sigma0: float, seed: int) -> dict:
    """What Figures 1, 2 and 4 show: clean and attacked images with their reconstructions and
    ELBOs (scored on the curve's own draws), and ``sample_count`` samples from the prior."""
    prior_noise = torch.randn((sample_count, model.latent_dim), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        def score(x):
            return mean_elbo_over(model, x, scoring_noise[:, : x.shape[0]], sigma0).cpu().numpy()

        return {
            "clean": to_uint8(examples), "attacked": to_uint8(attacked),
            "clean_reconstruction": to_uint8(model(examples)), "attacked_reconstruction": to_uint8(model(attacked)),
            "clean_elbo": score(examples), "attacked_elbo": score(attacked),
            "prior_samples": to_uint8(model.decode(prior_noise.to(examples.device))),
        }
