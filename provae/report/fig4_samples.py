"""Figure 4 of the paper: decoder samples g(e), e ~ N(0, I), the same draws for every model of a
dataset, one PNG per dataset (reports/figures/fig4_samples_<dataset>.png).
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from provae.grid import model_name
from provae.report.plotting import figure_title, palette, save_figure, show_images
from provae.report.results import Results


def figure_samples(results: Results, dataset, seed, path) -> list:
    """Figure 4: decoder samples g(e), e ~ N(0, I), the same draws for every model."""
    eps_grid = results.eps_of(dataset)
    fig, axes = plt.subplots(1, len(eps_grid), figsize=(3 * len(eps_grid), 3.3), squeeze=False)
    for ax, eps in zip(axes[0], eps_grid):
        samples = results.arrays(dataset, eps, seed)["prior_samples"]
        show_images(ax, samples, int(np.ceil(np.sqrt(len(samples)))), model_name(eps), palette(results)[eps])
    figure_title(fig, f"Figure 4 - samples, {results.labels[dataset]}, seed {seed}")
    keys = [(dataset, eps, seed) for eps in eps_grid]
    return save_figure(fig, path, results, keys, f"Figure 4: prior samples, {results.labels[dataset]}")


def claim3_quantities(results: Results, src) -> dict:
    """REPRODUCTION.md's Claim 3 (the paper's Figure 4: robust models' samples are blurrier), in
    numbers: active latent units and the mean KL per eps_train, and whether both fall."""
    from provae.report.reproduction import claim_verdict, model_source

    out = {}
    for dataset in results.datasets:
        eps_grid = results.eps_of(dataset)

        def q(eps, key, fmt):
            path, note = model_source(results, "metrics", dataset, eps)
            return src.q(results.over_seeds(dataset, eps, lambda k: results.metrics[k][key])["mean"], fmt, path,
                         f"key {key}; {note}")

        units = [q(e, "active_units", "{:.0f}") for e in eps_grid]
        kl = [q(e, "kl_test", "{:.1f}") for e in eps_grid]
        falls = [all(a.value >= b.value for a, b in zip(values, values[1:])) for values in (units, kl)]
        out[dataset] = {"label": results.labels[dataset], "units": ", ".join(map(str, units)), "kl_first": kl[0],
                        "kl_last": kl[-1], "verdict": claim_verdict(falls), "units_fall": falls[0], "kl_falls": falls[1]}
    return out
