"""The training-curves figure (reports/figures/training_curves.png): no paper counterpart. Per
dataset, each model's test certified bound at eps_train (solid) and test ELBO (dashed) per epoch
(DVCLive's logs on the test monitor subset), for seed report.example_seed.
"""

from __future__ import annotations

import pandas as pd
from matplotlib.ticker import MaxNLocator

from provae.report.plotting import (LINE_STYLES, figure_title, line_width, model_handles, new_figure, palette,
                                    save_figure, shared_legend, style_handles)
from provae.report.results import Results, read_required


def figure_training_curves(results: Results, seed, path) -> list:
    """Test certified bound at eps_train (solid) and test ELBO (dashed) per epoch, per model."""
    fig, axes = new_figure(1, len(results.datasets), figsize=(5.6 * len(results.datasets), 4.6))
    colours = palette(results)
    bound_style, elbo_style = ({k: v for k, v in LINE_STYLES[kind].items() if k != "label"}
                               for kind in ("train_bound", "train_elbo"))
    for ax, dataset in zip(axes[0], results.datasets):
        finals = []
        for eps in results.eps_of(dataset):
            folder = results.patterns.path("training", dataset, eps, seed) / "plots" / "metrics" / "test"
            bound = pd.read_csv(read_required(folder / "bound_at_eps_train.tsv", "train it first"), sep="\t")
            elbo = pd.read_csv(read_required(folder / "elbo.tsv", "train it first"), sep="\t")
            epoch = bound["step"] + 1
            ax.plot(epoch, bound["bound_at_eps_train"], color=colours[eps], linewidth=line_width(eps), **bound_style)
            ax.plot(elbo["step"] + 1, elbo["elbo"], color=colours[eps], linewidth=line_width(eps), **elbo_style)
            finals += [bound["bound_at_eps_train"].iloc[-1], elbo["elbo"].iloc[-1]]
        # The bound at the full eps_train is far lower during the warm-up; frame the converged values.
        span = max(finals) - min(finals) + 1.0
        ax.set_ylim(min(finals) - 0.6 * span, max(finals) + 0.08 * span)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(results.labels[dataset], fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel("nats per image (test monitor subset)")
        ax.grid(alpha=0.3, linewidth=0.5)
    figure_title(fig, f"Training, seed {seed}: the test certified bound at eps_train and the test ELBO per epoch")
    shared_legend(fig, model_handles(results, results.eps_grid), style_handles(("train_bound", "train_elbo")))
    keys = [(dataset, eps, seed) for dataset in results.datasets for eps in results.eps_of(dataset)]
    return save_figure(fig, path, results, keys, "Training curves")
