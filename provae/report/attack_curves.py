"""The attack-curve table (reports/attack_curves.md): Figure 3 of the paper in numbers. The attacked
ELBO per eps_attack, mean ± std over seeds, per model and ball, and each robust model's difference
to the VAE, marked beyond ('*') or within ('≈') the seed spread. A cell the attack-strength check
beat is marked an upper bound; a note under each table says which models were checked.
"""

from __future__ import annotations

import pandas as pd

from provae.grid import model_name
from provae.report.attack_strength import point, upper_bound_note, upper_bounds
from provae.report.results import BALL_TITLES, Results, balls_in_order, separated, show


def seeds_text(seeds) -> str:
    return f"seed{'s' * (len(seeds) > 1)} {', '.join(str(s) for s in seeds)}"


def check_note(results: Results, checks: dict, dataset: str) -> str:
    """Which models the attack-strength check covered, and which it did not."""
    checked, unchecked = [], []
    for eps in results.eps_of(dataset):
        keys = [k for k in results.keys(dataset, eps) if k in checks]
        if not keys:
            unchecked.append(model_name(eps))
            continue
        checked.append(f"{model_name(eps)} ({seeds_text([k[2] for k in keys])})")
    return (f"Attack strength (attack_strength.md): checked: {', '.join(checked) or 'none'}; "
            f"not checked: {', '.join(unchecked) or 'none'}.")


def attack_curve_markdown(results: Results, checks: dict) -> str:
    """Attacked ELBO per eps_attack, mean ± std over seeds, and each robust model's difference to the VAE."""
    lines = ["# ELBO under attack (Figure 3 in numbers)", "",
             "Mean attacked ELBO (nats) on each model's attacked test subset, mean ± std over the seeds listed "
             "(a model without '±' has one). 'vs VAE': the "
             "robust model's mean minus the VAE's; with two seeds or more, '*' marks a difference beyond the spread "
             "(the seed ranges do not overlap) and '≈' one within it. 'upper bound: 4x steps lowers it by X nats': "
             "the attack-strength check found a stronger attack there (X: the largest fall beyond the tolerance over "
             "the checked seeds; the challenger named unless it is APGD with 4x the steps), so the cell is only an "
             "upper bound of the attacked ELBO.", ""]
    for dataset in results.datasets:
        for ball in balls_in_order(results.headline):
            eps_attack = list(results.curves[results.keys(dataset)[0]].index)
            rows = []
            for eps in results.eps_of(dataset):
                marks = upper_bounds(checks, results.keys(dataset, eps))
                seeds = ", ".join(str(k[2]) for k in results.keys(dataset, eps))
                row, compare = {"model": model_name(eps), "seeds": seeds}, {"model": f"{model_name(eps)} vs VAE", "seeds": ""}
                for a in eps_attack:
                    stats = results.over_seeds(dataset, eps, lambda k, a=a: results.curves[k].loc[a, f"elbo_attacked_{ball}"])
                    vae = results.over_seeds(dataset, 0.0, lambda k, a=a: results.curves[k].loc[a, f"elbo_attacked_{ball}"])
                    mark = marks.get(point(ball, a))
                    row[f"{a:g}"] = show(stats) + (f" ({upper_bound_note(*mark)})" if mark else "")
                    spread_mark = {True: " *", False: " ≈", None: ""}[separated(stats, vae)]
                    compare[f"{a:g}"] = f"{stats['mean'] - vae['mean']:+.2f}{spread_mark}"
                rows.append(row)
                if eps != 0:
                    rows.append(compare)
            lines += [f"## {results.labels[dataset]}, {BALL_TITLES[ball]}", "",
                      "Columns: eps_attack.", "", pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True), "",
                      check_note(results, checks, dataset), ""]
    return "\n".join(lines)


def claim2_quantities(results: Results, paper: dict, src, reference_eps: float, paper_json) -> dict:
    """REPRODUCTION.md's Claim 2: per dataset and ball, the VAE's fall, each robust model's fall,
    where it ends up above the VAE (`reproduction.crossing`) and by how much, with the spread rule
    (`reproduction.compare`); against the paper's Figure 2 where it has values."""
    from provae.report.reproduction import claim_verdict, compare, crossing, degree, listing, model_source

    def stats(dataset, eps, a, ball):
        return results.over_seeds(dataset, eps, lambda k: results.curves[k].loc[a, f"elbo_attacked_{ball}"])

    def q(dataset, eps, a, ball, value, fmt, what):
        path, note = model_source(results, "curves", dataset, eps)
        return src.q(value, fmt, path, f"row eps_attack={a:g}, column elbo_attacked_{ball}{what}; {note}")

    def eps_q(value):
        return src.q(value, "{:g}", None, "") if value is not None else None

    out = {"reference_eps": eps_q(reference_eps)}
    for dataset in results.datasets:
        eps_grid = results.eps_of(dataset)
        robust = [e for e in eps_grid if e != 0]
        shown_models = [0.0, robust[0], robust[-1]]
        x = list(results.curves[results.keys(dataset)[0]].index)
        last = x[-1]
        for ball in balls_in_order(results.headline):
            mean = {e: {a: stats(dataset, e, a, ball)["mean"] for a in x} for e in eps_grid}
            loss = {e: {a: mean[e][0.0] - mean[e][a] for a in x} for e in eps_grid}
            models = []
            for eps in robust:
                differences = [mean[eps][a] - mean[0.0][a] for a in x]
                before, after = crossing(x, differences)
                at_ref = compare(stats(dataset, eps, reference_eps, ball), stats(dataset, 0.0, reference_eps, ball))
                models.append({
                    "name": model_name(eps), "eps": eps_q(eps), "before": eps_q(before), "after": eps_q(after),
                    "above_at_last": differences[-1] > 0, "ref_word": at_ref.word, "ref_spread": at_ref.spread_note,
                    "diff_ref": q(dataset, eps, reference_eps, ball, at_ref.difference, "{:+.1f}", " minus the VAE's"),
                    "diff_last": q(dataset, eps, last, ball, differences[-1], "{:+.1f}", " minus the VAE's"),
                    "clean_gap": q(dataset, eps, 0.0, ball, -differences[0], "{:.1f}", ": the VAE's minus this one's"),
                    "loss_ref": q(dataset, eps, reference_eps, ball, loss[eps][reference_eps], "{:.1f}", ", clean minus attacked"),
                    "loss_last": q(dataset, eps, last, ball, loss[eps][last], "{:.0f}", ", clean minus attacked")})
            above_last = [m for m in models if m["above_at_last"]]
            out.setdefault(dataset, {})[ball] = {
                "label": results.labels[dataset], "ball": BALL_TITLES[ball], "last": eps_q(last), "models": models,
                "verdict": claim_verdict([m["above_at_last"] for m in models]), "paper": None,
                "vae_loss_ref": q(dataset, 0.0, reference_eps, ball, loss[0.0][reference_eps], "{:.1f}", ", clean minus attacked"),
                "vae_loss_last": q(dataset, 0.0, last, ball, loss[0.0][last], "{:.1f}", ", clean minus attacked"),
                "robust_loss_ref": src.span([m["loss_ref"] for m in models], "{:.1f}"),
                "robust_loss_last": src.span([m["loss_last"] for m in models], "{:.0f}"),
                "diff_ref": src.span([m["diff_ref"] for m in models], "{:+.1f}"),
                "clean_gap": src.span([m["clean_gap"] for m in models], "{:.1f}"),
                "all_above_last": len(above_last) == len(models),
                "above_last": listing(m["eps"] for m in above_last),
                "below_last": listing(m["eps"] for m in models if not m["above_at_last"]),
                "below_ref": listing(m["eps"] for m in models if m["ref_word"] == "below"),
                "columns": [model_name(e) for e in shown_models],
                "rows": [{"eps_attack": eps_q(a), "cells": [q(dataset, e, a, ball, mean[e][a], "{:.2f}", "") for e in shown_models]}
                         for a in x if a in (0.0, reference_eps / 2, reference_eps, last)]}
        other = [b for b in balls_in_order(results.headline) if b != results.headline][0]
        ratio = out[dataset][results.headline]["vae_loss_ref"].value / out[dataset][other]["vae_loss_ref"].value
        out[dataset]["ball_ratio"] = src.q(ratio, "{:.2f}", None, "")
        out[dataset]["ball_word"] = degree(ratio)
        figure2 = paper.get(f"figure2_{dataset}_eps_attack_{reference_eps:g}", {})
        if "0.0" in figure2:
            head, where = out[dataset][results.headline], f"figure2_{dataset}_eps_attack_{reference_eps:g}"
            vae = figure2["0.0"]
            paper_loss = vae["clean"] - vae["attacked"]
            mean_ref = {e: stats(dataset, e, reference_eps, results.headline)["mean"] for e in shown_models}
            head["paper"] = {
                "vae_clean": src.q(vae["clean"], "{:.2f}", paper_json, f"{where}.0.0.clean"),
                "vae_clean_ours": q(dataset, 0.0, 0.0, results.headline, stats(dataset, 0.0, 0.0, results.headline)["mean"],
                                    "{:.2f}", ""),
                "vae_loss": src.q(paper_loss, "{:.0f}", paper_json, f"{where}.0.0: clean minus attacked"),
                "ratio": src.q(head["vae_loss_ref"].value / paper_loss, "{:.0%}", paper_json,
                               f"our VAE's fall at eps_attack {reference_eps:g} over {where}.0.0's"),
                "row": [src.q(figure2[str(e)]["attacked"], "{:.2f}", paper_json, f"{where}.{e:g}.attacked")
                        if str(e) in figure2 else "" for e in shown_models],
                "robust": [{"eps": eps_q(e), "diff": src.q(mean_ref[e] - figure2[str(e)]["attacked"], "{:+.1f}", paper_json,
                                                          f"ours at eps_attack {reference_eps:g} minus {where}.{e:g}.attacked")}
                           for e in shown_models[1:] if str(e) in figure2]}
    return out
