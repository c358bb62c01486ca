"""The certify_elbo stage's part of the report (provae/report/certify_elbo.py) on tests/report_fixture.py's
small grid with eps_train 0.01 added (the goals' proVAE): mnist-0.0-0 and mnist-0.01-0 listed, their
certify_elbo files fabricated from their certify rows (`make_elbo_inputs`: fewer images, a looser IBP, the
ELBO relaxation part of the way from CROWN's bound to the attacked ELBO). Every expected number is read
from those files here, not from the pages; with no model listed, every artifact is as without the stage."""

from __future__ import annotations

import dataclasses
import json
import re
import runpy
import sys

import numpy as np
import pandas as pd
import pytest
import yaml
from matplotlib.colors import to_hex
from PIL import Image
from report_fixture import ROOT, elbo_patterns, keep_drawn_figures, make_elbo_inputs, make_inputs, outputs, paper, params

from provae.grid import product
from provae.report import certified_radius, fig3_attack_curves
from provae.report.build import Page, ReportError, build_report, reproduction_context
from provae.report.certify import nats
from provae.report.certify_elbo import GOAL_NATS, GOAL_SHARE, elbo_models, read_elbo_runs
from provae.report.plotting import palette
from provae.report.reproduction import render_reproduction, shown
from provae.report.results import BALL_TITLES, Results

GRID = (0.0, 0.01, 0.1)
LISTED = (("mnist", 0.0, 0), ("mnist", 0.01, 0))
EXAMPLES = int(params()["certify_elbo"]["examples"])
TEMPLATE = ROOT / "reports" / "REPRODUCTION.md.j2"
SHOWN = (0.01, 0.05, 0.1)


def listed_params(models=LISTED) -> dict:
    settings = params(GRID)
    settings["certify_elbo"]["models"] = {}
    for dataset, eps, seed in models:
        settings["certify_elbo"]["models"].update(product([dataset], [eps], [seed]))
    return settings


def with_page(out):
    return dataclasses.replace(outputs(out), reproduction=out / "REPRODUCTION.md")


PAGE = Page(template=TEMPLATE, paper=ROOT / "references" / "paper.json", params=ROOT / "params.yaml")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("elbo") / "inputs"
    found = elbo_patterns(make_inputs(root, GRID), root)
    make_elbo_inputs(found, LISTED, EXAMPLES)
    return found


@pytest.fixture(scope="module")
def label(inputs) -> str:
    """The dataset's label, as the data stage wrote it (a mirror's copy is labelled so)."""
    return json.loads(inputs.path("data", "mnist", 0).read_text())["label"]


@pytest.fixture(scope="module")
def report(inputs, tmp_path_factory):
    out = with_page(tmp_path_factory.mktemp("listed"))
    build_report(inputs, out, listed_params(), paper(), PAGE)
    return out


def files_of(found, key) -> tuple[pd.DataFrame, pd.DataFrame]:
    folder = found.path("certify_elbo", *key)
    return pd.read_csv(folder / "bounds.csv"), pd.read_csv(folder / "radii.csv")


def tables_under(text: str, heading: str) -> list[list[dict]]:
    """The markdown tables of the section ``heading`` (up to the next '## '), each as rows of {column: cell}."""
    body = text.split(heading + "\n", 1)[1].split("\n## ", 1)[0]
    tables, header = [], None
    for line in [*body.splitlines(), ""]:
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if header is None:
            header = cells
            tables.append([])
        elif not set(line) <= set("|:- "):
            tables[-1].append(dict(zip(header, cells)))
    return tables


def closed(ibp: pd.Series, bound: float) -> str:
    gap = ibp["attacked_elbo"] - ibp["bound"]
    return f"{100 * (bound - ibp['bound']) / gap:.0f} %" if 0 < gap < np.inf else "n/a"


# --- certify.md -------------------------------------------------------------------------------------

def test_the_section_holds_the_files_numbers(report, inputs, label):
    text = report.certify_table.read_text()
    for key in LISTED:
        bounds, radii = files_of(inputs, key)
        (ball,) = set(bounds["ball"])
        heading = f"## {label}: the ELBO itself as the specification (first {EXAMPLES} images, {BALL_TITLES[ball]})"
        table, radius_table = tables_under(text, heading)
        model = ("VAE" if key[1] == 0 else f"proVAE eps_train={key[1]:g}") + f", seed {key[2]}"
        rows = {r["bound"]: r for r in table if r["model"] == model}
        assert list(rows) == ["attacked ELBO", "IBP", "linear relaxation (CROWN)", "ELBO relaxation"]
        at = bounds.set_index(["eps_attack", "method"])
        for a in SHOWN:
            assert rows["attacked ELBO"][f"eps {a:g}"] == nats(at.loc[(a, "ibp"), "attacked_elbo"])
            assert rows["IBP"][f"eps {a:g}"] == nats(at.loc[(a, "ibp"), "bound"])
            for method, title in (("crown", "linear relaxation (CROWN)"), ("elbo", "ELBO relaxation")):
                bound = at.loc[(a, method), "bound"]
                assert rows[title][f"eps {a:g}"] == f"{nats(bound)} ({closed(at.loc[(a, 'ibp')], bound)})", (key, a, method)
        for method, title in (("ibp", "IBP"), ("elbo", "ELBO relaxation")):
            own = bounds[bounds["method"] == method]
            assert rows[title]["s per image"] == f"{own['seconds_per_image'].mean():.3g}"
            assert rows[title]["violations"] == str(int(own["violations"].sum()))
        medians = {r["bound"]: r for r in radius_table if r["model"] == model}
        for tau in dict.fromkeys(radii["tau"]):
            for method, title in (("ibp", "IBP"), ("crown", "linear relaxation (CROWN)"), ("elbo", "ELBO relaxation")):
                median = radii[(radii["tau"] == tau) & (radii["method"] == method)]["radius"].median()
                assert medians[title][f"ELBO drop <= {tau}"] == f"{median:.4f}"


def test_the_gap_closed_is_against_the_same_files_ibp(report, inputs, label):
    """The fixture's IBP rows are looser than certify's: against certify's 64-image IBP the shares would differ."""
    text = report.certify_table.read_text()
    bounds, _ = files_of(inputs, LISTED[1])
    certify = pd.read_csv(inputs.path("certify", *LISTED[1]) / "bounds.csv")
    ours, theirs = bounds.set_index(["eps_attack", "method"]), certify[certify["ball"] == "unclipped"].set_index(
        ["eps_attack", "method"])
    (table, _) = tables_under(text, f"## {label}: the ELBO itself as the specification (first {EXAMPLES} images, "
                                    f"{BALL_TITLES['unclipped']})")
    crown = next(r for r in table if r["model"].startswith("proVAE eps_train=0.01") and r["bound"].endswith("(CROWN)"))
    same = closed(ours.loc[(0.05, "ibp")], ours.loc[(0.05, "crown"), "bound"])
    other = closed(theirs.loc[(0.05, "ibp")], ours.loc[(0.05, "crown"), "bound"])
    assert same != other and crown["eps 0.05"].endswith(f"({same})")


def test_the_section_says_which_images_and_that_they_compare_only_with_each_other(report):
    text = report.certify_table.read_text().split("the ELBO itself as the specification", 1)[1]
    assert f"the first {EXAMPLES} of the certify stage's test images" in text
    assert f"certify's first {params()['certify']['examples']} images" in text and "compare with each other only" in text
    assert f"Median certified radius over the same {EXAMPLES} images" in text


# --- the figures ------------------------------------------------------------------------------------

@pytest.fixture
def drawn(monkeypatch):
    """Each figure function's figure, drawn, instead of saved."""
    return keep_drawn_figures(monkeypatch, (certified_radius, fig3_attack_curves))


@pytest.fixture(scope="module")
def runs(inputs):
    results = Results(inputs, listed_params())
    return results, read_elbo_runs(results, elbo_models(results.params))


def legend(fig) -> list[str]:
    return [t.get_text() for t in fig.legends[0].get_texts()]


def test_figure_3_draws_the_elbo_relaxation_per_listed_model(runs, inputs, drawn, tmp_path):
    results, found = runs
    colours = palette(results)
    fig3_attack_curves.figure_attack_curves(results, "unclipped", tmp_path / "a.png", {}, found)
    fig3_attack_curves.figure_attack_curves(results, "clipped", tmp_path / "b.png", {}, found)
    fig3_attack_curves.figure_attack_curves(results, "unclipped", tmp_path / "c.png", {})
    unclipped, clipped, without = drawn
    bottom = unclipped.axes[1]
    assert len(bottom.get_lines()) == len(GRID) * 3 + len(LISTED)  # per model: attacked, IBP, CROWN; per listed: elbo
    dash_dot = [line for line in bottom.get_lines() if line.get_linestyle() == "-."]
    assert [to_hex(line.get_color()) for line in dash_dot] == [to_hex(colours[key[1]]) for key in LISTED]
    for line, key in zip(dash_dot, LISTED):
        bounds, _ = files_of(inputs, key)
        mean = bounds[bounds["method"] == "elbo"].groupby("eps_attack")["bound"].mean()
        assert list(line.get_xdata()) == list(mean.index) and np.array_equal(line.get_ydata(), mean.to_numpy())
    label = f"certified bound: ELBO relaxation (certify_elbo: first {EXAMPLES} images)"
    assert label in legend(unclipped)
    # the files hold the headline ball only: the clipped figure, and one without runs, are as before
    for fig in (clipped, without):
        assert len(fig.axes[1].get_lines()) == len(GRID) * 3 and label not in legend(fig)


def test_the_radius_figure_draws_the_elbo_relaxations_fraction(runs, inputs, drawn, tmp_path):
    results, found = runs
    certified_radius.figure_certified_radius(results, tmp_path / "a.png", found)
    certified_radius.figure_certified_radius(results, tmp_path / "b.png")
    fig, without = drawn
    _, radii = files_of(inputs, LISTED[0])
    taus = list(dict.fromkeys(radii["tau"]))
    for ax, tau in zip(fig.axes, taus):
        assert len(ax.get_lines()) == len(GRID) * 2 + len(LISTED) + 1  # models x methods, listed, the grey level
        dash_dot = [line for line in ax.get_lines() if line.get_linestyle() == "-."]
        for line, key in zip(dash_dot, LISTED, strict=True):
            _, radii = files_of(inputs, key)
            part = radii[(radii["method"] == "elbo") & (radii["tau"] == tau)]["radius"]
            assert len(part) == EXAMPLES
            assert np.array_equal(line.get_ydata(), certified_radius.certified_fraction(part, line.get_xdata()))
            assert ax.get_xlim()[1] >= part.max()  # the panel is as wide as the listed models' curves too
    assert f"certified bound: ELBO relaxation (certify_elbo: first {EXAMPLES} images)" in legend(fig)
    assert all(len(ax.get_lines()) == len(GRID) * 2 + 1 for ax in without.axes)
    assert not any("certify_elbo" in text for text in legend(without))


# --- errors -----------------------------------------------------------------------------------------

def test_a_missing_file_names_it_and_the_stage(inputs, tmp_path):
    path = inputs.path("certify_elbo", *LISTED[1]) / "bounds.csv"
    saved = path.read_bytes()
    path.unlink()
    try:
        with pytest.raises(FileNotFoundError, match=r"mnist-eps0.01-seed0/bounds.csv is missing: run "
                                                    r"certify_elbo@mnist-0.01-0 first"):
            build_report(inputs, outputs(tmp_path), listed_params(), paper())
    finally:
        path.write_bytes(saved)
    assert not (tmp_path / "certify.md").exists() and not (tmp_path / "figures").exists()  # nothing half-written


def test_a_file_of_other_images_or_methods_is_refused(inputs):
    settings = listed_params()
    settings["certify_elbo"]["examples"] = EXAMPLES + 1
    with pytest.raises(ValueError, match=rf"radii.csv holds {EXAMPLES} images, not certify_elbo.examples = "
                                         rf"{EXAMPLES + 1}: run certify_elbo@mnist-0.0-0 again"):
        read_elbo_runs(Results(inputs, settings), elbo_models(settings))
    settings = listed_params()
    settings["certify_elbo"]["methods"] = ["ibp", "crown", "elbo", "other"]
    with pytest.raises(FileNotFoundError, match=r"has no rows of method \['other'\] \(certify_elbo.methods\)"):
        read_elbo_runs(Results(inputs, settings), elbo_models(settings))


def test_listed_models_need_the_pattern_and_must_be_of_the_grid(inputs, tmp_path):
    with pytest.raises(ReportError, match=r"certify_elbo.models lists \['mnist-0.0-0', 'mnist-0.01-0'\]: .*--certify-elbo"):
        build_report(dataclasses.replace(inputs, certify_elbo=None), outputs(tmp_path), listed_params(), paper())
    with pytest.raises(ReportError, match=r"certify_elbo.models names models that are not in the grid .*'mnist-0.05-0'"):
        build_report(inputs, outputs(tmp_path), listed_params([("mnist", 0.05, 0)]), paper())


# --- nothing listed ---------------------------------------------------------------------------------

def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_an_empty_list_changes_nothing(inputs, report, label, tmp_path):
    """An empty `certify_elbo.models` (with the pattern given) writes what params without the section write
    (no pattern): every table byte for byte, every figure pixel for pixel (a PNG's Params chunk holds params)."""
    empty, absent = listed_params(models=()), params(GRID)
    del absent["certify_elbo"]
    build_report(inputs, with_page(tmp_path / "empty"), empty, paper(), PAGE)
    build_report(dataclasses.replace(inputs, certify_elbo=None), with_page(tmp_path / "absent"), absent, paper(), PAGE)
    names = sorted(p.relative_to(tmp_path / "empty").as_posix() for p in (tmp_path / "empty").rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(tmp_path / "absent").as_posix() for p in (tmp_path / "absent").rglob("*")
                           if p.is_file())
    for name in names:
        a, b = tmp_path / "empty" / name, tmp_path / "absent" / name
        if name.endswith(".png"):
            assert np.array_equal(pixels(a), pixels(b)), name
            chunks = [{k: v.replace(f"/{run}/", "/") for k, v in Image.open(path).text.items() if k != "Params"}
                      for run, path in (("empty", a), ("absent", b))]  # `Commit` names the file's own path
            assert chunks[0] == chunks[1], name
        else:
            assert a.read_bytes() == b.read_bytes(), name
    # and the listed run's differ where the section adds to them
    listed = report.certify_table.parent
    assert (listed / "certify.md").read_text().startswith((tmp_path / "empty" / "certify.md").read_text())
    assert (listed / "certify.md").read_text() != (tmp_path / "empty" / "certify.md").read_text()
    for name in ("fig3_attack_curves.png", "certified_radius.png"):
        assert not np.array_equal(pixels(listed / "figures" / name), pixels(tmp_path / "empty" / "figures" / name))
    assert "certify_elbo/*/" not in (tmp_path / "empty" / "README.md").read_text()
    page = (tmp_path / "empty" / "REPRODUCTION.md").read_text()
    assert "It has not been run over the grid: list models of the grid in `certify_elbo.models`" in page
    assert "run the stage `certify_elbo`" in page
    goals = page.split("The project's goals for it:", 1)[1].split("\n\n", 1)[0]
    assert goals.count(f"{label} **not measured**") == 2 and "[" not in goals


# --- the index --------------------------------------------------------------------------------------

def test_the_index_lists_the_files_and_what_reads_them(report):
    index = report.index.read_text()
    row = next(line for line in index.splitlines() if line.startswith("| certify_elbo/*/ |"))
    assert row.endswith("| mnist-eps0.0-seed0, mnist-eps0.01-seed0 |") and f"first {EXAMPLES} of certify's" in row
    for name in ("certify.md", "figures/fig3_attack_curves.png", "figures/certified_radius.png"):
        entry = next(line for line in index.splitlines() if line.startswith(f"| [{name}]"))
        assert f"the ELBO relaxation on the first {EXAMPLES} images of certify_elbo.models" in entry, name
    entry = next(line for line in index.splitlines() if line.startswith("| [figures/fig3_attack_curves_clipped.png]"))
    assert "certify_elbo" not in entry  # its files hold the headline ball only


# --- REPRODUCTION.md --------------------------------------------------------------------------------

def point_of(found, key, a) -> pd.DataFrame:
    bounds, _ = files_of(found, key)
    return bounds[bounds["eps_attack"] == a].set_index("method")


def test_the_paragraph_gives_each_models_numbers(report, inputs, label):
    page = report.reproduction.read_text()
    for key in LISTED:
        line = next(line for line in page.splitlines()
                    if line.startswith(f"- {label} {'VAE' if key[1] == 0 else f'proVAE eps_train={key[1]:g}'}, seed 0 ("))
        assert line.count("at eps ") == 2  # the smallest positive eps_attack and evaluate.example_eps_attack
        for a in (0.01, 0.1):
            row = point_of(inputs, key, a)
            gap = row.loc["ibp", "attacked_elbo"] - row.loc["ibp", "bound"]
            expected = [f"at eps {a:g}, IBP [{shown(row.loc['ibp', 'bound'], '{:.1f}')}](",
                        f"box-wise [{shown(row.loc['crown', 'bound'], '{:.1f}')}](",
                        f"ELBO relaxation [{shown(row.loc['elbo', 'bound'], '{:.1f}')}](",
                        f"attacked ELBO [{row.loc['ibp', 'attacked_elbo']:.1f}](",
                        f"closes [{(row.loc['crown', 'bound'] - row.loc['ibp', 'bound']) / gap:.1%}](",
                        f"the ELBO relaxation [{(row.loc['elbo', 'bound'] - row.loc['ibp', 'bound']) / gap:.1%}](",
                        f"(its bound [{shown(row.loc['ibp', 'attacked_elbo'] - row.loc['elbo', 'bound'], '{:.1f}')}](",
                        f"at [{row.loc['elbo', 'seconds_per_image']:.2g}]("]
            for text in expected:
                assert text in line, (key, a, text)
        assert f"certify_elbo/{'mnist-eps%r-seed0' % key[1]}/bounds.csv" in line


@pytest.mark.parametrize(("closes", "word"), [(0.5, "not met"), (0.99, "met")])
def test_the_goals_verdicts_follow_the_numbers(inputs, label, tmp_path, closes, word):
    found = elbo_patterns(inputs, tmp_path)
    make_elbo_inputs(found, LISTED, EXAMPLES, closes=closes)
    results = Results(found, listed_params())
    context = reproduction_context(results, with_page(tmp_path), PAGE, paper(), read_elbo_runs(results, elbo_models(results.params)))
    page = render_reproduction(TEMPLATE, context)
    goals = page.split("The project's goals for it:", 1)[1].split("\n\n", 1)[0].strip().splitlines()
    share_line, nats_line = goals
    row = point_of(found, ("mnist", 0.01, 0), 0.1)
    share = (row.loc["elbo", "bound"] - row.loc["ibp", "bound"]) / (row.loc["ibp", "attacked_elbo"] - row.loc["ibp", "bound"])
    assert ("met" if share >= GOAL_SHARE else "not met") == word  # the fixture flips it
    assert f"{label} **{word}** (seed 0: [{share:.1%}](" in share_line
    row = point_of(found, ("mnist", 0.0, 0), 0.01)
    remain = row.loc["ibp", "attacked_elbo"] - row.loc["elbo", "bound"]
    assert ("met" if remain <= GOAL_NATS else "not met") == word
    assert f"{label} **{word}** (seed 0: [{remain:.1f}](" in nats_line
    assert (f"[{remain - GOAL_NATS:.1f}](" in nats_line) == (word == "not met") and ("more than the goal" in nats_line) == (
        word == "not met")
    assert f"at least {GOAL_SHARE:.0%} of the gap" in share_line and f"within {GOAL_NATS:g} nats" in nats_line


def test_a_goal_without_its_model_is_not_measured(inputs, label, tmp_path):
    settings = listed_params(models=LISTED[:1])  # the VAE only: no proVAE eps_train=0.01 listed
    results = Results(inputs, settings)
    context = reproduction_context(results, with_page(tmp_path), PAGE, paper(), read_elbo_runs(results, elbo_models(settings)))
    assert context["ce"]["share"]["datasets"] == [{"label": label, "verdict": "not measured", "models": []}]
    assert context["ce"]["nats"]["datasets"][0]["verdict"] in ("met", "not met")


# --- the stage --------------------------------------------------------------------------------------

def test_the_stage_passes_its_flag(inputs, tmp_path, monkeypatch):
    """stages/report.py's --certify-elbo reaches the report; without it a listed model stops the stage."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(listed_params()))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT / "stages"))
    out = tmp_path / "out"
    flags = {"models": inputs.models, "eval": inputs.eval, "metrics": inputs.metrics, "curves": inputs.curves,
             "strength": inputs.strength, "fixed-encoder": inputs.fixed_encoder, "training": inputs.training,
             "data-provenance": inputs.data, "certify": inputs.certify, "budget": inputs.budget,
             "strength-table": out / "attack_strength.md", "budget-table": out / "attack_budget.md",
             "fixed-encoder-table": out / "fixed_encoder.md", "certify-table": out / "certify.md",
             "curve-table": out / "attack_curves.md", "summary": out / "metrics.json", "index": out / "README.md",
             "paper": ROOT / "references" / "paper.json", "figures": out / "figures", "table": out / "table1"}
    argv = ["report.py", *[part for name, value in flags.items() for part in (f"--{name}", str(value))]]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit, match="--certify-elbo"):
        runpy.run_path(str(ROOT / "stages" / "report.py"), run_name="__main__")
    monkeypatch.setattr(sys, "argv", [*argv, "--certify-elbo", inputs.certify_elbo])
    runpy.run_path(str(ROOT / "stages" / "report.py"), run_name="__main__")
    assert ": the ELBO itself as the specification (first" in (out / "certify.md").read_text()
