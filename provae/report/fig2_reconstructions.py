"""Figure 2 of the paper: reconstructions of clean and attacked test images by each shown model,
each image with its ELBO, a bar in the model's colour of the line figures beside its rows; one PNG
per dataset (reports/figures/fig2_reconstructions_<dataset>.png).
"""

from __future__ import annotations

import matplotlib.pyplot as plt

from provae.grid import model_name
from provae.report.plotting import figure_title, palette, save_figure, show_images
from provae.report.results import Results


def figure_reconstructions(results: Results, dataset, example_eps, seed, eps_attack, path) -> list:
    """Figure 2: reconstructions of clean and attacked images, each with its ELBO."""
    fig, axes = plt.subplots(2 * len(example_eps), 1, figsize=(8, 1.6 * 2 * len(example_eps)), squeeze=False)
    for i, eps in enumerate(example_eps):
        arrays = results.arrays(dataset, eps, seed)
        for ax, kind in zip(axes[2 * i : 2 * i + 2, 0], ("clean", "attacked")):
            elbos = arrays[f"{kind}_elbo"]
            show_images(ax, arrays[f"{kind}_reconstruction"], len(elbos),
                        f"{model_name(eps)}: {kind} reconstructions, mean ELBO {elbos.mean():.2f}", palette(results)[eps])
            tile = ax.get_xlim()[1] / len(elbos)
            for j, value in enumerate(elbos):
                ax.text((j + 0.5) * tile, ax.get_ylim()[0] + 2, f"{value:.1f}", ha="center", va="top", fontsize=7)
    figure_title(fig, f"Figure 2 - {results.labels[dataset]}, seed {seed}, eps_attack={eps_attack:g} "
                      "(ELBO in nats under each image)")
    keys = [(dataset, eps, seed) for eps in example_eps]
    return save_figure(fig, path, results, keys, f"Figure 2: clean vs attacked reconstructions, {results.labels[dataset]}")
