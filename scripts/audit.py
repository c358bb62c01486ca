"""`make audit`: re-check the committed results on a CPU in minutes, without retraining.

    python scripts/audit.py                      # every check, one verdict table, exit 1 on any failure
    python scripts/audit.py --skip rerun         # leave out a check (checkpoints, outputs, finite, report,
                                                 # certificate, fresh_attack, rerun)

Checks (README, "Auditing the results"). "Each model": each model of the grid, and each model of
`bound_training.models` trained again on `bound_training.bound` (its own `train_bound`,
`evaluate_bound` and `certify_bound` outputs, named `mnist-elbo_crown-eps0.01-seed0`); paths are read
from the stages' commands in dvc.lock.
1. checkpoints: each model's checkpoint has the md5 that dvc.lock records, and its metadata (dataset,
   eps_train, seed, sigma0, clip, latent_dim, train params, data md5, training bound) matches
   params.yaml and the data that dvc.lock records;
2. outputs: every output dvc.lock records (every stage's `outs`, files and folders: per-image
   values, figure arrays, curves, metrics, certify folders, attack-strength tables, checkpoints),
   and every dependency that is another stage's output, hashed the way DVC hashes it, equals
   dvc.lock's md5;
3. finite: the committed per-image values and tables hold no NaN, and -inf only as a vacuous
   bound (said so, per model), and so do certify_elbo's tables (per model of `certify_elbo.models`);
4. report: the report stage, re-run into a temporary copy, writes byte-identical tables and figures;
5. certificate: per model, the ELBO and the certified bound (both balls) recomputed on the audit's
   test images equal the committed per-example values within `audit.tolerance_relative`;
6. fresh_attack: per model, a fresh APGD attack at every eps_attack, both balls, never beats the
   certificate for the same noise;
7. rerun: one model's evaluation (`audit.rerun_model`) re-run on the CPU for its first
   `audit.rerun_examples` attacked images, compared with the committed per-image curve.
Every comparison fails on NaN, naming the model, eps, ball and file. Nothing in the workspace is
written: the data, if not prepared yet, is prepared into a temporary folder (from
$PROVAE_DATA_MIRROR or the download) and checked against dvc.lock.
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
from provae.attacks import apgd_attack  # noqa: E402
from provae.bounds import elbo, elbo_lower_bound  # noqa: E402
from provae.data import DataError, prepare, save_prepared  # noqa: E402
from provae.evaluation import BALLS, attack_curve, audit_records, evaluation_noise, load_for_evaluation  # noqa: E402
from provae.files import file_digest as file_md5  # noqa: E402
from provae.grid import GridModel, grid_models, models_of_grid  # noqa: E402
from provae.sensitivity import residual_sign_attack  # noqa: E402
import pandas as pd  # noqa: E402
from dvc.fs import LocalFileSystem  # noqa: E402
from dvc.exceptions import DvcException  # noqa: E402
from dvc.repo import Repo  # noqa: E402
from dvc_data.hashfile.build import build as dvc_build  # noqa: E402
from dvc_data.hashfile.db import HashFileDB  # noqa: E402
import zipfile  # noqa: E402

CHECKS = ("checkpoints", "outputs", "finite", "report", "certificate", "fresh_attack", "rerun")
# Reading or loading a committed file can fail in these ways (missing, truncated, not what it claims):
# each is a failed verdict naming the model, not a crash of the audit.
READ_ERRORS = (DataError, KeyError, OSError, ValueError, RuntimeError, EOFError, zipfile.BadZipFile, DvcException)


@dataclass
class Verdict:
    check: str
    expected: str
    found: str
    passed: bool


def stage_of(kind: str, model: GridModel) -> str:
    """The DVC stage of a model: `train@mnist-0.01-2`."""
    return f"{kind}@{model.id}"


@dataclass(frozen=True)
class Audited:
    """A model whose own outputs the per-model checks read: a model of the grid (``bound`` None:
    `train@`, `evaluate@`, `certify@`), or one of `bound_training.models` trained again on ``bound``
    (`train_bound@`, `evaluate_bound@`, `certify_bound@`: its own checkpoint and outputs)."""

    model: GridModel
    bound: str | None = None

    @property
    def name(self) -> str:
        """The per-model output name: `mnist-eps0.01-seed0`, `mnist-elbo_crown-eps0.01-seed0` (the
        report's `provae.report.bound_training_files.variant_name`, not imported: provae.report loads
        matplotlib and torchvision, and torchvision's import of cProfile finds scripts/profile.py)."""
        m = self.model
        return m.name if self.bound is None else f"{m.dataset}-{self.bound}-eps{m.eps!r}-seed{m.seed}"

    def stage(self, kind: str) -> str:
        """`train@mnist-0.01-0`, or `train_bound@mnist-0.01-0` for a model trained on another bound."""
        return stage_of(kind if self.bound is None else f"{kind}_bound", self.model)


def listed_models(params: dict, section: str) -> list[GridModel]:
    """The models of ``params[section]["models"]`` (each in the grid); none when empty or absent."""
    return models_of_grid(params, section) if (params.get(section) or {}).get("models") else []


class Project:
    """params.yaml, dvc.yaml and dvc.lock of the checkout, and the per-model paths dvc.lock records."""

    def __init__(self, root: Path):
        self.root = root
        self.params = yaml.safe_load((root / "params.yaml").read_text())
        self.dvc = yaml.safe_load((root / "dvc.yaml").read_text())
        self.lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
        self.models = grid_models(self.params)
        # The per-model checks' models: the grid's, then those trained again on bound_training.bound.
        bound = (self.params.get("bound_training") or {}).get("bound")
        self.audited = [Audited(m) for m in self.models] + [
            Audited(m, bound) for m in listed_models(self.params, "bound_training")]
        self.elbo_models = listed_models(self.params, "certify_elbo")  # certify_elbo@<id>: its own tables

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
    for audited in project.audited:
        model, stage = audited.model, audited.stage("train")
        try:
            path, data_path = project.path_of(stage, "--model"), project.path_of(stage, "--data")
        except KeyError as error:
            verdicts.append(Verdict(f"checkpoint {audited.name}", "a dvc.lock entry", str(error), False))
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
        data = project.dep_md5(stage, data_path.relative_to(project.root).as_posix())
        # `bound`: recorded only for a model trained on another bound than IBP (absent: None).
        wanted = {"dataset": model.dataset, "eps_train": model.eps, "seed": model.seed,
                  "sigma0": project.params["model"]["sigma0"], "clip": project.params["clip"],
                  "latent_dim": project.params["model"]["latent_dim"], "train_params": project.params["train"],
                  "data_md5": data, "bound": audited.bound}
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


def inside(path: str, folder: str) -> bool:
    """``path`` is ``folder`` or lies under it (dvc.lock's relative POSIX paths)."""
    return path == folder or path.startswith(folder + "/")


@dataclass
class Locked:
    """One path as dvc.lock records it: each md5 recorded for it (a folder's ends in ``.dir``) with
    the entries recording it (``evaluate@mnist-0.05-0 outs``, ``certify@mnist-0.05-0 deps``), the
    hash DVC computes it with (``md5``; entries without ``hash`` are DVC 2's ``md5-dos2unix``)."""

    hash_name: str
    md5s: dict[str, list[str]]


def locked_outputs(lock: dict, cached: set[str]) -> dict[str, Locked]:
    """Every output of every stage in dvc.lock, and every dependency that is one or holds some
    (the per-image file ``certify`` reads, the folders ``report`` reads): each file's own md5
    names the file when a folder's hash differs. Left out: paths under or around an output that
    DVC caches (``cached``, the prepared data: not in git; the audit's data source checks it)."""
    outs = {out["path"] for entry in lock.values() for out in entry.get("outs", [])}
    records: dict[str, Locked] = {}
    for stage, entry in lock.items():
        for role in ("outs", "deps"):
            for item in entry.get(role, []):
                path = item["path"]
                if any(inside(path, c) or inside(c, path) for c in cached):
                    continue
                if role == "deps" and not any(inside(path, out) or inside(out, path) for out in outs):
                    continue  # code, params, references: inputs, not results
                record = records.setdefault(path, Locked(item.get("hash", "md5-dos2unix"), {}))
                record.md5s.setdefault(str(item.get("md5")), []).append(f"{stage} {role}")
    return records


def output_problem(path: str, found: dict[str, str | None], records: dict[str, Locked],
                   files: list[str] | None) -> str | None:
    """None if ``path`` hashes to the one md5 dvc.lock records for it, else what differs.

    ``found``: DVC's hash of every recorded path (None: missing); ``files``: for a folder, the
    files inside it (None for a file). A folder names the deepest recorded paths inside it that differ, else the
    files inside it that no recorded path covers (one of which must differ)."""
    record = records[path]
    if len(record.md5s) > 1:
        return (f"dvc.lock records {len(record.md5s)} different md5s for it ("
                + "; ".join(f"{md5}: {', '.join(entries)}" for md5, entries in record.md5s.items())
                + "): a stage ran on an older version of it")
    if found[path] is None:
        return "missing"
    if found[path] in record.md5s:
        return None
    if not found[path].endswith(".dir"):
        return f"md5 {found[path]}: the file differs"
    within = [other for other in records if other != path and inside(other, path)]
    differing = [other for other in within if len(records[other].md5s) > 1 or found[other] not in records[other].md5s]
    deepest = sorted(other for other in differing if not any(o != other and inside(o, other) for o in differing))
    if deepest:
        return f"{found[path]}: differs in {', '.join(deepest)}"
    uncovered = sorted(Path(f).relative_to(path).as_posix() for f in files if not any(inside(f, o) for o in within))
    if uncovered:
        return (f"{found[path]}: differs in a file dvc.lock records only through the folder: "
                f"one of {', '.join(uncovered)}")
    return f"{found[path]}: a file was added or removed"


def check_outputs(project: Project) -> list[Verdict]:
    """Every output in dvc.lock (files and folders) hashed with DVC's own builder (dvc_data's
    ``build``, the function ``dvc status`` calls, with the project's .dvcignore; a folder's
    ``.dir`` hash is the md5 of its sorted file list), with a fresh hash database, so no cached
    hash of an earlier file version is reused, against the md5 dvc.lock records."""
    with Repo(str(project.root)) as repo, tempfile.TemporaryDirectory(prefix="provae-audit-hashes-") as temp:
        cached = {Path(out.fs_path).relative_to(project.root).as_posix() for out in repo.index.outs if out.use_cache}
        defined = {stage.name for stage in repo.index.stages}
        records = locked_outputs(project.lock, cached)
        fs, found, files = LocalFileSystem(), {}, {}
        database = HashFileDB(fs, temp)
        for path, record in records.items():
            target = project.root / path
            if not target.exists():
                found[path] = None
                continue
            _, _, obj = dvc_build(database, str(target), fs, record.hash_name, dry_run=True, ignore=repo.dvcignore)
            found[path] = obj.hash_info.value
            if target.is_dir():
                files[path] = [f"{path}/{'/'.join(key)}" for key, _ in obj.iteritems()]
    # Stages dvc.yaml no longer defines (with this params.yaml): dvc.lock is stale, and DVC cannot say
    # which of their outputs it caches.
    stale = [stage for stage in project.lock if stage not in defined]
    verdicts = [Verdict("outputs: dvc.lock's stages", "each defined by dvc.yaml with params.yaml",
                        f"{len(stale)} not defined (dvc.lock is stale): {', '.join(stale[:4])}"
                        + (f" and {len(stale) - 4} more" if len(stale) > 4 else ""), False)] if stale else []
    matched = 0
    for path, record in sorted(records.items()):
        problem = output_problem(path, found, records, files.get(path))
        if problem is None:
            matched += 1
            continue
        entries = "; ".join(", ".join(e) for e in record.md5s.values())
        verdicts.append(Verdict(f"output {path}", f"{' or '.join(record.md5s)} (dvc.lock: {entries})", problem, False))
    verdicts.append(Verdict("outputs: every path dvc.lock records", "dvc.lock's md5 (DVC's hash, folders .dir)",
                            f"{matched} of {len(records)} match", matched == len(records)))
    return verdicts


# --- finite: NaN never stands in a committed value; -inf only as a vacuous bound ---


def non_finite(values, labels: list[str], where: str, vacuous_ok: bool = False, gap_ok: bool = False):
    """Where ``values`` [rows, ...] (one row per label: an eps_attack and ball, a table row) hold
    NaN, or an infinity not allowed there: -inf is a vacuous bound (``vacuous_ok``), +inf the gap
    or margin above one (``gap_ok``). -> (messages naming the rows, count of vacuous bounds)."""
    values = np.asarray(values, dtype=float).reshape(len(labels), -1)
    none = np.zeros(values.shape, dtype=bool)
    problems = []
    for kind, mask in (("NaN", np.isnan(values)), ("+inf", none if gap_ok else np.isposinf(values)),
                       ("-inf", none if vacuous_ok else np.isneginf(values))):
        rows = np.flatnonzero(mask.any(axis=1))
        if rows.size:
            problems.append(f"{kind} in {where} at " + "; ".join(
                f"{labels[i]} ({int(mask[i].sum())} of {mask.shape[1]})" for i in rows))
    return problems, int(np.isneginf(values).sum()) if vacuous_ok else 0


def scan_per_example(arrays: dict, eps_train: float, where: str):
    """NaN and misplaced infinities in `evaluate`'s per-image values: [n_eps, n] per ball, and the
    audit records at eps_train."""
    problems, vacuous = [], 0
    eps_attack = arrays["eps_attack"]
    for key, values in arrays.items():  # integer arrays (the winners) pass: they hold no NaN or inf
        if "/" in key and np.ndim(values) == 2 and len(values) == len(eps_attack):
            ball, field = key.split("/")
            labels, vacuous_ok = [f"eps_attack {e:g}, {ball} ball" for e in eps_attack], field == "bound"
        elif key.startswith("audit_lb_"):
            labels, vacuous_ok = [f"eps_train {eps_train:g}, {key[len('audit_lb_'):]} ball"], True
        else:
            labels, vacuous_ok = [f"eps_train {eps_train:g}" if key.startswith("audit_") else key], False
        found, count = non_finite(values, labels, f"{where} [{key}]", vacuous_ok=vacuous_ok)
        problems += found
        vacuous += count
    return problems, vacuous


def scan_table(table: pd.DataFrame, where: str):
    """NaN and misplaced infinities in a per-model table (the attack curves, certify's bounds and
    radii): every numeric column; -inf in bound columns, +inf in gap and margin columns."""
    def label(row) -> str:
        if "eps_attack" in row:
            parts = [f"eps_attack {row['eps_attack']:g}"]
        else:
            parts = [f"image {row['image']}"] if "image" in row else []
        parts += [f"{row[k]}" + (" ball" if k == "ball" else "") for k in ("ball", "method", "tau") if k in row]
        return ", ".join(parts)

    labels = [label(row) for _, row in table.iterrows()]
    problems, vacuous = [], 0
    for column in table.columns:
        if not pd.api.types.is_float_dtype(table[column]):
            continue
        ball = next((b for b in BALLS if column.endswith(f"_{b}")), None)
        rows = [f"{text}, {ball} ball" if ball else text for text in labels]
        found, count = non_finite(table[column].to_numpy()[:, None], rows, f"{where} [{column}]",
                                  vacuous_ok=column.startswith("bound"),
                                  gap_ok=column.startswith(("gap", "min_margin")))
        problems += found
        vacuous += count
    return problems, vacuous


def scan_files(project: Project, files, eps_train: float):
    """``files`` (a callable: its paths, read from dvc.lock) scanned for NaN and misplaced
    infinities: per-image values (.npz) and tables (.csv). -> (problems, vacuous bounds); a path
    missing from dvc.lock or a file that does not read is a problem, not a crash."""
    problems, vacuous = [], 0
    try:
        for path in files():
            where = path.relative_to(project.root).as_posix()
            if path.suffix == ".npz":
                with np.load(path) as saved:
                    found, count = scan_per_example({key: saved[key] for key in saved.files}, eps_train, where)
            else:
                found, count = scan_table(pd.read_csv(path), where)
            problems += found
            vacuous += count
    except READ_ERRORS as error:
        problems, vacuous = [f"{type(error).__name__}: {error}"], 0
    return problems, vacuous


def finite_verdict(check: str, problems: list[str], vacuous: int) -> Verdict:
    said = f"; vacuous (-inf) bound in {vacuous} values" if vacuous else ""
    return Verdict(check, "no NaN; -inf only as a vacuous bound",
                   ("; ".join(problems) if problems else "no NaN") + said, not problems)


def model_files(project: Project, audited: Audited) -> list[Path]:
    """A model's per-image values, attack curves and certify tables. A grid model's certify tables
    only where dvc.lock has its certify stage; a model trained on another bound must have them."""
    evaluate, certify = audited.stage("evaluate"), audited.stage("certify")
    files = [project.path_of(evaluate, "--out") / "per_example.npz", project.path_of(evaluate, "--curve")]
    if audited.bound is not None or certify in project.lock:
        files += [project.path_of(certify, flag) for flag in ("--bounds", "--radii")]
    return files


def check_finite(project: Project) -> list[Verdict]:
    """Per model: the committed per-image values (per_example.npz), its attack curves and its
    certify tables hold no NaN, and -inf only as a vacuous bound (counted and said); per model of
    `certify_elbo.models`, so do that stage's bounds and radii."""
    verdicts = []
    for audited in project.audited:
        problems, vacuous = scan_files(project, lambda: model_files(project, audited), audited.model.eps)
        verdicts.append(finite_verdict(f"finite {audited.name} (eps_train {audited.model.eps:g}): "
                                       "per-image values, curves, certify", problems, vacuous))
    for model in project.elbo_models:
        stage = stage_of("certify_elbo", model)
        problems, vacuous = scan_files(project, lambda: [project.path_of(stage, flag) for flag in ("--bounds", "--radii")],
                                       model.eps)
        verdicts.append(finite_verdict(f"finite {model.name} (eps_train {model.eps:g}): certify_elbo's bounds, radii",
                                       problems, vacuous))
    return verdicts


def check_report(project: Project) -> list[Verdict]:
    """Re-run the report stage's own command in a temporary copy and compare its outputs byte by byte."""
    stage = project.dvc["stages"]["report"]
    inputs = ["params.yaml", "dvc.yaml", "stages", "provae", *[dep for dep in stage["deps"]]]
    outputs = [next(iter(out)) if isinstance(out, dict) else out for out in stage["outs"]]
    with tempfile.TemporaryDirectory(prefix="provae-audit-report-") as temp:
        temp = Path(temp)
        for name in dict.fromkeys(inputs):
            source, target = project.root / name, temp / name
            if target.exists():  # inside a folder already copied (provae/report in provae)
                continue
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


def load(project: Project, data: DataSource, audited: Audited):
    model = audited.model
    return load_for_evaluation(project.path_of(audited.stage("train"), "--model"), model.eps, model.seed,
                               data.path(model.dataset), "cpu")


def per_example_path(project: Project, audited: Audited) -> Path:
    return project.path_of(audited.stage("evaluate"), "--out") / "per_example.npz"


def committed_per_example(project: Project, audited: Audited) -> dict:
    with np.load(per_example_path(project, audited)) as saved:
        return {key: saved[key] for key in saved.files}


AUDIT_RECORDS = {"audit_elbo": ("ELBO", False), "audit_lb_unclipped": ("LB, unclipped ball", True),
                 "audit_lb_clipped": ("LB, clipped ball", True)}  # key -> (what, may be a vacuous -inf)


def images_at(mask: np.ndarray) -> str:
    index = np.flatnonzero(mask)
    return ", ".join(map(str, index[:8])) + (f" and {index.size - 8} more" if index.size > 8 else "")


def relative_difference(committed, recomputed, vacuous_ok: bool) -> tuple[float, list[str], int]:
    """Largest |recomputed - committed| / max(1, |committed|) over the finite pairs; NaN and +inf
    on either side, and -inf on one side only (or at all, unless ``vacuous_ok``), are problems
    naming the images. -> (worst, problems, images whose bound is -inf on both sides: vacuous)."""
    committed, recomputed = np.asarray(committed, dtype=float), np.asarray(recomputed, dtype=float)
    if committed.shape != recomputed.shape:
        return math.inf, [f"shape {committed.shape} committed, {recomputed.shape} recomputed"], 0
    problems = [f"{kind} {side} at images {images_at(mask)}"
                for side, values in (("committed", committed), ("recomputed", recomputed))
                for kind, mask in (("NaN", np.isnan(values)), ("+inf", np.isposinf(values))) if mask.any()]
    both = np.isneginf(committed) & np.isneginf(recomputed)
    one_side = np.isneginf(committed) != np.isneginf(recomputed)
    if one_side.any():
        problems.append(f"-inf on one side only at images {images_at(one_side)}")
    if both.any() and not vacuous_ok:
        problems.append(f"-inf (not a bound: never vacuous) at images {images_at(both)}")
    finite = np.isfinite(committed) & np.isfinite(recomputed)
    worst = float(np.max(np.abs(recomputed[finite] - committed[finite]) / np.maximum(1.0, np.abs(committed[finite])),
                         initial=0.0))
    return worst, problems, int(both.sum()) if vacuous_ok else 0


def check_certificates(project: Project, data: DataSource) -> list[Verdict]:
    """Per model and per record (ELBO, LB in each ball): recomputed on the CPU with `evaluate`'s
    audit noise against the committed per-image values; NaN anywhere fails, naming the images."""
    tolerance = project.params["audit"]["tolerance_relative"]
    verdicts = []
    for audited in project.audited:
        model = audited.model
        try:
            where = per_example_path(project, audited).relative_to(project.root)
            loaded = load(project, data, audited)
            committed = committed_per_example(project, audited)
            n = committed["audit_elbo"].shape[0]
            recomputed = audit_records(loaded.model, loaded.test_images[:n], model.eps, loaded.meta["sigma0"],
                                       model.seed)
        except READ_ERRORS as error:
            verdicts.append(Verdict(f"certificate {audited.name}", "loads and recomputes",
                                    f"{type(error).__name__}: {error}", False))
            continue
        for key, (what, vacuous_ok) in AUDIT_RECORDS.items():
            if key not in committed or key not in recomputed:
                verdicts.append(Verdict(f"certificate {audited.name}: {what}", f"{key} in {where}", "missing", False))
                continue
            worst, problems, vacuous = relative_difference(committed[key], recomputed[key], vacuous_ok)
            found = (f"{'; '.join(problems)} ({where} [{key}])" if problems else f"{worst:.2e}") + (
                f"; vacuous (-inf) on both sides at {vacuous} of {n} images" if vacuous else "")
            verdicts.append(Verdict(f"certificate {audited.name}: {what} at eps_train {model.eps:g}, {n} images",
                                    f"relative difference <= {tolerance:g}", found,
                                    not problems and worst <= tolerance))
    return verdicts


def certificate_violations(attacked, bound, tolerance: float) -> dict[str, int]:
    """Per image, the attacked ELBO against the certificate for the same noise: ``below`` (by more
    than float slack ``tolerance`` relative to |bound|; a +inf bound is below nothing, so it counts
    too), ``nan`` (either side), ``infinite_elbo`` (an ELBO is never infinite): failures;
    ``vacuous`` (a -inf bound, certifying nothing): said, not a failure."""
    attacked, bound = np.asarray(attacked, dtype=float), np.asarray(bound, dtype=float)
    nan = np.isnan(attacked) | np.isnan(bound)
    infinite_elbo = ~nan & np.isinf(attacked)
    checked = ~nan & ~infinite_elbo
    vacuous = checked & np.isneginf(bound)
    finite_bound = checked & np.isfinite(bound)
    with np.errstate(invalid="ignore"):  # inf - inf where the bound is not finite: masked out below
        below = (checked & np.isposinf(bound)) | (finite_bound & (attacked < bound - tolerance * np.abs(bound)))
    return {"below": int(below.sum()), "nan": int(nan.sum()), "infinite_elbo": int(infinite_elbo.sum()),
            "vacuous": int(vacuous.sum())}


def check_fresh_attacks(project: Project, data: DataSource) -> list[Verdict]:
    p, a = project.params["evaluate"], project.params["audit"]
    verdicts = []
    generator = torch.Generator().manual_seed(2024)
    for audited in project.audited:
        model = audited.model
        try:
            loaded = load(project, data, audited)
        except READ_ERRORS as error:
            verdicts.append(Verdict(f"fresh attack {audited.name}", "loads", f"{type(error).__name__}: {error}", False))
            continue
        x = loaded.test_images[: a["attack_examples"]]
        noise = evaluation_noise(x.shape[0], loaded.model.latent_dim, model.seed, p, x.device)["certificate"]
        sigma0, checked, failures, vacuous, below = loaded.meta["sigma0"], 0, [], 0, 0
        for ball, clip in BALLS.items():
            for eps in [e for e in p["eps_attack"] if e > 0]:
                starts = [residual_sign_attack(loaded.model, x, eps, clip)]
                x_adv = apgd_attack(loaded.model, x, eps, noise, start=starts[0], steps=a["attack_steps"],
                                    sigma0=sigma0, clip=clip, generator=generator)
                with torch.no_grad():
                    attacked = torch.minimum(elbo(loaded.model, x_adv, noise, sigma0), elbo(loaded.model, starts[0], noise, sigma0))
                    bound = elbo_lower_bound(loaded.model, x, eps, noise, sigma0, clip)
                counts = certificate_violations(attacked.cpu().numpy(), bound.cpu().numpy(), p["audit_tolerance"])
                checked, vacuous, below = checked + x.shape[0], vacuous + counts["vacuous"], below + counts["below"]
                wrong = [f"{counts[k]} {what}" for k, what in (("below", "below the certificate"), ("nan", "NaN"),
                                                              ("infinite_elbo", "infinite attacked ELBO")) if counts[k]]
                if wrong:
                    failures.append(f"eps_attack {eps:g}, {ball} ball: {', '.join(wrong)}")
        said = f"; vacuous (-inf) certificate for {vacuous}" if vacuous else ""
        found = ("; ".join(failures) if failures else f"{below} below") + said
        verdicts.append(Verdict(f"fresh attack {audited.name}: {checked} (image, eps, ball) triples",
                                "0 below the certificate, no NaN", found, not failures))
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
    model = GridModel(choice["dataset"], float(choice["eps_train"]), int(choice["seed"]))
    audited = Audited(model)  # a model of the grid
    loaded = load(project, data, audited)
    committed = committed_per_example(project, audited)
    where = per_example_path(project, audited).relative_to(project.root)
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
        check = f"re-run {model.name}, {headline} ball, eps_attack {eps:g}, {n} images"
        if not np.isfinite(differences).all():
            sides = (("committed", committed[f"{headline}/elbo_attacked"][i, :n]),
                     ("re-run", rerun["elbo_attacked"][i]))
            wrong = "; ".join(f"{side} non-finite at images {images_at(~np.isfinite(values))}"
                              for side, values in sides if not np.isfinite(values).all())
            verdicts.append(Verdict(check, "finite ELBOs on both sides",
                                    f"{wrong} ({where} [{headline}/elbo_attacked])", False))
            continue
        tolerance = (max(strength["tolerance_nats"], strength["tolerance_relative"] * abs(reference))
                     + 3 * float(differences.std(ddof=1)) / math.sqrt(n))
        found = float(differences.mean())
        verdicts.append(Verdict(check,
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
        steps = {"checkpoints": lambda: check_checkpoints(project), "outputs": lambda: check_outputs(project),
                 "finite": lambda: check_finite(project), "report": lambda: check_report(project),
                 "certificate": lambda: check_certificates(project, data),
                 "fresh_attack": lambda: check_fresh_attacks(project, data),
                 "rerun": lambda: check_rerun(project, data)}
        for name in CHECKS:
            if name in args.skip:
                continue
            step_started = time.time()
            try:
                verdicts += steps[name]()
            except READ_ERRORS as error:
                verdicts.append(Verdict(name, "runs", f"{type(error).__name__}: {error}", False))
            print(f"[audit] {name}: {time.time() - step_started:.0f} s", file=sys.stderr, flush=True)
    print_table(verdicts)
    failed = [v for v in verdicts if not v.passed]
    print(f"\n{len(verdicts) - len(failed)} passed, {len(failed)} failed, in {time.time() - started:.0f} s")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
