"""The attack-strength table (reports/attack_strength.md): no paper counterpart. Can any other
attack beat the attack curve behind Figure 3? Each challenger's change of the mean attacked ELBO
against `evaluate`'s curve, per model of `attack_strength.models` and ball. Where a gated
challenger beats the curve, the curve there is only an upper bound: `upper_bounds` says by how
much, for this table, the attack-curve table and Figure 3.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from provae.grid import GridModel, model_name, models_of_grid
from provae.report.results import Results, read_required


def point(ball: str, eps_attack: float) -> tuple[str, float]:
    """A (ball, eps_attack) key that two CSVs' parses of the same eps agree on."""
    return ball, round(float(eps_attack), 9)


@dataclass(frozen=True)
class StrengthCheck:
    """One model's attack-strength check: the stage's CSV."""

    table: pd.DataFrame
    path: Path

    def upper_bounds(self) -> dict[tuple[str, float], tuple[float, str]]:
        """(ball, eps_attack) -> (fall, challenger) where a gated challenger beats the curve: the
        largest fall among those that beat it, and which challenger it was."""
        beaten = self.table[self.table["gated"].astype(bool) & self.table["beats_curve"].astype(bool)]
        out = {}
        for (ball, a), rows in beaten.groupby(["ball", "eps_attack"], sort=False):
            worst = rows.loc[rows["change"].idxmin()]
            out[point(ball, a)] = (-float(worst["change"]), str(worst["challenger"]))
        return out


def strength_checks(results: Results) -> dict:
    """Model key -> its StrengthCheck, in the grid's order: each model of `attack_strength.models`
    (its CSV is required)."""
    checks = {}
    for m in models_of_grid(results.params, "attack_strength"):
        key = (m.dataset, m.eps, m.seed)
        path = read_required(results.patterns.path("strength", *key), "run attack_strength first")
        checks[key] = StrengthCheck(pd.read_csv(path), path)
    return {key: checks[key] for key in results.keys() if key in checks}


def upper_bounds(checks: dict, keys) -> dict[tuple[str, float], tuple[float, str]]:
    """Over the seeds ``keys`` of one model: (ball, eps_attack) -> the largest fall and its challenger."""
    out = {}
    for key in keys:
        if key in checks:
            for where, (fall, challenger) in checks[key].upper_bounds().items():
                if where not in out or fall > out[where][0]:
                    out[where] = (fall, challenger)
    return out


def upper_bound_note(fall: float, challenger: str) -> str:
    who = "4x steps" if challenger == "apgd_4x_steps" else challenger
    return f"upper bound: {who} lowers it by {fall:.2f} nats"


def attack_strength_markdown(results: Results, checks: dict) -> str:
    """Per model and ball: each challenger's change of the mean attacked ELBO against the curve."""
    lines = ["# Attack strength: can any other attack beat the attack curve?", "",
             "Mean attacked ELBO (nats) on the first attacked test images of each model. 'curve': `evaluate`'s "
             "attack (APGD from the clean input, the residual-sign corner and random starts, plus the latent attack; "
             "per image the worst). Other rows: each setting's mean minus the curve's, scored on the same noise draws "
             "(negative: it found lower ELBOs); '!' marks a challenger beyond the tolerance max(0.5 nats, 1 %), "
             "which fails the stage, and the curve there is only an upper bound ('upper bound: 4x steps lowers it by "
             "X nats': the largest fall among the challengers beyond the tolerance, named unless it is 4x steps). "
             "Settings marked 'cheaper' are not gated: where they stay within the tolerance too, the curve's budget "
             "is more than it needs.", ""]
    for (dataset, eps, seed), check in checks.items():
        table, marks = check.table, check.upper_bounds()
        rows = []
        for ball, part in table.groupby("ball", sort=False):
            first = part[part["challenger"] == part["challenger"].iloc[0]]
            curve = {}
            for a, v in zip(first["eps_attack"], first["curve"]):
                mark = marks.get(point(ball, a))
                curve[f"{a:g}"] = f"{v:.2f}" + (f" ({upper_bound_note(*mark)})" if mark else "")
            rows.append({"ball": ball, "attack": "curve", **curve})
            for name, runs in part.groupby("challenger", sort=False):
                rows.append({"ball": ball, "attack": name if runs["gated"].all() else f"{name} (cheaper)", **{
                    f"{a:g}": f"{c:+.2f}{'!' if beaten else ''}"
                    for a, c, beaten in zip(runs["eps_attack"], runs["change"], runs["beats_curve"])}})
        gated = table[table["gated"]]
        worst = gated.loc[gated["change"].idxmin()]
        lines += [f"## {results.labels[dataset]}, {model_name(eps)}, seed {seed}", "",
                  f"Columns: eps_attack. Largest fall by a challenger: {worst['change']:+.2f} nats ({worst['challenger']}, "
                  f"{worst['ball']}, eps_attack {worst['eps_attack']:g}; tolerance there {worst['tolerance']:.2f}).", "",
                  pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True), ""]
    return "\n".join(lines)


def attack_strength_quantities(results: Results, src, models, reference_eps: float, params_path) -> dict:
    """REPRODUCTION.md's attack section: does any challenger lower the curve beyond the tolerance
    (the checked models), and how far above it the previous attack (fixed-step PGD) and the
    residual-sign corner end."""
    from provae.report.reproduction import listing

    def changes(table, path, challenger, eps_from=0.0, fmt="{:+.2f}", sign=1):
        """Each row's change of the curve (``sign`` -1: as a fall, positive)."""
        rows = table[(table["challenger"] == challenger) & (table["eps_attack"] >= eps_from)]
        return [src.q(sign * r.change, fmt, path, f"row ball={r.ball}, eps_attack={r.eps_attack:g}, challenger={challenger}, "
                      f"column change{' (negated)' if sign < 0 else ''}") for r in rows.itertuples()]

    def label(key) -> str:
        return f"{results.labels[key[0]]} {model_name(key[1])} (seed {key[2]})"

    checked = {}
    for dataset, eps, seed in models:
        path = results.patterns.path("strength", dataset, eps, seed)
        checked[dataset, eps, seed] = (pd.read_csv(read_required(path, "run attack_strength first")), path)
    strength = results.params["attack_strength"]
    out = {"tolerance_nats": src.q(strength["tolerance_nats"], "{:g}", params_path, "attack_strength.tolerance_nats"),
           "tolerance_relative": src.q(strength["tolerance_relative"], "{:.0%}", params_path, "attack_strength.tolerance_relative"),
           "checked": listing(label(key) for key in checked),
           "unchecked": listing(f"{results.labels[d]} {model_name(e)}" for d in results.datasets for e in results.eps_of(d)
                                if e != 0 and not any(k[:2] == (d, e) for k in checked))}
    if checked:
        gated = {key: (t[t["gated"]], p) for key, (t, p) in checked.items()}

        def largest_fall(keys):
            falls = [q for key in keys for c in gated[key][0]["challenger"].unique()
                     for q in changes(*gated[key], c, fmt="{:.2f}", sign=-1)]
            return max(falls, key=lambda q: q.value) if falls else None

        beaten = [key for key, (t, _) in gated.items() if t["beats_curve"].any()]
        held = [key for key in checked if key not in beaten]
        upper = set(strength.get("upper_bound_models") or [])  # model ids
        out["holds"] = not beaten
        out["held"] = listing(label(key) for key in held)
        out["largest_fall"] = largest_fall(held)  # over the models where the curve holds
        out["beaten"] = [{"model": label(key), "fall": largest_fall([key]), "declared": GridModel(*key).id in upper}
                         for key in beaten]
        # A cheaper setting keeps up when it ends no more than the tolerance above the curve (NaN does not);
        # judged where the curve holds, since elsewhere the curve itself is short of converged.
        def keeps_up(table) -> bool:
            cheaper = table[~table["gated"]]
            return bool((cheaper["change"] <= cheaper["tolerance"]).all())

        weaker = [key for key in held if not keeps_up(checked[key][0])]
        out["cheaper_hold"] = not weaker
        out["cheaper_weaker"] = listing(label(key) for key in weaker)
        out["challengers"] = listing(f"`{c}`" for c in next(iter(gated.values()))[0]["challenger"].unique())
        out["cheaper"] = listing(f"`{c}`" for c in next(iter(checked.values()))[0].query("not gated")["challenger"].unique())
        pgd = [q for t, p in checked.values() for q in changes(t, p, "fixed_step_pgd", reference_eps, fmt="{:.2f}")]
        out["pgd_above"] = src.span([q for q in pgd if q.value > 0] or pgd, "{:.2f}")
        out["pgd_most_below"] = max([q for t, p in checked.values() for q in changes(t, p, "fixed_step_pgd", reference_eps,
                                                                                       fmt="{:.2f}", sign=-1)], key=lambda q: q.value)
        out["residual_sign"] = src.span([q for t, p in checked.values() for q in changes(t, p, "residual_sign")], "{:.1f}")
    return out
