"""End-to-end: `dvc repro` of the tiny profile in a temporary git repo, plus the data stage's checks.

Uses real MNIST from the offline mirror (`../shared/data`, or $PROVAE_DATA_MIRROR) when present,
else a small generated IDX mirror.
"""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import write_idx_mirror

ROOT = Path(__file__).resolve().parent.parent
PROJECT_FILES = ["provae", "stages", "scripts", "profiles", "references", "dvc.yaml", "params.yaml",
                 "pyproject.toml", ".gitignore"]
pytestmark = pytest.mark.pipeline


def run(args, cwd, env, check=True):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}")
    return result


def ran_stages(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    configured = os.environ.get("PROVAE_DATA_MIRROR") or ROOT.parent / "shared" / "data"
    if (Path(configured) / "mnist" / "SHA256SUMS").is_file():
        return Path(configured).resolve()
    return write_idx_mirror(tmp_path_factory.mktemp("mirror"))


@pytest.fixture(scope="module")
def env(mirror):
    bin_dir = Path(sys.executable).parent
    return {**os.environ, "DVC_NO_ANALYTICS": "1", "PROVAE_DATA_MIRROR": str(mirror),
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "GIT_AUTHOR_NAME": "test",
            "GIT_AUTHOR_EMAIL": "test@example.com", "GIT_COMMITTER_NAME": "test",
            "GIT_COMMITTER_EMAIL": "test@example.com"}


@pytest.fixture(scope="module")
def project(tmp_path_factory, env):
    """A fresh git + DVC repo holding the project with the tiny profile, reproduced once."""
    repo = tmp_path_factory.mktemp("project")
    for name in PROJECT_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, repo / name)
    run([sys.executable, "scripts/profile.py", "tiny", "--write"], repo, env)
    run(["git", "init", "-q"], repo, env)
    run(["dvc", "init", "-q"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "tiny profile"], repo, env)
    first = run(["dvc", "repro"], repo, env)
    return repo, first.stdout


def test_repro_runs_every_stage_and_writes_the_report(project):
    repo, output = project
    assert sorted(ran_stages(output)) == sorted([
        "data@mnist", "train@mnist-0.0", "train@mnist-0.05", "evaluate@mnist-0.0", "evaluate@mnist-0.05",
        "attack_strength@mnist-0.05", "fixed_encoder@mnist-0.0", "fixed_encoder@mnist-0.05", "report"])
    table = (repo / "reports" / "table1.csv").read_text().splitlines()
    assert len(table) == 3 and table[0].startswith("dataset,data,eps_train,lb_train")
    for figure in ("fig1_adversarial_mnist", "fig2_reconstructions_mnist", "fig3_attack_curves", "fig4_samples_mnist",
                   "training_curves"):
        assert (repo / "reports" / "figures" / f"{figure}.png").stat().st_size > 1000
    assert re.search(r"^## MNIST.*, proVAE eps_train=0.05$", (repo / "reports" / "attack_strength.md").read_text(), re.M)
    provenance = yaml.safe_load((repo / "reports" / "data" / "mnist.json").read_text())
    assert provenance["source"] == "mirror" and provenance["jpeg_copy"] is False


def test_status_is_clean_after_repro(project, env):
    repo, _ = project
    assert "Data and pipelines are up to date" in run(["dvc", "status"], repo, env).stdout


def test_certificate_audit_ran_and_passed(project):
    repo, _ = project
    metrics = yaml.safe_load((repo / "reports" / "eval" / "mnist-eps0.05" / "metrics.json").read_text())
    assert metrics["audit"]["violations"] == 0
    assert metrics["lb_test"] <= metrics["elbo_test"]


def test_attack_strength_compares_each_setting_with_evaluates_own(project):
    repo, _ = project
    table = pd.read_csv(repo / "reports" / "attack_strength" / "mnist-eps0.05.csv")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert table["pgd_steps"].tolist() == [params["evaluate"]["pgd_steps"], 10]  # tiny: evaluate's 5, then 10
    assert table["change_vs_evaluate"].iloc[0] == 0
    assert (table["elbo_attacked"] >= table["bound"]).all()  # a stronger attack still never beats the certificate


def test_fixed_encoder_drop_starts_at_zero_and_grows_with_eps_attack(project):
    repo, _ = project
    table = pd.read_csv(repo / "reports" / "fixed_encoder" / "mnist-eps0.05.csv")
    assert table["fixed_encoder_drop"].iloc[0] == 0 and table["eps_attack"].iloc[0] == 0
    assert table["fixed_encoder_drop"].is_monotonic_increasing  # a larger ball holds the smaller one
    assert "## MNIST" in (repo / "reports" / "fixed_encoder.md").read_text()


def test_adding_an_eps_value_runs_only_the_new_models(project, env):
    repo, _ = project
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["eps_train"].append(0.02)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    output = run(["dvc", "repro"], repo, env).stdout
    assert sorted(ran_stages(output)) == ["evaluate@mnist-0.02", "fixed_encoder@mnist-0.02", "report", "train@mnist-0.02"]


def test_push_clone_pull_is_up_to_date(project, env, tmp_path):
    repo, _ = project
    remote = tmp_path / "remote"
    run(["dvc", "remote", "add", "-d", "local", str(remote)], repo, env)
    run(["dvc", "push"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "results"], repo, env)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env)
    run(["dvc", "pull"], clone, env)
    output = run(["dvc", "repro"], clone, env).stdout
    assert ran_stages(output) == []
    assert "Data and pipelines are up to date" in run(["dvc", "status"], clone, env).stdout


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
    result = run([sys.executable, str(ROOT / "stages" / "data.py"), "--dataset", "svhn", "--out", str(tmp_path / "x"),
                  "--provenance", str(tmp_path / "p.json"), "--download-root", str(tmp_path)], ROOT, env, check=False)
    assert result.returncode != 0 and "unknown dataset 'svhn'" in result.stderr


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
    assert sorted(vae.index) == [0.5, 1.0]
    assert vae.loc[0.5, "run"] == "sweep-sigma0-0.5" and vae.loc[1.0, "run"] == "baseline (HEAD)"
    # Reconstruction weighs 1/(2 sigma0^2): four times more at 0.5, so a lower ELBO.
    assert vae.loc[0.5, "elbo_test"] < vae.loc[1.0, "elbo_test"]
    assert (repo / "reports" / "sigma0_sweep" / "sweep.png").stat().st_size > 1000
