"""Table 1 of the paper: certified lower bound (LB train, LB test) and ELBO test at eps = eps_train,
ours (mean ± std over seeds, with min and max) beside the paper's values, the gap ELBO - LB, the
other ball's LB, and whether training converged; written as reports/table1.md, .csv and .tex.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from provae.grid import model_name
from provae.report.results import BALL_TITLES, QUANTITIES, Results, read_required, show

CONVERGENCE_EPOCHS, CONVERGENCE_TOLERANCE = 5, 0.01  # clean ELBO moved < 1 % over the last 5 epochs


def convergence(results: Results) -> dict:
    """Per (dataset, eps): the largest relative move of the clean test ELBO over the last epochs."""
    moves = {}
    for dataset, eps, seed in results.keys():
        folder = results.patterns.path("training", dataset, eps, seed) / "plots" / "metrics" / "test"
        elbo = pd.read_csv(read_required(folder / "elbo.tsv", "train it first"), sep="\t")["elbo"]
        if len(elbo) > CONVERGENCE_EPOCHS:
            move = abs(elbo.iloc[-1] - elbo.iloc[-1 - CONVERGENCE_EPOCHS]) / abs(elbo.iloc[-1])
            moves[dataset, eps] = max(moves.get((dataset, eps), 0.0), move)
    return moves


def table1(results: Results, paper: dict) -> pd.DataFrame:
    """One row per (dataset, eps_train): each quantity's spread over seeds and the paper's value."""
    other = "clipped" if results.headline == "unclipped" else "unclipped"
    moves = convergence(results)
    rows = []
    for dataset in results.datasets:
        for eps in results.eps_of(dataset):
            reference = paper["table1"].get(dataset, {}).get(str(float(eps)), {})
            row = {"dataset": dataset, "data": results.labels[dataset], "ball": results.headline, "eps_train": eps}
            cells = {key: results.over_seeds(dataset, eps, lambda k, key=key: results.metrics[k][key]) for key in QUANTITIES}
            cells["gap_test"] = results.over_seeds(
                dataset, eps, lambda k: results.metrics[k]["elbo_test"] - results.metrics[k]["lb_test"])
            cells[f"lb_test_{other}"] = results.over_seeds(dataset, eps, lambda k: results.metrics[k][f"lb_test_{other}"])
            for key, stats in cells.items():
                row.update({f"{key}_{stat}": value for stat, value in stats.items() if stat != "n"})
                row[f"{key}_paper"] = reference.get(key, np.nan)
            row["gap_test_paper"] = reference.get("elbo_test", np.nan) - reference.get("lb_test", np.nan)
            row["seeds"] = cells["lb_test"]["n"]
            row["elbo_move_last_epochs"] = moves.get((dataset, eps), np.nan)
            rows.append(row)
    return pd.DataFrame(rows).drop(columns=[f"lb_test_{other}_paper"])


def table1_markdown(table: pd.DataFrame, paper_datasets: set) -> str:
    ball = table["ball"].iloc[0]
    other = "clipped" if ball == "unclipped" else "unclipped"
    lines = ["# Table 1: certified lower bound (LB) and ELBO at eps = eps_train", "",
             f"Threat model: the {BALL_TITLES[ball]}; the last LB column uses the {BALL_TITLES[other]}. "
             "Nats per image, the constant -(D/2) log(2 pi sigma0^2) dropped (as in the paper). Each cell: mean ± "
             "std over seeds, then the paper's value in brackets where it has one. 'converged': the clean test "
             f"ELBO moved by less than {CONVERGENCE_TOLERANCE:.0%} over the last {CONVERGENCE_EPOCHS} epochs "
             "(largest move over seeds, training monitor subset).", ""]
    for data_label, part in table.groupby("data", sort=False):
        with_paper = part["dataset"].iloc[0] in paper_datasets
        cells = pd.DataFrame({"eps_train": part["eps_train"].map("{:g}".format), "seeds": part["seeds"]})
        for key, title in {**QUANTITIES, "gap_test": "gap: ELBO - LB, test"}.items():
            cells[title] = [show({"mean": m, "std": s}) + (f" ({p:.2f})" if with_paper else "")
                            for m, s, p in zip(part[f"{key}_mean"], part[f"{key}_std"], part[f"{key}_paper"])]
        cells[f"LB test, {other} ball"] = [show({"mean": m, "std": s})
                                           for m, s in zip(part[f"lb_test_{other}_mean"], part[f"lb_test_{other}_std"])]
        cells["converged"] = [f"n/a (<= {CONVERGENCE_EPOCHS} epochs)" if np.isnan(move) else
                              ("yes" if move < CONVERGENCE_TOLERANCE else "no") + f" ({move:.1%})"
                              for move in part["elbo_move_last_epochs"]]
        lines += [f"## {data_label}", "", cells.to_markdown(index=False), ""]
    return "\n".join(lines)


def write_table1(results: Results, paper: dict, prefix: str) -> None:
    """``prefix``.md, .csv and .tex; without paper values for any dataset, no empty paper columns."""
    table = table1(results, paper)
    Path(f"{prefix}.md").write_text(table1_markdown(table, set(paper["table1"])) + "\n")
    if not any(dataset in paper["table1"] for dataset in results.datasets):  # ours alone: no empty paper columns
        table = table.drop(columns=[c for c in table.columns if c.endswith("_paper")])
    table.to_csv(f"{prefix}.csv", index=False, float_format="%.3f")
    Path(f"{prefix}.tex").write_text(
        table.drop(columns="dataset").to_latex(index=False, float_format="%.2f", na_rep="--", caption=(
            "Certified lower bound and ELBO at eps = eps_train (nats; mean, std, min and max over seeds; paper "
            "values in the _paper columns).")))


PAPER_TOLERANCE = 0.05  # a cell of ours "matches" the paper's within 5 % of the paper's value


def table1_quantities(results: Results, paper: dict, src, table_csv: Path, paper_json: Path) -> dict:
    """REPRODUCTION.md's Table 1 section: per dataset, each cell beside the paper's, which cells
    match (`reproduction.compare`, PAPER_TOLERANCE), and how the bounds that do not match sit
    against our bound in each ball."""
    from provae.report.reproduction import compare, listing

    other = "clipped" if results.headline == "unclipped" else "unclipped"
    sections = {"tolerance": src.q(PAPER_TOLERANCE, "{:.0%}", Path(__file__), "PAPER_TOLERANCE")}
    for dataset in results.datasets:
        reference = paper["table1"].get(dataset, {})
        rows, lb_match, elbo_match, off, elbo_diffs = [], [], [], [], []
        for eps in results.eps_of(dataset):
            row_where = f"row dataset={dataset}, eps_train={eps:g}"
            cell = {q: results.over_seeds(dataset, eps, lambda k, q=q: results.metrics[k][q])
                    for q in ("lb_test", "elbo_test", f"lb_test_{other}")}
            ours = {q: src.q(cell[q]["mean"], "{:.2f}", table_csv, f"{row_where}, column {q}_mean") for q in cell}
            row = {"eps": src.q(eps, "{:g}", table_csv, row_where), **ours}
            paper_cell = reference.get(str(float(eps)), {})
            for q in ("lb_test", "elbo_test"):
                row[f"{q}_paper"] = (src.q(paper_cell[q], "{:.2f}", paper_json, f"table1.{dataset}.{eps:g}.{q}")
                                     if q in paper_cell else None)
            rows.append(row)
            if not paper_cell:
                continue
            lb = compare(cell["lb_test"], paper_cell["lb_test"], PAPER_TOLERANCE * abs(paper_cell["lb_test"]))
            elbo = compare(cell["elbo_test"], paper_cell["elbo_test"], PAPER_TOLERANCE * abs(paper_cell["elbo_test"]))
            elbo_diffs.append(src.q(abs(elbo.difference), "{:.1f}", table_csv, f"{row_where}: |elbo_test_mean - elbo_test_paper|"))
            if elbo.word == "matches":
                elbo_match.append(row["eps"])
            if lb.word == "matches":
                lb_match.append({"eps": row["eps"], "diff": src.q(abs(lb.difference), "{:.1f}", table_csv,
                                                                  f"{row_where}: |lb_test_mean - lb_test_paper|")})
                continue
            clipped_diff = cell[f"lb_test_{other}"]["mean"] - paper_cell["lb_test"]
            off.append({"eps": row["eps"], "word": lb.word,
                        "headline": src.q(abs(lb.difference), "{:.1f}", table_csv, f"{row_where}: lb_test_mean - lb_test_paper"),
                        "other": src.q(abs(clipped_diff), "{:.1f}", table_csv, f"{row_where}: lb_test_{other}_mean - lb_test_paper"),
                        "other_closer": abs(clipped_diff) < abs(lb.difference)})
        sections[dataset] = {
            "label": results.labels[dataset], "rows": rows, "has_paper": bool(reference),
            "seeds": src.q(min(cell["lb_test"]["n"] for _ in [0]), "{:d}", table_csv, "column seeds"),
            "lb_match_eps": listing(m["eps"] for m in lb_match),
            "lb_match_diff": src.span([m["diff"] for m in lb_match], "{:.1f}") if lb_match else None,
            "elbo_match_eps": listing(elbo_match), "elbo_all_match": len(elbo_match) == len(elbo_diffs),
            "elbo_diff": src.span(elbo_diffs, "{:.1f}") if elbo_diffs else None,
            "off": off, "off_eps": listing(o["eps"] for o in off),
            "off_headline": src.span([o["headline"] for o in off], "{:.1f}") if off else None,
            "off_other": src.span([o["other"] for o in off], "{:.1f}") if off else None,
            "other_closer": sum(o["other_closer"] for o in off), "off_count": len(off),
        }
    sections["other_closer"] = sum(sections[d]["other_closer"] for d in results.datasets)
    sections["off_count"] = sum(sections[d]["off_count"] for d in results.datasets)
    return sections


def claim1_quantities(results: Results, src, table_csv: Path) -> dict:
    """REPRODUCTION.md's Claim 1 (the paper's Table 1): LB and ELBO fall as eps_train grows, and
    LB = ELBO at eps_train 0 (the same noise); and the convergence check of every model."""
    from provae.report.reproduction import claim_verdict, listing

    out, moves = {}, convergence(results)
    for dataset in results.datasets:
        eps_grid = results.eps_of(dataset)
        mean = {q: [results.over_seeds(dataset, e, lambda k, q=q: results.metrics[k][q])["mean"] for e in eps_grid]
                for q in ("lb_test", "elbo_test")}
        falls = [all(a >= b for a, b in zip(values, values[1:])) for values in mean.values()]
        equal = abs(mean["lb_test"][0] - mean["elbo_test"][0]) <= 1e-6 * abs(mean["elbo_test"][0]) if eps_grid[0] == 0 else False
        pending = [(e, moves[dataset, e]) for e in eps_grid if moves.get((dataset, e), 0.0) >= CONVERGENCE_TOLERANCE]
        direction = {}
        for eps, _ in pending:
            key = results.keys(dataset, eps)[0]
            folder = results.patterns.path("training", *key) / "plots" / "metrics" / "test"
            elbo = pd.read_csv(folder / "elbo.tsv", sep="\t")["elbo"]
            direction[eps] = src.q(elbo.iloc[-1 - CONVERGENCE_EPOCHS], "{:.1f}", folder / "elbo.tsv",
                                   f"row step={len(elbo) - 1 - CONVERGENCE_EPOCHS}, column elbo"), \
                src.q(elbo.iloc[-1], "{:.1f}", folder / "elbo.tsv", f"row step={len(elbo) - 1}, column elbo")
        out[dataset] = {
            "label": results.labels[dataset], "verdict": claim_verdict(falls + [equal]), "falls": all(falls), "equal": equal,
            "moves": src.span([src.q(m, "{:.1%}", table_csv, f"row dataset={dataset}, eps_train={e:g}, column elbo_move_last_epochs")
                               for (d, e), m in moves.items() if d == dataset], "{:.1%}") if moves else None,
            "converged": sum(moves.get((dataset, e), 1.0) < CONVERGENCE_TOLERANCE for e in eps_grid), "models": len(eps_grid),
            "pending": [{"name": model_name(e), "move": src.q(m, "{:.1%}", table_csv,
                                                             f"row dataset={dataset}, eps_train={e:g}, column elbo_move_last_epochs"),
                         "from": direction[e][0], "to": direction[e][1],
                         "word": "still improving" if direction[e][1].value > direction[e][0].value else "getting worse"}
                        for e, m in pending],
            "pending_names": listing(model_name(e) for e, _ in pending)}
    out["epochs"] = src.q(CONVERGENCE_EPOCHS, "{:d}", Path(__file__), "CONVERGENCE_EPOCHS")
    out["tolerance"] = src.q(CONVERGENCE_TOLERANCE, "{:.0%}", Path(__file__), "CONVERGENCE_TOLERANCE")
    return out
