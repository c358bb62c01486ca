"""Figure 1 of the paper: test images and their adversarial examples against each shown model
(report.example_eps_train, seed report.example_seed, eps_attack evaluate.example_eps_attack), a bar
in the model's colour of the line figures beside its row; one PNG per dataset
(reports/figures/fig1_adversarial_<dataset>.png).
"""

from __future__ import annotations

import matplotlib.pyplot as plt

from provae.grid import model_name
from provae.report.plotting import figure_title, palette, save_figure, show_images
from provae.report.results import BALL_TITLES, Results


def figure_adversarial_examples(results: Results, dataset, example_eps, seed, eps_attack, path) -> list:
    """Figure 1: test images and their adversarial examples against each shown model."""
    colours = palette(results)
    rows = [("clean test images", results.arrays(dataset, example_eps[0], seed)["clean"], None)]
    rows += [(f"attacked (eps_attack={eps_attack:g}): {model_name(eps)}", results.arrays(dataset, eps, seed)["attacked"],
              colours[eps]) for eps in example_eps]
    fig, axes = plt.subplots(len(rows), 1, figsize=(8, 1.3 * len(rows)), squeeze=False)
    for ax, (title, images, colour) in zip(axes[:, 0], rows):
        show_images(ax, images, len(images), title, colour)
    figure_title(fig, f"Figure 1 - {results.labels[dataset]}, seed {seed}, {BALL_TITLES[results.headline]}")
    keys = [(dataset, eps, seed) for eps in example_eps]
    return save_figure(fig, path, results, keys, f"Figure 1: adversarial examples, {results.labels[dataset]}")
