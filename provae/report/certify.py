"""The certify table (reports/certify.md): no paper counterpart; it extends the certified bounds of
the paper's Table 1 and Figure 3. Each certify method's bound (`certify.methods`: IBP, the linear
relaxation CROWN, the ELBO relaxation, ...) beside the attacked ELBO, the share of the gap between
IBP's bound and the attacked ELBO each tighter method closes, its cost per image, and the median
certified radius per method and tau.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from provae.grid import model_name
from provae.report.plotting import method_title
from provae.report.results import BALL_TITLES, Results, balls_in_order

SHOWN_EPS = (0.01, 0.05, 0.1)  # the eps_attack columns of the bounds tables


def nats(value: float, sign: str = "") -> str:
    """One decimal, or three significant digits once a vacuous bound runs to millions of nats."""
    return f"{value:{sign}.1f}" if abs(value) < 1e5 else f"{value:{sign}.2e}"


def cell(text) -> str:
    """Text for a markdown table cell: a '|' (as in tau '10% of |ELBO|') escaped, so it splits no column."""
    return str(text).replace("|", "\\|")


def closed_share(base: pd.Series, bound: float) -> float:
    """`gap_closed` as a number (1.0: exact); nan where the first method's gap is not positive and finite."""
    gap = base["attacked_elbo"] - base["bound"]
    return (bound - base["bound"]) / gap if 0 < gap < np.inf else np.nan


def gap_closed(base: pd.Series, bound: float) -> str:
    """The share of the gap between the first method's bound and the attacked ELBO that ``bound`` closes."""
    gap = base["attacked_elbo"] - base["bound"]
    return f"{100 * (bound - base['bound']) / gap:.0f} %" if 0 < gap < np.inf else "n/a"


def mean_bounds(tables: pd.DataFrame, ball: str) -> pd.DataFrame:
    """bounds.csv rows of ``ball`` (one or more seeds' files, concatenated) as the tables show them:
    each column's mean over seeds per (eps_attack, method); each row of a file is already the mean
    over the certify stage's images."""
    return tables[tables["ball"] == ball].groupby(["eps_attack", "method"]).mean(numeric_only=True)


def median_radii(radii: pd.DataFrame) -> tuple[pd.Series, list]:
    """radii.csv rows (one or more seeds' files) as the tables show them: the median certified
    radius per (tau, method), over images and seeds; and the taus in the file's order."""
    return radii.groupby(["tau", "method"], sort=False)["radius"].median(), list(dict.fromkeys(radii["tau"]))


def bounds_rows(tables: pd.DataFrame, label: str, methods: list[str], ball: str, shown_eps) -> list[dict]:
    """One model's rows (``tables``: its bounds.csv, one or more seeds' files, rows of ``methods``): the
    attacked ELBO, then each method's bound (gap closed against the first method's, in the same
    files), cost and violations."""
    base = methods[0]
    part = mean_bounds(tables, ball)
    shown = [a for a in shown_eps if all((a, m) in part.index for m in methods)]
    rows = [{"model": label, "bound": "attacked ELBO",
             **{f"eps {a:g}": nats(part.loc[(a, base), "attacked_elbo"]) for a in shown}, "s per image": "", "violations": ""}]
    for method in methods:
        own = tables[tables["method"] == method]
        cells = {f"eps {a:g}": nats(part.loc[(a, method), "bound"])
                 + ("" if method == base else f" ({gap_closed(part.loc[(a, base)], part.loc[(a, method), 'bound'])})")
                 for a in shown}
        rows.append({"model": label, "bound": method_title(method), **cells,
                     "s per image": f"{own['seconds_per_image'].mean():.3g}", "violations": int(own["violations"].sum())})
    return rows


def radius_rows(radii: pd.DataFrame, label: str, methods: list[str]) -> list[dict]:
    """One model's median certified radius per method (rows) and tau (columns) of its radii.csv."""
    median, taus = median_radii(radii)
    return [{"model": label, "bound": method_title(m),
             **{f"ELBO drop <= {cell(tau)}": f"{median.loc[(tau, m)]:.4f}" for tau in taus}} for m in methods]


def certify_markdown(results: Results, shown_eps=SHOWN_EPS) -> str:
    """Per model and eps: each method's certified bound, the share of the gap between the first
    method's (IBP's) bound and the attacked ELBO it closes, its cost per image, and the median
    certified radius per method."""
    methods = results.methods
    titles = [method_title(m) for m in methods]
    lines = [f"# How much tighter than {titles[0]} are the relaxations?", "",
             f"Mean certified lower bound of the ELBO (nats) by each certify method ({', '.join(titles)}: "
             "`certify.methods`), beside the attacked ELBO, on the certify stage's test images with the attacks' own "
             f"noise, mean over seeds. In brackets, the gap closed: how much of the gap between {titles[0]}'s bound and "
             "the attacked ELBO the method closes (100 % would make it exact; where that bound runs to astronomic "
             "values, even a still vacuous bound closes nearly all of it: compare it with the attacked ELBO). 's per "
             "image': the method's time per image and eps_attack. 'violations': attacked ELBOs below its bound (the "
             "audit), over every eps_attack and both balls.", ""]
    for dataset in results.datasets:
        for ball in balls_in_order(results.headline):
            rows = [row for eps in results.eps_of(dataset) for row in
                    bounds_rows(results.certify_csv(dataset, eps, "bounds.csv"), model_name(eps), methods, ball, shown_eps)]
            lines += [f"## {results.labels[dataset]}, {BALL_TITLES[ball]}", "",
                      pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True), ""]
        rows = [row for eps in results.eps_of(dataset)
                for row in radius_rows(results.certify_csv(dataset, eps, "radii.csv"), model_name(eps), methods)]
        lines += [f"## {results.labels[dataset]}: median certified radius per method", "",
                  f"The largest l_inf radius (in the {BALL_TITLES[results.headline]}) whose whole ball keeps the certified ELBO "
                  "within tau of the clean one; 1/255 = 0.0039 is one grey level.", "",
                  pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True), ""]
    return "\n".join(lines)


def certify_quantities(results: Results, src, bisection_steps: int, reference_eps: float, params_path) -> dict:
    """REPRODUCTION.md's 'beyond the paper' section, headline ball: what the linear relaxation
    gains over IBP (most, and on models certified at or below their eps_train), where the VAEs'
    bounds are not finite, the certified radii, and the cost."""
    from provae.report.reproduction import listing, model_source

    ball = results.headline
    out = {"grey": src.q(1 / 255, "{:.4f}", None, "")}
    for dataset in results.datasets:
        bounds, radii = {}, {}
        for eps in results.eps_of(dataset):
            table = results.certify_csv(dataset, eps, "bounds.csv")
            bounds[eps] = mean_bounds(table, ball)
            radii[eps] = results.certify_csv(dataset, eps, "radii.csv")
        x = sorted({a for a, _ in bounds[0.0].index})

        def q(eps, a, method, column, fmt, value=None, what=""):
            path, note = model_source(results, "certify", dataset, eps, "bounds.csv")
            shown = bounds[eps].loc[(a, method), column] if value is None else value
            return src.q(shown, fmt, path, f"rows ball={ball}, eps_attack={a:g}, method={method}, column {column}{what}; {note}")

        gains = []
        for eps in [e for e in results.eps_of(dataset) if e != 0]:
            for a in [a for a in x if a > 0]:
                ibp, crown = bounds[eps].loc[(a, "ibp")], bounds[eps].loc[(a, "crown")]
                gap = ibp["attacked_elbo"] - ibp["bound"]
                if not 0 < gap < np.inf:
                    continue
                gains.append({"eps": src.q(eps, "{:g}", None, ""), "at": src.q(a, "{:g}", None, ""), "name": model_name(eps),
                              "at_or_below": a <= eps, "ibp": q(eps, a, "ibp", "bound", "{:.1f}"),
                              "crown": q(eps, a, "crown", "bound", "{:.1f}"), "attacked": q(eps, a, "ibp", "attacked_elbo", "{:.1f}"),
                              "gain": q(eps, a, "crown", "bound", "{:+.2f}", crown["bound"] - ibp["bound"], " minus IBP's"),
                              "closed": q(eps, a, "crown", "bound", "{:.0%}", (crown["bound"] - ibp["bound"]) / gap,
                                          " minus IBP's, over the attacked ELBO minus IBP's")})
        at_reference = [g for g in gains if g["at"].value == reference_eps]
        best = max(at_reference, key=lambda g: g["closed"].value)
        tight = [g for g in gains if g["at_or_below"]]
        not_finite = {m: listing(src.q(a, "{:g}", None, "") for a in x if not np.isfinite(bounds[0.0].loc[(a, m), "bound"]))
                      for m in ("ibp", "crown")}
        first, tau = x[1], list(dict.fromkeys(radii[0.0]["tau"]))[0]

        def radius(eps, method):
            path, note = model_source(results, "certify", dataset, eps, "radii.csv")
            return src.q(median_radii(radii[eps])[0].loc[(tau, method)], "{:.4f}", path,
                         f"rows tau={tau}, method={method}: median of column radius; {note}")

        seconds = {m: [q(e, x[-1], m, "seconds_per_image", "{:.2g}") for e in results.eps_of(dataset)] for m in results.methods}
        out[dataset] = {
            "label": results.labels[dataset], "best": best, "at_reference": at_reference,
            "reference_closed": src.span([g["closed"] for g in at_reference], "{:.0%}"), "tight_gain": src.span([g["gain"] for g in tight], "{:.2f}"),
            "tight_closed": src.span([g["closed"] for g in tight], "{:.0%}"),
            "vae_first": {"at": src.q(first, "{:g}", None, ""), "ibp": q(0.0, first, "ibp", "bound", "{:.0f}"),
                          "crown": q(0.0, first, "crown", "bound", "{:.0f}"), "attacked": q(0.0, first, "ibp", "attacked_elbo", "{:.1f}")},
            "vae_last": {"at": src.q(x[-1], "{:g}", None, ""), "ibp": q(0.0, x[-1], "ibp", "bound", "{:.2g}"),
                         "crown": q(0.0, x[-1], "crown", "bound", "{:.2g}")},
            "vae_not_finite": not_finite, "tau": tau, "vae_radius": {m: radius(0.0, m) for m in ("ibp", "crown")},
            "radii": [{"name": model_name(e), "ibp": radius(e, "ibp"), "crown": radius(e, "crown")}
                      for e in results.eps_of(dataset) if e != 0],
            "seconds": {m: src.span(v, "{:.2g}") for m, v in seconds.items()},
            "methods": [{"title": method_title(m), "seconds": src.span(seconds[m], "{:.2g}")} for m in results.methods],
            "resolution": src.q(first / 2 ** bisection_steps, "{:.5f}", params_path,
                                "evaluate.eps_attack[1] / 2^certify.bisection_steps"),
            "resolution_grey": src.q(first / 2 ** bisection_steps * 255, "{:.2f}", params_path,
                                     "evaluate.eps_attack[1] / 2^certify.bisection_steps * 255"),
        }
    return out
