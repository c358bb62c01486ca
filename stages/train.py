"""Train stage: one model for one (dataset, eps_train), on the certified bound with an eps schedule."""

from __future__ import annotations

import argparse
import sys
import time

import torch
from common import eps_value, load_params
from dvclive import Live
from tqdm import tqdm

from provae.data import DataError, check_dataset_name, file_sha256, load_prepared
from provae.model import make_model, save_checkpoint
from provae.runtime import resolve_device, reuse_freed_memory, seed_everything
from provae.training import EpsSchedule, NonFiniteLossError, mean_bound_and_elbo, minibatches, train_epoch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--eps-train", required=True, type=eps_value)
    parser.add_argument("--data", required=True, help="prepared .npz from the data stage")
    parser.add_argument("--model", required=True, help="checkpoint to write")
    parser.add_argument("--live", required=True, help="DVCLive folder for the training curves")
    args = parser.parse_args()
    params = load_params()
    p, seed, sigma0 = params["train"], params["seed"], params["model"]["sigma0"]
    check_dataset_name(args.dataset)

    reuse_freed_memory()
    generator = seed_everything(seed)
    device = resolve_device(p["device"])
    data = load_prepared(args.data)
    train_images = data.images("train", device)[: p["max_train_examples"]]
    # A fixed, shuffled slice of the test set (CIFAR's mirror stores it grouped by class).
    monitor_order = torch.randperm(data.test_images.shape[0], generator=torch.Generator().manual_seed(seed))
    monitor_images = data.images("test", device)[monitor_order[: p["monitor_examples"]]]

    model = make_model(args.dataset, latent_dim=params["model"]["latent_dim"]).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=p["lr"])
    schedule = EpsSchedule(args.eps_train, p["warmup_epochs"], p["ramp_epochs"])
    steps_per_epoch = -(-train_images.shape[0] // p["batch_size"])
    interactive = sys.stderr.isatty()

    started = time.time()
    with Live(args.live, dvcyaml=False, save_dvc_exp=False, report=None) as live:
        for epoch in range(p["epochs"]):
            batches = tqdm(minibatches(train_images, p["batch_size"], generator), total=steps_per_epoch,
                           desc=f"{args.dataset} eps={args.eps_train:g} epoch {epoch + 1}/{p['epochs']}",
                           disable=not interactive, leave=False)
            stats = train_epoch(model, optimizer, (x.to(device) for x in batches), schedule, epoch=epoch,
                                steps_per_epoch=steps_per_epoch, sigma0=sigma0, clean_weight=p["clean_weight"], clip=params["clip"],
                                generator=generator if device.type == "cpu" else None)
            # Same noise every epoch, so the curve shows the model changing, not the draw.
            monitor = mean_bound_and_elbo(model, monitor_images, args.eps_train, sigma0=sigma0, clip=params["clip"],
                                          generator=torch.Generator(device).manual_seed(seed))
            live.log_metric("train/objective", stats["objective"])
            live.log_metric("train/eps", stats["eps"])
            live.log_metric("test/bound_at_eps_train", monitor["bound"])
            live.log_metric("test/elbo", monitor["elbo"])
            live.next_step()
            if not interactive:
                print(f"epoch {epoch + 1}: objective {stats['objective']:.2f} at eps {stats['eps']:.4g}, "
                      f"test bound {monitor['bound']:.2f}, test ELBO {monitor['elbo']:.2f}", flush=True)

    metadata = {
        "dataset": args.dataset, "data_label": data.provenance["label"], "data_sha256": file_sha256(args.data),
        "eps_train": args.eps_train, "sigma0": sigma0, "clip": params["clip"], "seed": seed, "train_params": p,
        "train_examples": int(train_images.shape[0]), "torch": str(torch.__version__), "device": str(device),
        "wall_time_s": round(time.time() - started, 1),
    }
    save_checkpoint(args.model, model.cpu(), metadata)


if __name__ == "__main__":
    try:
        main()
    except (DataError, NonFiniteLossError, ValueError) as error:
        sys.exit(f"train stage failed: {error}")
