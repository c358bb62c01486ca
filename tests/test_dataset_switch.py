"""A dataset switch, as the README's "Adding a dataset" tells a new user to make it, runs end to end.

Before the grid was an explicit list, `datasets: [fashion_mnist]` trained the new models and then
failed in `attack_strength@mnist-0.1-0`, which still named MNIST. `scripts/grid.py --write` moves
every stage's model list onto the new grid; the stages refuse a model list outside the grid.
"""

import json
import re

import pytest
import yaml

from conftest import copy_project, run, write_idx_gz_folder

pytestmark = pytest.mark.pipeline


@pytest.fixture(scope="module")
def switched(tmp_path_factory, env):
    """The tiny project switched to a generated Fashion-MNIST-layout mirror, reproduced."""
    mirror = tmp_path_factory.mktemp("mirror")
    write_idx_gz_folder(mirror / "fashion_mnist", n_train=300, n_test=100)
    env = {**env, "PROVAE_DATA_MIRROR": str(mirror)}
    repo = copy_project(tmp_path_factory.mktemp("switch"), env)
    run(["python", "scripts/grid.py", "--datasets", "fashion_mnist", "--eps", "0.0", "0.05", "--seeds", "0", "--write"],
        repo, env)
    return repo, env


def test_a_dataset_switch_runs_every_stage_of_the_new_dataset(switched):
    repo, env = switched
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert sorted(params["grid"]) == ["fashion_mnist-0.0-0", "fashion_mnist-0.05-0"]
    assert sorted(params["attack_strength"]["models"]) == ["fashion_mnist-0.05-0"]
    result = run(["dvc", "repro"], repo, env)
    ran = re.findall(r"Running stage '([^']+)'", result.stdout)
    assert not [stage for stage in ran if "mnist-" in stage and "fashion_mnist-" not in stage]
    assert "attack_strength@fashion_mnist-0.05-0" in ran and "report" in ran
    assert "## Fashion-MNIST" in (repo / "reports" / "attack_strength.md").read_text()
    assert json.loads(run(["dvc", "status", "--json"], repo, env).stdout) == {}


def test_a_stage_model_list_outside_the_grid_is_refused_naming_it(switched):
    repo, env = switched
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["attack_strength"]["models"] = {"mnist-0.1-0": {"dataset": "mnist", "eps": 0.1, "seed": 0}}
    params["datasets"].append("mnist")
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        result = run(["python", "stages/attack_strength.py", "--eps-train", "0.1", "--seed", "0", "--model", "x.pt",
                      "--data", "x.npz", "--per-example", "x.npz", "--out", "x.csv"], repo, env, check=False)
        assert result.returncode != 0
        assert "mnist-0.1-0" in result.stderr and "not in the grid" in result.stderr
    finally:
        run(["git", "checkout", "params.yaml"], repo, env)
