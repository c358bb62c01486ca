"""Certificate methods side by side: IBP, CROWN-IBP and full CROWN (provae.linear_bounds).

For the paper's MNIST and CIFAR-10 architectures (untrained weights: timing only), the wall time
per image of one certificate call and the mean certificate at each eps; for a small VAE, untrained
and briefly trained on the IBP bound (blob images, as the tests use), the mean certificate beside
the clean ELBO. Same images and noise for every method. Optionally trained checkpoints on their
test images (``--checkpoint model.pt --data prepared.npz``, repeatable). Prints JSON.

    python benchmarks/bound_methods.py [--images 8] [--threads N] [--decoder-backward]
        [--checkpoint models/mnist/eps0.01.pt --data data/prepared/mnist.npz]

Methods: ``ibp`` (provae.bounds.elbo_lower_bound); ``crown-ibp`` and ``crown``
(crown_elbo_lower_bound, intermediate "ibp" / "crown"; the decoder is bounded forward, from its
50 latent inputs). ``--decoder-backward`` adds ``crown-decoder-backward``: full CROWN with the
decoder bounded backward from every output pixel instead (slower; the comparison behind the
forward default).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from provae import EpsSchedule, elbo, elbo_lower_bound, make_model, minibatches, train_epoch
from provae.bounds import input_box, kl_upper_bound, latent_box, reconstruction_upper_bound
from provae.linear_bounds import crown_elbo_lower_bound, decoder_interval, encoder_intervals
from provae.model import load_model
from provae.runtime import reuse_freed_memory


def decoder_backward_bound(model, x, eps, noise, sigma0, clip):
    """crown_elbo_lower_bound with the decoder bounded by back-substitution from its outputs."""
    box = input_box(x, eps, clip)
    mu, log_sigma = encoder_intervals(model, box, intermediate="crown")
    decoded = decoder_interval(model, latent_box(mu, log_sigma, noise), intermediate="crown", direction="backward")
    return -reconstruction_upper_bound(box, decoded) / (2 * sigma0**2) - kl_upper_bound(mu, log_sigma)


def methods(decoder_backward: bool) -> dict:
    table = {
        "ibp": lambda m, x, eps, noise, sigma0, clip: elbo_lower_bound(m, x, eps, noise, sigma0, clip),
        "crown-ibp": lambda m, x, eps, noise, sigma0, clip: crown_elbo_lower_bound(
            m, x, eps, noise, sigma0, clip, intermediate="ibp"),
        "crown": lambda m, x, eps, noise, sigma0, clip: crown_elbo_lower_bound(
            m, x, eps, noise, sigma0, clip, intermediate="crown"),
    }
    if decoder_backward:
        table["crown-decoder-backward"] = decoder_backward_bound
    return table


def seconds_per_image(fn, n_images: int, repeats: int) -> dict:
    """Best-of-``repeats`` wall time (the machine may be shared), and CPU time, per image."""
    fn()  # warm-up
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return {"wall_ms_per_image": round(1000 * min(walls) / n_images, 2),
            "wall_ms_per_image_median": round(1000 * statistics.median(walls) / n_images, 2),
            "cpu_ms_per_image": round(1000 * min(cpus) / n_images, 2)}


def mean_bounds(model, x, noise, eps_values, table, sigma0, clip) -> dict:
    with torch.no_grad():
        out = {"elbo": round(elbo(model, x, noise, sigma0).mean().item(), 3)}
        for eps in eps_values:
            out[f"eps={eps:g}"] = {name: round(fn(model, x, eps, noise, sigma0, clip).mean().item(), 3)
                                   for name, fn in table.items()}
    return out


def blobs(n: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    """Blurry blobs in [0, 1] with saturated pixels (tests/conftest.py's synthetic images)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.rand((n, 2, 1, 1), generator=g) * size
    grid = torch.arange(size, dtype=torch.float32)
    dist2 = (grid.view(1, size, 1) - centers[:, 0]) ** 2 + (grid.view(1, 1, size) - centers[:, 1]) ** 2
    return (torch.exp(-dist2 / 4.0) * 1.3).clamp(0, 1).unsqueeze(1)


def small_models():
    """The tests' small VAE, untrained and trained briefly on the IBP bound at eps 0.05."""
    torch.manual_seed(0)
    untrained = make_model("mnist", image_size=8, latent_dim=4, channels=(4, 8))
    torch.manual_seed(0)
    trained = make_model("mnist", image_size=8, latent_dim=4, channels=(4, 8))
    optimizer = torch.optim.Adam(trained.parameters(), lr=3e-3)
    schedule, data, g = EpsSchedule(0.05, 2, 3), blobs(256), torch.Generator().manual_seed(1)
    for epoch in range(8):
        train_epoch(trained, optimizer, minibatches(data, 64, g), schedule, epoch=epoch, steps_per_epoch=4, generator=g)
    return {"small-untrained": untrained.eval(), "small-trained-ibp-eps0.05": trained.eval()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8, help="images per timed call (paper architectures)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eps", type=float, nargs="+", default=[0.01, 0.05])
    parser.add_argument("--timing-eps", type=float, default=0.01)
    parser.add_argument("--sigma0", type=float, default=1 / math.sqrt(2))
    parser.add_argument("--no-clip", dest="clip", action="store_false", help="the paper's ball (not clipped to [0, 1])")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--decoder-backward", action="store_true", help="add the backward-decoder variant (slow)")
    parser.add_argument("--checkpoint", action="append", default=[], help="trained model (repeatable)")
    parser.add_argument("--data", action="append", default=[], help="prepared .npz for each --checkpoint")
    parser.add_argument("--checkpoint-images", type=int, default=32)
    args = parser.parse_args()
    if len(args.data) != len(args.checkpoint):
        parser.error("give one --data per --checkpoint")
    reuse_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    table = methods(args.decoder_backward)
    g = torch.Generator().manual_seed(0)
    report = {"threads": torch.get_num_threads(), "torch": torch.__version__, "sigma0": args.sigma0,
              "clip": args.clip, "timing": {}, "bounds": {}}

    for dataset in ("mnist", "cifar10"):
        torch.manual_seed(0)
        model = make_model(dataset).eval()
        x = torch.rand((args.images, *model.config.image_shape), generator=g)
        noise = torch.randn((args.images, model.latent_dim), generator=g)
        with torch.no_grad():
            report["timing"][dataset] = {
                name: seconds_per_image(lambda: fn(model, x, args.timing_eps, noise, args.sigma0, args.clip),
                                        args.images, args.repeats)
                for name, fn in table.items()}
        report["bounds"][f"{dataset}-untrained"] = mean_bounds(model, x, noise, args.eps, table, args.sigma0, args.clip)

    for name, model in small_models().items():
        x = blobs(32, seed=99)
        noise = torch.randn((32, model.latent_dim), generator=g)
        report["bounds"][name] = mean_bounds(model, x, noise, args.eps, table, args.sigma0, args.clip)

    for path, data_path in zip(args.checkpoint, args.data):
        from provae.data import load_prepared

        model = load_model(path).eval()
        x = load_prepared(data_path).images("test")[: args.checkpoint_images]
        noise = torch.randn((x.shape[0], model.latent_dim), generator=g)
        report["bounds"][path] = mean_bounds(model, x, noise, args.eps, table, args.sigma0, args.clip)

    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
