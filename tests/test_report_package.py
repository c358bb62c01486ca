"""The report package on a small grid (tests/report_fixture.py): every artifact written, each
figure's provenance, byte-identical re-runs, and the errors a wrong grid gives."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from PIL import Image
from report_fixture import ROOT, make_inputs, outputs, paper, params

from provae.report.build import ReportError, build_report

FIGURES = ["fig1_adversarial_mnist.png", "fig2_reconstructions_mnist.png", "fig4_samples_mnist.png",
           "fig3_attack_curves.png", "fig3_attack_curves_clipped.png", "training_curves.png", "certified_radius.png",
           "attack_budget.png"]
TABLES = ["table1.md", "table1.csv", "table1.tex", "attack_curves.md", "attack_strength.md", "attack_budget.md",
          "fixed_encoder.md", "certify.md", "metrics.json", "README.md"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    found = make_inputs(root / "inputs")
    out = root / "out"
    build_report(found, outputs(out), params(), paper())
    first = {name: path.read_bytes() for name, path in files(out).items()}
    build_report(found, outputs(out), params(), paper())  # again, into the same paths
    return {"root": root, "patterns": found, "out": out, "first": first}


def files(out: Path) -> dict:
    return {p.relative_to(out).as_posix(): p for p in sorted(out.rglob("*")) if p.is_file()}


def test_every_artifact_is_written_and_indexed(report):
    written = files(report["out"])
    assert set(written) == set(TABLES) | {f"figures/{name}" for name in FIGURES}
    index = (report["out"] / "README.md").read_text()
    for name in FIGURES + ["attack_curves.md", "attack_strength.md", "attack_budget.md", "certify.md", "fixed_encoder.md"]:
        assert f"{name})" in index, name
    assert "| mnist-eps0.1-seed1 |" in index and "2 seed(s) [0, 1]" in index


def test_a_rerun_is_byte_identical(report):
    again = {name: path.read_bytes() for name, path in files(report["out"]).items()}
    assert again == report["first"]


def test_each_png_names_its_models_and_params_and_no_time(report):
    for name in FIGURES:
        text = Image.open(report["out"] / "figures" / name).text
        assert set(text) == {"Title", "Software", "Models", "Params", "Commit"}, name
        assert json.loads(text["Params"]) == json.loads(json.dumps(params(), sort_keys=True))
        assert ("mnist-eps0.0-seed0" if name == "attack_budget.png" else "mnist-eps0.1-seed0") + " md5:" in text["Models"]
    assert Image.open(report["out"] / "figures" / "attack_budget.png").text["Models"].count("md5:") == 1  # its one model
    models = Image.open(report["out"] / "figures" / "fig3_attack_curves.png").text["Models"]
    assert models.count("md5:") == 4  # every model of the grid


def test_tables_show_the_spread_over_seeds(report):
    curves = (report["out"] / "attack_curves.md").read_text()
    assert "±" in curves and "proVAE eps_train=0.1 vs VAE" in curves
    table = (report["out"] / "table1.md").read_text()
    assert "-40.11 ± 1.06 (-43.41)" in table  # seeds 1.5 nats apart: sample std 1.5 / sqrt(2)
    summary = json.loads((report["out"] / "metrics.json").read_text())
    assert set(summary["mnist"]) == {"eps_train_0", "eps_train_0_1"}


def test_a_missing_output_names_the_file(report, tmp_path):
    found = report["patterns"]
    metrics = found.path("metrics", "mnist", 0.1, 1)
    saved = metrics.read_bytes()
    metrics.unlink()
    try:
        with pytest.raises(FileNotFoundError, match="mnist-eps0.1-seed1.json is missing: evaluate"):
            build_report(found, outputs(tmp_path), params(), paper())
    finally:
        metrics.write_bytes(saved)


def test_example_models_outside_the_grid_are_an_error(report, tmp_path):
    wrong = params()
    wrong["report"]["example_eps_train"] = [0.0, 0.05]
    with pytest.raises(ReportError, match=r"example_eps_train \[0.05\]"):
        build_report(report["patterns"], outputs(tmp_path), wrong, paper())
    wrong = params()
    wrong["report"]["example_seed"] = 7
    with pytest.raises(ReportError, match="example_seed 7"):
        build_report(report["patterns"], outputs(tmp_path), wrong, paper())


def test_modules_are_small_and_say_what_they_reproduce():
    for path in sorted((ROOT / "provae" / "report").glob("*.py")):
        text = path.read_text()
        assert len(text.splitlines()) <= 250, path.name
        docstring = ast.get_docstring(ast.parse(text))
        assert docstring, path.name
        if path.stem not in {"__init__", "results", "plotting", "build", "reproduction"}:
            assert "paper" in docstring, path.name  # which paper figure or table, or that it has no counterpart
    stage = (ROOT / "stages" / "report.py").read_text()
    assert len(stage.splitlines()) < 80 and "def " in stage and "plt." not in stage


def test_the_package_reads_no_params_file():
    for path in sorted((ROOT / "provae" / "report").glob("*.py")):
        imported = {alias.name for node in ast.walk(ast.parse(path.read_text()))
                    if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
        imported |= {node.module for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ImportFrom)}
        assert not imported & {"yaml", "common", "load_params"}, path.name
