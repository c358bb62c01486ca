"""Report stage: the paper's Table 1 and Figures 1-4, regenerated beside the paper's values.

Iterates over the params lists (datasets x eps_train); a missing evaluation is an error, and
nothing is globbed, so a stale output of a model no longer in the grid never shows up.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
import torch  # noqa: E402
from common import load_params, model_name, write_json  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402

QUANTITIES = {"lb_train": "LB train", "lb_test": "LB test", "elbo_test": "ELBO test"}


def load_results(eval_pattern: str, curve_pattern: str, datasets, eps_grid) -> dict:
    results = {}
    for dataset in datasets:
        for eps in eps_grid:
            folder = Path(eval_pattern.format(dataset=dataset, eps=eps))
            curve = Path(curve_pattern.format(dataset=dataset, eps=eps))
            for path in (folder / "metrics.json", folder / "figure_arrays.npz", curve):
                if not path.is_file():
                    raise FileNotFoundError(f"{path} is missing: evaluate {dataset} at eps_train={eps} first")
            with np.load(folder / "figure_arrays.npz") as arrays:
                results[dataset, eps] = {
                    "metrics": json.loads((folder / "metrics.json").read_text()),
                    "curve": pd.read_csv(curve),
                    "arrays": dict(arrays),
                }
    return results


def table1(results: dict, paper: dict) -> pd.DataFrame:
    rows = []
    for (dataset, eps), result in results.items():
        reference = paper["table1"].get(dataset, {}).get(str(float(eps)), {})
        row = {"dataset": dataset, "data": result["metrics"]["data_label"], "eps_train": eps}
        for key in QUANTITIES:
            row[key] = result["metrics"][key]
            row[f"{key}_paper"] = reference.get(key, np.nan)
        # How loose the certificate is on clean test data: ELBO minus its lower bound at eps_train.
        row["gap_test"] = row["elbo_test"] - row["lb_test"]
        row["gap_test_paper"] = row["elbo_test_paper"] - row["lb_test_paper"]
        rows.append(row)
    return pd.DataFrame(rows)


def table1_markdown(table: pd.DataFrame) -> str:
    lines = ["# Table 1: certified lower bound (LB) and ELBO at eps = eps_train", "",
             "Nats per image, the constant -(D/2) log(2 pi sigma0^2) dropped (as in the paper). "
             "Each cell: ours (paper).", ""]
    for data_label, part in table.groupby("data", sort=False):
        cells = pd.DataFrame({"eps_train": part["eps_train"].map("{:g}".format)})
        for key, title in QUANTITIES.items():
            cells[title] = [f"{ours:.2f} ({theirs:.2f})" for ours, theirs in zip(part[key], part[f"{key}_paper"])]
        cells["gap: ELBO - LB, test"] = [f"{ours:.2f} ({theirs:.2f})"
                                         for ours, theirs in zip(part["gap_test"], part["gap_test_paper"])]
        lines += [f"## {data_label}", "", cells.to_markdown(index=False), ""]
    return "\n".join(lines)


def image_strip(images: np.ndarray, nrow: int) -> np.ndarray:
    """uint8 [N, C, H, W] -> one HWC image, tiles separated by a 2-pixel border."""
    grid = make_grid(torch.from_numpy(images), nrow=nrow, padding=2, pad_value=255)
    return grid.permute(1, 2, 0).numpy()


def show(ax, images: np.ndarray, nrow: int, title: str) -> None:
    strip = image_strip(images, nrow)
    ax.imshow(strip.squeeze(-1) if strip.shape[-1] == 1 else strip, cmap="gray", vmin=0, vmax=255)
    ax.set_title(title, fontsize=9, loc="left")
    ax.axis("off")


def figure_adversarial_examples(results, dataset, example_eps, eps_attack, path) -> None:
    """Figure 1: test images and their adversarial examples against each shown model."""
    rows = [("clean test images", results[dataset, example_eps[0]]["arrays"]["clean"])]
    rows += [(f"attacked (eps_attack={eps_attack:g}): {model_name(eps)}",
              results[dataset, eps]["arrays"]["attacked"]) for eps in example_eps]
    fig, axes = plt.subplots(len(rows), 1, figsize=(8, 1.3 * len(rows)), squeeze=False)
    for ax, (title, images) in zip(axes[:, 0], rows):
        show(ax, images, len(images), title)
    fig.suptitle(f"Figure 1 - {results[dataset, example_eps[0]]['metrics']['data_label']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def figure_reconstructions(results, dataset, example_eps, eps_attack, path) -> None:
    """Figure 2: reconstructions of clean and attacked images, each with its ELBO."""
    fig, axes = plt.subplots(2 * len(example_eps), 1, figsize=(8, 1.6 * 2 * len(example_eps)), squeeze=False)
    for i, eps in enumerate(example_eps):
        arrays = results[dataset, eps]["arrays"]
        name = model_name(eps)
        for ax, kind in zip(axes[2 * i : 2 * i + 2, 0], ("clean", "attacked")):
            elbos = arrays[f"{kind}_elbo"]
            show(ax, arrays[f"{kind}_reconstruction"], len(elbos),
                 f"{name}: {kind} reconstructions, mean ELBO {elbos.mean():.2f}")
            tile = ax.get_xlim()[1] / len(elbos)
            for j, value in enumerate(elbos):
                ax.text((j + 0.5) * tile, ax.get_ylim()[0] + 2, f"{value:.1f}", ha="center", va="top", fontsize=7)
    label = results[dataset, example_eps[0]]["metrics"]["data_label"]
    fig.suptitle(f"Figure 2 - {label}, eps_attack={eps_attack:g} (ELBO in nats under each image)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def figure_attack_curves(results, datasets, eps_grid, path) -> None:
    """Figure 3: ELBO under attack vs eps_attack, one curve per eps_train (VAE bold), bound dashed."""
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
    palette = dict(zip(eps_grid, sns.color_palette("viridis", len(eps_grid))))
    for ax, dataset in zip(axes[0], datasets):
        for eps in eps_grid:
            curve = results[dataset, eps]["curve"]
            name = model_name(eps)
            width = 3.0 if eps == 0 else 1.5
            sns.lineplot(data=curve, x="eps_attack", y="elbo_attacked", ax=ax, color=palette[eps], linewidth=width,
                         marker="o", label=f"{name}: attacked ELBO")
            sns.lineplot(data=curve, x="eps_attack", y="bound", ax=ax, color=palette[eps], linewidth=width / 2,
                         linestyle="--", label=f"{name}: certified bound")
        ax.set_title(results[dataset, eps_grid[0]]["metrics"]["data_label"])
        ax.set_xlabel("eps_attack (l_inf)")
        ax.set_ylabel("ELBO (nats)")
        # Frame the attacked ELBOs; a loose bound far below them runs off the bottom rather than
        # squashing every curve into one line.
        attacked = pd.concat([results[dataset, eps]["curve"]["elbo_attacked"] for eps in eps_grid])
        span = attacked.max() - attacked.min() + 1.0
        ax.set_ylim(attacked.min() - 0.5 * span, attacked.max() + 0.1 * span)
        ax.legend(fontsize=6)
    fig.suptitle("Figure 3 - ELBO under attack (solid) and its certified lower bound (dashed)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def figure_training_curves(pattern: str, datasets, eps_grid, labels: dict, path) -> None:
    """Test certified bound at eps_train (solid) and test ELBO (dashed) per epoch, per model."""
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
    palette = dict(zip(eps_grid, sns.color_palette("viridis", len(eps_grid))))
    for ax, dataset in zip(axes[0], datasets):
        finals = []
        for eps in eps_grid:
            folder = Path(pattern.format(dataset=dataset, eps=eps)) / "plots" / "metrics" / "test"
            bound = pd.read_csv(folder / "bound_at_eps_train.tsv", sep="\t")
            elbo = pd.read_csv(folder / "elbo.tsv", sep="\t")
            epoch = bound["step"] + 1
            ax.plot(epoch, bound["bound_at_eps_train"], color=palette[eps], marker=".", label=f"{model_name(eps)}: LB")
            ax.plot(epoch, elbo["elbo"], color=palette[eps], linestyle="--", label=f"{model_name(eps)}: ELBO")
            finals += [bound["bound_at_eps_train"].iloc[-1], elbo["elbo"].iloc[-1]]
        # The bound at the full eps_train is far lower during the warm-up; frame the converged values.
        span = max(finals) - min(finals) + 1.0
        ax.set_ylim(min(finals) - 1.5 * span, max(finals) + 0.3 * span)
        ax.set_title(labels[dataset])
        ax.set_xlabel("epoch")
        ax.set_ylabel("nats (test monitor subset)")
        ax.legend(fontsize=6)
    fig.suptitle("Training: test bound at eps_train (solid), test ELBO (dashed)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def figure_samples(results, dataset, eps_grid, path) -> None:
    """Figure 4: decoder samples g(e), e ~ N(0, I), the same draws for every model."""
    fig, axes = plt.subplots(1, len(eps_grid), figsize=(3 * len(eps_grid), 3.3), squeeze=False)
    for ax, eps in zip(axes[0], eps_grid):
        samples = results[dataset, eps]["arrays"]["prior_samples"]
        show(ax, samples, int(np.ceil(np.sqrt(len(samples)))), model_name(eps))
    fig.suptitle(f"Figure 4 - samples, {results[dataset, eps_grid[0]]['metrics']['data_label']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def attack_strength_markdown(pattern: str, datasets, strength_eps, labels: dict) -> str:
    """The attacked ELBO under `evaluate`'s attack and under each stronger setting."""
    lines = ["# Attack strength: do stronger attacks lower the attack curve?", "",
             "Mean attacked ELBO (nats) on the first test images of the attacked subset. The first row per "
             "eps_attack is `evaluate`'s own setting; 'change' is each stronger setting minus it (negative: "
             "the stronger attack found lower ELBOs).", ""]
    for dataset in datasets:
        for eps in strength_eps:
            path = Path(pattern.format(dataset=dataset, eps=eps))
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: run attack_strength for {dataset} at eps_train={eps}")
            table = pd.read_csv(path)
            shown = pd.DataFrame({
                "eps_attack": table["eps_attack"].map("{:g}".format),
                "PGD steps x restarts": [f"{s} x {r}" for s, r in zip(table["pgd_steps"], table["pgd_restarts"])],
                "EOT draws": table["eot_samples"],
                "attacked ELBO": table["elbo_attacked"].map("{:.2f}".format),
                "change": table["change_vs_evaluate"].map("{:+.2f}".format),
                "seconds": table["seconds"],
            })
            lines += [f"## {labels[dataset]}, {model_name(eps)}", "", shown.to_markdown(index=False), ""]
    return "\n".join(lines)


def fixed_encoder_markdown(pattern: str, datasets, eps_grid, labels: dict, preferred_eps_attack=(0.05, 0.1, 0.2)) -> str:
    """Per model: the attacks' fall of the ELBO beside the fall with the encoder held fixed."""
    lines = ["# How much of the attacked ELBO's fall needs no encoder?", "",
             "Mean fall of the ELBO (nats) on `evaluate`'s attacked test images. 'attacks': `evaluate`'s "
             "curve (the worst of PGD, the latent attack and no attack). 'fixed encoder': the worst input in "
             "the ball scored against the clean input's own latent code, exact; what a model whose encoder "
             "ignored the perturbation would lose. 'residual sign': the true ELBO at that input, a one-step "
             "attack (where it exceeds 'attacks', it beat PGD).", ""]
    for dataset in datasets:
        rows = []
        for eps in eps_grid:
            path = Path(pattern.format(dataset=dataset, eps=eps))
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: run fixed_encoder for {dataset} at eps_train={eps}")
            table = pd.read_csv(path).set_index("eps_attack")
            shown = [a for a in table.index if a in preferred_eps_attack] or [a for a in table.index if a > 0]
            row = {"model": model_name(eps)}
            for eps_attack in shown:
                values = table.loc[eps_attack]
                row[f"eps {eps_attack:g}: attacks / fixed encoder / residual sign"] = (
                    f"{values['attack_drop']:.2f} / {values['fixed_encoder_drop']:.2f} / {values['residual_sign_drop']:.2f}")
            rows.append(row)
        lines += [f"## {labels[dataset]}", "", pd.DataFrame(rows).to_markdown(index=False), ""]
    return "\n".join(lines)


def metric_key(name: str, value: float) -> str:
    """`eps_train_0_05`: DVC joins nested keys with dots, so a key must not contain one."""
    return f"{name}_{value:g}".replace(".", "_")


def summary_metrics(results: dict, table: pd.DataFrame) -> dict:
    """Nested {dataset: {eps_train: ...}} for `dvc metrics diff` across branches."""
    summary: dict = {}
    for (dataset, eps), result in results.items():
        curve = result["curve"].set_index("eps_attack")
        summary.setdefault(dataset, {})[metric_key("eps_train", eps)] = {
            **{key: round(result["metrics"][key], 3) for key in QUANTITIES},
            "attacked_elbo": {metric_key("eps_attack", a): round(v, 3) for a, v in curve["elbo_attacked"].items()},
            "audit_violations": result["metrics"]["audit"]["violations"],
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval", required=True, help="evaluation folder, with {dataset} and {eps}")
    parser.add_argument("--curves", required=True, help="attack-curve csv, with {dataset} and {eps}")
    parser.add_argument("--strength", required=True, help="attack-strength csv, with {dataset} and {eps}")
    parser.add_argument("--strength-table", required=True, help="attack-strength summary, .md")
    parser.add_argument("--fixed-encoder", required=True, help="fixed-encoder csv, with {dataset} and {eps}")
    parser.add_argument("--fixed-encoder-table", required=True, help="fixed-encoder summary, .md")
    parser.add_argument("--training", required=True, help="DVCLive folder per model, with {dataset} and {eps}")
    parser.add_argument("--paper", required=True)
    parser.add_argument("--table", required=True, help="path prefix for table .md/.csv/.tex")
    parser.add_argument("--figures", required=True)
    parser.add_argument("--metrics", required=True)
    parser.add_argument("--index", required=True)
    args = parser.parse_args()
    params = load_params()
    datasets, eps_grid = params["datasets"], [float(e) for e in params["eps_train"]]
    example_eps = [float(e) for e in params["report"]["example_eps_train"]]
    unknown = [e for e in example_eps if e not in eps_grid]
    if unknown:
        sys.exit(f"report.example_eps_train {unknown} not in eps_train {eps_grid}")
    eps_attack = params["evaluate"]["example_eps_attack"]

    results = load_results(args.eval, args.curves, datasets, eps_grid)
    paper = json.loads(Path(args.paper).read_text())
    table = table1(results, paper)
    table.to_csv(f"{args.table}.csv", index=False, float_format="%.3f")
    Path(f"{args.table}.md").write_text(table1_markdown(table) + "\n")
    Path(f"{args.table}.tex").write_text(
        table.drop(columns="dataset").to_latex(index=False, float_format="%.2f", caption="Certified lower bound and ELBO "
                                               "at eps = eps_train (nats; paper values in the _paper columns)."))

    figures = Path(args.figures)
    figures.mkdir(parents=True, exist_ok=True)
    entries = [("table1.md / .csv / .tex", "Table 1: LB train, LB test, ELBO test per eps_train, ours beside the paper's")]
    for dataset in datasets:
        for name, draw, what in (
            ("fig1_adversarial", figure_adversarial_examples, "Figure 1: adversarial examples"),
            ("fig2_reconstructions", figure_reconstructions, "Figure 2: clean vs attacked reconstructions with ELBO"),
        ):
            draw(results, dataset, example_eps, eps_attack, figures / f"{name}_{dataset}.png")
            entries.append((f"figures/{name}_{dataset}.png", f"{what} ({results[dataset, eps_grid[0]]['metrics']['data_label']})"))
        figure_samples(results, dataset, eps_grid, figures / f"fig4_samples_{dataset}.png")
        entries.append((f"figures/fig4_samples_{dataset}.png", f"Figure 4: prior samples ({results[dataset, eps_grid[0]]['metrics']['data_label']})"))
    figure_attack_curves(results, datasets, eps_grid, figures / "fig3_attack_curves.png")
    entries.append(("figures/fig3_attack_curves.png", "Figure 3: ELBO under attack vs eps_attack, with certified bounds"))
    write_json(args.metrics, summary_metrics(results, table))
    labels = {dataset: results[dataset, eps_grid[0]]["metrics"]["data_label"] for dataset in datasets}
    figure_training_curves(args.training, datasets, eps_grid, labels, figures / "training_curves.png")
    entries.append(("figures/training_curves.png", "Training curves: test bound and ELBO per epoch, every model"))
    strength_eps = [float(e) for e in params["attack_strength"]["eps_train"]]
    Path(args.strength_table).write_text(attack_strength_markdown(args.strength, datasets, strength_eps, labels) + "\n")
    entries.append(("attack_strength.md", "Attack strength: the attack curve's attack vs stronger settings"))
    Path(args.fixed_encoder_table).write_text(fixed_encoder_markdown(args.fixed_encoder, datasets, eps_grid, labels) + "\n")
    entries.append(("fixed_encoder.md", "The attacks' fall of the ELBO beside the fall with the encoder held fixed"))

    index = ["# Reports", "", "Generated by `dvc repro` (stage `report`); do not edit by hand.", "",
             "Conventions: nats per image with the Gaussian constant dropped; threat model l_inf ball "
             f"{'intersected with [0, 1]' if params['clip'] else 'not clipped'}; ELBO under attack is the "
             "lowest over PGD, a latent (KL) attack and no attack, scored with fresh noise.", "",
             "| file | what |", "|---|---|"]
    index += [f"| [{path}]({path.split(' ')[0]}) | {what} |" for path, what in entries]
    index += ["| metrics.json | summary metrics (`dvc metrics diff`) |",
              "| data/*.json | provenance of each dataset (source, hashes, counts, pixel statistics) |",
              "| training/ | training curves per model (DVCLive) |",
              "| eval/*/metrics.json, attack_curves/*.csv | per-model evaluation and certificate audit |"]
    Path(args.index).write_text("\n".join(index) + "\n")


if __name__ == "__main__":
    main()
