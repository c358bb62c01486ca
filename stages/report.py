"""Report stage: the paper's Table 1 and Figures 1-4 regenerated beside the paper's values, with
the spread over seeds, plus the attack-curve, attack-strength and fixed-encoder tables.

Iterates over the params lists (datasets x eps_train x seeds); a missing output is an error, and
nothing is globbed, so a stale output of a model no longer in the grid never shows up. Every
figure carries its provenance (checkpoint hashes, params) in its PNG text chunks, and the index
(reports/README.md) lists it; nothing time-dependent is written, so a re-run is byte-identical.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
import torch  # noqa: E402
from common import file_md5, load_params, model_name, write_json  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402

QUANTITIES = {"lb_train": "LB train", "lb_test": "LB test", "elbo_test": "ELBO test"}
BALLS = ("unclipped", "clipped")
BALL_TITLES = {"unclipped": "unclipped ball (paper eq. 15)", "clipped": "ball clipped to [0, 1] (valid images)"}
SOFTWARE = f"matplotlib {matplotlib.__version__} via stages/report.py"
CONVERGENCE_EPOCHS, CONVERGENCE_TOLERANCE = 5, 0.01  # clean ELBO moved < 1 % over the last 5 epochs


@dataclass(frozen=True)
class Patterns:
    """Where each per-model output lives: dvc.yaml's paths, with {dataset}, {eps} and {seed}."""

    models: str
    eval: str
    metrics: str
    curves: str
    strength: str
    fixed_encoder: str
    training: str
    data: str
    certify: str

    def path(self, kind: str, dataset: str, eps: float, seed: int | None = None) -> Path:
        return Path(getattr(self, kind).format(dataset=dataset, eps=eps, seed=seed))


def read_required(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: {what}")
    return path


def model_id(dataset: str, eps: float, seed: int) -> str:
    return f"{dataset}-eps{eps}-seed{seed}"


def spread(values) -> dict:
    """Mean, sample std, min and max over seeds (std is nan with one seed)."""
    values = np.asarray(list(values), dtype=float)
    return {"mean": values.mean(), "std": values.std(ddof=1) if len(values) > 1 else np.nan,
            "min": values.min(), "max": values.max(), "n": len(values)}


def show(stats: dict, digits: int = 2) -> str:
    text = f"{stats['mean']:.{digits}f}"
    return text if np.isnan(stats["std"]) else f"{text} ± {stats['std']:.{digits}f}"


def separated(a: dict, b: dict) -> bool | None:
    """True when the seed ranges of two cells do not overlap: a difference beyond the spread.
    None with fewer than two seeds on either side: there is no spread to judge against."""
    if min(a["n"], b["n"]) < 2:
        return None
    return bool(a["min"] > b["max"] or b["min"] > a["max"])


class Results:
    """Every per-model output of the grid, read once."""

    def __init__(self, patterns: Patterns, params: dict):
        self.patterns, self.params = patterns, params
        self.datasets = params["datasets"]
        self.eps_grid = [float(e) for e in params["eps_train"]]
        self.seeds = [int(s) for s in params["seeds"]]
        self.labels = {d: json.loads(read_required(patterns.path("data", d, 0), "run the data stage").read_text())["label"]
                       for d in self.datasets}
        self.metrics, self.details, self.curves, self.md5 = {}, {}, {}, {}
        for key in self.keys():
            dataset, eps, seed = key
            hint = f"evaluate {model_id(*key)} first"
            self.metrics[key] = json.loads(read_required(patterns.path("metrics", *key), hint).read_text())
            self.details[key] = json.loads(read_required(patterns.path("eval", *key) / "details.json", hint).read_text())
            self.curves[key] = pd.read_csv(read_required(patterns.path("curves", *key), hint)).set_index("eps_attack")
            self.md5[key] = file_md5(read_required(patterns.path("models", *key), f"train {model_id(*key)} first"))
        self.headline = self.details[self.keys()[0]]["headline_ball"]

    def keys(self, dataset: str | None = None, eps: float | None = None) -> list[tuple[str, float, int]]:
        return [(d, e, s) for d in self.datasets for e in self.eps_grid for s in self.seeds
                if d == (dataset or d) and e == (e if eps is None else eps)]

    def over_seeds(self, dataset: str, eps: float, value) -> dict:
        return spread(value(key) for key in self.keys(dataset, eps))

    def arrays(self, dataset: str, eps: float, seed: int) -> dict:
        path = read_required(self.patterns.path("eval", dataset, eps, seed) / "figure_arrays.npz", "evaluate it first")
        with np.load(path) as arrays:
            return dict(arrays)


def save_figure(fig, path: Path, results: Results, keys: list, what: str) -> list:
    """PNG with its provenance in text chunks: the models (checkpoint md5) and the params. Returns ``keys``."""
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={
        "Title": what, "Software": SOFTWARE,
        "Models": "; ".join(f"{model_id(*key)} md5:{results.md5[key]}" for key in keys),
        "Params": json.dumps(results.params, sort_keys=True),
        "Commit": f"the git commit that added this file: git log -1 --format=%H -- {path.as_posix()}",
    })
    plt.close(fig)
    return keys


def convergence(results: Results) -> dict:
    """Per (dataset, eps): the largest relative move of the clean test ELBO over the last epochs."""
    moves = {}
    for dataset, eps, seed in results.keys():
        folder = results.patterns.path("training", dataset, eps, seed) / "plots" / "metrics" / "test"
        elbo = pd.read_csv(read_required(folder / "elbo.tsv", "train it first"), sep="\t")["elbo"]
        if len(elbo) > CONVERGENCE_EPOCHS:
            move = abs(elbo.iloc[-1] - elbo.iloc[-1 - CONVERGENCE_EPOCHS]) / abs(elbo.iloc[-1])
            moves[dataset, eps] = max(moves.get((dataset, eps), 0.0), move)
    return moves


def table1(results: Results, paper: dict) -> pd.DataFrame:
    other = "clipped" if results.headline == "unclipped" else "unclipped"
    moves = convergence(results)
    rows = []
    for dataset in results.datasets:
        for eps in results.eps_grid:
            reference = paper["table1"].get(dataset, {}).get(str(float(eps)), {})
            row = {"dataset": dataset, "data": results.labels[dataset], "ball": results.headline, "eps_train": eps}
            cells = {key: results.over_seeds(dataset, eps, lambda k, key=key: results.metrics[k][key]) for key in QUANTITIES}
            cells["gap_test"] = results.over_seeds(
                dataset, eps, lambda k: results.metrics[k]["elbo_test"] - results.metrics[k]["lb_test"])
            cells[f"lb_test_{other}"] = results.over_seeds(dataset, eps, lambda k: results.metrics[k][f"lb_test_{other}"])
            for key, stats in cells.items():
                row.update({f"{key}_{stat}": value for stat, value in stats.items() if stat != "n"})
                row[f"{key}_paper"] = reference.get(key, np.nan)
            row["gap_test_paper"] = reference.get("elbo_test", np.nan) - reference.get("lb_test", np.nan)
            row["seeds"] = cells["lb_test"]["n"]
            row["elbo_move_last_epochs"] = moves.get((dataset, eps), np.nan)
            rows.append(row)
    return pd.DataFrame(rows).drop(columns=[f"lb_test_{other}_paper"])


def table1_markdown(table: pd.DataFrame, paper_datasets: set) -> str:
    ball = table["ball"].iloc[0]
    other = "clipped" if ball == "unclipped" else "unclipped"
    lines = ["# Table 1: certified lower bound (LB) and ELBO at eps = eps_train", "",
             f"Threat model: the {BALL_TITLES[ball]}; the last LB column uses the {BALL_TITLES[other]}. "
             "Nats per image, the constant -(D/2) log(2 pi sigma0^2) dropped (as in the paper). Each cell: mean ± "
             "std over seeds, then the paper's value in brackets where it has one. 'converged': the clean test "
             f"ELBO moved by less than {CONVERGENCE_TOLERANCE:.0%} over the last {CONVERGENCE_EPOCHS} epochs "
             "(largest move over seeds, training monitor subset).", ""]
    for data_label, part in table.groupby("data", sort=False):
        with_paper = part["dataset"].iloc[0] in paper_datasets
        cells = pd.DataFrame({"eps_train": part["eps_train"].map("{:g}".format), "seeds": part["seeds"]})
        for key, title in {**QUANTITIES, "gap_test": "gap: ELBO - LB, test"}.items():
            cells[title] = [show({"mean": m, "std": s}) + (f" ({p:.2f})" if with_paper else "")
                            for m, s, p in zip(part[f"{key}_mean"], part[f"{key}_std"], part[f"{key}_paper"])]
        cells[f"LB test, {other} ball"] = [show({"mean": m, "std": s})
                                           for m, s in zip(part[f"lb_test_{other}_mean"], part[f"lb_test_{other}_std"])]
        cells["converged"] = [f"n/a (<= {CONVERGENCE_EPOCHS} epochs)" if np.isnan(move) else
                              ("yes" if move < CONVERGENCE_TOLERANCE else "no") + f" ({move:.1%})"
                              for move in part["elbo_move_last_epochs"]]
        lines += [f"## {data_label}", "", cells.to_markdown(index=False), ""]
    return "\n".join(lines)


def attack_curve_markdown(results: Results) -> str:
    """Attacked ELBO per eps_attack, mean ± std over seeds, and each robust model's difference to the VAE."""
    lines = ["# ELBO under attack (Figure 3 in numbers)", "",
             "Mean attacked ELBO (nats) on each model's attacked test subset, mean ± std over seeds. 'vs VAE': the "
             "robust model's mean minus the VAE's; with two seeds or more, '*' marks a difference beyond the spread "
             "(the seed ranges do not overlap) and '≈' one within it.", ""]
    for dataset in results.datasets:
        for ball in (results.headline, *[b for b in BALLS if b != results.headline]):
            eps_attack = list(results.curves[results.keys(dataset)[0]].index)
            rows = []
            for eps in results.eps_grid:
                row, compare = {"model": model_name(eps)}, {"model": f"{model_name(eps)} vs VAE"}
                for a in eps_attack:
                    stats = results.over_seeds(dataset, eps, lambda k, a=a: results.curves[k].loc[a, f"elbo_attacked_{ball}"])
                    vae = results.over_seeds(dataset, 0.0, lambda k, a=a: results.curves[k].loc[a, f"elbo_attacked_{ball}"])
                    row[f"{a:g}"] = show(stats)
                    mark = {True: " *", False: " ≈", None: ""}[separated(stats, vae)]
                    compare[f"{a:g}"] = f"{stats['mean'] - vae['mean']:+.2f}{mark}"
                rows.append(row)
                if eps != 0:
                    rows.append(compare)
            lines += [f"## {results.labels[dataset]}, {BALL_TITLES[ball]}", "",
                      "Columns: eps_attack.", "", pd.DataFrame(rows).to_markdown(index=False), ""]
    return "\n".join(lines)


def image_strip(images: np.ndarray, nrow: int) -> np.ndarray:
    """uint8 [N, C, H, W] -> one HWC image, tiles separated by a 2-pixel border."""
    grid = make_grid(torch.from_numpy(images), nrow=nrow, padding=2, pad_value=255)
    return grid.permute(1, 2, 0).numpy()


def show_images(ax, images: np.ndarray, nrow: int, title: str) -> None:
    strip = image_strip(images, nrow)
    ax.imshow(strip.squeeze(-1) if strip.shape[-1] == 1 else strip, cmap="gray", vmin=0, vmax=255)
    ax.set_title(title, fontsize=9, loc="left")
    ax.axis("off")


def figure_adversarial_examples(results: Results, dataset, example_eps, seed, eps_attack, path) -> list:
    """Figure 1: test images and their adversarial examples against each shown model."""
    rows = [("clean test images", results.arrays(dataset, example_eps[0], seed)["clean"])]
    rows += [(f"attacked (eps_attack={eps_attack:g}): {model_name(eps)}", results.arrays(dataset, eps, seed)["attacked"])
             for eps in example_eps]
    fig, axes = plt.subplots(len(rows), 1, figsize=(8, 1.3 * len(rows)), squeeze=False)
    for ax, (title, images) in zip(axes[:, 0], rows):
        show_images(ax, images, len(images), title)
    fig.suptitle(f"Figure 1 - {results.labels[dataset]}, seed {seed}, {BALL_TITLES[results.headline]}", fontsize=10)
    keys = [(dataset, eps, seed) for eps in example_eps]
    return save_figure(fig, path, results, keys, f"Figure 1: adversarial examples, {results.labels[dataset]}")


def figure_reconstructions(results: Results, dataset, example_eps, seed, eps_attack, path) -> list:
    """Figure 2: reconstructions of clean and attacked images, each with its ELBO."""
    fig, axes = plt.subplots(2 * len(example_eps), 1, figsize=(8, 1.6 * 2 * len(example_eps)), squeeze=False)
    for i, eps in enumerate(example_eps):
        arrays = results.arrays(dataset, eps, seed)
        for ax, kind in zip(axes[2 * i : 2 * i + 2, 0], ("clean", "attacked")):
            elbos = arrays[f"{kind}_elbo"]
            show_images(ax, arrays[f"{kind}_reconstruction"], len(elbos),
                        f"{model_name(eps)}: {kind} reconstructions, mean ELBO {elbos.mean():.2f}")
            tile = ax.get_xlim()[1] / len(elbos)
            for j, value in enumerate(elbos):
                ax.text((j + 0.5) * tile, ax.get_ylim()[0] + 2, f"{value:.1f}", ha="center", va="top", fontsize=7)
    fig.suptitle(f"Figure 2 - {results.labels[dataset]}, seed {seed}, eps_attack={eps_attack:g} "
                 "(ELBO in nats under each image)", fontsize=10)
    keys = [(dataset, eps, seed) for eps in example_eps]
    return save_figure(fig, path, results, keys, f"Figure 2: clean vs attacked reconstructions, {results.labels[dataset]}")


def certified_bounds(results: Results, dataset: str, eps: float, ball: str) -> pd.DataFrame:
    """Mean certified bound per (eps_attack, method) over the seeds, on the certify stage's images."""
    tables = [pd.read_csv(read_required(results.patterns.path("certify", *key) / "bounds.csv", "run certify first"))
              for key in results.keys(dataset, eps)]
    table = pd.concat(tables)
    return table[table["ball"] == ball].groupby(["method", "eps_attack"])["bound"].mean().unstack(0)


METHOD_STYLES = {"ibp": "--", "crown": ":"}
METHOD_TITLES = {"ibp": "IBP", "crown": "linear relaxation (CROWN)"}


def figure_attack_curves(results: Results, path) -> list:
    """Figure 3: ELBO under attack vs eps_attack, mean over seeds with a min-max band, one line per
    eps_train (VAE bold), and its certified bound by each method (IBP dashed, linear relaxation
    dotted, on the certify stage's images); one row per ball, one column per dataset."""
    balls = (results.headline, *[b for b in BALLS if b != results.headline])
    fig, axes = plt.subplots(len(balls), len(results.datasets), figsize=(5.5 * len(results.datasets), 4 * len(balls)),
                             squeeze=False)
    palette = dict(zip(results.eps_grid, sns.color_palette("viridis", len(results.eps_grid))))
    for row, ball in enumerate(balls):
        for ax, dataset in zip(axes[row], results.datasets):
            framed = []
            for eps in results.eps_grid:
                stacked = np.stack([results.curves[k][f"elbo_attacked_{ball}"].to_numpy() for k in results.keys(dataset, eps)])
                x = results.curves[results.keys(dataset, eps)[0]].index.to_numpy()
                width = 3.0 if eps == 0 else 1.5
                ax.plot(x, stacked.mean(0), color=palette[eps], linewidth=width, marker="o", markersize=3,
                        label=f"{model_name(eps)}: attacked ELBO")
                ax.fill_between(x, stacked.min(0), stacked.max(0), color=palette[eps], alpha=0.25, linewidth=0)
                bounds = certified_bounds(results, dataset, eps, ball)
                for method in bounds.columns:
                    ax.plot(bounds.index, bounds[method], color=palette[eps], linewidth=width / 2,
                            linestyle=METHOD_STYLES.get(method, "-."), label=f"{model_name(eps)}: {METHOD_TITLES[method]}")
                framed.append(stacked)
            ax.set_title(f"{results.labels[dataset]}, {BALL_TITLES[ball]}", fontsize=9)
            ax.set_xlabel("eps_attack (l_inf)")
            ax.set_ylabel("ELBO (nats)")
            # Frame the attacked ELBOs; a loose bound far below them runs off the bottom rather than
            # squashing every curve into one line.
            low, high = min(a.min() for a in framed), max(a.max() for a in framed)
            span = high - low + 1.0
            ax.set_ylim(low - 0.5 * span, high + 0.1 * span)
            ax.legend(fontsize=5, ncol=2)
    seeds = len(results.seeds)
    fig.suptitle(f"Figure 3 - ELBO under attack (solid: mean over {seeds} seed{'s' * (seeds > 1)}, band: min to max) "
                 "and its certified lower bound (dashed: IBP, dotted: linear relaxation; certify's images)", fontsize=9)
    return save_figure(fig, path, results, results.keys(),
                       "Figure 3: ELBO under attack vs eps_attack, with certified bounds")


def figure_certified_radius(results: Results, path) -> list:
    """Certified-radius curves: the fraction of test images whose certified ELBO drop stays within
    tau over the whole ball of radius eps, against eps (the analogue of certified accuracy); one
    column per tau, one row per dataset, a line per model (colour) and bound method (style)."""
    radii = {key: pd.read_csv(read_required(results.patterns.path("certify", *key) / "radii.csv", "run certify first"))
             for key in results.keys()}
    taus = list(dict.fromkeys(radii[results.keys()[0]]["tau"]))
    fig, axes = plt.subplots(len(results.datasets), len(taus), figsize=(4.2 * len(taus), 3.6 * len(results.datasets)),
                             squeeze=False, sharex=True)
    palette = dict(zip(results.eps_grid, sns.color_palette("viridis", len(results.eps_grid))))
    grid = np.linspace(0, max(radii[results.keys()[0]]["radius"].max(), max(results.curves[results.keys()[0]].index)), 101)
    for row, dataset in enumerate(results.datasets):
        for ax, tau in zip(axes[row], taus):
            for eps in results.eps_grid:
                table = pd.concat([radii[k] for k in results.keys(dataset, eps)])
                for method, part in table[table["tau"] == tau].groupby("method", sort=False):
                    values = part["radius"].to_numpy()
                    ax.plot(grid, [(values >= g).mean() for g in grid], color=palette[eps], linewidth=2.5 if eps == 0 else 1.3,
                            linestyle=METHOD_STYLES.get(method, "-."), label=f"{model_name(eps)}, {METHOD_TITLES[method]}")
            ax.set_title(f"{results.labels[dataset]}: ELBO drop <= {tau}", fontsize=9)
            ax.set_xlabel("eps (l_inf radius)")
            ax.set_ylabel("fraction of test images certified")
            ax.set_ylim(-0.02, 1.02)
            ax.legend(fontsize=5)
    fig.suptitle(f"Certified radius: the whole ball ({BALL_TITLES[results.headline]}) keeps the ELBO within tau of the "
                 "clean one (dashed: IBP, dotted: linear relaxation)", fontsize=9)
    return save_figure(fig, path, results, results.keys(), "Certified-radius curves")


def nats(value: float, sign: str = "") -> str:
    """One decimal, or three significant digits once a vacuous bound runs to millions of nats."""
    return f"{value:{sign}.1f}" if abs(value) < 1e5 else f"{value:{sign}.2e}"


def certify_markdown(results: Results, shown_eps=(0.01, 0.05, 0.1)) -> str:
    """Per model and eps: each method's certified bound, the tighter method's gain and the share of
    the gap between IBP's bound and the attacked ELBO that it closes."""
    lines = ["# How much tighter than IBP is the linear relaxation?", "",
             "Mean certified lower bound of the ELBO (nats) by IBP and by the linear relaxation (CROWN), and the "
             "attacked ELBO, on the certify stage's test images with the attacks' own noise, mean over seeds. 'gap "
             "closed': how much of the gap between IBP's bound and the attacked ELBO the relaxation closes (100 % "
             "would make it exact; where IBP's bound runs to astronomic values, even a still vacuous relaxation "
             "closes nearly all of it: compare its bound with the attacked ELBO). 'violations': attacked ELBOs "
             "below any bound (the audit), over every eps_attack and both balls.", ""]
    for dataset in results.datasets:
        for ball in (results.headline, *[b for b in BALLS if b != results.headline]):
            rows = []
            for eps in results.eps_grid:
                tables = pd.concat([pd.read_csv(results.patterns.path("certify", *k) / "bounds.csv")
                                    for k in results.keys(dataset, eps)])
                part = tables[tables["ball"] == ball].groupby(["eps_attack", "method"]).mean(numeric_only=True)
                row = {"model": model_name(eps), "violations": int(tables["violations"].sum())}
                for a in [a for a in shown_eps if (a, "ibp") in part.index and (a, "crown") in part.index]:
                    ibp, crown = part.loc[(a, "ibp")], part.loc[(a, "crown")]
                    gap = ibp["attacked_elbo"] - ibp["bound"]
                    closed = f"{100 * (crown['bound'] - ibp['bound']) / gap:.0f} %" if 0 < gap < np.inf else "n/a"
                    row[f"eps {a:g}: IBP / CROWN / attacked (gap closed)"] = (
                        f"{nats(ibp['bound'])} / {nats(crown['bound'])} / {nats(ibp['attacked_elbo'])} ({closed})")
                row["s per image: IBP / CROWN"] = (f"{tables[tables['method'] == 'ibp']['seconds_per_image'].mean():.4f} / "
                                                   f"{tables[tables['method'] == 'crown']['seconds_per_image'].mean():.3f}")
                rows.append(row)
            lines += [f"## {results.labels[dataset]}, {BALL_TITLES[ball]}", "", pd.DataFrame(rows).to_markdown(index=False), ""]
        rows = []
        for eps in results.eps_grid:
            radii = pd.concat([pd.read_csv(results.patterns.path("certify", *k) / "radii.csv") for k in results.keys(dataset, eps)])
            median = radii.groupby(["tau", "method"], sort=False)["radius"].median().unstack()
            rows.append({"model": model_name(eps), **{f"ELBO drop <= {tau}": f"{median.loc[tau, 'ibp']:.4f} / {median.loc[tau, 'crown']:.4f}"
                                                      for tau in median.index}})
        lines += [f"## {results.labels[dataset]}: median certified radius, IBP / linear relaxation", "",
                  f"The largest l_inf radius (in the {BALL_TITLES[results.headline]}) whose whole ball keeps the certified ELBO "
                  "within tau of the clean one; 1/255 = 0.0039 is one grey level.", "",
                  pd.DataFrame(rows).to_markdown(index=False), ""]
    return "\n".join(lines)


def figure_training_curves(results: Results, seed, path) -> list:
    """Test certified bound at eps_train (solid) and test ELBO (dashed) per epoch, per model."""
    fig, axes = plt.subplots(1, len(results.datasets), figsize=(5.5 * len(results.datasets), 4), squeeze=False)
    palette = dict(zip(results.eps_grid, sns.color_palette("viridis", len(results.eps_grid))))
    for ax, dataset in zip(axes[0], results.datasets):
        finals = []
        for eps in results.eps_grid:
            folder = results.patterns.path("training", dataset, eps, seed) / "plots" / "metrics" / "test"
            bound = pd.read_csv(folder / "bound_at_eps_train.tsv", sep="\t")
            elbo = pd.read_csv(folder / "elbo.tsv", sep="\t")
            epoch = bound["step"] + 1
            ax.plot(epoch, bound["bound_at_eps_train"], color=palette[eps], marker=".", label=f"{model_name(eps)}: LB")
            ax.plot(epoch, elbo["elbo"], color=palette[eps], linestyle="--", label=f"{model_name(eps)}: ELBO")
            finals += [bound["bound_at_eps_train"].iloc[-1], elbo["elbo"].iloc[-1]]
        # The bound at the full eps_train is far lower during the warm-up; frame the converged values.
        span = max(finals) - min(finals) + 1.0
        ax.set_ylim(min(finals) - 1.5 * span, max(finals) + 0.3 * span)
        ax.set_title(results.labels[dataset])
        ax.set_xlabel("epoch")
        ax.set_ylabel("nats (test monitor subset)")
        ax.legend(fontsize=6)
    fig.suptitle(f"Training, seed {seed}: test bound at eps_train (solid), test ELBO (dashed)", fontsize=10)
    keys = [(dataset, eps, seed) for dataset in results.datasets for eps in results.eps_grid]
    return save_figure(fig, path, results, keys, "Training curves")


def figure_samples(results: Results, dataset, seed, path) -> list:
    """Figure 4: decoder samples g(e), e ~ N(0, I), the same draws for every model."""
    fig, axes = plt.subplots(1, len(results.eps_grid), figsize=(3 * len(results.eps_grid), 3.3), squeeze=False)
    for ax, eps in zip(axes[0], results.eps_grid):
        samples = results.arrays(dataset, eps, seed)["prior_samples"]
        show_images(ax, samples, int(np.ceil(np.sqrt(len(samples)))), model_name(eps))
    fig.suptitle(f"Figure 4 - samples, {results.labels[dataset]}, seed {seed}", fontsize=10)
    keys = [(dataset, eps, seed) for eps in results.eps_grid]
    return save_figure(fig, path, results, keys, f"Figure 4: prior samples, {results.labels[dataset]}")


def attack_strength_markdown(results: Results, models) -> str:
    """Per model and ball: each challenger's change of the mean attacked ELBO against the curve."""
    lines = ["# Attack strength: can any other attack beat the attack curve?", "",
             "Mean attacked ELBO (nats) on the first attacked test images of each model. 'curve': `evaluate`'s "
             "attack (APGD from the clean input, the residual-sign corner and random starts, plus the latent attack; "
             "per image the worst). Other rows: each setting's mean minus the curve's, scored on the same noise draws "
             "(negative: it found lower ELBOs); '!' marks a challenger beyond the tolerance max(0.5 nats, 1 %), "
             "which fails the stage. Settings marked 'cheaper' are not gated: where they stay within the tolerance "
             "too, the curve's budget is more than it needs.", ""]
    for dataset, eps, seed in models:
        table = pd.read_csv(read_required(results.patterns.path("strength", dataset, eps, seed), "run attack_strength first"))
        rows = []
        for ball, part in table.groupby("ball", sort=False):
            first = part[part["challenger"] == part["challenger"].iloc[0]]
            rows.append({"ball": ball, "attack": "curve",
                         **{f"{a:g}": f"{v:.2f}" for a, v in zip(first["eps_attack"], first["curve"])}})
            for name, runs in part.groupby("challenger", sort=False):
                rows.append({"ball": ball, "attack": name if runs["gated"].all() else f"{name} (cheaper)", **{
                    f"{a:g}": f"{c:+.2f}{'!' if beaten else ''}"
                    for a, c, beaten in zip(runs["eps_attack"], runs["change"], runs["beats_curve"])}})
        gated = table[table["gated"]]
        worst = gated.loc[gated["change"].idxmin()]
        lines += [f"## {results.labels[dataset]}, {model_name(eps)}, seed {seed}", "",
                  f"Columns: eps_attack. Largest fall by a challenger: {worst['change']:+.2f} nats ({worst['challenger']}, "
                  f"{worst['ball']}, eps_attack {worst['eps_attack']:g}; tolerance there {worst['tolerance']:.2f}).", "",
                  pd.DataFrame(rows).to_markdown(index=False), ""]
    return "\n".join(lines)


def fixed_encoder_markdown(results: Results, shown_eps_attack=(0.05, 0.1, 0.2)) -> str:
    """Per model: the attacks' fall of the ELBO beside the fall with the encoder held fixed."""
    lines = ["# How much of the attacked ELBO's fall needs no encoder?", "",
             "Mean fall of the ELBO (nats) on `evaluate`'s attacked test images, mean over seeds. 'attacks': "
             "`evaluate`'s curve. 'fixed encoder': the worst input in the ball scored against the clean input's own "
             "latent code, exact; what a model whose encoder ignored the perturbation would lose. 'residual sign': "
             "the true ELBO at that input, a one-step attack (also one of APGD's starts).", ""]
    for dataset in results.datasets:
        for ball in BALLS:
            rows = []
            for eps in results.eps_grid:
                tables = [pd.read_csv(read_required(results.patterns.path("fixed_encoder", *key), "run fixed_encoder first"))
                          for key in results.keys(dataset, eps)]
                table = pd.concat(tables).query("ball == @ball").groupby("eps_attack").mean(numeric_only=True)
                row = {"model": model_name(eps)}
                for a in [a for a in table.index if a in shown_eps_attack]:
                    values = table.loc[a]
                    row[f"eps {a:g}: attacks / fixed encoder / residual sign"] = (
                        f"{values['attack_drop']:.2f} / {values['fixed_encoder_drop']:.2f} / {values['residual_sign_drop']:.2f}")
                rows.append(row)
            lines += [f"## {results.labels[dataset]}, {BALL_TITLES[ball]}", "", pd.DataFrame(rows).to_markdown(index=False), ""]
    return "\n".join(lines)


def summary_metrics(results: Results) -> dict:
    """{dataset: {eps_train_X: ...}} of seed means, laid out as the sigma0 = 1 grid's reports/metrics.json
    was, so `dvc metrics diff <rev> --targets reports/metrics.json` compares the two grids model by model."""
    def key(name: str, value: float) -> str:
        return f"{name}_{value:g}".replace(".", "_")

    summary: dict = {}
    for dataset in results.datasets:
        for eps in results.eps_grid:
            keys = results.keys(dataset, eps)
            attacked = pd.concat([results.curves[k][f"elbo_attacked_{results.headline}"] for k in keys], axis=1).mean(axis=1)
            summary.setdefault(dataset, {})[key("eps_train", eps)] = {
                **{q: round(float(np.mean([results.metrics[k][q] for k in keys])), 3) for q in QUANTITIES},
                "attacked_elbo": {key("eps_attack", a): round(float(v), 3) for a, v in attacked.items()},
                "audit_violations": int(sum(results.metrics[k]["violations"] for k in keys)),
            }
    return summary


def index_markdown(results: Results, entries: list[tuple[str, str, list]]) -> str:
    params = results.params
    lines = ["# Reports", "", "Generated by `dvc repro` (stage `report`); do not edit by hand. `make audit` re-checks "
             "them (README, 'Auditing the results').", "",
             f"Setting: sigma0 = {params['model']['sigma0']:g}; threat model of training and of the headline numbers: "
             f"the {BALL_TITLES[results.headline]}; {len(results.seeds)} seed(s) {results.seeds}. Nats per image with "
             "the Gaussian constant dropped. The attacked ELBO is, per image, the lowest over APGD (several starts), "
             "the residual-sign corner, a latent (KL) attack and no attack, scored with fresh noise.", "",
             "Provenance: every PNG carries text chunks `Models` (each model's id and checkpoint md5), `Params` "
             "(params.yaml as JSON) and `Commit` (how to find the commit that made it: `git log -1 -- <file>`); read "
             "them with `python -c \"from PIL import Image; print(Image.open('reports/figures/<file>.png').text)\"`.",
             "", "| file | what | models |", "|---|---|---|"]
    lines += [f"| [{path}]({path.split(' ')[0]}) | {what} | {describe_models(keys, results)} |" for path, what, keys in entries]
    lines += ["| metrics/*.json | one flat metrics file per model (`dvc metrics show`, `dvc metrics diff`) | each |",
              "| metrics.json | seed means, nested as in earlier grids (`dvc metrics diff <rev> --targets reports/metrics.json`) | all |",
              "| data/*.json | provenance of each dataset (source, hashes, counts, pixel statistics) | |",
              "| training/ | training curves per model (DVCLive) | each |",
              "| eval/*/, attack_curves/*.csv | per-model evaluation: details, per-example values, certificate audit | each |",
              "| certify/*/ | per-model certified bounds (IBP, linear relaxation) over eps_attack, and certified radii | each |",
              "| gpu_run/ | the logs of the lent GPU's run (`scripts/run_grid.py`), as they came back: not made by this stage | |",
              "| sigma0_sweep/, training_length/ | DVC experiments at other sigma0 or training lengths, beside the committed "
              "models (`scripts/sigma0_sweep.py collect`): not made by this stage | their own |",
              "", "## Models", "",
              "| model | checkpoint md5 | trained on | training s | evaluated on | evaluation s |", "|---|---|---|---|---|---|"]
    for key in results.keys():
        details = results.details[key]
        lines.append(f"| {model_id(*key)} | `{results.md5[key]}` | {details['training']['device']} | "
                     f"{details['training']['seconds']} | {details['device']} | {details['seconds']} |")
    return "\n".join(lines) + "\n"


def describe_models(keys, results: Results) -> str:
    if len(keys) == len(results.keys()):
        return "all"
    return ", ".join(model_id(*key) for key in keys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("models", "eval", "metrics", "curves", "strength", "fixed-encoder", "training", "data-provenance",
                 "certify"):
        parser.add_argument(f"--{name}", required=True, help="per-model path with {dataset}, {eps} and {seed}")
    for name in ("strength-table", "fixed-encoder-table", "certify-table", "curve-table", "summary", "index", "paper",
                 "figures"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--table", required=True, help="path prefix for table .md/.csv/.tex")
    args = parser.parse_args()
    params = load_params()
    patterns = Patterns(models=args.models, eval=args.eval, metrics=args.metrics, curves=args.curves,
                        strength=args.strength, fixed_encoder=args.fixed_encoder, training=args.training,
                        data=args.data_provenance, certify=args.certify)
    results = Results(patterns, params)
    example_eps = [float(e) for e in params["report"]["example_eps_train"]]
    unknown = [e for e in example_eps if e not in results.eps_grid]
    if unknown:
        raise SystemExit(f"report.example_eps_train {unknown} not in eps_train {results.eps_grid}")
    seed = params["report"]["example_seed"]
    if seed not in results.seeds:
        raise SystemExit(f"report.example_seed {seed} not in seeds {results.seeds}")
    eps_attack = params["evaluate"]["example_eps_attack"]

    paper = json.loads(Path(args.paper).read_text())
    table = table1(results, paper)
    Path(f"{args.table}.md").write_text(table1_markdown(table, set(paper["table1"])) + "\n")
    if not any(dataset in paper["table1"] for dataset in results.datasets):  # ours alone: no empty paper columns
        table = table.drop(columns=[c for c in table.columns if c.endswith("_paper")])
    table.to_csv(f"{args.table}.csv", index=False, float_format="%.3f")
    Path(f"{args.table}.tex").write_text(
        table.drop(columns="dataset").to_latex(index=False, float_format="%.2f", na_rep="--", caption=(
            "Certified lower bound and ELBO at eps = eps_train (nats; mean, std, min and max over seeds; paper "
            "values in the _paper columns).")))
    Path(args.curve_table).write_text(attack_curve_markdown(results) + "\n")

    figures = Path(args.figures)
    figures.mkdir(parents=True, exist_ok=True)
    entries = [("table1.md / .csv / .tex", "Table 1: LB train, LB test, ELBO test per eps_train, ours beside the paper's",
                results.keys()),
               ("attack_curves.md", "Figure 3 in numbers: attacked ELBO per eps_attack, with the spread", results.keys())]
    for dataset in results.datasets:
        label = results.labels[dataset]
        for name, draw, what in (("fig1_adversarial", figure_adversarial_examples, "Figure 1: adversarial examples"),
                                 ("fig2_reconstructions", figure_reconstructions,
                                  "Figure 2: clean vs attacked reconstructions with ELBO")):
            path = figures / f"{name}_{dataset}.png"
            entries.append((f"figures/{path.name}", f"{what} ({label})",
                            draw(results, dataset, example_eps, seed, eps_attack, path)))
        path = figures / f"fig4_samples_{dataset}.png"
        entries.append((f"figures/{path.name}", f"Figure 4: prior samples ({label})", figure_samples(results, dataset, seed, path)))
    path = figures / "fig3_attack_curves.png"
    entries.append((f"figures/{path.name}", "Figure 3: ELBO under attack vs eps_attack, with certified bounds",
                    figure_attack_curves(results, path)))
    path = figures / "training_curves.png"
    entries.append((f"figures/{path.name}", "Training curves: test bound and ELBO per epoch",
                    figure_training_curves(results, seed, path)))
    write_json(args.summary, summary_metrics(results))
    strength = params["attack_strength"]
    strength_models = [(d, float(e), int(s)) for d in strength["datasets"] for e in strength["eps_train"]
                       for s in strength["seeds"]]
    outside = [m for m in strength_models if m not in results.keys()]
    if outside:
        raise SystemExit(f"attack_strength checks models outside the grid: {[model_id(*m) for m in outside]}")
    Path(args.strength_table).write_text(attack_strength_markdown(results, strength_models) + "\n")
    entries.append(("attack_strength.md", "Attack strength: challengers against the attack curve", strength_models))
    path = figures / "certified_radius.png"
    entries.append((f"figures/{path.name}", "Certified-radius curves: fraction of images certified vs eps, IBP and "
                    "linear relaxation", figure_certified_radius(results, path)))
    Path(args.certify_table).write_text(certify_markdown(results) + "\n")
    entries.append(("certify.md", "Linear relaxation vs IBP: certified bounds, gain, gap closed, cost", results.keys()))
    Path(args.fixed_encoder_table).write_text(fixed_encoder_markdown(results) + "\n")
    entries.append(("fixed_encoder.md", "The attacks' fall of the ELBO beside the fall with the encoder held fixed",
                    results.keys()))
    Path(args.index).write_text(index_markdown(results, entries))


if __name__ == "__main__":
    main()
