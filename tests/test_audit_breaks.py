"""`make audit` broken on purpose, one way per check: each damage must fail the audit, naming the file.

A tiny project is reproduced once (module fixture, a couple of minutes on 2 CPU cores) and
committed; each test damages a copy of one committed result, runs scripts/audit.py (the slow
checks skipped where they are not the subject), restores the bytes, and reads the verdict table.
A copy of `conftest.listed_project` (the tiny project with mnist-0.05-0 on `bound_training.models`
and `certify_elbo.models`, their stages reproduced) checks that the per-model checks visit those
models' files too.
The comparisons themselves, on values made by hand: tests/test_audit_checks.py.
"""

import io
import re
import shutil
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import copy_project, run

pytestmark = pytest.mark.pipeline

MODEL = "mnist-eps0.05-seed0"
PER_EXAMPLE = f"reports/eval/{MODEL}/per_example.npz"
CHECKPOINTS = ("models/mnist/eps0.0-seed0.pt", "models/mnist/eps0.05-seed0.pt")
SLOW = ("report", "certificate", "fresh_attack", "rerun")


@pytest.fixture(scope="module")
def project(tmp_path_factory, env):
    """The tiny profile reproduced and committed in a fresh git + DVC repository."""
    repo = copy_project(tmp_path_factory.mktemp("audited"), env)
    run(["dvc", "repro"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "tiny results"], repo, env)
    return repo


def audit(repo, env, skip=SLOW):
    result = run([sys.executable, "scripts/audit.py", *(["--skip", *skip] if skip else [])], repo, env, check=False)
    return result.returncode, result.stdout + result.stderr


def failed(output: str) -> list[str]:
    """The verdict rows that FAIL, as printed."""
    return [line for line in output.splitlines() if line.rstrip().endswith("| FAIL")]


def assert_fails_naming(output: str, *patterns: str) -> None:
    rows = failed(output)
    for pattern in patterns:
        assert any(re.search(pattern, row) for row in rows), f"no FAIL row matches {pattern!r} in:\n{output}"


class Damaged:
    """Files of the project changed inside a ``with`` block, their bytes restored after it."""

    def __init__(self, repo, *paths):
        self.repo, self.saved = repo, {path: (repo / path).read_bytes() for path in paths}

    def __enter__(self):
        return self

    def __exit__(self, *_):
        for path, data in self.saved.items():
            (self.repo / path).write_bytes(data)


def edit_npz(path, key: str, index, change) -> None:
    with np.load(path) as saved:
        arrays = {name: saved[name].copy() for name in saved.files}
    arrays[key][index] = change(arrays[key][index])
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    path.write_bytes(buffer.getvalue())


def test_the_committed_tiny_project_passes(project, env):
    code, output = audit(project, env, skip=())
    assert code == 0, output
    assert re.search(r"outputs: every path dvc.lock records .*\| (\d+) of \1 match .*\| pass", output)
    assert run(["git", "status", "--porcelain"], project, env).stdout == ""


def test_a_per_image_value_moved_by_100_nats_fails(project, env):
    """+100 nats on one certified bound: the file's md5 is no longer dvc.lock's."""
    with Damaged(project, PER_EXAMPLE):
        edit_npz(project / PER_EXAMPLE, "unclipped/bound", (1, 0), lambda v: v + 100)
        code, output = audit(project, env)
    assert code == 1
    assert_fails_naming(output, rf"output {re.escape(PER_EXAMPLE)} .*the file differs",
                        rf"output reports/eval/{MODEL} .*differs in {re.escape(PER_EXAMPLE)}")


def test_an_audited_per_image_bound_moved_by_100_nats_fails_the_recomputation_too(project, env):
    with Damaged(project, PER_EXAMPLE):
        edit_npz(project / PER_EXAMPLE, "audit_lb_unclipped", 0, lambda v: v + 100)
        code, output = audit(project, env, skip=("report", "fresh_attack", "rerun"))
    assert code == 1
    assert_fails_naming(output, rf"output {re.escape(PER_EXAMPLE)} ",
                        rf"certificate {MODEL}: LB, unclipped ball at eps_train 0.05")


@pytest.mark.parametrize("key, index, where", [
    ("audit_lb_clipped", 3, r"eps_train 0.05, clipped ball"),  # the value the issue found passed
    ("unclipped/bound", (1, 2), r"eps_attack 0.05, unclipped ball"),
])
def test_a_nan_in_a_per_image_value_fails(project, env, key, index, where):
    with Damaged(project, PER_EXAMPLE):
        edit_npz(project / PER_EXAMPLE, key, index, lambda v: np.nan)
        code, output = audit(project, env, skip=("report", "fresh_attack", "rerun"))
    assert code == 1
    assert_fails_naming(output, rf"output {re.escape(PER_EXAMPLE)} ",
                        rf"finite {MODEL} .*NaN in {re.escape(PER_EXAMPLE)} \[{re.escape(key)}\] at {where}")
    if key == "audit_lb_clipped":
        assert_fails_naming(output, rf"certificate {MODEL}: LB, clipped ball .*NaN committed at images 3 "
                                    rf"\({re.escape(PER_EXAMPLE)} \[audit_lb_clipped\]\)")


def test_two_swapped_checkpoints_fail(project, env):
    """The files swapped, metadata and all: md5, metadata, and the loader's own check all refuse them."""
    a, b = (project / path for path in CHECKPOINTS)
    with Damaged(project, *CHECKPOINTS):
        first, second = a.read_bytes(), b.read_bytes()
        a.write_bytes(second)
        b.write_bytes(first)
        code, output = audit(project, env, skip=("report", "fresh_attack", "rerun"))
    assert code == 1
    for path, eps, other in ((CHECKPOINTS[0], "0.0", "0.05"), (CHECKPOINTS[1], "0.05", "0.0")):
        assert_fails_naming(output, rf"checkpoint {re.escape(path)}: md5 ", rf"output {re.escape(path)} ",
                            rf"checkpoint {re.escape(path)}: metadata .*eps_train: {other}, expected {eps}")
        assert_fails_naming(output, rf"certificate mnist-eps{eps}-seed0 .*{re.escape(path)} was trained with "
                                    rf"eps_train={other}, not {eps}")


def test_two_swapped_checkpoints_with_their_metadata_rewritten_fail(project, env):
    """Swapped, and each checkpoint's embedded metadata edited to claim the other's place: the
    metadata check and the loader now agree with the paths, so the md5s and the recomputed
    per-image certificate are what catch it."""
    a, b = (project / path for path in CHECKPOINTS)
    with Damaged(project, *CHECKPOINTS):
        payloads = [torch.load(path, weights_only=True) for path in (a, b)]
        for payload, path, claimed in ((payloads[1], a, payloads[0]["metadata"]),
                                       (payloads[0], b, payloads[1]["metadata"])):
            payload["metadata"] = {**payload["metadata"], "eps_train": claimed["eps_train"], "seed": claimed["seed"]}
            torch.save(payload, path)
        code, output = audit(project, env, skip=("report", "fresh_attack", "rerun"))
    assert code == 1
    assert not any("metadata" in row for row in failed(output)), output  # the edit fooled this check...
    for path in CHECKPOINTS:
        assert_fails_naming(output, rf"checkpoint {re.escape(path)}: md5 ", rf"output {re.escape(path)} ")
    # ...but not the recomputation: the eps 0.05 path now holds the plain VAE, a different certificate.
    assert_fails_naming(output, rf"certificate {MODEL}: LB, unclipped ball")


@pytest.mark.parametrize("path, named", [
    (f"reports/attack_curves/{MODEL}.csv", r"output {path} .*the file differs"),
    (f"reports/attack_strength/{MODEL}.csv", r"output {path} .*the file differs"),
    ("reports/table1.csv", r"output {path} .*the file differs"),
    (f"reports/certify/{MODEL}/bounds.csv", r"output reports/certify/{model} .*one of .*bounds.csv"),
])
def test_a_csv_edited_by_one_digit_fails(project, env, path, named):
    target = project / path
    with Damaged(project, path):
        text = target.read_text()
        match = re.search(r"(?<=,)-?\d+\.(\d)", text)  # the first decimal digit of a number in the body
        digit = match.start(1)
        target.write_text(text[:digit] + str((int(text[digit]) + 1) % 10) + text[digit + 1 :])
        code, output = audit(project, env)
    assert code == 1
    assert_fails_naming(output, named.format(path=re.escape(path), model=MODEL))


# --- the models of bound_training.models and certify_elbo.models, visited by the per-model checks ---

VARIANT = "mnist-elbo_crown-eps0.05-seed0"  # mnist-0.05-0 trained again on bound_training.bound
BOUND_CHECKPOINT = "models/mnist/elbo_crown-eps0.05-seed0.pt"
BOUND_PER_EXAMPLE = f"reports/eval/{VARIANT}/per_example.npz"
ELBO_BOUNDS = f"reports/certify_elbo/{MODEL}/bounds.csv"


@pytest.fixture(scope="module")
def listed(listed_project, tmp_path_factory):
    """A copy of `conftest.listed_project`: the tiny project with mnist-0.05-0 on
    `bound_training.models` and on `certify_elbo.models`, its stages (train_bound, evaluate_bound,
    certify_bound, certify_elbo) reproduced and committed; a copy, since the tests here damage it."""
    repo, _, _, ran = listed_project
    assert {f"{stage}@mnist-0.05-0" for stage in ("train_bound", "evaluate_bound", "certify_bound", "certify_elbo")} <= set(
        re.findall(r"Running stage '([^']+)'", ran))
    copy = tmp_path_factory.mktemp("listed_copy") / "repo"
    shutil.copytree(repo, copy, symlinks=True)
    return copy


def passed_row(output: str, pattern: str) -> None:
    assert any(re.search(pattern, line) and line.rstrip().endswith("| pass") for line in output.splitlines()), (
        f"no passing row matches {pattern!r} in:\n{output}")


def test_the_listed_models_are_audited_and_pass(listed, env):
    code, output = audit(listed, env, skip=("rerun",))
    assert code == 0, output
    for pattern in (rf"checkpoint {re.escape(BOUND_CHECKPOINT)}: md5 ", rf"checkpoint {re.escape(BOUND_CHECKPOINT)}: metadata ",
                    rf"finite {VARIANT} \(eps_train 0.05\): per-image values, curves, certify ",
                    rf"finite {MODEL} \(eps_train 0.05\): certify_elbo's bounds, radii ",
                    rf"certificate {VARIANT}: LB, clipped ball at eps_train 0.05",
                    rf"fresh attack {VARIANT}: \d+ \(image, eps, ball\) triples",
                    r"outputs: every path dvc.lock records .*\| (\d+) of \1 match"):
        passed_row(output, pattern)


def test_a_nan_in_the_bound_trained_models_per_image_value_fails(listed, env):
    with Damaged(listed, BOUND_PER_EXAMPLE):
        edit_npz(listed / BOUND_PER_EXAMPLE, "unclipped/bound", (1, 2), lambda v: np.nan)
        code, output = audit(listed, env)
    assert code == 1
    assert_fails_naming(output, rf"finite {VARIANT} .*NaN in {re.escape(BOUND_PER_EXAMPLE)} \[unclipped/bound\] "
                                r"at eps_attack 0.05, unclipped ball")
    assert not any(f"finite {MODEL} " in row for row in failed(output)), output  # its IBP-trained twin is intact


def test_a_nan_in_certify_elbos_bounds_fails_naming_the_file(listed, env):
    with Damaged(listed, ELBO_BOUNDS):
        table = pd.read_csv(listed / ELBO_BOUNDS)
        assert set(table["method"]) == {"ibp", "crown", "elbo"}
        table.loc[(table["method"] == "elbo") & (table["eps_attack"] == 0.05), "attacked_elbo"] = np.nan
        table.to_csv(listed / ELBO_BOUNDS, index=False)
        code, output = audit(listed, env)
    assert code == 1
    assert_fails_naming(output, rf"finite {MODEL} \(eps_train 0.05\): certify_elbo's bounds, radii .*"
                                rf"NaN in {re.escape(ELBO_BOUNDS)} \[attacked_elbo\] at eps_attack 0.05, \w+ ball, "
                                r"elbo \(1 of 1\) +\|",
                        rf"output reports/certify_elbo/{MODEL} .*bounds.csv")


def test_a_tampered_bound_trained_checkpoint_fails(listed, env):
    target = listed / BOUND_CHECKPOINT
    with Damaged(listed, BOUND_CHECKPOINT):
        payload = torch.load(target, weights_only=True)
        name = next(key for key, value in payload["state_dict"].items() if value.is_floating_point())
        payload["state_dict"][name] = payload["state_dict"][name] + 1e-2
        torch.save(payload, target)
        code, output = audit(listed, env, skip=("report", "fresh_attack", "rerun"))
    assert code == 1
    assert_fails_naming(output, rf"checkpoint {re.escape(BOUND_CHECKPOINT)}: md5 ", rf"output {re.escape(BOUND_CHECKPOINT)} ",
                        rf"certificate {VARIANT}: ")
    assert not any(row.startswith(f"certificate {MODEL}") for row in failed(output)), output
