"""End-to-end: `dvc repro` of the tiny profile in a temporary git repo, plus the data stage's checks.

Uses real MNIST from the offline mirror (`../shared/data`, or $PROVAE_DATA_MIRROR) when present,
else a small generated IDX mirror.
"""

import hashlib
import json
import re
import shutil
import sys
import time

import pandas as pd
import pytest
import yaml

from conftest import ROOT, copy_project, run

pytestmark = pytest.mark.pipeline


def ran_stages(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


@pytest.fixture(scope="module")
def project(tmp_path_factory, env):
    """A fresh git + DVC repo holding the project with the tiny profile, reproduced once and committed."""
    repo = copy_project(tmp_path_factory.mktemp("project"), env)
    first = run(["dvc", "repro"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "tiny results"], repo, env)
    return repo, first.stdout


def test_repro_runs_every_stage_and_writes_the_report(project):
    repo, output = project
    models = ("mnist-0.0-0", "mnist-0.05-0")
    assert sorted(ran_stages(output)) == sorted(
        ["data@mnist", "report", "attack_strength@mnist-0.05-0", "attack_budget@mnist-0.0-0"]
        + [f"{stage}@{model}" for stage in ("train", "evaluate", "fixed_encoder", "certify") for model in models])
    table = (repo / "reports" / "table1.csv").read_text().splitlines()
    assert len(table) == 3 and table[0].startswith("dataset,data,ball,eps_train,lb_train_mean,lb_train_std")
    for figure in ("fig1_adversarial_mnist", "fig2_reconstructions_mnist", "fig3_attack_curves", "fig4_samples_mnist",
                   "training_curves", "certified_radius"):
        assert (repo / "reports" / "figures" / f"{figure}.png").stat().st_size > 1000
    assert re.search(r"^## MNIST.*, proVAE eps_train=0.05, seed 0$", (repo / "reports" / "attack_strength.md").read_text(), re.M)
    provenance = yaml.safe_load((repo / "reports" / "data" / "mnist.json").read_text())
    assert provenance["source"] == "mirror" and provenance["jpeg_copy"] is False


def test_figures_carry_their_provenance(project):
    from PIL import Image

    repo, _ = project
    text = Image.open(repo / "reports" / "figures" / "fig3_attack_curves.png").text
    md5 = hashlib.md5((repo / "models" / "mnist" / "eps0.05-seed0.pt").read_bytes()).hexdigest()
    assert f"mnist-eps0.05-seed0 md5:{md5}" in text["Models"]
    assert json.loads(text["Params"]) == yaml.safe_load((repo / "params.yaml").read_text())
    assert md5 in (repo / "reports" / "README.md").read_text()


def test_status_is_clean_after_repro(project, env):
    repo, _ = project
    assert "Data and pipelines are up to date" in run(["dvc", "status"], repo, env).stdout


def test_certificate_audit_ran_and_passed_in_both_balls(project):
    repo, _ = project
    metrics = json.loads((repo / "reports" / "metrics" / "mnist-eps0.05-seed0.json").read_text())
    assert metrics["violations"] == 0
    assert metrics["lb_test"] <= metrics["lb_test_clipped"] <= metrics["elbo_test"]  # the clipped ball is smaller
    curve = pd.read_csv(repo / "reports" / "attack_curves" / "mnist-eps0.05-seed0.csv")
    tolerance = yaml.safe_load((repo / "params.yaml").read_text())["evaluate"]["audit_tolerance"]
    for ball in ("unclipped", "clipped"):  # within the audit's float slack; NaN fails
        bound = curve[f"bound_{ball}"]
        assert (curve[f"elbo_attacked_{ball}"] >= bound - tolerance * bound.abs()).all()
    # Valid images are a subset of the unclipped ball: its attacks reach at least as low.
    assert (curve["elbo_attacked_unclipped"] <= curve["elbo_attacked_clipped"] + 0.5).all()


def test_metrics_show_one_row_per_model(project, env):
    repo, _ = project
    rows = [line for line in run(["dvc", "metrics", "show"], repo, env).stdout.splitlines()
            if line.startswith("reports/metrics/")]
    assert [row.split()[0] for row in rows] == ["reports/metrics/mnist-eps0.0-seed0.json",
                                                "reports/metrics/mnist-eps0.05-seed0.json"]


def test_attack_strength_compares_every_challenger_with_the_curve(project):
    repo, _ = project
    table = pd.read_csv(repo / "reports" / "attack_strength" / "mnist-eps0.05-seed0.csv")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    strength = params["attack_strength"]
    names = list(strength["challengers"]) + list(strength["cheaper"])
    attacked = [e for e in params["evaluate"]["eps_attack"] if e > 0]
    assert sorted(zip(table["ball"], table["eps_attack"], table["challenger"])) == sorted(
        (ball, eps, name) for ball in ("unclipped", "clipped") for eps in attacked for name in names)
    assert table.loc[table["challenger"].isin(strength["cheaper"]), "gated"].eq(False).all()
    assert not table["beats_curve"].any()  # the stage passed, so no gated challenger beat the curve


def test_attack_strength_fails_when_a_challenger_beats_the_curve(project, env, tmp_path):
    """A negative tolerance makes every challenger 'beat' the curve: the stage must fail and say which."""
    repo, _ = project
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["attack_strength"].update(tolerance_nats=-1.0e9, tolerance_relative=0.0)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        result = run(["dvc", "repro", "attack_strength@mnist-0.05-0"], repo, env, check=False)
    finally:
        run(["git", "checkout", "params.yaml", "reports", "dvc.lock"], repo, env)
    assert result.returncode != 0
    assert "a challenger beat the attack curve" in result.stderr + result.stdout
    assert "apgd_4x_steps" in result.stderr + result.stdout


def test_certify_bounds_both_methods_soundly_and_the_relaxation_is_never_looser(project):
    repo, _ = project
    folder = repo / "reports" / "certify" / "mnist-eps0.05-seed0"
    bounds = pd.read_csv(folder / "bounds.csv").set_index(["ball", "eps_attack", "method"])["bound"].unstack("method")
    assert set(bounds.columns) == {"ibp", "crown"}
    assert (bounds["crown"] >= bounds["ibp"] - 1e-3).all()
    assert pd.read_csv(folder / "bounds.csv")["violations"].eq(0).all()  # the stage passed its audit
    radii = pd.read_csv(folder / "radii.csv").set_index(["image", "tau", "method"])["radius"].unstack("method")
    assert ((radii >= 0) & (radii <= 0.1)).all().all()  # tiny's largest eps_attack
    assert (radii["crown"] >= radii["ibp"]).all()  # a tighter bound certifies at least as far
    assert "## MNIST" in (repo / "reports" / "certify.md").read_text()


def test_fixed_encoder_drop_starts_at_zero_and_grows_with_eps_attack(project):
    repo, _ = project
    table = pd.read_csv(repo / "reports" / "fixed_encoder" / "mnist-eps0.05-seed0.csv")
    for _, part in table.groupby("ball"):
        assert part["fixed_encoder_drop"].iloc[0] == 0 and part["eps_attack"].iloc[0] == 0
        assert part["fixed_encoder_drop"].is_monotonic_increasing  # a larger ball holds the smaller one
    assert "## MNIST" in (repo / "reports" / "fixed_encoder.md").read_text()


def test_adding_a_model_to_the_grid_runs_only_that_model(project, env):
    """`dvc status` lists the stages `dvc repro` would run: only the new model's (and the report)."""
    repo, _ = project

    def to_run() -> list[str]:
        return sorted(json.loads(run(["dvc", "status", "--json"], repo, env).stdout))

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["grid"]["mnist-0.02-0"] = {"dataset": "mnist", "eps": 0.02, "seed": 0}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        assert to_run() == ["certify@mnist-0.02-0", "evaluate@mnist-0.02-0", "fixed_encoder@mnist-0.02-0", "report",
                            "train@mnist-0.02-0"]
        del params["grid"]["mnist-0.02-0"]
        params["grid"]["mnist-0.05-1"] = {"dataset": "mnist", "eps": 0.05, "seed": 1}  # a seed for one eps only
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        # attack_strength runs for its own list of models only.
        assert to_run() == sorted(["report"] + [f"{stage}@mnist-0.05-1" for stage in (
            "train", "evaluate", "fixed_encoder", "certify")])
    finally:
        run(["git", "checkout", "params.yaml"], repo, env)


def audit(repo, env, *skip):
    return run([sys.executable, "scripts/audit.py", *(["--skip", *skip] if skip else [])], repo, env, check=False)


def test_audit_passes_on_the_committed_results(project, env):
    repo, _ = project
    result = audit(repo, env)
    assert result.returncode == 0, result.stdout + result.stderr
    for check in ("checkpoint models/mnist/eps0.05-seed0.pt: md5", "report: reports/figures/fig3_attack_curves.png",
                  "certificate mnist-eps0.05-seed0", "fresh attack mnist-eps0.05-seed0", "re-run mnist-eps0.0-seed0"):
        assert check in result.stdout
    assert run(["git", "status", "--porcelain"], repo, env).stdout == ""  # it wrote nothing


@pytest.mark.parametrize("damage, expected", [
    ("flip a byte", r"checkpoint models/mnist/eps0.05-seed0.pt: md5 .*FAIL"),
    ("truncate", r"checkpoint models/mnist/eps0.05-seed0.pt: loads .*FAIL"),
])
def test_audit_names_a_damaged_checkpoint(project, env, damage, expected):
    repo, _ = project
    path = repo / "models" / "mnist" / "eps0.05-seed0.pt"
    original = path.read_bytes()
    data = bytearray(original)
    if damage == "flip a byte":
        data[len(data) // 2] ^= 0xFF
    else:
        del data[len(data) // 2 :]
    path.write_bytes(bytes(data))
    try:
        result = audit(repo, env, "report", "certificate", "fresh_attack", "rerun")
    finally:
        path.write_bytes(original)
    assert result.returncode == 1 and re.search(expected, result.stdout)


def test_audit_names_an_edited_figure_and_a_changed_param(project, env):
    repo, _ = project
    figure = repo / "reports" / "figures" / "fig4_samples_mnist.png"
    params_path = repo / "params.yaml"
    original_figure, original_params = figure.read_bytes(), params_path.read_text()
    figure.write_bytes(original_figure + b"edited")
    params = yaml.safe_load(original_params)
    params["train"]["lr"] = 0.5
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        result = audit(repo, env, "certificate", "fresh_attack", "rerun")
    finally:
        figure.write_bytes(original_figure)
        params_path.write_text(original_params)
    assert result.returncode == 1
    assert re.search(r"report: reports/figures/fig4_samples_mnist.png .*differs .*FAIL", result.stdout)
    assert re.search(r"checkpoint models/mnist/eps0.05-seed0.pt: metadata .*train_params.*FAIL", result.stdout)
    assert re.search(r"train@mnist-0.05-0: params .*params.yaml changed: train.*FAIL", result.stdout)


def test_branches_compare_params_metrics_and_plots(project, env):
    """Two branches that differ in one param: DVC's diffs show the param, the metrics it moved, the plots."""
    repo, _ = project
    base = run(["git", "rev-parse", "--abbrev-ref", "HEAD"], repo, env).stdout.strip()
    run(["git", "checkout", "-qb", "fewer-attack-steps"], repo, env)
    try:
        params = yaml.safe_load((repo / "params.yaml").read_text())
        params["evaluate"]["apgd_steps"] = 1
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        ran = ran_stages(run(["dvc", "repro"], repo, env).stdout)
        assert "evaluate@mnist-0.05-0" in ran and not any(stage.startswith("train@") for stage in ran)
        run(["git", "add", "-A"], repo, env)
        run(["git", "commit", "-qm", "one APGD step"], repo, env)

        params_diff = run(["dvc", "params", "diff", base], repo, env).stdout
        assert re.search(r"evaluate\.apgd_steps\s+5\s+1", params_diff)
        metrics_diff = run(["dvc", "metrics", "diff", base], repo, env).stdout
        assert re.search(r"reports/metrics/mnist-eps0.05-seed0.json\s+attacked_elbo_eps0_1\s", metrics_diff)
        assert "lb_test " not in metrics_diff  # the certificate did not move: only what the attack changed
        out = repo / "plots_diff"
        run(["dvc", "plots", "diff", base, "-o", str(out)], repo, env)
        page = (out / "index.html").read_text()
        assert "attack_curves" in page and "elbo_attacked_unclipped" in page
    finally:
        run(["git", "checkout", "-q", base], repo, env)
        run(["dvc", "checkout", "-q"], repo, env, check=False)


def test_a_clone_gets_the_models_and_only_prepares_the_data(project, env, tmp_path):
    """Models travel in git: a fresh clone with the data mirror runs the data stage alone."""
    repo, _ = project
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env)
    output = run(["dvc", "repro"], clone, env).stdout
    assert ran_stages(output) == ["data@mnist"]
    assert "Data and pipelines are up to date" in run(["dvc", "status"], clone, env).stdout
    assert run(["git", "status", "--porcelain"], clone, env).stdout == ""


def test_data_stage_rejects_a_corrupted_file(mirror, env, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(mirror / "mnist", broken / "mnist")
    target = broken / "mnist" / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    out = tmp_path / "prepared.npz"
    out.write_bytes(b"earlier output")
    result = run([sys.executable, str(ROOT / "stages" / "data.py"), "--dataset", "mnist", "--out", str(out),
                  "--provenance", str(tmp_path / "p.json"), "--download-root", str(tmp_path / "dl")],
                 ROOT, {**env, "PROVAE_DATA_MIRROR": str(broken)}, check=False)
    assert result.returncode != 0
    assert "t10k-labels-idx1-ubyte.gz does not match its SHA-256" in result.stderr
    assert out.read_bytes() == b"earlier output"


def test_data_stage_rejects_an_unknown_dataset(env, tmp_path):
    result = run([sys.executable, str(ROOT / "stages" / "data.py"), "--dataset", "imagenet", "--out", str(tmp_path / "x"),
                  "--provenance", str(tmp_path / "p.json"), "--download-root", str(tmp_path)], ROOT, env, check=False)
    assert result.returncode != 0 and "unknown dataset 'imagenet'" in result.stderr


def test_sweep_refuses_a_dataset_outside_the_grid(env):
    result = run([sys.executable, str(ROOT / "scripts" / "sigma0_sweep.py"), "queue", "--dataset", "svhn",
                  "--sigma0", "1.0"], ROOT, env, check=False)
    assert result.returncode != 0 and "dataset 'svhn' not in params.yaml's datasets" in result.stderr


def test_train_stage_rejects_negative_eps(env, tmp_path):
    result = run([sys.executable, str(ROOT / "stages" / "train.py"), "--dataset", "mnist", "--eps-train", "-0.1",
                  "--data", str(tmp_path / "d.npz"), "--model", str(tmp_path / "m.pt"), "--live", str(tmp_path / "l")],
                 ROOT, env, check=False)
    assert result.returncode != 0 and "eps must be finite and >= 0" in result.stderr


def test_sigma0_sweep_queues_experiments_and_collects_them_beside_the_baseline(project, env):
    repo, _ = project
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "baseline for the sweep", "--allow-empty"], repo, env)
    run([sys.executable, "scripts/sigma0_sweep.py", "queue", "--sigma0", "0.5"], repo, env)
    run(["dvc", "queue", "start", "--jobs", "1"], repo, env)
    deadline = time.monotonic() + 600
    while re.search(r"\b(Queued|Running)\b", run(["dvc", "queue", "status"], repo, env).stdout):
        assert time.monotonic() < deadline, "the queued sweep experiment did not finish in 10 minutes"
        time.sleep(5)
    run(["dvc", "queue", "stop"], repo, env, check=False)
    assert "sweep-sigma0-0.5" in run(["dvc", "exp", "list", "--name-only"], repo, env).stdout
    run([sys.executable, "scripts/sigma0_sweep.py", "collect"], repo, env)
    table = pd.read_csv(repo / "reports" / "sigma0_sweep" / "sweep.csv")
    vae = table[table["eps_train"] == 0].set_index("sigma0")
    baseline = round(yaml.safe_load((repo / "params.yaml").read_text())["model"]["sigma0"], 4)  # the CSV's rounding
    assert sorted(vae.index) == [0.5, baseline]
    assert vae.loc[0.5, "run"] == "sweep-sigma0-0.5" and vae.loc[baseline, "run"] == "baseline (HEAD)"
    # Reconstruction weighs 1/(2 sigma0^2): twice as much at 0.5 as at 1/sqrt(2), so a lower ELBO.
    assert vae.loc[0.5, "elbo_test"] < vae.loc[baseline, "elbo_test"]
    assert table["median_drop"].notna().all()  # read from every run's per-example outputs
    assert (repo / "reports" / "sigma0_sweep" / "sweep.png").stat().st_size > 1000
    # Another collection (the training-length one) goes to its own folder under its own heading.
    run([sys.executable, "scripts/sigma0_sweep.py", "collect", "--out", "reports/training_length",
         "--title", "Training length (MNIST)"], repo, env)
    assert (repo / "reports" / "training_length" / "sweep.md").read_text().startswith("# Training length (MNIST)\n")
    assert (repo / "reports" / "sigma0_sweep" / "sweep.md").read_text().startswith("# sigma0 sweep (MNIST)\n")
