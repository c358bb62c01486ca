"""The linear relaxation of the ELBO itself (provae.elbo_relaxation) on the committed models.

For each case (model, eps), on the certify stage's first ``--images`` test images with
`evaluate`'s certificate noise (one draw per image), in the unclipped ball unless ``--clip``:
the attacked ELBO (APGD from the clean input, the residual-sign corner and one random point,
same noise), and the certificates: IBP, CROWN's box-wise one (provae.linear_bounds), the plain
recipe (decoder boxes from the z box), the whole-VAE boxes, and the whole-VAE boxes with
optimised lines; the share of the IBP -> attacked gap each closes, and seconds per image (each
variant's time includes the boxes it needs). Prints a markdown table, then JSON.

    python benchmarks/elbo_relaxation.py [--case mnist:0.01:0.1] [--case mnist:0.0:0.01]
        [--images 16] [--slope-steps 80] [--attack-steps 100] [--clip] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from provae import apgd_attack, attack_starts, elbo, elbo_lower_bound
from provae.bounds import input_box
from provae.data import load_prepared
from provae.elbo_relaxation import input_boxes, latent_boxes, linear_elbo_bound, optimised_bound, vacuous_if_undefined
from provae.linear_bounds import crown_elbo_lower_bound
from provae.model import load_checkpoint
from provae.runtime import derived_seed

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CASES = ["mnist:0.01:0.1", "mnist:0.0:0.01"]


def certify_inputs(dataset: str, eps_train: str, n: int, seed: int = 0):
    """The certify stage's images and certificate noise: `evaluate`'s seeded test order and draw."""
    checkpoint = load_checkpoint(ROOT / "models" / dataset / f"eps{eps_train}-seed{seed}.pt", map_location="cpu")
    model = checkpoint.model.eval()
    data = load_prepared(ROOT / "data" / "prepared" / f"{dataset}.npz")
    order = torch.randperm(data.test_images.shape[0], generator=torch.Generator().manual_seed(seed))
    attack_examples = yaml.safe_load((ROOT / "params.yaml").read_text())["evaluate"]["attack_examples"]
    generator = torch.Generator().manual_seed(derived_seed(seed, "certificate noise"))
    noise = torch.randn((attack_examples, model.latent_dim), generator=generator)[:n]
    return model, checkpoint.metadata["sigma0"], data.images("test")[order][:n], noise


def attacked_elbo(model, x, eps, noise, sigma0, clip, steps) -> torch.Tensor:
    """The lowest ELBO (same noise) among the clean input and APGD from three starts."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        worst = elbo(model, x, noise, sigma0)
    for start in attack_starts(model, x, eps, random_starts=1, clip=clip, generator=g):
        adv = apgd_attack(model, x, eps, noise, start=start, steps=steps, sigma0=sigma0, clip=clip, generator=g)
        with torch.no_grad():
            worst = torch.minimum(worst, elbo(model, adv, noise, sigma0))
    return worst


def timed(fn):
    """fn's value, and its wall and CPU seconds (on a shared machine the CPU time is the cost)."""
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    return value, (time.perf_counter() - wall, time.process_time() - cpu)


def total(*times) -> tuple[float, float]:
    return sum(t[0] for t in times), sum(t[1] for t in times)


@torch.no_grad()
def run_case(case: str, images: int, slope_steps: int, attack_steps: int, clip: bool) -> list[dict]:
    dataset, eps_train, eps = case.split(":")
    eps = float(eps)
    model, sigma0, x, noise = certify_inputs(dataset, eps_train, images)
    scale = 1 / (2 * sigma0**2)
    with torch.enable_grad():
        attacked, attack_seconds = timed(lambda: attacked_elbo(model, x, eps, noise, sigma0, clip, attack_steps))
    ibp, ibp_seconds = timed(lambda: elbo_lower_bound(model, x, eps, noise, sigma0, clip))
    crown, crown_seconds = timed(lambda: crown_elbo_lower_bound(model, x, eps, noise, sigma0, clip))
    ball = input_box(x, eps, clip)
    plain_boxes, plain_box_seconds = timed(lambda: latent_boxes(model, ball, noise))
    plain, plain_seconds = timed(lambda: vacuous_if_undefined(linear_elbo_bound(model, plain_boxes, noise, scale)))
    whole_boxes, whole_box_seconds = timed(lambda: input_boxes(model, plain_boxes, noise))
    whole, whole_seconds = timed(lambda: vacuous_if_undefined(linear_elbo_bound(model, whole_boxes, noise, scale)))
    optimised, optimised_seconds = timed(lambda: optimised_bound(model, whole_boxes, noise, scale, slope_steps))
    box_wise = torch.maximum(ibp, crown)
    plain_time = total(plain_box_seconds, plain_seconds)
    optimised_time = total(plain_box_seconds, whole_box_seconds, optimised_seconds)
    rows = [
        ("attacked ELBO (APGD, same noise)", attacked, attack_seconds),
        ("IBP", ibp, ibp_seconds),
        ("box-wise (linear_bounds, CROWN)", crown, crown_seconds),
        ("ELBO relaxation, plain recipe", plain, plain_time),
        ("  certificate: max with box-wise", torch.maximum(plain, box_wise), plain_time),
        ("ELBO relaxation, whole-VAE boxes", whole, total(plain_box_seconds, whole_box_seconds, whole_seconds)),
        (f"  + optimised lines ({slope_steps} steps)", optimised, optimised_time),
        ("  certificate: max with box-wise", torch.maximum(optimised, box_wise), optimised_time),
    ]
    gap = (attacked - ibp).mean()
    return [{"case": f"{dataset} eps_train {eps_train}, eps {eps:g}, {'clipped' if clip else 'unclipped'}",
             "method": name, "mean": float(values.mean()),
             "gap_closed": float((values.mean() - ibp.mean()) / gap) if name != rows[0][0] else None,
             "wall_seconds_per_image": wall / images, "cpu_seconds_per_image": cpu / images}
            for name, values, (wall, cpu) in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", help="dataset:eps_train:eps (repeatable)")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--slope-steps", type=int, default=80)
    parser.add_argument("--attack-steps", type=int, default=100)
    parser.add_argument("--clip", action="store_true", help="the ball clipped to [0, 1] (default: unclipped)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for case in args.case or DEFAULT_CASES:
        results += run_case(case, args.images, args.slope_steps, args.attack_steps, args.clip)
    print(f"{args.images} images, one noise draw each; gap closed = (bound - IBP) / (attacked - IBP), means\n")
    print("| case | method | mean (nats) | gap closed | wall s / image | CPU s / image |\n|---|---|---|---|---|---|")
    for row in results:
        closed = "" if row["gap_closed"] is None else f"{row['gap_closed']:.1%}"
        print(f"| {row['case']} | {row['method']} | {row['mean']:.2f} | {closed} | "
              f"{row['wall_seconds_per_image']:.3f} | {row['cpu_seconds_per_image']:.3f} |")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
