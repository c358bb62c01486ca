"""REPRODUCTION.md's training-length section: no paper counterpart (the paper does not say how long
it trained), but it sets the VAE's attacked ELBO at the paper's Figure 2 against training length.
Reads the DVC experiments that `scripts/sigma0_sweep.py collect` committed beside the grid
(reports/training_length/<dataset>/sweep.csv and curves.csv): the VAE retrained for longer.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from provae.grid import model_name
from provae.report.results import Results


def training_length_quantities(results: Results, src, pattern: str | None, reference_eps: float, paper: dict,
                               tolerance: float, paper_json) -> dict:
    """Per dataset with a training-length folder: the VAE per training length (sweep.csv), its
    attacked curve (curves.csv), whether it matches the paper's Figure 2, and where the grid's
    robust models end up above the longest-trained VAE."""
    from provae.report.reproduction import compare, crossing, listing

    out = {}
    for dataset in results.datasets:
        folder = Path(pattern.format(dataset=dataset)) if pattern else None
        if folder is None or not (folder / "sweep.csv").exists():
            continue
        sweep_path, curves_path = folder / "sweep.csv", folder / "curves.csv"
        sweep = pd.read_csv(sweep_path)
        vae = sweep[sweep["eps_train"] == 0].sort_values("epochs")
        curves = pd.read_csv(curves_path)

        def q(row, column, fmt):
            return src.q(row[column], fmt, sweep_path, f"row run={row['run']}, column {column}")

        def curve(epochs, a, column="elbo_attacked_unclipped"):
            rows = curves[(curves["eps_train"] == 0) & (curves["epochs"] == epochs) & (curves["eps_attack"] == a)]
            if rows.empty or column not in rows:
                return None
            return src.q(rows[column].iloc[0], "{:.2f}", curves_path,
                         f"row epochs={epochs}, eps_train=0, eps_attack={a:g}, column {column}")

        attack_grid = sorted(curves["eps_attack"].unique())
        shown_eps = [a for a in attack_grid if a >= reference_eps]
        runs = []
        for _, row in vae.iterrows():
            epochs = int(row["epochs"])
            runs.append({"epochs": q(row, "epochs", "{:d}"), "elbo": q(row, "elbo_test", "{:.2f}"),
                         "units": q(row, "active_units", "{:d}"), "attacked": q(row, "elbo_attacked", "{:.2f}"),
                         "drop": q(row, "drop", "{:.1f}"), "median": q(row, "median_drop", "{:.1f}"),
                         "curve": [curve(epochs, a) for a in shown_eps],
                         "clipped": curve(epochs, reference_eps, "elbo_attacked_clipped")})
        first, longest = vae.iloc[0], vae.iloc[-1]
        entry = {"label": results.labels[dataset], "runs": runs, "shown_eps": [src.q(a, "{:g}", None, "") for a in shown_eps],
                 "clean_gain": src.q(longest["elbo_test"] - first["elbo_test"], "{:.1f}", sweep_path,
                                     f"column elbo_test: run {longest['run']} minus run {first['run']}"),
                 "has_clipped": runs[0]["clipped"] is not None, "paper_attacked": None, "matching": []}
        figure2 = paper.get(f"figure2_{dataset}_eps_attack_{reference_eps:g}", {}).get("0.0")
        if figure2:
            matching = [r for r, (_, row) in zip(runs, vae.iterrows())
                        if compare({"mean": row["elbo_attacked"], "min": row["elbo_attacked"], "max": row["elbo_attacked"], "n": 1},
                                   figure2["attacked"], tolerance * abs(figure2["attacked"])).word == "matches"]
            entry["paper_attacked"] = src.q(figure2["attacked"], "{:.2f}", paper_json,
                                            f"figure2_{dataset}_eps_attack_{reference_eps:g}.0.0.attacked")
            entry["paper_loss"] = src.q(figure2["clean"] - figure2["attacked"], "{:.0f}", paper_json,
                                        f"figure2_{dataset}_eps_attack_{reference_eps:g}.0.0: clean minus attacked")
            entry["matching"] = matching
            entry["matching_epochs"] = listing(r["epochs"] for r in matching)
        longest_epochs = int(longest["epochs"])
        crossings = []
        for eps in [e for e in results.eps_of(dataset) if e != 0]:
            robust = curves[(curves["eps_train"] == eps) & (curves["epochs"] == int(first["epochs"]))].set_index("eps_attack")
            vae_long = curves[(curves["eps_train"] == 0) & (curves["epochs"] == longest_epochs)].set_index("eps_attack")
            if robust.empty or vae_long.empty:
                continue
            x = sorted(set(robust.index) & set(vae_long.index))
            differences = [robust.loc[a, "elbo_attacked_unclipped"] - vae_long.loc[a, "elbo_attacked_unclipped"] for a in x]
            before, after = crossing(x, differences)
            crossings.append({
                "name": model_name(eps), "eps": src.q(eps, "{:g}", None, ""),
                "after": src.q(after, "{:g}", curves_path, "") if after is not None else None,
                "before": src.q(before, "{:g}", curves_path, "") if before is not None else None,
                "diffs": [src.q(d, "{:+.1f}", curves_path, f"eps_train={eps:g} at {first['epochs']} epochs minus the VAE at "
                                f"{longest_epochs}, eps_attack={a:g}, column elbo_attacked_unclipped")
                          for a, d in zip(x, differences) if a >= reference_eps]})
        entry["longest"] = src.q(longest_epochs, "{:d}", sweep_path, f"row run={longest['run']}, column epochs")
        entry["grid_epochs"] = src.q(int(first["epochs"]), "{:d}", sweep_path, f"row run={first['run']}, column epochs")
        entry["crossings"] = crossings
        out[dataset] = entry
    return out
