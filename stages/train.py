"""Train stage: one model for one (dataset, eps_train, seed), on the certified bound with an eps schedule.

After every epoch the run's full state goes to ``--state`` (outside the stage's outs, which DVC
deletes before a run): a run killed mid-way continues from its last completed epoch on the next
``dvc repro`` and ends with the same checkpoint as an uninterrupted run (on the same device).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from common import eps_value, load_params, run_stage
from dvclive import Live
from tqdm import tqdm

from provae.data import DataError, check_dataset_name, load_prepared
from provae.files import file_digest
from provae.model import make_model, save_checkpoint
from provae.runtime import derived_seed, device_generator, resolve_device, reuse_freed_memory, seed_everything
from provae.training import (BOUNDS, EpsSchedule, NonFiniteLossError, TrainingState, load_training_state,
                             mean_bound_and_elbo, minibatches, save_training_state, train_epoch)

MONITORED = ("train/objective", "train/eps", "test/bound_at_eps_train", "test/elbo")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--eps-train", required=True, type=eps_value)
    parser.add_argument("--seed", required=True, type=int)
    parser.add_argument("--data", required=True, help="prepared .npz from the data stage")
    parser.add_argument("--model", required=True, help="checkpoint to write")
    parser.add_argument("--live", required=True, help="DVCLive folder for the training curves")
    parser.add_argument("--state", required=True, help="resumable training state, kept until the run completes")
    parser.add_argument("--bound", choices=BOUNDS, default="ibp",
                        help="the objective's lower bound: ibp (default), or elbo_crown, the linear bound of the ELBO "
                             "on IBP's boxes mixed with IBP's, its weight 1 -> 0 over the eps ramp (CROWN-IBP)")
    args = parser.parse_args()
    params = load_params()
    p, sigma0, clip, seed = params["train"], params["model"]["sigma0"], params["clip"], args.seed
    check_dataset_name(args.dataset)

    reuse_freed_memory()
    seed_everything(seed)
    device = resolve_device(p["device"])
    data = load_prepared(args.data)
    data_md5 = file_digest(args.data, "md5")
    train_images = data.images("train", device)[: p["max_train_examples"]]
    # A fixed, shuffled slice of the test set (CIFAR's mirror stores it grouped by class).
    monitor_order = torch.randperm(data.test_images.shape[0], generator=torch.Generator().manual_seed(seed))
    monitor_images = data.images("test", device)[monitor_order[: p["monitor_examples"]]]

    model = make_model(args.dataset, latent_dim=params["model"]["latent_dim"]).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=p["lr"], fused=True)  # one kernel per step on a GPU
    schedule = EpsSchedule(args.eps_train, p["warmup_epochs"], p["ramp_epochs"])
    generators = {"order": torch.Generator().manual_seed(derived_seed(seed, "data order")),
                  "noise": device_generator(device, derived_seed(seed, "training noise"))}
    steps_per_epoch = -(-train_images.shape[0] // p["batch_size"])
    fingerprint = {"dataset": args.dataset, "eps_train": args.eps_train, "seed": seed, "sigma0": sigma0, "clip": clip,
                   "latent_dim": params["model"]["latent_dim"], "data_md5": data_md5,
                   "train": {key: value for key, value in p.items() if key != "device"}}
    # Recorded only when not the default, so the default run's state and checkpoint stay as they were.
    bound_setting = {} if args.bound == "ibp" else {"bound": args.bound}
    fingerprint.update(bound_setting)

    state, why = load_training_state(args.state, fingerprint)
    print(why, flush=True)
    history, first_epoch, resumed_seconds = [], 0, 0.0
    if state is not None:
        model.load_state_dict(state.model_state)
        optimizer.load_state_dict(state.optimizer_state)
        for name, generator in generators.items():
            generator.set_state(state.generator_states[name])
        history, first_epoch = state.history, state.epochs_done
        resumed_seconds = sum(row["seconds"] for row in history)

    interactive = sys.stderr.isatty()
    started = time.time()
    with Live(args.live, dvcyaml=False, save_dvc_exp=False, report=None) as live:
        def log(row: dict) -> None:
            for name in MONITORED:
                live.log_metric(name, row[name])
            live.next_step()

        for row in history:  # DVC deleted the folder before this run: write the completed epochs again
            log(row)
        for epoch in range(first_epoch, p["epochs"]):
            epoch_started = time.time()
            batches = tqdm(minibatches(train_images, p["batch_size"], generators["order"]), total=steps_per_epoch,
                           desc=f"{args.dataset} eps={args.eps_train:g} seed={seed} epoch {epoch + 1}/{p['epochs']}",
                           disable=not interactive, leave=False)
            stats = train_epoch(model, optimizer, batches, schedule, epoch=epoch, steps_per_epoch=steps_per_epoch,
                                sigma0=sigma0, clean_weight=p["clean_weight"], clip=clip, generator=generators["noise"],
                                bound=args.bound)
            # Same noise every epoch, so the curve shows the model changing, not the draw.
            monitor = mean_bound_and_elbo(model, monitor_images, args.eps_train, sigma0=sigma0, clip=clip,
                                          generator=device_generator(device, seed))
            row = {"train/objective": stats["objective"], "train/eps": stats["eps"],
                   "test/bound_at_eps_train": monitor["bound"], "test/elbo": monitor["elbo"],
                   "seconds": time.time() - epoch_started}
            history.append(row)
            log(row)
            save_training_state(args.state, TrainingState(
                epochs_done=epoch + 1, model_state=model.state_dict(), optimizer_state=optimizer.state_dict(),
                generator_states={name: g.get_state() for name, g in generators.items()}, history=history,
                fingerprint=fingerprint))
            if not interactive:
                print(f"epoch {epoch + 1}: objective {stats['objective']:.2f} at eps {stats['eps']:.4g}, "
                      f"test bound {monitor['bound']:.2f}, test ELBO {monitor['elbo']:.2f}", flush=True)

    metadata = {
        "dataset": args.dataset, "data_label": data.provenance["label"], "data_md5": data_md5,
        "eps_train": args.eps_train, "sigma0": sigma0, "clip": clip, "seed": seed, "train_params": p,
        "latent_dim": params["model"]["latent_dim"], "train_examples": int(train_images.shape[0]),
        "torch": str(torch.__version__), "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "resumed_after_epoch": first_epoch or None, **bound_setting,
        "wall_time_s": round(resumed_seconds + time.time() - started, 1),
    }
    save_checkpoint(args.model, model.cpu(), metadata)
    Path(args.state).unlink()


if __name__ == "__main__":
    run_stage(main, "train", errors=(DataError, NonFiniteLossError))
