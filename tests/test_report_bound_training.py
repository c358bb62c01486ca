"""reports/bound_training.md (provae/report/bound_training.py) on tests/report_fixture.py's small grid:
its eps_train 0.1 (seed 0) model trained again on the ELBO-level bound (`make_bound_inputs`: the twin's
files, each quantity moved by `BOUND_CHANGES`). Every expected value below is read from those input
files here, not from the page; the verdict follows the moves' signs."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pandas as pd
import pytest
from report_fixture import (BOUND, TWIN, bound_params, bound_patterns, make_bound_inputs, make_inputs, outputs, paper,
                            params)

from provae.grid import GridModel
from provae.report.bound_training import bound_training_markdown
from provae.report.bound_training_files import EPS_ATTACK, BoundPatterns, bound_models
from provae.report.build import ReportError, build_report
from provae.report.results import Results

LINK = re.compile(r'^\[([^\]]+)\]\(([^ )]+) "([^"]*)"\)')
METHODS = {"ibp": "IBP", "crown": "linear relaxation (CROWN)"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bound")
    found = make_inputs(root / "inputs")
    return found, root / "inputs"


@pytest.fixture(scope="module")
def results(inputs):
    return Results(inputs[0], bound_params())


def with_page(out: Path):
    return dataclasses.replace(outputs(out), bound_training=out / "bound_training.md")


def page_for(results: Results, inputs, tmp_path: Path, **changes) -> str:
    """bound_training.md for TWIN trained on BOUND with ``changes`` to `BOUND_CHANGES`."""
    found, folder = inputs
    bound = make_bound_inputs(found, folder, changes)
    return bound_training_markdown(results, bound, bound_models(results.params), tmp_path / "bound_training.md")


def cells(page: str, label: str) -> list[str]:
    """The cells of the table row whose first cell is ``label`` (a '|' escaped inside a cell stays in it)."""
    escaped = label.replace("|", "\\|")
    line = next(line for line in page.splitlines() if line.startswith(f"| {escaped} |"))
    return [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", line)[1:-1]]


def linked(cell: str, base: Path) -> tuple[str, Path, str]:
    """(the number as shown, the file it links to, its row and column) of a cell."""
    text, source, where = LINK.match(cell).groups()
    return text, (base / source).resolve(), where


# --- the table's numbers, each from its file --------------------------------------------------------

def expected_rows(found, bound: BoundPatterns) -> dict:
    """label -> (twin's file, ours, twin's value, ours, format): read from the fixture's files."""
    files = {"twin": lambda kind: found.path(kind, *TWIN), "ours": lambda kind: bound.path(kind, BOUND, *TWIN)}
    side = {}
    for who, path in files.items():
        metrics = json.loads(path("metrics").read_text())
        bounds, radii = pd.read_csv(path("certify") / "bounds.csv"), pd.read_csv(path("certify") / "radii.csv")
        curve = pd.read_csv(path("curves"))
        side[who] = {"clean test ELBO": (path("metrics"), metrics["elbo_test"], "{:.2f}"),
                     f"certified bound (IBP) at eps_train {TWIN[1]:g}, test set": (path("metrics"), metrics["lb_test"], "{:.2f}")}
        for a in EPS_ATTACK:
            for method, title in METHODS.items():
                row = bounds[(bounds["ball"] == "unclipped") & (bounds["eps_attack"] == a) & (bounds["method"] == method)]
                assert len(row) == 1  # one seed: the file's row is already the mean over certify's images
                side[who][f"certified bound ({title}) at eps_attack {a:g}, certify's images"] = (
                    path("certify") / "bounds.csv", float(row["bound"].iloc[0]), "{:.2f}")
            side[who][f"attacked ELBO at eps_attack {a:g}"] = (
                path("curves"), float(curve.loc[curve["eps_attack"] == a, "elbo_attacked_unclipped"].iloc[0]), "{:.2f}")
        for tau in dict.fromkeys(radii["tau"]):
            for method, title in METHODS.items():
                median = radii[(radii["tau"] == tau) & (radii["method"] == method)]["radius"].median()
                side[who][f"median certified radius ({title}), ELBO drop <= {tau}"] = (
                    path("certify") / "radii.csv", float(median), "{:.4f}")
    return {label: (*side["twin"][label][:2], *side["ours"][label][:2], side["twin"][label][2]) for label in side["twin"]}


def test_one_model_the_table_holds_its_files_numbers(results, inputs, tmp_path):
    page = page_for(results, inputs, tmp_path)
    rows = expected_rows(inputs[0], bound_patterns(inputs[1]))
    assert len(rows) == 2 + 2 * len(METHODS) + 2 + 3 * len(METHODS)  # clean, LB; bounds, attacked at 0.05, 0.1; 3 taus
    for label, (twin_file, twin, ours_file, ours, fmt) in rows.items():
        _, twin_cell, ours_cell, diff = cells(page, label)
        assert linked(twin_cell, tmp_path)[:2] == (fmt.format(twin), twin_file.resolve()), label
        assert linked(ours_cell, tmp_path)[:2] == (fmt.format(ours), ours_file.resolve()), label
        assert diff == fmt.replace("{:", "{:+").format(ours - twin), label
    assert "## MNIST, proVAE eps_train=0.1, seed 0" in page
    assert "| quantity | IBP-trained (`mnist-eps0.1-seed0`) | elbo_crown-trained (`mnist-elbo_crown-eps0.1-seed0`) |" in page


def test_the_wall_time_and_its_device(results, inputs, tmp_path):
    found, folder = inputs
    twin = json.loads((found.path("eval", *TWIN) / "details.json").read_text())["training"]
    page = page_for(results, inputs, tmp_path, seconds=3 * twin["seconds"])
    _, mine, ours, diff = cells(page, "training wall time")
    assert mine.endswith(f" s on {twin['device']}") and linked(mine, tmp_path)[0] == f"{twin['seconds']:.1f}"
    assert linked(ours, tmp_path)[0] == f"{3 * twin['seconds']:.1f}"
    assert diff == f"{2 * twin['seconds']:+.1f} s (x3.00)"
    page = page_for(results, inputs, tmp_path, device="cpu")
    assert cells(page, "training wall time")[3] == f"n/a: trained on {twin['device']} and cpu"


# --- the verdict ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("changes", "word", "robust", "cheap"), [
    ({}, "partly supported", "yes", "no"),                                   # tighter certificates, at a cost in clean ELBO
    ({"clean": 0.8}, "supported", "yes", "yes"),                             # both
    ({"lb": -2.5, "certified": -3.0}, "not supported", "no", "no"),          # neither
    ({"lb": -2.5, "certified": -3.0, "clean": 0.8}, "partly supported", "no", "yes"),
    ({"certified": -3.0, "clean": 0.8}, "partly supported", "no", "yes"),   # lower at eps_attack 0.1 alone
])
def test_the_verdict_follows_the_inputs(results, inputs, tmp_path, changes, word, robust, cheap):
    page = page_for(results, inputs, tmp_path, **changes)
    verdict = page.split("## Verdict", 1)[1]
    assert f"The claim is {word} here (higher certified bounds at eps_train and at eps_attack 0.1 by every certify " \
           f"method: {robust}; a clean ELBO at least the twin's: {cheap})" in verdict
    assert f"is {word} for mnist-0.1-0." in verdict
    found = inputs[0]
    clean = json.loads(bound_patterns(inputs[1]).path("metrics", BOUND, *TWIN).read_text())["elbo_test"] \
        - json.loads(found.path("metrics", *TWIN).read_text())["elbo_test"]
    assert (f"a gain of {clean:.2f} nats" if clean > 0 else f"a cost of {-clean:.2f} nats") in verdict
    lb = "higher than" if changes.get("lb", 1) > 0 else "lower than"
    assert f"at eps_train 0.1 is {lb} its IBP-trained twin's" in verdict


# --- the empty list, the grid check, the wiring ------------------------------------------------------

def test_an_empty_list_writes_the_placeholder_page_and_its_index_entry(inputs, tmp_path):
    settings = params()
    settings["bound_training"] = {"bound": BOUND, "models": {}}
    out = with_page(tmp_path)
    build_report(inputs[0], out, settings, paper())  # no --bound-* patterns needed
    page = out.bound_training.read_text()
    assert page.startswith(f"# Training on the ELBO-level bound: {BOUND} beside IBP\n\nNo model is listed yet")
    assert "`bound_training.models`" in page and "`dvc repro`" in page and "|" not in page
    assert "`mnist-0.1-0: {dataset: mnist, eps: 0.1, seed: 0}`" in page  # a model of this grid, as the example
    assert "| [bound_training.md](bound_training.md) | Training on the ELBO-level bound" in out.index.read_text()


def test_the_report_writes_the_page_and_indexes_both_models(inputs, tmp_path):
    bound = make_bound_inputs(*inputs)
    out = with_page(tmp_path / "out")
    build_report(inputs[0], out, bound_params(), paper(), None, bound)
    assert "## Verdict" in out.bound_training.read_text()
    entry = next(line for line in out.index.read_text().splitlines() if "[bound_training.md]" in line)
    assert entry.endswith("| mnist-eps0.1-seed0, mnist-elbo_crown-eps0.1-seed0 |")


def test_a_listed_model_outside_the_grid_is_refused_naming_it(inputs, tmp_path):
    settings = bound_params(models=[("mnist", 0.05, 0)])
    with pytest.raises(ReportError, match=r"bound_training.models names models that are not in the grid .*'mnist-0.05-0'"):
        build_report(inputs[0], with_page(tmp_path), settings, paper(), None, bound_patterns(inputs[1]))
    assert not list(tmp_path.iterdir())  # refused before anything is written


def test_a_listed_model_needs_the_page_and_its_patterns(inputs, tmp_path):
    with pytest.raises(ReportError, match=r"bound_training.models lists \['mnist-0.1-0'\]: the report needs"):
        build_report(inputs[0], outputs(tmp_path), bound_params(), paper())
    with pytest.raises(ReportError, match="--bound-"):
        build_report(inputs[0], with_page(tmp_path), bound_params(), paper())


def test_a_missing_output_names_the_stage_that_writes_it(results, inputs, tmp_path):
    bound = make_bound_inputs(*inputs)
    path = bound.path("metrics", BOUND, *TWIN)
    saved = path.read_bytes()
    path.unlink()
    try:
        with pytest.raises(FileNotFoundError, match="mnist-elbo_crown-eps0.1-seed0.json is missing: run evaluate_bound@mnist-0.1-0"):
            bound_training_markdown(results, bound, [GridModel(*TWIN)], tmp_path / "page.md")
    finally:
        path.write_bytes(saved)


def test_a_pattern_without_the_bound_would_name_the_twin_and_is_refused(inputs):
    paths = vars(bound_patterns(inputs[1]))
    with pytest.raises(ValueError, match=r"\['metrics'\] have no \{bound\}"):
        BoundPatterns(**{**paths, "metrics": paths["metrics"].replace("{bound}-", "")})


def test_a_vacuous_bound_is_no_difference_and_counts_as_lower(results, inputs, tmp_path):
    page = page_for(results, inputs, tmp_path, certified=float("-inf"))  # every certify bound of ours: -inf
    _, twin, ours, diff = cells(page, "certified bound (IBP) at eps_attack 0.1, certify's images")
    assert linked(ours, tmp_path)[0] == "-inf" and linked(twin, tmp_path)[0] != "-inf" and diff == "n/a"
    assert "at eps_attack 0.1 it is lower by IBP (one of the two vacuous)" in page
    assert "The claim is not supported here (higher certified bounds at eps_train and at eps_attack 0.1 by every " \
           "certify method: no; a clean ELBO at least the twin's: no)" in page  # BOUND_CHANGES: a cost in clean ELBO


def rendered_reproduction(inputs, tmp_path, settings, bound, name) -> str:
    from provae.report.build import Page
    from test_report_reproduction import ROOT, TEMPLATE
    out = dataclasses.replace(with_page(tmp_path / name), reproduction=tmp_path / name / "REPRODUCTION.md")
    page = Page(template=TEMPLATE, paper=ROOT / "references" / "paper.json", params=ROOT / "params.yaml")
    build_report(inputs[0], out, settings, paper(), page, bound)
    return out.reproduction.read_text()


def bullet(page: str, model: str) -> str:
    """REPRODUCTION.md's bullet on a bound-trained model, up to its verdict."""
    start = page.index(f"- {model}, seed 0: clean test ELBO")
    return page[start:page.index("here.", start)]


def test_reproduction_gives_each_models_numbers_and_verdict(inputs, tmp_path):
    found, folder = inputs
    bound = make_bound_inputs(found, folder, {"seconds": 700.0})
    page = rendered_reproduction(inputs, tmp_path, bound_params(), bound, "listed")
    text = bullet(page, "MNIST proVAE eps_train=0.1")
    rows = expected_rows(found, bound)
    base = tmp_path / "listed"
    numbers = [linked(c, base)[:2] for c in re.findall(r"\[[^\]]+\]\([^ )]+ \"[^\"]*\"\)", text)]
    for label in ("clean test ELBO", "certified bound (IBP) at eps_train 0.1, test set",
                  "certified bound (IBP) at eps_attack 0.1, certify's images",
                  "certified bound (linear relaxation (CROWN)) at eps_attack 0.1, certify's images",
                  next(label for label in rows if label.startswith("median certified radius (IBP)"))):
        twin_file, twin, ours_file, ours, fmt = rows[label]
        at = numbers.index((fmt.format(ours), ours_file.resolve()))  # ours first, then the twin's
        assert numbers[at + 1] == (fmt.format(twin), twin_file.resolve()), label
    twin_seconds = json.loads((found.path("eval", *TWIN) / "details.json").read_text())["training"]["seconds"]
    assert "times as long, both on" in text and f"({700.0 / twin_seconds:.1f} times as long" in text
    assert "ELBO drop at most 5 nats)" in text and "nats nats" not in page  # the tau as radii.csv names it
    assert "The claim is **partly supported**" in text  # BOUND_CHANGES: tighter bounds, a cost in clean ELBO
    assert "Over the listed models the claim is partly supported for mnist-0.1-0" in page
    assert "no model is trained on it yet" not in page and "the claim\nis untested" not in page
    on_other = rendered_reproduction(inputs, tmp_path, bound_params(), make_bound_inputs(found, folder, {"device": "cpu"}),
                                     "other")
    assert "cpu: not comparable; `make benchmark`" in bullet(on_other, "MNIST proVAE eps_train=0.1") and "times as long" not in on_other


def test_reproduction_says_when_no_model_was_trained_on_the_bound(inputs, tmp_path):
    empty = " ".join(rendered_reproduction(inputs, tmp_path, bound_params(models=[]), None, "empty").split())
    assert "No model is trained on it yet" in empty and "no model is trained on it yet, so the hypothesis above is " \
        "untested." in empty and "Over the listed models" not in empty
