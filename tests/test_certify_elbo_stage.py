"""End to end: the tiny profile with one model of its grid on `certify_elbo.models` and a few
`certify_elbo.examples`. `dvc repro` certifies it with `certify_elbo.methods` (IBP, the box-wise
relaxation, the ELBO relaxation) on the first images certify certifies, in the model's headline ball
only, and the report adds that section to reports/certify.md; a model outside the grid on the list
is refused, naming the stage and the model."""

import json
import re
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from conftest import LISTED as MODEL, LISTED_EXAMPLES as EXAMPLES, run

from provae.report.results import BALL_TITLES

pytestmark = pytest.mark.pipeline

NAME = "mnist-eps0.05-seed0"
OUTSIDE = {"mnist-0.1-0": {"dataset": "mnist", "eps": 0.1, "seed": 0}}  # not in the tiny grid
BOUND_COLUMNS = ["ball", "eps_attack", "method", "bound", "attacked_elbo", "gap", "violations", "seconds_per_image"]


@pytest.fixture(scope="module")
def project(listed_project):
    return listed_project


def files(repo):
    folder = repo / "reports" / "certify_elbo" / NAME
    return pd.read_csv(folder / "bounds.csv"), pd.read_csv(folder / "radii.csv")


def headline(params) -> str:
    return "clipped" if params["clip"] else "unclipped"


def test_repro_runs_the_stage_and_the_report(project):
    _, _, _, output = project
    ran = re.findall(r"Running stage '([^']+)'", output)
    assert {"certify_elbo@mnist-0.05-0", "report"} <= set(ran)
    assert not [stage for stage in ran if stage.startswith("certify_elbo@") and stage != "certify_elbo@mnist-0.05-0"]


def test_bounds_hold_every_method_in_the_headline_ball_only_soundly_and_in_order(project):
    repo, _, params, _ = project
    bounds, _ = files(repo)
    methods = params["certify_elbo"]["methods"]
    eps = [float(e) for e in params["evaluate"]["eps_attack"]]
    assert methods == ["ibp", "crown", "elbo"]
    assert list(bounds.columns) == BOUND_COLUMNS
    assert set(bounds["ball"]) == {headline(params)}
    assert sorted(zip(bounds["eps_attack"], bounds["method"])) == sorted((e, m) for e in eps for m in methods)
    assert bounds["violations"].eq(0).all()  # the stage passed its audit
    table = bounds.set_index(["eps_attack", "method"])
    for e in eps:  # means over the same images, each ordered per image
        assert table.loc[(e, "elbo"), "bound"] >= table.loc[(e, "crown"), "bound"] >= table.loc[(e, "ibp"), "bound"]
        assert table.loc[(e, "attacked_elbo")].nunique() == 1  # one attack, audited against each method
        # The audit's float slack: at eps 0 each bound is the ELBO by another arithmetic path, and on
        # some CPUs it rounds a few ulps above the attacked (= clean) ELBO. NaN still fails.
        slack = params["evaluate"]["audit_tolerance"] * table.loc[(e, "attacked_elbo")].abs()
        assert (table.loc[(e, "bound")] <= table.loc[(e, "attacked_elbo")] + slack).all()
    at_zero = table.loc[0.0]
    assert at_zero["bound"].to_numpy() == pytest.approx([at_zero["attacked_elbo"].iloc[0]] * 3, rel=1e-4)
    assert table.loc[(max(eps), "crown"), "bound"] > table.loc[(max(eps), "ibp"), "bound"]


def test_radii_hold_each_image_method_and_tau_on_certifys_first_images(project):
    """examples x methods x taus rows; IBP's and the box-wise relaxation's radii are certify's own for
    its first images (the same images and noise, in the same ball)."""
    repo, _, params, _ = project
    _, radii = files(repo)
    p = params["certify"]
    taus = len(p["tau_nats"]) + len(p["tau_relative"])
    assert EXAMPLES < p["examples"]
    assert len(radii) == EXAMPLES * 3 * taus
    assert sorted(set(radii["image"])) == list(range(EXAMPLES))
    assert set(radii["ball"]) == {headline(params)}
    assert ((radii["radius"] >= 0) & (radii["radius"] <= max(params["evaluate"]["eps_attack"]) + 1e-6)).all()
    wide = radii.set_index(["image", "tau", "method"])["radius"].unstack("method")
    assert (wide["elbo"] >= wide["crown"]).all() and (wide["crown"] >= wide["ibp"]).all()
    certify = pd.read_csv(repo / "reports" / "certify" / NAME / "radii.csv")
    certify = certify[(certify["image"] < EXAMPLES) & (certify["ball"] == headline(params))]
    mine = radii[radii["method"].isin(["ibp", "crown"])]
    keys = ["image", "method", "tau"]
    merged = mine.merge(certify, on=keys, suffixes=("", "_certify"), validate="one_to_one")
    assert len(merged) == len(mine) == EXAMPLES * 2 * taus
    assert merged["radius"].to_numpy() == pytest.approx(merged["radius_certify"].to_numpy(), abs=1e-6)


def test_certify_md_gains_the_section(project):
    repo, _, params, _ = project
    page = (repo / "reports" / "certify.md").read_text()
    title = f": the ELBO itself as the specification (first {EXAMPLES} images, {BALL_TITLES[headline(params)]})"
    heading = re.search(rf"^## [^\n]*{re.escape(title)}$", page, re.M)
    assert heading, page[-2000:]
    section = page[heading.start():]
    assert "`certify_elbo.models`" in section and "proVAE eps_train=0.05, seed 0" in section


def test_status_is_clean_after_repro(project):
    repo, env, _, _ = project
    assert json.loads(run(["dvc", "status", "--json"], repo, env).stdout) == {}


def test_a_model_outside_the_grid_is_refused_naming_the_stage_and_the_model(project, tmp_path):
    """Listed beside the model of the grid: its stage script refuses before loading anything (its
    model is missing), and so does the stage of the model of the grid when it runs (here forced);
    `dvc repro` stops at the outside model's stage, which names it (DVC's own message: its
    checkpoint is missing). Afterwards, with the list restored, nothing is out of date."""
    repo, env, params, _ = project
    saved = (repo / "params.yaml").read_text()
    outputs = repo / "reports" / "certify_elbo" / NAME
    shutil.copytree(outputs, tmp_path / "kept")  # a failed stage's outputs are removed: put back after
    listed = {**params, "certify_elbo": {**params["certify_elbo"], "models": {**MODEL, **OUTSIDE}}}
    (repo / "params.yaml").write_text(yaml.safe_dump(listed, sort_keys=False))
    written = tmp_path / "written"
    try:
        script = subprocess.run(
            [sys.executable, "stages/certify_elbo.py", "--eps-train", "0.1", "--seed", "0",
             "--model", "models/mnist/eps0.1-seed0.pt", "--data", "data/prepared/mnist.npz",
             "--per-example", "reports/eval/mnist-eps0.1-seed0/per_example.npz",
             "--bounds", str(written / "bounds.csv"), "--radii", str(written / "radii.csv")],
            cwd=repo, env=env, capture_output=True, text=True)
        whole = run(["dvc", "repro"], repo, env, check=False)
        forced = run(["dvc", "repro", "--single-item", "--force", "certify_elbo@mnist-0.05-0"], repo, env, check=False)
    finally:
        (repo / "params.yaml").write_text(saved)
        shutil.rmtree(outputs, ignore_errors=True)
        shutil.copytree(tmp_path / "kept", outputs)
    refusal = "certify_elbo stage failed: certify_elbo.models names models that are not in the grid"
    assert script.returncode != 0 and not written.exists()
    assert script.stderr.strip().splitlines()[-1].startswith(refusal) and "mnist-0.1-0" in script.stderr
    assert whole.returncode != 0 and "failed to reproduce 'certify_elbo@mnist-0.1-0'" in whole.stderr
    assert forced.returncode != 0
    said = forced.stdout + forced.stderr
    assert refusal in said and "mnist-0.1-0" in said
    assert json.loads(run(["dvc", "status", "--json"], repo, env).stdout) == {}
