"""The ELBO itself as the specification, on the models of `certify_elbo.models`: no paper counterpart
(the paper certifies with IBP alone). The certify_elbo stage runs `certify_elbo.methods` (IBP, the
box-wise relaxation, the ELBO relaxation `elbo` of provae/elbo_relaxation.py) on the same first
`certify_elbo.examples` of certify's images, in the ball(s) its files hold. Here: reading its files
(`read_elbo_runs`), their section of reports/certify.md (`elbo_markdown`), the ELBO relaxation's
lines in Figure 3 and the certified-radius figure (`elbo_bound_lines`, `elbo_radii`, `elbo_style`),
and REPRODUCTION.md's paragraph with the project's two goals as verdicts (`certify_elbo_quantities`).
Every gap closed is against IBP's bound on the same N images: comparable within these files only,
never with certify's tables over its own images. With no model listed there is none of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from provae.grid import GridModel, model_name, models_of_grid
from provae.report.certify import SHOWN_EPS, bounds_rows, closed_share, mean_bounds, radius_rows
from provae.report.plotting import method_styles, method_title
from provae.report.results import BALL_TITLES, Results, balls_in_order, read_certify

STAGE, KEY = "certify_elbo", "certify_elbo.models"
METHOD, BASE, BOXWISE = "elbo", "ibp", "crown"  # the stage's method, the gaps' base, the relaxation it beats
# The project's two goals for the ELBO relaxation (README, "The ELBO itself as the specification"),
# which REPRODUCTION.md states as verdicts: it closes at least GOAL_SHARE of the gap between IBP's
# bound and the attacked ELBO on the proVAE trained at GOAL_SHARE_EPS_TRAIN, at eps_attack
# `evaluate.example_eps_attack`; and it certifies the VAE within GOAL_NATS nats of its attacked ELBO
# at eps_attack GOAL_NATS_EPS_ATTACK.
GOAL_SHARE, GOAL_SHARE_EPS_TRAIN = 0.90, 0.01
GOAL_NATS, GOAL_NATS_EPS_ATTACK = 20.0, 0.01


@dataclass(frozen=True)
class ElboRun:
    """One model of `certify_elbo.models`: its folder and its files' rows of `certify_elbo.methods`."""

    model: GridModel
    folder: Path
    bounds: pd.DataFrame
    radii: pd.DataFrame
    methods: list
    examples: int   # certify_elbo.examples: the first N of certify's images

    @property
    def label(self) -> str:
        return f"{model_name(self.model.eps)}, seed {self.model.seed}"

    def holds(self, ball: str) -> bool:
        return ball in set(self.bounds["ball"])


def elbo_models(params: dict) -> list[GridModel]:
    """The models of `certify_elbo.models`, each of the grid (`models_of_grid`); none when the list is
    empty or the section absent (params before the stage)."""
    if not (params.get("certify_elbo") or {}).get("models"):
        return []
    return models_of_grid(params, "certify_elbo")


def read_elbo_runs(results: Results, models: list[GridModel]) -> list[ElboRun]:
    """Each model's bounds.csv and radii.csv; a missing file names it and the stage to run."""
    if not models:  # params before the stage have no section to read
        return []
    settings = results.params["certify_elbo"]
    methods = [str(m) for m in settings["methods"]]
    # As the stage counts them: certify_elbo.examples, but no more than certify's, nor than evaluate attacked.
    examples = min(int(settings["examples"]), int(results.params["certify"]["examples"]),
                   int(results.params["evaluate"]["attack_examples"]))
    runs = []
    for model in models:
        folder = results.patterns.path("certify_elbo", model.dataset, model.eps, model.seed)
        hint = f"run {STAGE}@{model.id} first"
        bounds = read_certify(folder / "bounds.csv", methods, hint, "certify_elbo.methods")
        radii = read_certify(folder / "radii.csv", methods, hint, "certify_elbo.methods")
        images = radii["image"].nunique()
        if images != examples:  # every page says "the first N images": a stale file would make that false
            raise ValueError(f"{folder / 'radii.csv'} holds {images} images, not certify_elbo.examples = {examples}: "
                             f"run {STAGE}@{model.id} again")
        runs.append(ElboRun(model, folder, bounds, radii, methods, examples))
    return runs


def elbo_markdown(results: Results, runs: list[ElboRun], shown_eps=SHOWN_EPS) -> str:
    """certify.md's section per dataset and ball the listed models' files hold: their bounds as in the
    tables above, then their median radii, all on the first N images."""
    lines = []
    for dataset in results.datasets:
        mine = [r for r in runs if r.model.dataset == dataset]
        for ball in [b for b in balls_in_order(results.headline) if any(r.holds(b) for r in mine)]:
            held = [r for r in mine if r.holds(ball)]
            n, titles = held[0].examples, [method_title(m) for m in held[0].methods]
            bounds = [row for r in held for row in bounds_rows(r.bounds, r.label, r.methods, ball, shown_eps)]
            radii = [row for r in held if (r.radii["ball"] == ball).any()
                     for row in radius_rows(r.radii[r.radii["ball"] == ball], r.label, r.methods)]
            lines += [f"## {results.labels[dataset]}: the ELBO itself as the specification (first {n} images, "
                      f"{BALL_TITLES[ball]})", "",
                      f"The models of `{KEY}` (stage `{STAGE}`), one seed per row: {', '.join(titles)} "
                      f"(`certify_elbo.methods`) on the same images, the first {n} of the certify stage's test images "
                      "with the attacks' own noise. These rows compare with each other only: the tables above are over "
                      f"certify's first {results.params['certify']['examples']} images, so neither their bounds, their "
                      f"attacked ELBOs nor their gaps closed compare with these. In brackets, the gap closed against "
                      f"{titles[0]}'s bound on these {n} images; 's per image' and 'violations' as above.", "",
                      pd.DataFrame(bounds).to_markdown(index=False, disable_numparse=True), ""]
            if radii:
                lines += [f"Median certified radius over the same {n} images, per method:", "",
                          pd.DataFrame(radii).to_markdown(index=False, disable_numparse=True), ""]
    return "\n".join(lines)


def elbo_style(runs: list[ElboRun]) -> dict:
    """The ELBO relaxation's line style; its key says on how many images its lines are."""
    style = method_styles([METHOD])[METHOD]
    return {**style, "label": f"{style['label']} ({STAGE}: first {runs[0].examples} images)"}


def elbo_bound_lines(runs: list[ElboRun], dataset: str, ball: str) -> list[tuple[float, pd.Series]]:
    """(eps_train, the ELBO relaxation's mean bound per eps_attack) of each listed model of ``dataset``
    whose file has rows of ``ball``."""
    lines = []
    for run in [r for r in runs if r.model.dataset == dataset]:
        part = run.bounds[(run.bounds["ball"] == ball) & (run.bounds["method"] == METHOD)]
        if len(part):
            lines.append((run.model.eps, part.groupby("eps_attack")["bound"].mean()))
    return lines


def elbo_radii(runs: list[ElboRun], dataset: str, ball: str) -> list[tuple[float, pd.DataFrame]]:
    """(eps_train, the ELBO relaxation's radii.csv rows in ``ball``) of each listed model of ``dataset`` that has them."""
    found = [(r.model.eps, r.radii[(r.radii["ball"] == ball) & (r.radii["method"] == METHOD)])
             for r in runs if r.model.dataset == dataset]
    return [(eps, part) for eps, part in found if len(part)]


def headline_of(run: ElboRun, headline: str) -> str:
    """The ball the page reads a file in: the report's headline ball where the file holds it."""
    return next(b for b in balls_in_order(headline) if run.holds(b))


def point(run: ElboRun, table: pd.DataFrame, ball: str, a: float, src) -> dict:
    """One model's numbers at eps_attack ``a``, each linked to its rows of the file."""
    path, base, note = run.folder / "bounds.csv", table.loc[(a, BASE)], f"mean over the first {run.examples} images"

    def q(method, column, fmt, value=None, what=""):
        shown = table.loc[(a, method), column] if value is None else value
        return src.q(shown, fmt, path, f"rows ball={ball}, eps_attack={a:g}, method={method}, column {column}{what}; {note}")

    def closed(method):
        share = closed_share(base, table.loc[(a, method), "bound"])
        return q(method, "bound", "{:.1%}", "n/a" if math.isnan(share) else share,
                 f" minus method {BASE}'s, over the attacked ELBO minus method {BASE}'s")

    remain = base["attacked_elbo"] - table.loc[(a, METHOD), "bound"]
    where = f"rows ball={ball}, eps_attack={a:g}: the attacked ELBO minus method {METHOD}'s bound; {note}"
    return {"at": src.q(a, "{:g}", None, ""), "ibp": q(BASE, "bound", "{:.1f}"), "crown": q(BOXWISE, "bound", "{:.1f}"),
            "elbo": q(METHOD, "bound", "{:.1f}"), "attacked": q(BASE, "attacked_elbo", "{:.1f}"),
            "crown_closed": closed(BOXWISE), "elbo_closed": closed(METHOD), "seconds": q(METHOD, "seconds_per_image", "{:.2g}"),
            "share": closed_share(base, table.loc[(a, METHOD), "bound"]), "remain": src.q(remain, "{:.1f}", path, where),
            "beyond": src.q(remain - GOAL_NATS, "{:.1f}", path, f"{where}, minus the goal's {GOAL_NATS:g} nats")}


def share_met(p: dict) -> bool | None:
    """Goal one at a point: the ELBO relaxation closes at least GOAL_SHARE of IBP's gap (None: no gap to close)."""
    return None if math.isnan(p["share"]) else bool(p["share"] >= GOAL_SHARE)


def nats_met(p: dict) -> bool | None:
    """Goal two at a point: the ELBO relaxation's bound within GOAL_NATS of the attacked ELBO (a vacuous one is not)."""
    return None if math.isnan(p["remain"].value) else bool(p["remain"].value <= GOAL_NATS)


def goal(results: Results, runs: list[ElboRun], tables: dict, src, eps_train: float, at: float, met) -> list[dict]:
    """Per dataset of the grid: the verdict over its listed models of ``eps_train`` at eps_attack ``at``,
    each model's point beside it; 'not measured' where none is listed or none has the point."""
    words = {True: "met", False: "not met", None: "not measured"}
    datasets = []
    for dataset in results.datasets:
        models = []
        for run in [r for r in runs if r.model.dataset == dataset and r.model.eps == eps_train]:
            table, ball = tables[run.model]
            if all((at, m) in table.index for m in (BASE, METHOD)):
                found = point(run, table, ball, at, src)
                models.append({"seed": run.model.seed, "verdict": words[met(found)], **found})
        measured = [m["verdict"] for m in models if m["verdict"] != words[None]]
        verdict = words[None] if not measured else words[all(v == words[True] for v in measured)]
        datasets.append({"label": results.labels[dataset], "verdict": verdict, "models": models})
    return datasets


def certify_elbo_quantities(results: Results, runs: list[ElboRun], src, reference_eps: float, params_path) -> dict:
    """REPRODUCTION.md's paragraph: per listed model, at eps_attack ``reference_eps`` and at its
    smallest positive eps_attack, each bound, the attacked ELBO, the gaps closed on the same N
    images, the ELBO relaxation's cost; then the project's two goals as verdicts."""
    balls = {r.model: headline_of(r, results.headline) for r in runs}
    tables = {r.model: (mean_bounds(r.bounds, balls[r.model]), balls[r.model]) for r in runs}
    models = []
    for run in runs:
        table, ball = tables[run.model]
        x = sorted({a for a, _ in table.index if a > 0})
        shown = list(dict.fromkeys([*x[:1], *[reference_eps] * (reference_eps in x)]))
        models.append({"label": results.labels[run.model.dataset], "name": model_name(run.model.eps),
                       "seed": run.model.seed, "ball": BALL_TITLES[ball],
                       "points": [point(run, table, ball, a, src) for a in shown]})
    return {
        "stage": STAGE, "key": KEY, "listed": bool(runs), "models": models,
        "examples": src.q(runs[0].examples, "{:d}", params_path, "certify_elbo.examples") if runs else None,
        "share": {"goal": src.q(GOAL_SHARE, "{:.0%}", None, ""), "model": model_name(GOAL_SHARE_EPS_TRAIN),
                  "at": src.q(reference_eps, "{:g}", None, ""),
                  "datasets": goal(results, runs, tables, src, GOAL_SHARE_EPS_TRAIN, reference_eps, share_met)},
        "nats": {"goal": src.q(GOAL_NATS, "{:g}", None, ""), "model": model_name(0.0),
                 "at": src.q(GOAL_NATS_EPS_ATTACK, "{:g}", None, ""),
                 "datasets": goal(results, runs, tables, src, 0.0, GOAL_NATS_EPS_ATTACK, nats_met)},
    }
