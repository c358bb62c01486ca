"""A train stage killed mid-run continues from its last completed epoch on the next `dvc repro`, and ends
with the same checkpoint as an uninterrupted run (tiny profile, CPU)."""

import os
import signal
import subprocess
import time

import pytest
import torch
import yaml

from provae.model import load_checkpoint
from conftest import copy_project, run

pytestmark = pytest.mark.pipeline
STAGE = "train@mnist-0.05-0"


@pytest.fixture(scope="module")
def repo(tmp_path_factory, env):
    """The tiny profile with more, longer epochs, so that a kill lands between two of them."""
    repo = copy_project(tmp_path_factory.mktemp("resume"), env)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"].update(epochs=4, max_train_examples=2048)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "commit", "-qam", "longer tiny training"], repo, env)
    run(["dvc", "repro", "data@mnist"], repo, env)
    return repo


def test_a_killed_training_resumes_and_matches_an_uninterrupted_run(repo, env):
    state = repo / "training_state" / "mnist-eps0.05-seed0.pt"
    process = subprocess.Popen(["dvc", "repro", STAGE], cwd=repo, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not state.is_file():
        assert process.poll() is None, "training finished or failed before its first epoch was saved"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    saved = torch.load(state, weights_only=True)
    assert 1 <= saved["epochs_done"] < 4
    assert not (repo / "models" / "mnist" / "eps0.05-seed0.pt").exists()

    resumed = run(["dvc", "repro", STAGE], repo, env).stdout
    assert f"resuming after epoch {saved['epochs_done']}" in resumed
    assert not state.exists()  # removed once the checkpoint is written
    curve = (repo / "reports" / "training" / "mnist-eps0.05-seed0" / "plots" / "metrics" / "test" / "elbo.tsv")
    assert len(curve.read_text().splitlines()) == 1 + 4  # every epoch logged, the resumed ones too

    # The same stage, uninterrupted (forced), writes the same weights.
    resumed_weights = load_checkpoint(repo / "models" / "mnist" / "eps0.05-seed0.pt").model.state_dict()
    assert "no saved state" in run(["dvc", "repro", "-f", STAGE], repo, env).stdout
    fresh_weights = load_checkpoint(repo / "models" / "mnist" / "eps0.05-seed0.pt").model.state_dict()
    assert all(torch.equal(resumed_weights[key], fresh_weights[key]) for key in fresh_weights)


def test_a_state_from_other_settings_is_not_resumed(repo, env):
    state = repo / "training_state" / "mnist-eps0.05-seed0.pt"
    state.parent.mkdir(exist_ok=True)
    torch.save({"epochs_done": 1, "model_state": {}, "optimizer_state": {}, "generator_states": {}, "history": [],
                "fingerprint": {"dataset": "mnist", "eps_train": 0.05, "seed": 0, "sigma0": 0.1}}, state)
    output = run(["dvc", "repro", "-f", STAGE], repo, env).stdout
    assert "belongs to a run with other settings" in output and "clip" in output
    assert not state.exists()
