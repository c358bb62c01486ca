"""The attack-budget figure (reports/figures/attack_budget.png): no paper counterpart; it says how
far the curve behind Figure 3 is from converged. Per model of `attack_budget.models` (row) and ball
(column): the attacked ELBO at each APGD budget of the ladder minus the ladder's strongest (log
steps), one line per eps_attack; a filled marker where 4x the steps stays within the attack-strength
tolerance, a hollow one where it falls beyond it (there the curve is only an upper bound, as in
Figure 3), a grey line at the curve's own steps (`evaluate.apgd_steps`), the verdict in the title.
"""

from __future__ import annotations

import numpy as np
from matplotlib.lines import Line2D
from matplotlib.ticker import NullLocator

from provae.grid import model_name
from provae.report.attack_budget import read_ladder, verdict
from provae.report.plotting import (LINE_STYLES, OKABE_ITO, figure_title, new_figure, save_figure, shared_legend,
                                    style_handles)
from provae.report.results import Results, balls_in_order

# eps_attack is not a model: its colours skip the VAE's black (and the faint yellow).
EPS_COLOURS = tuple(c for c in OKABE_ITO if c not in ("#000000", "#F0E442"))
STARTS_STYLES = ("-", "--", ":", "-.")
CURVE_BUDGET = {"color": "0.6", "linewidth": 0.9, "linestyle": (0, (4, 2))}
WITHIN = {"linestyle": "none", "marker": "o", "markersize": 5, "label": "4x steps: within the tolerance"}
BEYOND = {**LINE_STYLES["upper_bound"], "label": "4x steps: beyond it (an upper bound)"}


def eps_colours(values) -> dict:
    return {a: EPS_COLOURS[i % len(EPS_COLOURS)] for i, a in enumerate(sorted(values))}


def draw_ladder(ax, part, colours: dict, starts_values: list) -> None:
    """One panel: per eps_attack (colour) and random starts (style), ELBO minus the largest budget's."""
    marker_style = {k: v for k, v in WITHIN.items() if k != "label"}
    hollow = {k: v for k, v in BEYOND.items() if k != "label"}
    for a in sorted(part["eps_attack"].unique()):
        for starts in starts_values:
            rungs = part[(part["eps_attack"] == a) & (part["random_starts"] == starts)].sort_values("steps")
            if rungs.empty:
                continue
            x = rungs["steps"].to_numpy()
            y = rungs["elbo_attacked"].to_numpy() - rungs["elbo_attacked"].iloc[-1]
            measured = np.isfinite(rungs["change_at_4x_steps"].astype(float).to_numpy())
            within = rungs["within_tolerance"].astype(bool).to_numpy()
            style = STARTS_STYLES[starts_values.index(starts) % len(STARTS_STYLES)]
            ax.plot(x, y, color=colours[a], linewidth=1.6, linestyle=style)
            ax.plot(x[measured & within], y[measured & within], color=colours[a], **marker_style)
            ax.plot(x[measured & ~within], y[measured & ~within], color=colours[a], zorder=3, **hollow)


def figure_attack_budget(results: Results, models, path) -> list:
    """One row per model, one column per ball; returns the models (their keys) it shows."""
    ladders = {key: read_ladder(results, key)[0] for key in models}
    measured = {b for t in ladders.values() for b in t["ball"]}  # a ladder may run in one ball only
    balls = [b for b in balls_in_order(results.headline) if b in measured]
    colours = eps_colours({a for t in ladders.values() for a in t["eps_attack"]})
    starts_values = sorted({int(s) for t in ladders.values() for s in t["random_starts"]})
    curve_steps = int(results.params["evaluate"]["apgd_steps"])
    # at least two panels wide: the title and the key are as long with one ball as with two
    fig, axes = new_figure(len(models), len(balls), figsize=(max(5.6 * len(balls), 11.2), 3.4 * len(models) + 1.3))
    for row, key in enumerate(models):
        table = ladders[key]
        for ax, ball in zip(axes[row], balls):
            part = table[table["ball"] == ball]
            steps = sorted({int(s) for s in part["steps"]} | {curve_steps})
            draw_ladder(ax, part, colours, starts_values)
            ax.axvline(curve_steps, zorder=0, **CURVE_BUDGET)
            ax.axhline(0.0, color="0.8", linewidth=0.8, zorder=0)
            ax.set_xscale("log")
            ax.set_xticks(steps, [str(s) for s in steps])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xlim(min(steps) / 1.5, max(steps) * 1.5)
            found = verdict(part) if len(part) else None
            text = "no rows" if found is None else (found.text() if found.converged or found.worst is None else
                                                   f"not converged by {found.cap} steps: 4x lowers it by "
                                                   f"{-found.worst['change_at_4x_steps']:.2f} nats at eps_attack "
                                                   f"{found.worst['eps_attack']:g}")
            ax.set_title(f"{results.labels[key[0]]} {model_name(key[1])}, seed {key[2]}, {ball} ball:\n{text}", fontsize=9)
            ax.set_xlabel("APGD steps (log scale)")
            ax.set_ylabel("ELBO minus the largest budget's (nats)")
            ax.grid(alpha=0.3, linewidth=0.5)
    strength = results.params["attack_strength"]
    figure_title(fig, "Attack budget: the curve's attacked ELBO at each APGD budget minus the ladder's largest (positive: the "
                      "smaller budget stops above it)\nThe attack-strength gate: 4x the steps may lower it by at most "
                      f"max({strength['tolerance_nats']:g} nats, {100 * strength['tolerance_relative']:g} %)")
    handles = [Line2D([], [], color=colours[a], linewidth=1.6, label=f"eps_attack {a:g}") for a in colours]
    styles = [WITHIN, BEYOND, {"linestyle": CURVE_BUDGET["linestyle"], "label": f"the curve's budget ({curve_steps} steps)"}]
    if len(starts_values) > 1:
        styles += [{"linestyle": STARTS_STYLES[i % len(STARTS_STYLES)], "label": f"{s} random start{'s' * (s > 1)}"}
                   for i, s in enumerate(starts_values)]
    shared_legend(fig, handles, style_handles(styles), colour_label="colour: eps_attack")
    return save_figure(fig, path, results, list(models), "Attack budget: attacked ELBO vs APGD steps")
