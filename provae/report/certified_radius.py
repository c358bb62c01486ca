"""The certified-radius figure (reports/figures/certified_radius.png): no paper counterpart; the
analogue of certified accuracy for the paper's certificate. The fraction of test images whose whole
l_inf ball of radius eps keeps the certified ELBO within tau of the clean one, against eps, by each
certify method (`certify.methods`: IBP dashed, the linear relaxation dotted, the ELBO relaxation
dash-dot; with `certify_elbo.models` listed, their ELBO relaxation's curve over its own first images,
dash-dot); one row per dataset, one column per tau, each panel's x-axis as wide as its curves.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from provae.report.certify_elbo import ElboRun, elbo_radii, elbo_style
from provae.report.plotting import (figure_title, line_width, method_styles, model_handles, new_figure, palette,
                                    save_figure, shared_legend, style_handles)
from provae.report.results import BALL_TITLES, Results

GREY_LEVEL = 1 / 255


def certified_fraction(radii: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """The fraction of images certified at each eps of ``grid``: those whose radius is at least eps."""
    return (np.asarray(radii)[None, :] >= np.asarray(grid)[:, None]).mean(axis=1)


def panel_limit(radii: pd.Series) -> float:
    """Where a panel's curves end, with a margin: the largest radius of any model, at least 2 grey levels."""
    return 1.08 * max(float(radii.max()), 2 * GREY_LEVEL)


def figure_certified_radius(results: Results, path, elbo: list[ElboRun] = ()) -> list:
    """Certified-radius curves: one column per tau, one row per dataset, a line per model (colour)
    and bound method (style); and per run of ``elbo`` (`certify_elbo.read_elbo_runs`) its ELBO
    relaxation's curve."""
    radii = {(dataset, eps): results.certify_csv(dataset, eps, "radii.csv")
             for dataset in results.datasets for eps in results.eps_of(dataset)}
    taus = list(dict.fromkeys(next(iter(radii.values()))["tau"]))
    fig, axes = new_figure(len(results.datasets), len(taus), figsize=(4.3 * len(taus), 3.3 * len(results.datasets) + 0.9))
    colours, styles = palette(results), method_styles(results.methods)
    extra = {dataset: elbo_radii(list(elbo), dataset, results.headline) for dataset in results.datasets}
    for row, dataset in enumerate(results.datasets):
        tables = {eps: radii[dataset, eps] for eps in results.eps_of(dataset)}
        for ax, tau in zip(axes[row], taus):
            shown = [*tables.values(), *[t for _, t in extra[dataset]]]
            limit = panel_limit(pd.concat([t[t["tau"] == tau]["radius"] for t in shown]))
            grid = np.linspace(0, limit, 201)
            for eps, table in tables.items():
                part = table[table["tau"] == tau]
                for method in results.methods:
                    ax.plot(grid, certified_fraction(part[part["method"] == method]["radius"], grid), color=colours[eps],
                            linewidth=line_width(eps), linestyle=styles[method]["linestyle"])
            for eps, table in extra[dataset]:  # over the run's own first images
                ax.plot(grid, certified_fraction(table[table["tau"] == tau]["radius"], grid), color=colours[eps],
                        linewidth=line_width(eps), linestyle=elbo_style(list(elbo))["linestyle"])
            ax.axvline(GREY_LEVEL, color="0.6", linewidth=0.8, linestyle="-", zorder=0)
            ax.set_xlim(0, limit)
            ax.xaxis.set_major_locator(MaxNLocator(5))
            ax.set_ylim(-0.02, 1.02)
            ax.set_title(f"{results.labels[dataset]}: ELBO drop <= {tau}", fontsize=9)
            ax.set_xlabel("eps (l_inf radius)")
            ax.set_ylabel("fraction of test images certified")
            ax.grid(alpha=0.3, linewidth=0.5)
    figure_title(fig, f"Certified radius, {BALL_TITLES[results.headline]}: the share of test images whose whole ball keeps "
                      "the certified ELBO within tau of the clean one\n(grey line: 1/255, one grey level)")
    drawn = [elbo_style(list(elbo))] if any(extra.values()) else []
    shared_legend(fig, model_handles(results, results.eps_grid), style_handles([*styles.values(), *drawn]))
    return save_figure(fig, path, results, results.keys(), "Certified-radius curves")
