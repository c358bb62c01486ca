"""REPRODUCTION.md from its template: no number typed into the prose, the one spread and verdict
rule by hand, a changed CSV value changes the page, the page is byte-reproducible, and every git
ref it names exists (tests/report_fixture.py's small grid; the committed template)."""

from __future__ import annotations

import math
import shutil
import subprocess

import pandas as pd
import pytest
from report_fixture import ROOT, make_inputs, outputs, paper, params

from provae.grid import product
from provae.report.build import Page, build_report
from provae.report.reproduction import (EARLIER_GRID, Sources, claim_verdict, compare, crossing, degree,
                                        hand_typed_numbers, render_reproduction)
from provae.report.results import spread

TEMPLATE = ROOT / "reports" / "REPRODUCTION.md.j2"


def test_the_committed_template_types_no_number():
    assert hand_typed_numbers(TEMPLATE.read_text()) == []


def test_a_typed_digit_fails_and_names_are_allowed(tmp_path):
    assert hand_typed_numbers("as Figure 3 and Table 1 show, eq. 15 holds on CIFAR-10 in [0, 1]") == []
    assert hand_typed_numbers("{{ c.loss }} nats at eps_attack {{ c.eps }} {% if x > 2 %}a{% endif %}") == []
    assert hand_typed_numbers("the VAE loses 47.4 nats\nfine\nat eps 0.1") == ["the VAE loses 47.4 nats", "at eps 0.1"]
    template = tmp_path / "page.md.j2"
    template.write_text("The VAE loses {{ loss }} nats, 3 times more.\n")
    with pytest.raises(ValueError, match="3 times more"):
        render_reproduction(template, {"loss": 47})
    template.write_text("The VAE loses {{ loss }} nats.\n")
    assert render_reproduction(template, {"loss": 47}) == "The VAE loses 47 nats.\n"
    with pytest.raises(Exception, match="loss"):  # a name the context lacks fails; it never renders empty
        render_reproduction(template, {})


def test_the_spread_rule_by_hand():
    one, other = spread([-40.0]), spread([-45.0])
    assert compare(one, other) .word == "above" and compare(one, other).beyond_spread is None
    assert compare(one, other).spread_note == "one seed: no spread to judge against"
    low, high = spread([-75.5, -67.4, -72.6]), spread([-49.1, -50.0, -48.7])
    assert compare(high, low).word == "above" and compare(high, low).beyond_spread is True
    assert compare(low, spread([-70.0, -60.0])).beyond_spread is False  # ranges overlap
    assert compare(spread([-28.54]), -28.36, tolerance=0.05 * 28.36).word == "matches"
    assert compare(spread([-48.76]), -44.39, tolerance=0.05 * 44.39).word == "below"
    assert math.isclose(compare(spread([-48.76]), -44.39).difference, -4.37)


def test_crossing_degree_and_verdict_by_hand():
    x = [0.0, 0.05, 0.1, 0.2]
    assert crossing(x, [-3, 1, 2, 3]) == (0.0, 0.05)
    assert crossing(x, [-3, 1, -2, 3]) == (0.1, 0.2)  # above for good only from 0.2
    assert crossing(x, [1, 1, 2, 3]) == (None, 0.0)
    assert crossing(x, [-1, 1, 2, -3]) == (0.2, None)
    assert [degree(r) for r in (2.89, 1.5, 1.09, 0.5)] == ["far more", "more", "about as", "less"]
    assert [claim_verdict(c) for c in ([True, True], [True, False], [False])] == ["reproduces", "partly",
                                                                                 "does not reproduce"]


def test_a_quantity_links_to_its_source(tmp_path):
    src = Sources(tmp_path / "reports")
    q = src.q(-75.4615, "{:.2f}", tmp_path / "reports" / "attack_curves" / "m.csv", "row eps_attack=0.1")
    assert str(q) == '[-75.46](attack_curves/m.csv "row eps_attack=0.1")'
    assert src.q(-3.27357e16, "{:.1f}", None, "").text == "-3.27e+16"  # a vacuous bound: three digits, not 17
    low, high = src.q(0.4, "{:.1f}", None, "a"), src.q(13.5, "{:.1f}", None, "b")
    assert src.span([high, low], "{:.1f}").text == '[0.4]( "a")-[13.5]( "b")'


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    root = tmp_path_factory.mktemp("page")
    found = make_inputs(root / "inputs")
    template = root / "REPRODUCTION.md.j2"
    shutil.copy(TEMPLATE, template)
    out = outputs(root / "out")
    out = type(out)(**{**out.__dict__, "reproduction": root / "out" / "REPRODUCTION.md"})
    setting = Page(template=template, paper=ROOT / "references" / "paper.json", params=ROOT / "params.yaml")
    build_report(found, out, params(), paper(), setting)
    return {"patterns": found, "outputs": out, "page": setting, "text": out.reproduction.read_text()}


def test_the_page_renders_every_section_and_is_byte_reproducible(page):
    text = page["text"]
    for heading in ("## In short", "## Table 1, ours beside the paper's", "### Claim 1", "### Claim 2", "### Claim 3",
                    "## Beyond the paper", "## The attack"):
        assert heading in text
    assert "**reproduces**" in text and "[object" not in text and "None" not in text
    assert "mean over seeds [0, 1]" in text  # the fixture's two seeds: the spread rule has something to judge
    # the attack budget (tests/report_fixture.py's ladder): converged in one ball, not in the other
    assert "The budget the curve's attack needs" in text and "it needs [400](../inputs/attack_budget/mnist-eps0.0" in text
    assert "four times the steps still lowers it by [1.00](../inputs/attack_budget/mnist-eps0.0" in text
    assert "Cost per image and eps: IBP " in text and ", linear relaxation (CROWN) " in text
    assert "REPRODUCTION.md" in (page["outputs"].index).read_text()
    build_report(page["patterns"], page["outputs"], params(), paper(), page["page"])
    assert page["outputs"].reproduction.read_text() == text


def test_a_changed_csv_value_changes_the_page(page, tmp_path):
    found = page["patterns"]
    curves = found.path("curves", "mnist", 0.0, 1)
    saved = curves.read_bytes()
    table = pd.read_csv(curves)
    table.loc[table["eps_attack"] == 0.1, "elbo_attacked_unclipped"] -= 100.0
    table.to_csv(curves, index=False)
    vae = [pd.read_csv(found.path("curves", "mnist", 0.0, seed)).set_index("eps_attack").loc[0.1, "elbo_attacked_unclipped"]
           for seed in (0, 1)]
    out = outputs(tmp_path)
    out = type(out)(**{**out.__dict__, "reproduction": tmp_path / "REPRODUCTION.md"})
    try:
        build_report(found, out, params(), paper(), page["page"])
    finally:
        curves.write_bytes(saved)
    changed = out.reproduction.read_text()
    moved = f"[{sum(vae) / 2:.2f}]("  # the VAE's mean over seeds at eps_attack 0.1, in Claim 2's table
    assert moved in changed and moved not in page["text"]


def git_has(ref: str) -> bool:
    result = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"],
                            capture_output=True)
    return result.returncode == 0


def test_the_earlier_grid_is_a_commit_of_mains_history(page):
    """The page cites the grid before this one by a commit a fresh clone has (tests/test_refs.py checks
    every ref the committed documents and this template name)."""
    if not git_has("HEAD"):
        pytest.skip("not a git checkout")
    ancestry = subprocess.run(["git", "-C", str(ROOT), "merge-base", "--is-ancestor", EARLIER_GRID["commit"], "HEAD"])
    assert ancestry.returncode == 0
    assert f"git show {EARLIER_GRID['commit']}:reports/REPRODUCTION.md" in page["text"]
    assert "mnist-seeds" not in page["text"] and "sigma0-1-clipped" not in page["text"]


def test_open_names_what_is_still_missing(page, tmp_path):
    """'Open' is computed: the models with one seed, the models whose attack does not converge within
    the ladder's cap, the models without a strength check; an item with nothing in it is left out."""
    still = page["text"].split("## Open")[1]
    assert "**Seeds**" not in still  # every model of the fixture has two seeds
    assert "- **The attack where it does not converge**: MNIST VAE: the" in still  # the ladder's clipped ball
    assert "attack-strength check** of" not in still
    ragged = params()
    ragged["grid"] = {k: v for k, v in ragged["grid"].items() if not (v["eps"] == 0.1 and v["seed"] == 1)}
    ragged["attack_strength"]["models"] = product(["mnist"], [0.1], [0])
    out = outputs(tmp_path)
    out = type(out)(**{**out.__dict__, "reproduction": tmp_path / "REPRODUCTION.md"})
    build_report(page["patterns"], out, ragged, paper(), page["page"])
    text = out.reproduction.read_text()
    assert "differences have no spread to be judged against: MNIST: proVAE eps_train=0.1." in text.split("## Open")[1]
    assert "one seed (MNIST: proVAE eps_train=0.1), its differences" in text
    assert "one seed (MNIST: none), its differences" in page["text"]
