"""Figure 3 of the paper: the ELBO under attack against eps_attack, one line per eps_train, and each
model's certified lower bound. Two questions, two rows: the attacks (top: mean over seeds, band min
to max; a hollow marker where the attack-strength check found a stronger attack, so the curve there
is only an upper bound) and the certified bounds by each certify method (`certify.methods`) beside
the attacked ELBO on the same images (bottom: the certify stage's images; with `certify_elbo.models`
listed, also their ELBO relaxation's bound on its own first images, dash-dot); one column per
dataset, one PNG per ball (reports/figures/fig3_attack_curves.png: the headline ball;
fig3_attack_curves_<ball>.png: the other).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from provae.report.attack_strength import point, upper_bounds
from provae.report.certify_elbo import METHOD, ElboRun, elbo_bound_lines, elbo_style
from provae.report.plotting import (LINE_STYLES, figure_title, line_width, method_styles, model_handles, new_figure,
                                    palette, save_figure, shared_legend, style_handles)
from provae.report.results import BALL_TITLES, Results

CUT_BELOW = 0.6  # the bounds' panel shows down to this many spans of the attacked ELBOs below them


def certified_bounds(results: Results, dataset: str, eps: float, ball: str) -> pd.DataFrame:
    """Mean over seeds per eps_attack, on the certify stage's images: each method's certified bound
    (a column per method) and the attacked ELBO of the same images and noise ('attacked')."""
    table = results.certify_csv(dataset, eps, "bounds.csv")
    table = table[table["ball"] == ball]
    bounds = table.groupby(["method", "eps_attack"])["bound"].mean().unstack(0)
    bounds["attacked"] = table.groupby("eps_attack")["attacked_elbo"].mean()
    return bounds


def seed_counts(results: Results, dataset: str) -> str:
    """How many seeds each model's line averages: the grid may hold more for some models than others."""
    counts = {eps: len(results.keys(dataset, eps)) for eps in results.eps_of(dataset)}
    if len(set(counts.values())) == 1:
        n = next(iter(counts.values()))
        return f"{n} seed{'s' * (n > 1)} per model"
    return (f"seeds per model (eps_train {' / '.join(f'{eps:g}' for eps in counts)}): "
            f"{' / '.join(str(n) for n in counts.values())}")


def draw_attacks(ax, results: Results, dataset: str, ball: str, checks: dict) -> int:
    """Each model's attacked ELBO (mean over seeds, band min to max); a hollow marker where the
    attack-strength check beat the curve. Returns how many points are so marked."""
    colours = palette(results)
    framed, marked = [], 0
    for eps in results.eps_of(dataset):
        keys = results.keys(dataset, eps)
        stacked = np.stack([results.curves[k][f"elbo_attacked_{ball}"].to_numpy() for k in keys])
        x = results.curves[keys[0]].index.to_numpy()
        style = {k: v for k, v in LINE_STYLES["attacked"].items() if k != "label"}
        ax.plot(x, stacked.mean(0), color=colours[eps], linewidth=line_width(eps), **style)
        ax.fill_between(x, stacked.min(0), stacked.max(0), color=colours[eps], alpha=0.2, linewidth=0)
        framed.append(stacked)
        marks = upper_bounds(checks, keys)
        upper = [i for i, a in enumerate(x) if point(ball, a) in marks]
        if upper:
            hollow = {k: v for k, v in LINE_STYLES["upper_bound"].items() if k != "label"}
            ax.plot(x[upper], stacked.mean(0)[upper], color=colours[eps], zorder=3, **hollow)
            marked += len(upper)
    low, high = min(a.min() for a in framed), max(a.max() for a in framed)
    span = high - low + 1.0
    ax.set_ylim(low - 0.08 * span, high + 0.08 * span)
    return marked


def draw_bounds(ax, results: Results, dataset: str, ball: str, elbo_lines=()) -> str:
    """Each model's bounds beside its attacked ELBO on the same images, and ``elbo_lines``
    ((eps_train, bound per eps_attack): `certify_elbo.elbo_bound_lines`); the axis is cut below the
    attacked ELBOs, since a vacuous bound (millions of nats) would flatten every other line.
    Returns a note saying where the axis is cut, or "" when every bound fits."""
    colours, styles = palette(results), method_styles(results.methods)
    attacked, lowest = [], np.inf
    for eps in results.eps_of(dataset):
        bounds = certified_bounds(results, dataset, eps, ball)
        ax.plot(bounds.index, bounds["attacked"], color=colours[eps], linewidth=1.0, alpha=0.45, linestyle="-")
        for method in results.methods:
            ax.plot(bounds.index, bounds[method], color=colours[eps], linewidth=line_width(eps),
                    linestyle=styles[method]["linestyle"])
            lowest = min(lowest, bounds[method].min())
        attacked.append(bounds["attacked"].to_numpy())
    for eps, line in elbo_lines:
        ax.plot(line.index, line.to_numpy(), color=colours[eps], linewidth=line_width(eps),
                linestyle=method_styles([METHOD])[METHOD]["linestyle"])
        lowest = min(lowest, line.min())
    low, high = min(a.min() for a in attacked), max(a.max() for a in attacked)
    span = high - low + 1.0
    floor = low - CUT_BELOW * span
    ax.set_ylim(floor, high + 0.08 * span)
    return f"axis cut at {floor:.0f} nats; the lines leaving it fall to {lowest:.3g}" if lowest < floor else ""


def figure_attack_curves(results: Results, ball: str, path, checks: dict, elbo: list[ElboRun] = ()) -> list:
    """Figure 3 for one ball: attacks (top row) and certified bounds (bottom row), per dataset;
    ``checks``: the attack-strength checks (`attack_strength.strength_checks`); ``elbo``: the runs of
    `certify_elbo.models` (`certify_elbo.read_elbo_runs`), whose ELBO relaxation joins the bottom row."""
    fig, axes = new_figure(2, len(results.datasets), figsize=(max(5.6 * len(results.datasets), 11.2), 7.6))
    marked, elbo_drawn = 0, False
    for column, dataset in enumerate(results.datasets):
        top, bottom = axes[0, column], axes[1, column]
        marked += draw_attacks(top, results, dataset, ball, checks)
        top.set_title(f"{results.labels[dataset]}: ELBO under attack\n{seed_counts(results, dataset)}", fontsize=9)
        lines = elbo_bound_lines(list(elbo), dataset, ball)
        elbo_drawn |= bool(lines)
        cut = draw_bounds(bottom, results, dataset, ball, lines)
        bottom.set_title(f"{results.labels[dataset]}: certified lower bound, beside the attacked ELBO (faint)\n"
                         f"on certify's images{'; ' + cut if cut else ''}", fontsize=9)
        for ax in (top, bottom):
            ax.set_xlabel("eps_attack (l_inf radius)")
            ax.set_ylabel("nats per image")
            ax.grid(alpha=0.3, linewidth=0.5)
    figure_title(fig, f"Figure 3 - {BALL_TITLES[ball]}: ELBO under the strongest attack (top; line: mean over seeds, "
                      f"band: min to max) and its certified lower bound (bottom)")
    styles = ["attacked", *(["upper_bound"] if marked else []), *method_styles(results.methods).values(),
              *([elbo_style(list(elbo))] if elbo_drawn else [])]
    shared_legend(fig, model_handles(results, results.eps_grid), style_handles(styles))
    return save_figure(fig, path, results, results.keys(),
                       f"Figure 3: ELBO under attack vs eps_attack, with certified bounds, {BALL_TITLES[ball]}")
