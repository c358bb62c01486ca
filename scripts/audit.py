"""`make audit`: re-check the committed results on a CPU in minutes, without retraining.

    python scripts/audit.py                      # every check, one verdict table, exit 1 on any failure
    python scripts/audit.py --skip rerun         # leave out a check (checkpoints, report, certificate,
                                                 # fresh_attack, rerun)

Checks (README, "Auditing the results"):
1. checkpoints: each model's checkpoint has the md5 that dvc.lock records, and its metadata (dataset,
   eps_train, seed, sigma0, clip, latent_dim, train params, data md5) matches params.yaml and the
   data that dvc.lock records;
2. report: the report stage, re-run into a temporary copy, writes byte-identical tables and figures;
3. certificate: per model, the ELBO and the certified bound (both balls) recomputed on the audit's
   test images equal the committed per-example values within `audit.tolerance_relative`;
4. fresh_attack: per model, a fresh APGD attack at every eps_attack, both balls, never beats the
   certificate for the same noise;
5. rerun: one model's evaluation (`audit.rerun_model`) re-run on the CPU for its first
   `audit.rerun_examples` attacked images, compared with the committed per-image curve.
Nothing in the workspace is written: the data, if not prepared yet, is prepared into a temporary
folder (from $PROVAE_DATA_MIRROR or the download) and checked against dvc.lock.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "stages"))
from common import file_md5  # noqa: E402
from evaluate import BALLS, attack_curve, audit_records, evaluation_noise, load_for_evaluation  # noqa: E402

from provae.attacks import apgd_attack  # noqa: E402
from provae.bounds import elbo, elbo_lower_bound  # noqa: E402
from provae.data import DataError, prepare, save_prepared  # noqa: E402
from provae.sensitivity import residual_sign_attack  # noqa: E402

CHECKS = ("checkpoints", "report", "certificate", "fresh_attack", "rerun")


@dataclass
class Verdict:
    check: str
    expected: str
    found: str
    passed: bool


@dataclass(frozen=True)
class Model:
    dataset: str
    eps: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.dataset}-eps{self.eps}-seed{self.seed}"

    def stage(self, kind: str) -> str:
        return f"{kind}@{self.dataset}-{self.eps}-{self.seed}"


class Project:
    """params.yaml, dvc.yaml and dvc.lock of the checkout, and the per-model paths dvc.lock records."""

    def __init__(self, root: Path):
        self.root = root
        self.params = yaml.safe_load((root / "params.yaml").read_text())
        self.dvc = yaml.safe_load((root / "dvc.yaml").read_text())
        self.lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
        self.models = [Model(d, float(e), int(s)) for d in self.params["datasets"] for e in self.params["eps_train"]
                       for s in self.params["seeds"]]

    def locked(self, stage: str) -> dict:
        if stage not in self.lock:
            raise KeyError(f"dvc.lock has no stage {stage}: run and commit the pipeline first")
        return self.lock[stage]

    def path_of(self, stage: str, flag: str) -> Path:
        """The path a stage's command passes with ``flag`` (dvc.lock holds the templated command)."""
        words = shlex.split(self.locked(stage)["cmd"])
        return self.root / words[words.index(flag) + 1]

    def out_md5(self, stage: str, path: Path) -> str | None:
        relative = path.relative_to(self.root).as_posix()
        return next((out["md5"] for out in self.locked(stage).get("outs", []) if out["path"] == relative), None)

    def dep_md5(self, stage: str, relative: str) -> str | None:
        return next((dep["md5"] for dep in self.locked(stage).get("deps", []) if dep["path"] == relative), None)


def check_checkpoints(project: Project) -> list[Verdict]:
    from provae.model import load_checkpoint

    verdicts = []
    for model in project.models:
        stage = model.stage("train")
        try:
            path = project.path_of(stage, "--model")
        except KeyError as error:
            verdicts.append(Verdict(f"checkpoint {model.name}", "a dvc.lock entry", str(error), False))
            continue
        where = path.relative_to(project.root)
        if not path.is_file():
            verdicts.append(Verdict(f"checkpoint {where}", "present", "missing", False))
            continue
        expected, found = project.out_md5(stage, path), file_md5(path)
        verdicts.append(Verdict(f"checkpoint {where}: md5", f"{expected} (dvc.lock)", found, expected == found))
        try:
            meta = load_checkpoint(path).metadata
        except Exception as error:  # truncated or foreign file
            verdicts.append(Verdict(f"checkpoint {where}: loads", "a checkpoint", f"{type(error).__name__}: {error}", False))
            continue
        data = project.dep_md5(stage, f"data/prepared/{model.dataset}.npz")
        wanted = {"dataset": model.dataset, "eps_train": model.eps, "seed": model.seed,
                  "sigma0": project.params["model"]["sigma0"], "clip": project.params["clip"],
                  "latent_dim": project.params["model"]["latent_dim"], "train_params": project.params["train"],
                  "data_md5": data}
        differ = {key: (value, meta.get(key)) for key, value in wanted.items() if meta.get(key) != value}
        locked_params = project.locked(stage).get("params", {}).get("params.yaml", {})
        stale = {key: value for key, value in locked_params.items() if lookup(project.params, key) != value}
        verdicts.append(Verdict(f"checkpoint {where}: metadata", "params.yaml and dvc.lock's data",
                                "matches" if not differ else "; ".join(f"{k}: {v[1]!r}, expected {v[0]!r}"
                                                                      for k, v in differ.items()), not differ))
        if stale:
            verdicts.append(Verdict(f"{stage}: params", "dvc.lock's params = params.yaml",
                                    f"params.yaml changed: {', '.join(stale)}", False))
    return verdicts


def lookup(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def check_report(project: Project) -> list[Verdict]:
    """Re-run the report stage's own command in a temporary copy and compare its outputs byte by byte."""
    stage = project.dvc["stages"]["report"]
    inputs = ["params.yaml", "dvc.yaml", "stages", "provae", *[dep for dep in stage["deps"]]]
    outputs = [next(iter(out)) if isinstance(out, dict) else out for out in stage["outs"]]
    with tempfile.TemporaryDirectory(prefix="provae-audit-report-") as temp:
        temp = Path(temp)
        for name in dict.fromkeys(inputs):
            source, target = project.root / name, temp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if source.is_dir() else shutil.copy)(source, target)
        for name in outputs:  # the copy must write them afresh
            target = temp / name
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
        # The stage's `python` is this interpreter (its packages), however the audit was started.
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        result = subprocess.run(stage["cmd"], shell=True, cwd=temp, capture_output=True, text=True,
                                env={**os.environ, "PYTHONPATH": str(temp), "PATH": path})
        if result.returncode != 0:
            return [Verdict("report re-run", "exit 0", f"exit {result.returncode}: {result.stderr.strip()[-400:]}", False)]
        verdicts = []
        for name in outputs:
            committed, rerun = project.root / name, temp / name
            files = sorted(p.relative_to(committed) for p in committed.rglob("*") if p.is_file()) if committed.is_dir() else [Path()]
            for relative in files:
                a, b = committed / relative, rerun / relative
                shown = (Path(name) / relative).as_posix()
                same = b.is_file() and a.read_bytes() == b.read_bytes()
                verdicts.append(Verdict(f"report: {shown}", "byte-identical to a re-run",
                                        "identical" if same else ("not written" if not b.is_file() else "differs"), same))
            if committed.is_dir():
                extra = sorted(str(p.relative_to(rerun)) for p in rerun.rglob("*") if p.is_file()
                               and not (committed / p.relative_to(rerun)).is_file())
                if extra:
                    verdicts.append(Verdict(f"report: {name}", "no file the re-run does not write", ", ".join(extra), False))
    return verdicts


class DataSource:
    """Prepared data as dvc.lock records it: the workspace's file if its md5 matches, else prepared
    afresh into a temporary folder and checked."""

    def __init__(self, project: Project, temp: Path):
        self.project, self.temp, self.paths = project, temp, {}

    def path(self, dataset: str) -> Path:
        if dataset in self.paths:
            return self.paths[dataset]
        stage = f"data@{dataset}"
        workspace = self.project.path_of(stage, "--out")
        expected = self.project.out_md5(stage, workspace)
        if workspace.is_file() and file_md5(workspace) == expected:
            self.paths[dataset] = workspace
            return workspace
        prepared = self.temp / workspace.name
        mirror = os.environ.get("PROVAE_DATA_MIRROR") or None
        save_prepared(prepare(dataset, mirror, self.temp / "downloads"), prepared)
        if file_md5(prepared) != expected:
            raise DataError(f"{dataset} prepared from {mirror or 'the download'} has md5 {file_md5(prepared)}, "
                            f"but dvc.lock records {expected}: not the data the models were trained on")
        self.paths[dataset] = prepared
        return prepared


def load(project: Project, data: DataSource, model: Model):
    return load_for_evaluation(project.path_of(model.stage("train"), "--model"), model.eps, model.seed,
                               data.path(model.dataset), "cpu")


def committed_per_example(project: Project, model: Model) -> dict:
    with np.load(project.path_of(model.stage("evaluate"), "--out") / "per_example.npz") as saved:
        return {key: saved[key] for key in saved.files}


def check_certificates(project: Project, data: DataSource) -> list[Verdict]:
    tolerance = project.params["audit"]["tolerance_relative"]
    verdicts = []
    for model in project.models:
        loaded = load(project, data, model)
        committed = committed_per_example(project, model)
        n = committed["audit_elbo"].shape[0]
        recomputed = audit_records(loaded.model, loaded.test_images[:n], model.eps, loaded.meta["sigma0"], model.seed)
        worst = max(float(np.max(np.abs(recomputed[k] - committed[k]) / np.maximum(1.0, np.abs(committed[k]))))
                    for k in recomputed)
        verdicts.append(Verdict(f"certificate {model.name}: ELBO and LB (both balls), {n} images",
                                f"relative difference <= {tolerance:g}", f"{worst:.2e}", worst <= tolerance))
    return verdicts


def check_fresh_attacks(project: Project, data: DataSource) -> list[Verdict]:
    p, a = project.params["evaluate"], project.params["audit"]
    verdicts = []
    generator = torch.Generator().manual_seed(2024)
    for model in project.models:
        loaded = load(project, data, model)
        x = loaded.test_images[: a["attack_examples"]]
        noise = evaluation_noise(x.shape[0], loaded.model.latent_dim, model.seed, p, x.device)["certificate"]
        sigma0, violations, checked = loaded.meta["sigma0"], 0, 0
        for clip in BALLS.values():
            for eps in [e for e in p["eps_attack"] if e > 0]:
                starts = [residual_sign_attack(loaded.model, x, eps, clip)]
                x_adv = apgd_attack(loaded.model, x, eps, noise, start=starts[0], steps=a["attack_steps"],
                                    sigma0=sigma0, clip=clip, generator=generator)
                with torch.no_grad():
                    attacked = torch.minimum(elbo(loaded.model, x_adv, noise, sigma0), elbo(loaded.model, starts[0], noise, sigma0))
                    bound = elbo_lower_bound(loaded.model, x, eps, noise, sigma0, clip)
                violations += int((attacked < bound - p["audit_tolerance"] * bound.abs()).sum())
                checked += x.shape[0]
        verdicts.append(Verdict(f"fresh attack {model.name}: {checked} (image, eps, ball) triples",
                                "0 below the certificate", f"{violations} below", violations == 0))
    return verdicts


def check_rerun(project: Project, data: DataSource) -> list[Verdict]:
    """Re-run `evaluate`'s attack on the CPU (headline ball) and compare it, image by image, with the
    committed values: a paired comparison. The certificate and scoring draws are the committed
    run's (drawn on the CPU from the seed); the attack's own random numbers (random starts, EOT
    draws) come from the device's generator and differ, so the mean may differ by the attack's
    convergence tolerance (attack_strength's max(0.5 nats, 1 %)) plus 3 standard errors of the
    paired differences."""
    p, a, strength = project.params["evaluate"], project.params["audit"], project.params["attack_strength"]
    choice = a["rerun_model"]
    model = Model(choice["dataset"], float(choice["eps_train"]), int(choice["seed"]))
    loaded = load(project, data, model)
    committed = committed_per_example(project, model)
    headline = "clipped" if loaded.meta["clip"] else "unclipped"
    n = min(a["rerun_examples"], committed[f"{headline}/elbo_attacked"].shape[1])
    images = loaded.test_images[:n]
    noise = evaluation_noise(n, loaded.model.latent_dim, model.seed, p, images.device)
    started = time.time()
    rerun = attack_curve(loaded.model, images, noise, p, loaded.meta["sigma0"], loaded.meta["clip"], model.seed)
    seconds = time.time() - started
    verdicts = []
    for i, eps in enumerate(committed["eps_attack"]):
        differences = rerun["elbo_attacked"][i] - committed[f"{headline}/elbo_attacked"][i, :n]
        reference = float(committed[f"{headline}/elbo_attacked"][i, :n].mean())
        tolerance = (max(strength["tolerance_nats"], strength["tolerance_relative"] * abs(reference))
                     + 3 * float(differences.std(ddof=1)) / math.sqrt(n))
        found = float(differences.mean())
        verdicts.append(Verdict(f"re-run {model.name}, {headline} ball, eps_attack {eps:g}, {n} images",
                                f"|re-run - committed| <= {tolerance:.2f} nats (committed {reference:.2f})",
                                f"{found:+.2f} nats ({seconds:.0f} s for the curve)", abs(found) <= tolerance))
    return verdicts


def print_table(verdicts: list[Verdict]) -> None:
    rows = [("check", "expected", "found", "verdict")] + [
        (v.check, v.expected, v.found, "pass" if v.passed else "FAIL") for v in verdicts]
    widths = [min(max(len(row[i]) for row in rows), 70) for i in range(4)]
    for j, row in enumerate(rows):
        print(" | ".join(cell.ljust(width) for cell, width in zip(row, widths)))
        if j == 0:
            print("-+-".join("-" * width for width in widths))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip", nargs="*", default=[], choices=CHECKS)
    parser.add_argument("--root", default=str(ROOT), help="the checkout to audit")
    args = parser.parse_args()
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    started = time.time()
    project = Project(Path(args.root).resolve())
    verdicts: list[Verdict] = []
    with tempfile.TemporaryDirectory(prefix="provae-audit-data-") as temp:
        data = DataSource(project, Path(temp))
        steps = {"checkpoints": lambda: check_checkpoints(project), "report": lambda: check_report(project),
                 "certificate": lambda: check_certificates(project, data),
                 "fresh_attack": lambda: check_fresh_attacks(project, data), "rerun": lambda: check_rerun(project, data)}
        for name in CHECKS:
            if name in args.skip:
                continue
            step_started = time.time()
            try:
                verdicts += steps[name]()
            except (DataError, KeyError, FileNotFoundError, ValueError, RuntimeError) as error:
                verdicts.append(Verdict(name, "runs", f"{type(error).__name__}: {error}", False))
            print(f"[audit] {name}: {time.time() - step_started:.0f} s", file=sys.stderr, flush=True)
    print_table(verdicts)
    failed = [v for v in verdicts if not v.passed]
    print(f"\n{len(verdicts) - len(failed)} passed, {len(failed)} failed, in {time.time() - started:.0f} s")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
