"""Step-time benchmark: VAE vs proVAE training step, and PGD / APGD steps vs one ELBO fwd+bwd.

Paper architecture (MNIST by default, or --dataset cifar10), batch 128, CPU, one process. Prints JSON (medians, in milliseconds).
Targets (issue "Core"): proVAE / VAE step ratio <= 2.2; PGD step <= 1.3 x ELBO fwd+bwd; APGD step (EOT 1)
<= 1.3 x ELBO fwd+bwd. An APGD step is the marginal cost of one more step: (run of --apgd-steps steps - run
of 0 steps) / --apgd-steps. With EOT k it is compared with k ELBO fwd+bwd at the same batch (one per draw).
Beside the proVAE (IBP) step: the "elbo_crown" training step (issue 22: the linear bound of the ELBO on IBP's
boxes mixed with IBP's, provae.elbo_crown; mix 0.5, mid-ramp: every mix in (0, 1] costs the same) and its
ratio to the IBP step (target <= 3-5).

    python benchmarks/step_times.py [--repeats 30] [--threads N] [--apgd-steps 10] [--attacks-only]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from provae import elbo, make_model
from provae.attacks import _eot_objective, _sign_gradient_descent, apgd_minimize
from provae.bounds import input_box
from provae.runtime import reuse_freed_memory
from provae.training import training_objective


def median_ms(functions: dict, repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median wall time of each function; rounds interleave them so drift hits all alike."""
    for fn in functions.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--dataset", default="mnist", choices=["mnist", "cifar10"], help="which paper architecture")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--apgd-steps", type=int, default=10, help="steps per timed APGD run (>= 1)")
    parser.add_argument("--eot", type=int, default=4, help="EOT draws for the second APGD timing")
    parser.add_argument("--attacks-only", action="store_true", help="skip the training-step timings")
    parser.add_argument("--default-allocator", action="store_true",
                        help="skip reuse_freed_memory() (the stages call it; this shows its effect)")
    args = parser.parse_args()
    allocator_tuned = False if args.default_allocator else reuse_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)

    generator = torch.Generator().manual_seed(0)
    model = make_model(args.dataset)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand((args.batch_size, *model.config.image_shape), generator=generator)
    noise = torch.randn((args.batch_size, model.latent_dim), generator=generator)

    def train_step(eps: float, **bound):
        def step():
            loss = -training_objective(model, x, eps, noise, sigma0=1.0, **bound).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return step

    def elbo_fwd_bwd():
        loss = -elbo(model, x, noise).mean()
        model.zero_grad(set_to_none=True)
        loss.backward()

    box = input_box(x, args.eps)

    def pgd_step():
        _sign_gradient_descent(lambda v: elbo(model, v, noise), x, box.lower, box.upper, steps=1, step_size=0.01)

    def apgd_run(eot_samples: int, steps: int):
        objective = _eot_objective(model, noise, eot_samples, 1.0, generator)

        def run():
            apgd_minimize(objective, x, box.lower, box.upper, steps=steps, initial_step=2 * args.eps)
        return run

    if args.apgd_steps < 1:
        parser.error("--apgd-steps must be >= 1")
    functions = {} if args.attacks_only else {"vae": train_step(0.0), "provae": train_step(args.eps),
                                              "elbo_crown": train_step(args.eps, bound="elbo_crown", mix=0.5)}
    functions.update({"fwd_bwd": elbo_fwd_bwd, "pgd": pgd_step})
    for eot in (1, args.eot):
        functions[f"apgd_eot{eot}_0"] = apgd_run(eot, 0)
        functions[f"apgd_eot{eot}_n"] = apgd_run(eot, args.apgd_steps)
    ms = median_ms(functions, args.repeats)
    fwd_bwd, pgd = ms["fwd_bwd"], ms["pgd"]
    result = {
        "dataset": args.dataset,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "allocator_tuned": allocator_tuned,
        "torch": torch.__version__,
    }
    if not args.attacks_only:
        vae, provae = ms["vae"], ms["provae"]
        result.update({
            "vae_train_step_ms": round(vae, 2),
            "provae_train_step_ms": round(provae, 2),
            "provae_over_vae": round(provae / vae, 3),
            "elbo_crown_train_step_ms": round(ms["elbo_crown"], 2),
            "elbo_crown_over_provae": round(ms["elbo_crown"] / provae, 3),
        })
    result.update({
        "elbo_fwd_bwd_ms": round(fwd_bwd, 2),
        "pgd_step_ms": round(pgd, 2),
        "pgd_over_fwd_bwd": round(pgd / fwd_bwd, 3),
        "apgd_steps_timed": args.apgd_steps,
    })
    for eot in (1, args.eot):
        step = (ms[f"apgd_eot{eot}_n"] - ms[f"apgd_eot{eot}_0"]) / args.apgd_steps
        result[f"apgd_eot{eot}_step_ms"] = round(step, 2)
        result[f"apgd_eot{eot}_over_fwd_bwd_per_draw"] = round(step / (eot * fwd_bwd), 3)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
