"""The whole report in one call: reads the grid's outputs once (`Results`), then writes every
artifact (Table 1, the attack-curve, attack-strength, attack-budget, certify and fixed-encoder
tables, Figures 1-4, the training-curve, attack-budget and certified-radius figures,
reports/metrics.json, and, given its path, bound_training.md; with `certify_elbo.models` listed,
their ELBO relaxation in certify.md, Figure 3, the radius figure and REPRODUCTION.md) and, last, the index
(reports/README.md) that lists each with the models that made it. Reads no params file: the stage
passes the params dict, the paper's values and every path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from provae.files import write_json
from provae.grid import GridError, models_of_grid
from provae.report.attack_budget import attack_budget_markdown, budget_models, budget_quantities, read_ladder
from provae.report.attack_budget_figure import figure_attack_budget
from provae.report.attack_curves import attack_curve_markdown, claim2_quantities
from provae.report.attack_strength import attack_strength_markdown, attack_strength_quantities, strength_checks
from provae.report.bound_training import bound_training_markdown, bound_training_quantities
from provae.report.bound_training_files import BoundPatterns, bound_models, variant_name
from provae.report.certified_radius import figure_certified_radius
from provae.report.certify import certify_markdown, certify_quantities
from provae.report.certify_elbo import ElboRun, certify_elbo_quantities, elbo_markdown, elbo_models, read_elbo_runs
from provae.report.fig1_adversarial import figure_adversarial_examples
from provae.report.fig2_reconstructions import figure_reconstructions
from provae.report.fig3_attack_curves import figure_attack_curves
from provae.report.fig4_samples import claim3_quantities, figure_samples
from provae.report.fixed_encoder import fixed_encoder_markdown, fixed_encoder_quantities
from provae.report.index import index_markdown, run_quantities
from provae.report.plotting import method_title
from provae.report.reproduction import EARLIER_GRID, Sources, render_reproduction
from provae.report.results import BALL_TITLES, Patterns, Results, balls_in_order
from provae.report.summary import summary_metrics
from provae.report.table1 import PAPER_TOLERANCE, claim1_quantities, table1_quantities, write_table1
from provae.report.training_curves import figure_training_curves
from provae.report.training_length import training_length_quantities


class ReportError(ValueError):
    """The params ask for a figure of a model the grid does not hold."""


@dataclass(frozen=True)
class Outputs:
    """The report's outputs: dvc.yaml's `report` outs."""

    table: str  # path prefix of table1 .md/.csv/.tex
    curve_table: Path
    strength_table: Path
    budget_table: Path
    fixed_encoder_table: Path
    certify_table: Path
    summary: Path
    index: Path
    figures: Path
    reproduction: Path | None = None  # REPRODUCTION.md, rendered from `Page.template`
    bound_training: Path | None = None  # bound_training.md: `bound_training.models` beside their IBP-trained twins


@dataclass(frozen=True)
class Page:
    """What REPRODUCTION.md reads beyond the grid's outputs, and the files its numbers link to."""

    template: Path
    paper: Path                            # references/paper.json
    params: Path                           # params.yaml (linked, never read here)
    training_length: str | None = None     # folder per dataset with {dataset}: scripts/sigma0_sweep.py's


def reproduction_context(results: Results, outputs: Outputs, page: Page, paper: dict, elbo: list[ElboRun] = (),
                         bound: BoundPatterns | None = None) -> dict:
    """Every named quantity REPRODUCTION.md's template uses, each beside its artifact's module;
    ``elbo``: the runs of `certify_elbo.models` (`certify_elbo.read_elbo_runs`); ``bound``: where the
    models of `bound_training.models` keep their outputs."""
    params = results.params
    src = Sources(Path(outputs.reproduction).parent)
    reference = float(params["evaluate"]["example_eps_attack"])
    table_csv = Path(f"{outputs.table}.csv")
    strength_models = [(m.dataset, m.eps, m.seed) for m in models_of_grid(params, "attack_strength")]
    return {
        "run": run_quantities(results, src, page.params, results.patterns.data, reference),
        "t1": table1_quantities(results, paper, src, table_csv, page.paper),
        "c1": claim1_quantities(results, src, table_csv),
        "c2": claim2_quantities(results, paper, src, reference, page.paper),
        "fe": fixed_encoder_quantities(results, src, reference),
        "tl": training_length_quantities(results, src, page.training_length, reference, paper, PAPER_TOLERANCE, page.paper),
        "c3": claim3_quantities(results, src),
        "cert": certify_quantities(results, src, int(params["certify"]["bisection_steps"]), reference, page.params),
        "ce": certify_elbo_quantities(results, list(elbo), src, reference, page.params),
        "strength": attack_strength_quantities(results, src, strength_models, reference, page.params),
        "budget": budget_quantities(results, src, budget_models(params), page.params),
        "bt": bound_training_quantities(results, bound, bound_models(params), src, outputs.bound_training),
        "earlier": EARLIER_GRID, "datasets": results.datasets, "headline": results.headline,
        "other": "clipped" if results.headline == "unclipped" else "unclipped",
        "links": {"table1": src.link(Path(f"{outputs.table}.md")), "curves": src.link(outputs.curve_table),
                  "fixed_encoder": src.link(outputs.fixed_encoder_table), "certify": src.link(outputs.certify_table),
                  "strength": src.link(outputs.strength_table), "figures": src.link(outputs.figures),
                  "budget": src.link(outputs.budget_table),
                  "paper": src.link(page.paper), "template": src.link(page.template),
                  "fig3": "fig3_attack_curves.png", "radius": "certified_radius.png", "budget_figure": "attack_budget.png"},
    }


def build_report(patterns: Patterns, outputs: Outputs, params: dict, paper: dict, page: Page | None = None,
                 bound: BoundPatterns | None = None) -> None:
    """Every artifact; ``bound``: where the models of `bound_training.models` trained on
    `bound_training.bound` keep their outputs (needed once that list names a model)."""
    results = Results(patterns, params)
    example_eps = [float(e) for e in params["report"]["example_eps_train"]]
    unknown = [e for e in example_eps if e not in results.eps_grid]
    if unknown:
        raise ReportError(f"report.example_eps_train {unknown} not in eps_train {results.eps_grid}")
    seed = params["report"]["example_seed"]
    if seed not in results.seeds:
        raise ReportError(f"report.example_seed {seed} not in seeds {results.seeds}")
    eps_attack = params["evaluate"]["example_eps_attack"]
    if (outputs.reproduction is None) != (page is None):
        raise ReportError("REPRODUCTION.md needs both its output path and its template (Page)")
    for path in (Path(outputs.table), outputs.curve_table, outputs.strength_table, outputs.budget_table, outputs.fixed_encoder_table,
                 outputs.certify_table, outputs.summary, outputs.index, *[outputs.reproduction] * (page is not None)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)

    try:
        trained = bound_models(params)
    except GridError as error:
        raise ReportError(str(error)) from None
    if trained and (outputs.bound_training is None or bound is None):
        raise ReportError(f"bound_training.models lists {[m.id for m in trained]}: the report needs bound_training.md's "
                          "path and the --bound-* patterns of their outputs (the report stage's cmd in dvc.yaml)")
    try:
        listed = elbo_models(params)
    except GridError as error:
        raise ReportError(str(error)) from None
    if listed and patterns.certify_elbo is None:
        raise ReportError(f"certify_elbo.models lists {[m.id for m in listed]}: the report needs the pattern of their "
                          "outputs, --certify-elbo (Patterns.certify_elbo; the report stage's cmd in dvc.yaml)")

    # Read before anything is written, so a missing check, ladder or model leaves no half-written report.
    checks = strength_checks(results)  # where a stronger attack beat the curve, it is an upper bound
    budget = budget_models(params)
    for key in budget:
        read_ladder(results, key)
    elbo = read_elbo_runs(results, listed)
    bound_text = (bound_training_markdown(results, bound, trained, outputs.bound_training)
                  if outputs.bound_training is not None else None)
    write_table1(results, paper, outputs.table)
    Path(outputs.curve_table).write_text(attack_curve_markdown(results, checks) + "\n")

    figures = Path(outputs.figures)
    figures.mkdir(parents=True, exist_ok=True)
    entries = [("table1.md / .csv / .tex", "Table 1: LB train, LB test, ELBO test per eps_train, ours beside the paper's",
                results.keys()),
               ("attack_curves.md", "Figure 3 in numbers: attacked ELBO per eps_attack, with the spread", results.keys())]
    for dataset in results.datasets:
        label = results.labels[dataset]
        for name, draw, what in (("fig1_adversarial", figure_adversarial_examples, "Figure 1: adversarial examples"),
                                 ("fig2_reconstructions", figure_reconstructions,
                                  "Figure 2: clean vs attacked reconstructions with ELBO")):
            path = figures / f"{name}_{dataset}.png"
            entries.append((f"figures/{path.name}", f"{what} ({label})",
                            draw(results, dataset, example_eps, seed, eps_attack, path)))
        path = figures / f"fig4_samples_{dataset}.png"
        entries.append((f"figures/{path.name}", f"Figure 4: prior samples ({label})", figure_samples(results, dataset, seed, path)))
    for ball in balls_in_order(results.headline):
        path = figures / ("fig3_attack_curves.png" if ball == results.headline else f"fig3_attack_curves_{ball}.png")
        entries.append((f"figures/{path.name}", f"Figure 3: ELBO under attack vs eps_attack (top), certified bounds "
                        f"(bottom), {BALL_TITLES[ball]}{elbo_note(elbo, ball)}",
                        figure_attack_curves(results, ball, path, checks, elbo)))
    path = figures / "training_curves.png"
    entries.append((f"figures/{path.name}", "Training curves: test bound and ELBO per epoch",
                    figure_training_curves(results, seed, path)))
    write_json(outputs.summary, summary_metrics(results))
    Path(outputs.strength_table).write_text(attack_strength_markdown(results, checks) + "\n")
    entries.append(("attack_strength.md", "Attack strength: challengers against the attack curve; where one beats "
                    "it, the curve is an upper bound", list(checks)))
    Path(outputs.budget_table).write_text(attack_budget_markdown(results, budget) + "\n")
    entries.append(("attack_budget.md", "Attack budget: attacked ELBO per APGD budget, the fall each 4x brings, the "
                    "steps each model needs", budget))
    path = figures / "attack_budget.png"
    if budget:
        entries.append((f"figures/{path.name}", "Attack budget: attacked ELBO vs APGD steps, per eps_attack",
                        figure_attack_budget(results, budget, path)))
    else:
        path.unlink(missing_ok=True)  # no model on the ladder: no figure, not a stale one
    methods = ", ".join(method_title(m) for m in results.methods)
    path = figures / "certified_radius.png"
    entries.append((f"figures/{path.name}", f"Certified-radius curves: fraction of images certified vs eps, by "
                    f"{methods}{elbo_note(elbo, results.headline)}", figure_certified_radius(results, path, elbo)))
    certify_text = certify_markdown(results) + "\n" + (elbo_markdown(results, elbo) + "\n" if elbo else "")
    Path(outputs.certify_table).write_text(certify_text)
    entries.append(("certify.md", f"Certified bounds by {methods}: gap closed, cost per image, radii"
                    f"{elbo_note(elbo)}", results.keys()))
    Path(outputs.fixed_encoder_table).write_text(fixed_encoder_markdown(results) + "\n")
    entries.append(("fixed_encoder.md", "The attacks' fall of the ELBO beside the fall with the encoder held fixed",
                    results.keys()))
    if bound_text is not None:
        Path(outputs.bound_training).parent.mkdir(parents=True, exist_ok=True)
        Path(outputs.bound_training).write_text(bound_text)
        name = (params.get("bound_training") or {}).get("bound", "")
        entries.append((Sources(Path(outputs.index).parent).link(outputs.bound_training),
                        f"Training on the ELBO-level bound: each model of `bound_training.models` trained on {name} beside "
                        "its IBP-trained twin (clean ELBO, certified bounds and radii, attacked ELBO, wall time), and "
                        "the verdict", [(m.dataset, m.eps, m.seed) for m in trained]
                        + [variant_name(m, name) for m in trained]))
    if outputs.reproduction is not None and not params["report"]["reproduction"]:
        # A profile's grid (tiny, quick) holds few of the models the page's claims are about.
        Path(outputs.reproduction).write_text(
            "# Reproduction\n\nNot rendered: `report.reproduction` is false in this run's params (a profile's "
            "grid, not the paper's). The full grid of `params.yaml` renders it from `REPRODUCTION.md.j2`.\n")
    elif outputs.reproduction is not None:
        text = render_reproduction(page.template, reproduction_context(results, outputs, page, paper, elbo, bound))
        Path(outputs.reproduction).write_text(text)
        entries.insert(0, ("REPRODUCTION.md", "The written analysis: our numbers beside the paper's, claim by claim "
                           "(rendered from REPRODUCTION.md.j2)", results.keys()))
    inputs = [("certify_elbo/*/", f"per-model bounds (`certify_elbo.methods`) and certified radii on the first "
               f"{elbo[0].examples} of certify's images (certify.md, Figure 3, certified_radius.png)",
               ", ".join(r.model.name for r in elbo))] if elbo else []
    Path(outputs.index).write_text(index_markdown(results, entries, inputs))


def elbo_note(elbo: list[ElboRun], ball: str | None = None) -> str:
    """What the listed models of `certify_elbo.models` add to an artifact (of ``ball``), for the index; "" for none."""
    if not [r for r in elbo if ball is None or r.holds(ball)]:
        return ""
    return f"; and the ELBO relaxation on the first {elbo[0].examples} images of certify_elbo.models"
