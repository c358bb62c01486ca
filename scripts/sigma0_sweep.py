"""The sigma0 sweep (MNIST unless --dataset says otherwise): DVC experiments that retrain and
re-evaluate models at other values of sigma0 (the std of p(x|z)) or other settings, collected beside
the committed models into reports/sigma0_sweep/.

    python scripts/sigma0_sweep.py queue --sigma0 0.5 0.3 0.1            # the VAE at each sigma0
    python scripts/sigma0_sweep.py queue --sigma0 0.3 --eps-train 0.0 0.1 # and a proVAE beside it
    python scripts/sigma0_sweep.py queue --sigma0 1.0 --set train.epochs=5 # training length instead
    dvc queue start --jobs 1 && dvc queue status                           # runs them, in order
    python scripts/sigma0_sweep.py collect
    python scripts/sigma0_sweep.py collect --out reports/training_length/mnist --title "Training length (MNIST)"
    python scripts/sigma0_sweep.py queue --dataset cifar10 --sigma0 0.7071067811865476 --set train.epochs=50

Experiments are named `sweep-[<dataset>-]sigma0-<value>[-<key><value>...]` (no dataset part for
MNIST); `collect` reads every such experiment's params, evaluation metrics and attack curves from
its git commit, adds the committed models (HEAD) as the baseline, and writes a table and a figure.
Experiment refs live only in this git repository (share them with `dvc exp push origin`); the
collected files are what gets committed.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
import yaml  # noqa: E402

from provae.grid import GridModel, grid_models  # noqa: E402

SEED = 0  # the sweep's models: seed 0 of the grid's naming
PREFIX = "sweep-"
EVAL_METRICS = "reports/metrics/{dataset}-eps{eps}-seed{seed}.json"
EVAL_DETAILS = "reports/eval/{dataset}-eps{eps}-seed{seed}/details.json"
PER_EXAMPLE = "reports/eval/{dataset}-eps{eps}-seed{seed}/per_example.npz"
CURVE = "reports/attack_curves/{dataset}-eps{eps}-seed{seed}.csv"
PAPER = "references/paper.json"
SHOWN_EPS_ATTACK = 0.1  # the paper's headline attack radius


def git(*args: str) -> str:
    return subprocess.run(["git", *args], check=True, capture_output=True, text=True).stdout


def bytes_at(commit: str, path: str) -> bytes | None:
    result = subprocess.run(["git", "show", f"{commit}:{path}"], capture_output=True)
    return result.stdout if result.returncode == 0 else None


def read_at(commit: str, path: str) -> str | None:
    content = bytes_at(commit, path)
    return None if content is None else content.decode()


def median_drop(commit: str, path: str, ball: str, eps_attack: float) -> float:
    """The median over images of the clean minus the attacked ELBO: a mean can be ruled by a heavy
    tail (a few images whose ELBO explodes outside [0, 1]^D move it by millions of nats)."""
    content = bytes_at(commit, path)
    if content is None:
        return float("nan")  # an evaluation from before per-example outputs existed
    arrays = np.load(io.BytesIO(content))
    row = int(np.flatnonzero(np.isclose(arrays["eps_attack"], eps_attack))[0])
    return float(np.median(arrays[f"{ball}/elbo_clean"][row] - arrays[f"{ball}/elbo_attacked"][row]))


def experiment_name(sigma0: float, overrides: list[str], dataset: str) -> str:
    suffix = "".join(f"-{key.split('.')[-1]}{value}" for key, value in (o.split("=", 1) for o in overrides))
    # MNIST's experiments were named before other datasets could be swept: their names stay.
    infix = "" if dataset == "mnist" else f"{dataset}-"
    return f"{PREFIX}{infix}sigma0-{sigma0:g}{suffix}"


def queue(args) -> None:
    params = yaml.safe_load(Path("params.yaml").read_text())
    if args.dataset not in params["datasets"]:
        sys.exit(f"dataset {args.dataset!r} not in params.yaml's datasets {params['datasets']}")
    grid = {m.id for m in grid_models(params)}
    wanted = [GridModel(args.dataset, float(eps), SEED).id for eps in args.eps_train]
    unknown = [model for model in wanted if model not in grid]
    if unknown:
        sys.exit(f"models {unknown} are not in params.yaml's grid")
    targets = [f"{stage}@{model}" for model in wanted for stage in ("train", "evaluate")]
    for sigma0 in args.sigma0:
        if not sigma0 > 0:
            sys.exit(f"sigma0 must be > 0, got {sigma0}")
        command = ["dvc", "exp", "run", "--queue", "-n", experiment_name(sigma0, args.set, args.dataset),
                   "-S", f"model.sigma0={sigma0}"]
        for override in args.set:
            command += ["-S", override]
        print(" ".join(command + targets), flush=True)
        subprocess.run(command + targets, check=True)


def runs() -> list[tuple[str, str]]:
    """(label, commit) for HEAD and every sweep experiment, oldest experiment first."""
    refs = git("for-each-ref", "--sort=committerdate", "--format=%(refname) %(objectname)", "refs/exps").split("\n")
    found = [("baseline (HEAD)", git("rev-parse", "HEAD").strip())]
    for line in filter(None, refs):
        ref, commit = line.split()
        name = ref.rsplit("/", 1)[-1]
        if name.startswith(PREFIX):
            found.append((name, commit))
    return found


def collect_rows(eps_grid: list[float], dataset: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    summary, curves = [], []
    for label, commit in runs():
        params = yaml.safe_load(read_at(commit, "params.yaml"))
        # An experiment commit's parent is its baseline: only the files it changed are its own results.
        changed = None if label.startswith("baseline") else set(git("diff", "--name-only", f"{commit}^", commit).split())
        for eps in eps_grid:
            paths = {name: pattern.format(dataset=dataset, eps=eps, seed=SEED)
                     for name, pattern in (("metrics", EVAL_METRICS), ("details", EVAL_DETAILS), ("curve", CURVE))}
            if changed is not None and paths["metrics"] not in changed:
                continue
            texts = {name: read_at(commit, path) for name, path in paths.items()}
            if None in texts.values():
                continue
            metrics, details = json.loads(texts["metrics"]), json.loads(texts["details"])
            ball = details["headline_ball"]
            run = {"run": label, "commit": commit[:10], "sigma0": details["sigma0"], "epochs": params["train"]["epochs"],
                   "eps_train": eps, "clip": details["train_clip"], "eot": params["evaluate"]["eot_samples"]}
            curve = pd.read_csv(pd.io.common.StringIO(texts["curve"]))
            curve = curve.assign(elbo_attacked=curve[f"elbo_attacked_{ball}"])
            attacked = curve.set_index("eps_attack")["elbo_attacked"]
            summary.append({**run, **{key: metrics.get(key) for key in ("elbo_test", "lb_test", "kl_test", "active_units")},
                            "attack_examples": details["attack_examples"],
                            "elbo_clean_subset": attacked.get(0.0), "elbo_attacked": attacked.get(SHOWN_EPS_ATTACK),
                            "median_drop": median_drop(commit, PER_EXAMPLE.format(dataset=dataset, eps=eps, seed=SEED),
                                                       ball, SHOWN_EPS_ATTACK)})
            curves.append(curve.assign(**run))
    if not summary:
        sys.exit(f"no evaluated {dataset} models found at HEAD or in sweep experiments")
    table = pd.DataFrame(summary)
    # One row per setting: a rerun of the same setting replaces the earlier one.
    table = table.drop_duplicates(["sigma0", "epochs", "eps_train", "clip", "eot"], keep="last")
    table["drop"] = table["elbo_clean_subset"] - table["elbo_attacked"]
    curves = pd.concat(curves).merge(table[["run", "eps_train"]], on=["run", "eps_train"])
    return table.sort_values(["eps_train", "clip", "epochs", "sigma0"], ascending=[True, False, True, False]), curves


def markdown(table: pd.DataFrame, title: str) -> str:
    shown = table.rename(columns={
        "elbo_test": "ELBO test", "lb_test": "LB test", "kl_test": "KL test", "active_units": "active units",
        "elbo_clean_subset": "ELBO (attacked subset, clean)",
        "elbo_attacked": f"ELBO attacked, eps {SHOWN_EPS_ATTACK:g}", "drop": "drop", "median_drop": "median drop"})
    columns = ["sigma0", "epochs", "eps_train", "clip", "eot", "ELBO test", "LB test", "KL test", "active units",
               "ELBO (attacked subset, clean)", f"ELBO attacked, eps {SHOWN_EPS_ATTACK:g}", "drop", "median drop", "run",
               "commit"]
    return "\n".join([
        f"# {title}", "",
        "Generated by `python scripts/sigma0_sweep.py collect` from DVC experiments; do not edit by hand.",
        "Nats per image, the Gaussian constant dropped. 'drop' is the clean minus the attacked ELBO on the "
        f"attacked test subset at eps_attack = {SHOWN_EPS_ATTACK:g}; 'median drop' the median over its images. Active units: latent dims with "
        "Var_x E_q[z_j] > 0.01. clip: the l_inf ball intersected with [0, 1]^D (false: the unclipped ball); "
        "eot: noise draws averaged per PGD step.", "",
        shown[columns].to_markdown(index=False, floatfmt=".2f"), ""])


def figure(curves: pd.DataFrame, path: Path, title: str, dataset: str) -> None:
    """One panel per training setting: does a robust model end above the VAE trained beside it?"""
    curves = curves.assign(model=["VAE" if t == 0 else f"proVAE eps_train={t:g}" for t in curves["eps_train"]])
    models = sorted(curves["model"].unique(), key=lambda name: (name != "VAE", name))
    palette = dict(zip(models, sns.color_palette("viridis", len(models))))
    settings = (curves[["sigma0", "epochs", "clip"]].drop_duplicates()
                .sort_values(["clip", "epochs", "sigma0"], ascending=[False, True, False]))
    columns = min(4, len(settings))
    rows = -(-len(settings) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.8 * columns, 3.3 * rows), squeeze=False)
    # The paper prints attacked values (its Figure 2) for MNIST only.
    paper = json.loads(Path(PAPER).read_text())["figure2_mnist_eps_attack_0.1"] if dataset == "mnist" else {}
    for ax, (sigma0, epochs, clip) in zip(axes.flat, settings.itertuples(index=False)):
        shown = curves[(curves["sigma0"] == sigma0) & (curves["epochs"] == epochs) & (curves["clip"] == clip)]
        sns.lineplot(data=shown, x="eps_attack", y="elbo_attacked", hue="model", palette=palette, marker="o", ax=ax)
        for eps_train, marker in (("0.0", "*"), ("0.1", "X")) if paper else ():
            values = paper[eps_train]
            name = "VAE" if eps_train == "0.0" else f"eps_train={eps_train}"
            ax.plot([0.0, SHOWN_EPS_ATTACK], [values["clean"], values["attacked"]], "k", linestyle=":",
                    marker=marker, markersize=8, label=f"paper's {name} (Fig. 2)")
        ax.set_title(f"sigma0={sigma0:g}, {epochs} epochs" + ("" if clip else ", unclipped ball"), fontsize=10)
        ax.set_xlabel("eps_attack (l_inf)")
        # A few exploding images can pull a mean down by millions of nats: keep the rest readable.
        if shown["elbo_attacked"].min() < -1e4:
            ax.set_yscale("symlog", linthresh=100)
        ax.set_ylabel("ELBO under attack (nats)" + (", symlog" if ax.get_yscale() == "symlog" else ""))
        ax.legend(fontsize=6)
    for ax in axes.flat[len(settings):]:
        ax.set_visible(False)
    suptitle = (f"{title}: the attacked ELBO per training setting (a smaller sigma0 weights reconstruction by "
                "1/(2 sigma0^2))" + ("; black: the paper's Figure 2 values" if paper else ""))
    fig.suptitle(textwrap.fill(suptitle, width=45 * columns), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def collect(args) -> None:
    params = yaml.safe_load(Path("params.yaml").read_text())
    table, curves = collect_rows(sorted({m.eps for m in grid_models(params) if m.dataset == args.dataset}), args.dataset)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "sweep.csv", index=False, float_format="%.4f")
    curves.to_csv(out / "curves.csv", index=False, float_format="%.6g")
    (out / "sweep.md").write_text(markdown(table, args.title))
    figure(curves, out / "sweep.png", args.title, args.dataset)
    print(markdown(table, args.title))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    queued = commands.add_parser("queue", help="queue one DVC experiment per sigma0")
    queued.add_argument("--sigma0", type=float, nargs="+", required=True)
    queued.add_argument("--dataset", default="mnist")
    queued.add_argument("--eps-train", type=float, nargs="+", default=[0.0])
    queued.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="another param override")
    queued.set_defaults(run=queue)
    collected = commands.add_parser("collect", help="write reports/sigma0_sweep/ from the experiments")
    collected.add_argument("--out", default="reports/sigma0_sweep")
    collected.add_argument("--dataset", default="mnist")
    collected.add_argument("--title", default="sigma0 sweep (MNIST)", help="heading of the table and the figure")
    collected.set_defaults(run=collect)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
