"""The report's attack-budget table and figure, the upper-bound marks where an attack-strength check
beat the curve, and certify methods beyond IBP and CROWN (tests/report_fixture.py's small grid with
its hand-written ladder `LADDER` and, as the VAE's (seed 0) check, `BEATEN_CHECK`; every expected
value below follows from those numbers)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from report_fixture import (BEATEN_CHECK, CHALLENGERS, add_certify_method, beaten_check_table, keep_drawn_figures,
                            ladder_table, make_inputs, outputs, paper, params)

from provae.grid import product
from provae.report import attack_budget_figure, certified_radius, fig3_attack_curves
from provae.report.attack_budget import attack_budget_markdown, budget_models, budget_quantities, verdict
from provae.report.attack_curves import attack_curve_markdown
from provae.report.attack_strength import attack_strength_markdown, strength_checks, upper_bound_note, upper_bounds
from provae.report.build import build_report
from provae.report.certify import certify_markdown
from provae.report.reproduction import Sources
from provae.report.results import Results

VAE = ("mnist", 0.0, 0)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def results(inputs):
    return Results(inputs, params())


@pytest.fixture(scope="module")
def beaten(tmp_path_factory):
    """The small grid with the VAE (seed 0) on `attack_strength.models` too, its check `BEATEN_CHECK`."""
    found = make_inputs(tmp_path_factory.mktemp("beaten"))
    beaten_check_table().to_csv(found.path("strength", *VAE), index=False)
    settings = params()
    settings["attack_strength"]["models"].update(product(["mnist"], [0.0], [0]))
    return Results(found, settings)


@pytest.fixture
def drawn(monkeypatch):
    return keep_drawn_figures(monkeypatch, (attack_budget_figure, certified_radius, fig3_attack_curves))


# --- the attack budget -----------------------------------------------------------------------------

def test_the_verdict_by_hand():
    table = ladder_table()
    needs = verdict(table[table["ball"] == "unclipped"])  # 100 -> 400 lowers eps 0.1 by 1.20 > 0.74; 400 -> 1600 within
    assert needs.converged and (needs.steps, needs.starts, needs.cap) == (400, 1, 1600)
    assert needs.text() == "needs 400 steps"
    stuck = verdict(table[table["ball"] == "clipped"])  # 400 -> 1600 still lowers eps 0.1 by 1.00 > 0.50
    assert not stuck.converged and stuck.worst["eps_attack"] == 0.1 and stuck.worst["steps"] == 400
    assert stuck.text() == ("does not converge within the ladder's cap (1600 steps): 4x steps still lowers it by 1.00 "
                            "nats at eps_attack 0.1 (400 to 1600 steps; tolerance 0.50)")
    one_rung = verdict(ladder_table({("unclipped", 0.1): (-74.0,)}, steps=(100,)))
    assert not one_rung.converged and one_rung.worst is None and one_rung.text().startswith("not measured")


def test_the_cheapest_sufficient_budget_counts_random_starts():
    """Two random-start settings: 100 steps x 4 starts (cost 400) converges, 400 x 1 does too; 100 x 1 does not."""
    slow = ladder_table({("unclipped", 0.1): (-74.0, -75.2, -75.5)}, starts=1)
    fast = ladder_table({("unclipped", 0.1): (-75.0, -75.3, -75.5)}, starts=4)
    found = verdict(pd.concat([slow, fast]))
    assert (found.steps, found.starts) == (100, 4) and found.text(with_starts=True) == "needs 100 steps with 4 random starts"


def test_the_budget_table(results):
    text = attack_budget_markdown(results, budget_models(results.params))
    assert "| MNIST VAE, seed 0 | unclipped | needs 400 steps |" in text
    assert "| MNIST VAE, seed 0 | clipped | does not converge within the ladder's cap (1600 steps): 4x steps still " \
           "lowers it by 1.00 nats at eps_attack 0.1 (400 to 1600 steps; tolerance 0.50) |" in text
    assert "### unclipped ball (paper eq. 15): needs 400 steps" in text
    # rows: budgets; columns: eps_attack; the 4x change in brackets, '!' beyond the tolerance; the top rung bare
    assert "| 100 steps  | -42.00 (4x: -0.30) | -74.00 (4x: -1.20!) |" in text
    assert "| 1600 steps | -42.40             | -75.50              |" in text
    assert "max(0.5 nats, 1 %)" in text and "runs 100 APGD steps" in text


def test_no_model_on_the_ladder_is_one_line_and_no_figure(inputs, tmp_path):
    settings = params()
    settings["attack_budget"]["models"] = {}
    out = outputs(tmp_path)
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "attack_budget.png").write_bytes(b"stale")
    build_report(inputs, out, settings, paper())
    assert out.budget_table.read_text() == ("# Attack budget: how many APGD steps does the attack curve need?\n\n"
                                            "None: `attack_budget.models` lists no model.\n\n")
    assert not (tmp_path / "figures" / "attack_budget.png").exists()
    assert "attack_budget.png" not in out.index.read_text() and "[attack_budget.md]" in out.index.read_text()


def test_a_missing_ladder_names_the_file_and_a_running_one_says_so(inputs, tmp_path):
    path = inputs.path("budget", *VAE)
    saved = path.read_bytes()
    path.unlink()
    try:
        with pytest.raises(FileNotFoundError, match="mnist-eps0.0-seed0.csv is missing: run attack_budget@mnist-0.0-0"):
            build_report(inputs, outputs(tmp_path), params(), paper())
        assert not list(tmp_path.rglob("*.*"))  # read before anything is written: no half-written report
        path.with_name(path.name + ".partial").write_text("ball\n")
        with pytest.raises(FileNotFoundError, match="its run is still going"):
            build_report(inputs, outputs(tmp_path), params(), paper())
    finally:
        path.write_bytes(saved)
        path.with_name(path.name + ".partial").unlink(missing_ok=True)


def test_the_budget_figure(results, drawn, tmp_path):
    keys = attack_budget_figure.figure_attack_budget(results, budget_models(results.params), tmp_path / "b.png")
    assert keys == [VAE]
    fig = drawn[0]
    unclipped, clipped = fig.axes  # one row per model, one column per ball (the headline first)
    assert "needs 400 steps" in unclipped.get_title() and "not converged by 1600 steps" in clipped.get_title()
    assert unclipped.get_xscale() == "log"
    assert [t.get_text() for t in unclipped.get_xticklabels()] == ["100", "400", "1600"]
    # per eps: the line, relative to the largest budget (ends at 0), filled markers where 4x stays within
    # the tolerance, hollow ones where it does not
    hollow = [(tuple(line.get_xdata()), tuple(np.round(line.get_ydata(), 6))) for line in clipped.get_lines()
              if line.get_markerfacecolor() == "white" and len(line.get_xdata())]
    assert hollow == [((100, 400), (3.0, 1.0))]  # eps 0.1: -44 and -46 against -47
    assert all(line.get_ydata()[-1] == 0 for line in clipped.get_lines() if line.get_linestyle() == "-")
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert {"colour: eps_attack", "eps_attack 0.05", "eps_attack 0.1", "the curve's budget (100 steps)"} <= set(labels)
    assert all(ax.get_legend() is None for ax in fig.axes)


def test_budget_quantities_link_their_rows(results, tmp_path):
    out = budget_quantities(results, Sources(tmp_path), budget_models(results.params), tmp_path / "params.yaml")
    unclipped, clipped = out["models"][0]["balls"]
    assert unclipped["converged"] and unclipped["needs"].value == 400 and "within_tolerance" in unclipped["needs"].where
    assert not clipped["converged"] and clipped["fall"].text == "1.00" and clipped["at"].text == "0.1"
    assert "change_at_4x_steps (negated)" in clipped["fall"].where and out["curve_steps"].text == "100"


# --- upper bounds where a check beat the curve ------------------------------------------------------

def test_upper_bounds_by_hand(beaten):
    checks = strength_checks(beaten)
    assert list(checks) == [VAE, ("mnist", 0.1, 0), ("mnist", 0.1, 1)]  # the grid's order
    marks = checks[VAE].upper_bounds()
    # 0.1: two gated challengers beat it, random starts by more; 0.15: 4x steps; 0.2: only an ungated one
    assert marks == {("unclipped", 0.1): (1.5, "apgd_4x_random_starts"), ("unclipped", 0.15): (2.16, "apgd_4x_steps")}
    assert upper_bounds(checks, beaten.keys("mnist", 0.0)) == marks
    assert upper_bounds(checks, beaten.keys("mnist", 0.1)) == {}
    assert upper_bound_note(2.16, "apgd_4x_steps") == "upper bound: 4x steps lowers it by 2.16 nats"
    assert upper_bound_note(1.5, "apgd_4x_random_starts") == "upper bound: apgd_4x_random_starts lowers it by 1.50 nats"


def test_the_tables_mark_upper_bounds_and_say_what_was_checked(beaten, results):
    checks = strength_checks(beaten)
    curves = attack_curve_markdown(beaten, checks)
    unclipped = curves.split("## MNIST, ball clipped")[0]
    vae = next(line for line in unclipped.splitlines() if line.startswith("| VAE "))
    assert vae.count("upper bound") == 2
    assert "(upper bound: apgd_4x_random_starts lowers it by 1.50 nats)" in vae
    assert "(upper bound: 4x steps lowers it by 2.16 nats)" in vae
    assert "upper bound:" not in curves.split("## MNIST, ball clipped")[1].split("| VAE")[1].splitlines()[0]
    assert "checked: VAE (seed 0), proVAE eps_train=0.1 (seeds 0, 1); not checked: none." in curves
    strength = attack_strength_markdown(beaten, checks)
    assert "## MNIST, VAE, seed 0\n" in strength
    assert "| unclipped | curve                     | -75.00 (upper bound: apgd_4x_random_starts lowers it by 1.50 nats)" \
           in strength
    # without its check (the VAE not on `attack_strength.models`), the VAE is not checked: said once under
    # each table, not per cell
    text = attack_curve_markdown(results, strength_checks(results))
    assert "checked: proVAE eps_train=0.1 (seeds 0, 1); not checked: VAE." in text
    assert "upper bound:" not in text.split("\n\n", 2)[2] and text.count("not checked: VAE.") == 2


def test_figure_3_draws_upper_bounds_hollow(beaten, drawn, tmp_path):
    fig3_attack_curves.figure_attack_curves(beaten, "unclipped", tmp_path / "fig3.png", strength_checks(beaten))
    top = drawn[0].axes[0]
    hollow = [line for line in top.get_lines() if line.get_markerfacecolor() == "white"]
    assert len(hollow) == 1 and list(hollow[0].get_xdata()) == [0.1, 0.15]
    assert hollow[0].get_color() == "#000000"  # the VAE's colour
    assert "upper bound (a check beat it)" in [t.get_text() for t in drawn[0].legends[0].get_texts()]


# --- a third certify method ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """The small grid with the ELBO relaxation beside IBP and CROWN."""
    found = make_inputs(tmp_path_factory.mktemp("three"))
    add_certify_method(found, "elbo", seconds=0.5)
    settings = params()
    settings["certify"]["methods"] = ["ibp", "crown", "elbo"]
    return Results(found, settings)


def test_certify_table_lists_every_method_with_its_cost(three):
    text = certify_markdown(three)
    assert text.startswith("# How much tighter than IBP are the relaxations?")
    rows = [line for line in text.split("## MNIST, ball clipped")[0].splitlines() if line.startswith("| proVAE")]
    assert [r.split("|")[2].strip() for r in rows] == ["attacked ELBO", "IBP", "linear relaxation (CROWN)",
                                                       "ELBO relaxation"]
    # the ELBO relaxation's bound: halfway from CROWN's to the attacked ELBO, so it closes more of IBP's gap
    elbo = rows[3].split("|")
    assert elbo[-3].strip() == "0.5" and "%" in elbo[3]
    assert "ELBO drop <= 10% of \\|ELBO\\|" in text  # a '|' in a tau would split the column
    radius_rows = [line for line in text.split("median certified radius")[1].splitlines() if line.startswith("| VAE")]
    assert [r.split("|")[2].strip() for r in radius_rows] == ["IBP", "linear relaxation (CROWN)", "ELBO relaxation"]


def test_figures_draw_every_method_in_its_own_style(three, drawn, tmp_path):
    fig3_attack_curves.figure_attack_curves(three, "unclipped", tmp_path / "fig3.png", {})
    certified_radius.figure_certified_radius(three, tmp_path / "radius.png")
    fig3, radius = drawn
    bottom = fig3.axes[1]
    assert {line.get_linestyle() for line in bottom.get_lines()} == {"-", "--", ":", "-."}
    assert len(bottom.get_lines()) == 2 * 4  # per model: the faint attacked ELBO and three bounds
    assert sum(len(ax.get_lines()) for ax in radius.axes) == 3 * (2 * 3 + 1)  # per tau: 2 models x 3 methods + 1/255
    for fig in (fig3, radius):
        assert "certified bound: ELBO relaxation" in [t.get_text() for t in fig.legends[0].get_texts()]


def test_a_listed_method_a_file_lacks_is_an_error(results, tmp_path):
    settings = params()
    settings["certify"]["methods"] = ["ibp", "crown", "elbo"]
    with pytest.raises(FileNotFoundError, match=r"bounds.csv has no rows of method \['elbo'\]"):
        certify_markdown(Results(results.patterns, settings))


# --- REPRODUCTION's attack-strength paragraph --------------------------------------------------------

def strength_quantities(results: Results, tmp_path) -> dict:
    from provae.report.attack_strength import attack_strength_quantities
    models = [(m.dataset, m.eps, m.seed) for m in results.grid if m.id in results.params["attack_strength"]["models"]]
    return attack_strength_quantities(results, Sources(tmp_path), models, 0.1, tmp_path / "params.yaml")


def test_the_paragraph_separates_the_models_where_the_curve_holds(beaten, tmp_path):
    found = strength_quantities(beaten, tmp_path)
    assert not found["holds"]
    assert [b["model"] for b in found["beaten"]] == ["MNIST VAE (seed 0)"]
    worst = max(-change for (_, _, challenger), (change, _) in BEATEN_CHECK.items() if CHALLENGERS[challenger])
    assert found["beaten"][0]["fall"].value == pytest.approx(worst)  # the gated challengers' largest fall
    assert found["beaten"][0]["declared"] == ("mnist-0.0-0" in beaten.params["attack_strength"]["upper_bound_models"])
    held = [key for key in [(m.dataset, m.eps, m.seed) for m in beaten.grid] if key[1] == 0.1]
    assert found["held"] == " and ".join(", ".join(f"MNIST proVAE eps_train=0.1 (seed {k[2]})" for k in held).rsplit(", ", 1))
    tables = [pd.read_csv(beaten.patterns.path("strength", *key)) for key in held]
    assert found["largest_fall"].value == pytest.approx(max((-t[t["gated"]]["change"]).max() for t in tables))
    assert found["largest_fall"].value < worst  # the VAE's fall is not reported as the held models'


@pytest.mark.parametrize("change", [+50.0, float("nan")])
def test_a_cheaper_setting_far_above_the_curve_or_nan_is_named(inputs, tmp_path, change):
    key = ("mnist", 0.1, 0)
    path = inputs.path("strength", *key)
    saved = path.read_bytes()
    table = pd.read_csv(path)
    table.loc[table.index[~table["gated"]][0], "change"] = change  # one cheaper setting ends far above, or unmeasured
    table.to_csv(path, index=False)
    try:
        found = strength_quantities(Results(inputs, params()), tmp_path)
    finally:
        path.write_bytes(saved)
    assert found["holds"] and not found["cheaper_hold"] and found["cheaper_weaker"] == "MNIST proVAE eps_train=0.1 (seed 0)"
    assert strength_quantities(Results(inputs, params()), tmp_path)["cheaper_hold"]  # the committed check: they keep up
