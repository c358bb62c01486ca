"""The attack-budget table (reports/attack_budget.md): no paper counterpart. How many APGD steps
does the curve behind Figure 3 need? Per model of `attack_budget.models` and ball, the mean attacked
ELBO of the curve's own attack at a ladder of budgets (stages/attack_budget.py: rows APGD steps x
random starts, columns eps_attack), the change each 4x of the steps brings, and the verdict: the
smallest budget whose 4x row stays within the attack-strength tolerance at every eps_attack
("needs N steps"), or that the ladder does not converge within its cap.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from provae.grid import model_name, models_of_grid
from provae.report.results import BALL_TITLES, Results, balls_in_order, model_id, read_required


def budget_models(params: dict) -> list[tuple[str, float, int]]:
    """The models of `attack_budget.models` (each in the grid); none when the list is empty."""
    if not (params.get("attack_budget") or {}).get("models"):
        return []
    return [(m.dataset, m.eps, m.seed) for m in models_of_grid(params, "attack_budget")]


def read_ladder(results: Results, key) -> tuple[pd.DataFrame, Path]:
    """One model's ladder (stages/attack_budget.py's CSV); a missing one is an error naming it."""
    path = results.patterns.path("budget", *key)
    running = path.with_name(path.name + ".partial")
    hint = (f"its run is still going ({running.name} holds the rungs done so far)" if running.exists()
            else f"run attack_budget@{key[0]}-{key[1]!r}-{key[2]} first")
    return pd.read_csv(read_required(path, hint)), path


@dataclass(frozen=True)
class Verdict:
    """One model and ball: the smallest sufficient budget, or where the ladder's top rung fails."""

    steps: int | None              # the budget the curve's attack needs (None: none on the ladder)
    starts: int | None
    cap: int                       # the ladder's largest steps
    worst: pd.Series | None = None  # not converged: the top measured rung's row with the largest fall

    @property
    def converged(self) -> bool:
        return self.steps is not None

    def text(self, with_starts: bool = False, short: bool = False) -> str:
        """The verdict; ``short``: without the fall that keeps it from converging (for a heading)."""
        if self.converged:
            starts = f" with {self.starts} random start{'s' * (self.starts > 1)}" if with_starts else ""
            return f"needs {self.steps} steps{starts}"
        if self.worst is None:
            return f"not measured: no rung of the ladder (cap {self.cap} steps) has one at 4x its steps"
        if short:
            return f"does not converge within the ladder's cap ({self.cap} steps)"
        w = self.worst
        return (f"does not converge within the ladder's cap ({self.cap} steps): 4x steps still lowers it by "
                f"{-w['change_at_4x_steps']:.2f} nats at eps_attack {w['eps_attack']:g} ({int(w['steps'])} to "
                f"{4 * int(w['steps'])} steps; tolerance {w['tolerance']:.2f})")


def budgets(part: pd.DataFrame) -> list[tuple[int, int]]:
    """(random_starts, steps) of the ladder, cheapest first (steps x starts, then steps)."""
    pairs = {(int(r), int(s)) for r, s in zip(part["random_starts"], part["steps"])}
    return sorted(pairs, key=lambda p: (p[0] * p[1], p[1]))


def verdict(part: pd.DataFrame) -> Verdict:
    """The smallest budget whose 4x row lies within the tolerance at every eps_attack (the CSV's
    `within_tolerance`: a rung without a 4x row never passes, nothing was measured above it)."""
    cap = int(part["steps"].max())
    for starts, steps in budgets(part):
        rows = part[(part["random_starts"] == starts) & (part["steps"] == steps)]
        if rows["within_tolerance"].astype(bool).all():
            return Verdict(steps, starts, cap)
    measured = part[np.isfinite(part["change_at_4x_steps"].astype(float))]
    if measured.empty:
        return Verdict(None, None, cap)
    top = measured[measured["steps"] == measured["steps"].max()]
    failing = top[~top["within_tolerance"].astype(bool)]
    return Verdict(None, None, cap, failing.loc[failing["change_at_4x_steps"].idxmin()])


def ladder_rows(part: pd.DataFrame, with_starts: bool) -> list[dict]:
    """The mean attacked ELBO per budget (row) and eps_attack (column), with the change at 4x steps."""
    rows = []
    for starts, steps in budgets(part):
        rung = part[(part["random_starts"] == starts) & (part["steps"] == steps)].sort_values("eps_attack")
        row = {"budget": f"{steps} steps" + (f" x {starts} start{'s' * (starts > 1)}" if with_starts else "")}
        for r in rung.itertuples():
            change = float(r.change_at_4x_steps)
            row[f"{r.eps_attack:g}"] = f"{r.elbo_attacked:.2f}" + (
                f" (4x: {change:+.2f}{'' if r.within_tolerance else '!'})" if np.isfinite(change) else "")
        row["s per eps_attack"] = f"{rung['seconds'].mean():.1f}"
        rows.append(row)
    return rows


def attack_budget_markdown(results: Results, models) -> str:
    """Per model and ball: the ladder, the fall each 4x brings, and the budget the model needs."""
    params = results.params
    strength, curve = params["attack_strength"], params["evaluate"]
    lines = ["# Attack budget: how many APGD steps does the attack curve need?", ""]
    if not models:
        return "\n".join(lines + ["None: `attack_budget.models` lists no model.", ""])
    lines += [f"Mean attacked ELBO (nats) of the curve's own attack (`evaluate`'s, which runs {curve['apgd_steps']} APGD "
              f"steps and {curve['random_starts']} random start(s)) at a ladder of budgets, measured by the attack_budget "
              "stage on the first attacked test images: rows APGD steps (x random starts), columns eps_attack. In "
              "brackets, the change that 4x the steps brings (the next rung minus this one; negative: it lowers the "
              f"ELBO); '!' marks a change beyond the attack-strength tolerance max({strength['tolerance_nats']:g} nats, "
              f"{100 * strength['tolerance_relative']:g} %), where this budget's curve is only an upper bound. A budget suffices "
              "when its 4x row stays within the tolerance at every eps_attack; the verdict is the smallest that does.", "",
              "| model | ball | the curve's attack |", "|---|---|---|"]
    sections = []
    for key in models:
        table, path = read_ladder(results, key)
        with_starts = table["random_starts"].nunique() > 1
        name = f"{results.labels[key[0]]} {model_name(key[1])}, seed {key[2]}"
        sections += [f"## {results.labels[key[0]]}, {model_name(key[1])}, seed {key[2]}", "",
                     f"`{model_id(*key)}`: the first {int(table['examples'].iloc[0])} attacked test images "
                     f"({path.parent.name}/{path.name}).", ""]
        for ball in [b for b in balls_in_order(results.headline) if b in set(table["ball"])]:
            part = table[table["ball"] == ball]
            found = verdict(part)
            lines.append(f"| {name} | {ball} | {found.text(with_starts)} |")
            sections += [f"### {BALL_TITLES[ball]}: {found.text(with_starts, short=True)}", "",
                         *([f"{found.text(with_starts)[0].upper()}{found.text(with_starts)[1:]}.", ""] if not found.converged else []),
                         "Columns: eps_attack.", "",
                         pd.DataFrame(ladder_rows(part, with_starts)).to_markdown(index=False, disable_numparse=True), ""]
    return "\n".join(lines + [""] + sections)


def budget_quantities(results: Results, src, models, params_path) -> dict:
    """REPRODUCTION.md's attack-budget bullet: per model and ball, the steps the curve's attack
    needs, or the ladder's cap and the fall 4x steps still brings there; the curve's own steps."""
    out = {"curve_steps": src.q(results.params["evaluate"]["apgd_steps"], "{:d}", params_path, "evaluate.apgd_steps"),
           "models": []}
    for key in models:
        table, path = read_ladder(results, key)
        balls = []
        for ball in [b for b in balls_in_order(results.headline) if b in set(table["ball"])]:
            found = verdict(table[table["ball"] == ball])
            entry = {"ball": BALL_TITLES[ball], "converged": found.converged, "measured": found.worst is not None,
                     "cap": src.q(found.cap, "{:d}", path, f"rows ball={ball}: the largest of column steps")}
            if found.converged:
                entry["needs"] = src.q(found.steps, "{:d}", path, f"rows ball={ball}, steps={found.steps}, random_starts="
                                       f"{found.starts}: column within_tolerance true at every eps_attack")
            elif found.worst is not None:
                w = found.worst
                row = f"row ball={ball}, eps_attack={w['eps_attack']:g}, steps={int(w['steps'])}, random_starts={int(w['random_starts'])}"
                entry.update(fall=src.q(-float(w["change_at_4x_steps"]), "{:.2f}", path, f"{row}, column change_at_4x_steps (negated)"),
                             at=src.q(float(w["eps_attack"]), "{:g}", path, row),
                             tolerance=src.q(float(w["tolerance"]), "{:.2f}", path, f"{row}, column tolerance"))
            balls.append(entry)
        out["models"].append({"label": results.labels[key[0]], "name": model_name(key[1]), "seed": key[2], "balls": balls,
                              "converged": all(b["converged"] for b in balls)})
    return out
