"""A per-model stage run in this process on a very small model: a checkpoint of `small_model` (8x8
images), prepared data, and a params.yaml with tiny settings, in a temporary working folder."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from provae.data import PreparedData, save_prepared
from provae.model import save_checkpoint

from conftest import small_model, synthetic_images

ROOT = Path(__file__).resolve().parent.parent
EPS_TRAIN, SEED = 0.05, 0
PARAMS = {
    "datasets": ["blobs"],
    "grid": {"blobs-0.05-0": {"dataset": "blobs", "eps": 0.05, "seed": 0}},
    "evaluate": {"device": "cpu", "eps_attack": [0.0, 0.05, 0.1], "example_eps_attack": 0.1,
                 "bound_train_examples": 16, "bound_test_examples": 16, "noise_samples": 1, "batch_size": 64,
                 "attack_examples": 6, "score_samples": 2, "random_starts": 1, "apgd_steps": 2, "eot_samples": 1,
                 "latent_attack_steps": 0, "audit_tolerance": 1.0e-4, "audit_examples": 4, "example_count": 2,
                 "sample_count": 4},
    "certify": {"device": "cpu", "examples": 4, "methods": ["ibp"], "intermediate": "crown", "tau_nats": [5.0],
                "tau_relative": [0.1], "bisection_steps": 1, "batch_size": 64},
    "attack_strength": {"models": {"blobs-0.05-0": {"dataset": "blobs", "eps": 0.05, "seed": 0}},
                        "examples": 4, "tolerance_nats": 0.5, "tolerance_relative": 0.01,
                        "challengers": {"residual_sign": {"method": "residual_sign"}}, "cheaper": {},
                        "upper_bound_models": [], "budget_challengers": ["apgd_4x_steps"]},
}


class Project:
    """The working folder, and the command line of each stage in it."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.model, self.data = folder / "model.pt", folder / "data.npz"
        self.eval = folder / "eval"
        self.curve, self.metrics = folder / "curve.csv", folder / "metrics.json"
        self.per_example = self.eval / "per_example.npz"
        self.bounds, self.radii = folder / "certify" / "bounds.csv", folder / "certify" / "radii.csv"
        self.strength = folder / "strength.csv"

    def argv(self, stage: str) -> list[str]:
        common = ["--eps-train", str(EPS_TRAIN), "--seed", str(SEED), "--model", str(self.model), "--data", str(self.data)]
        outputs = {
            "evaluate": ["--metrics", self.metrics, "--curve", self.curve, "--out", self.eval],
            "certify": ["--per-example", self.per_example, "--bounds", self.bounds, "--radii", self.radii],
            "attack_strength": ["--per-example", self.per_example, "--out", self.strength],
        }[stage]
        return [f"{stage}.py", *common, *map(str, outputs)]

    def run(self, stage: str, monkeypatch) -> str | None:
        """Run ``stages/<stage>.py`` as `dvc repro` would; its exit message, or None on success."""
        monkeypatch.setattr(sys, "argv", self.argv(stage))
        try:
            runpy.run_path(str(ROOT / "stages" / f"{stage}.py"), run_name="__main__")
        except SystemExit as exit:
            return None if exit.code in (None, 0) else str(exit.code)
        return None


@pytest.fixture
def project(tmp_path, monkeypatch) -> Project:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT / "stages"))  # the stages' own `from common import ...`
    project = Project(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    images = (synthetic_images(48, seed=3) * 255).round().to(torch.uint8)
    labels = torch.arange(48) % 10
    save_prepared(PreparedData(images[:32], labels[:32], images[32:], labels[32:], {"label": "Blobs"}), project.data)
    save_checkpoint(project.model, small_model(), {
        "dataset": "blobs", "data_label": "Blobs", "eps_train": EPS_TRAIN, "seed": SEED, "sigma0": 1.0,
        "clip": False, "device": "cpu", "wall_time_s": 0.0, "torch": str(torch.__version__)})
    return project


def write_per_example(project: Project, bound: float, attacked_same_noise: float, attacked: float = -50.0) -> None:
    """An `evaluate` per_example.npz with the same value for every image (certify and attack_strength read it)."""
    eps = np.array(PARAMS["evaluate"]["eps_attack"])
    n = PARAMS["evaluate"]["attack_examples"]
    arrays = {"eps_attack": eps}
    for ball in ("unclipped", "clipped"):
        arrays[f"{ball}/elbo_attacked"] = np.full((len(eps), n), attacked, np.float32)
        arrays[f"{ball}/elbo_attacked_same_noise"] = np.full((len(eps), n), attacked_same_noise, np.float32)
        arrays[f"{ball}/bound"] = np.full((len(eps), n), bound, np.float32)
    project.eval.mkdir(exist_ok=True)
    np.savez(project.per_example, **arrays)
