"""`make audit`'s comparisons on values made by hand: each fails on NaN wherever it stands, takes
-inf only as a vacuous bound (and says so), and names what differs. Fast: no pipeline run.

The checks end to end, each broken on purpose in a tiny reproduced project: tests/test_audit_breaks.py.
"""

import os
import shutil
import sys
import warnings
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from conftest import run, small_model
from scripts import audit  # a namespace package: imported by its path, as mutmut names its mutants

NAN, INF = float("nan"), float("inf")


# --- certificate: committed per-image values against the recomputed ones ---


@pytest.mark.parametrize("position", [0, 1, 2])
def test_a_nan_fails_the_comparison_wherever_it_stands(position):
    """Python's max over the keys dropped a NaN unless it came first: here each position fails."""
    committed = np.array([-50.0, -60.0, -70.0], dtype=np.float32)
    recomputed = committed.copy()
    committed[position] = NAN
    worst, problems, vacuous = audit.relative_difference(committed, recomputed, vacuous_ok=True)
    assert problems == [f"NaN committed at images {position}"] and vacuous == 0
    worst, problems, _ = audit.relative_difference(recomputed, committed, vacuous_ok=True)
    assert problems == [f"NaN recomputed at images {position}"]


def test_relative_difference_by_hand():
    # |100.01 - 100| / 100 = 1e-4; |1.5 - 1| / max(1, 1) = 0.5; |0.6 - 0.5| / max(1, 0.5) = 0.1
    worst, problems, vacuous = audit.relative_difference([100.0, 1.0, 0.5], [100.01, 1.5, 0.6], vacuous_ok=False)
    assert worst == pytest.approx(0.5) and problems == [] and vacuous == 0
    worst, _, _ = audit.relative_difference([-200.0, 0.5], [-200.02, 0.6], vacuous_ok=False)
    assert worst == pytest.approx(0.1)
    worst, _, _ = audit.relative_difference([-200.0], [-200.02], vacuous_ok=False)
    assert worst == pytest.approx(1e-4)  # relative to |committed| above 1, not to 1
    worst, _, _ = audit.relative_difference([2.0, 4.0], [2.0, 4.0], vacuous_ok=False)
    assert worst == 0.0


def test_a_vacuous_bound_on_both_sides_is_counted_not_hidden():
    worst, problems, vacuous = audit.relative_difference([-INF, -10.0, -INF], [-INF, -10.0, -INF], vacuous_ok=True)
    assert (worst, problems, vacuous) == (0.0, [], 2)
    assert audit.relative_difference([-INF, -INF], [-INF, -INF], vacuous_ok=True) == (0.0, [], 2)  # nothing finite
    _, problems, vacuous = audit.relative_difference([-INF, -10.0], [-INF, -10.0], vacuous_ok=False)
    assert problems == ["-inf (not a bound: never vacuous) at images 0"] and vacuous == 0  # an ELBO is never -inf


@pytest.mark.parametrize("committed, recomputed, expected", [
    ([-INF, -1.0], [-5.0, -1.0], "-inf on one side only at images 0"),
    ([-5.0, -1.0], [-5.0, -INF], "-inf on one side only at images 1"),
    ([INF, -1.0], [-1.0, -1.0], "+inf committed at images 0"),
    ([-1.0, -1.0], [-1.0, INF], "+inf recomputed at images 1"),
])
def test_infinities_that_are_not_a_vacuous_bound_fail(committed, recomputed, expected):
    worst, problems, vacuous = audit.relative_difference(committed, recomputed, vacuous_ok=True)
    assert problems == [expected] and vacuous == 0
    assert worst == 0.0  # the finite pair agrees; the infinite one is a problem, not a difference


def test_images_are_named_and_long_lists_cut():
    mask = np.zeros(20, dtype=bool)
    mask[[1, 3]] = True
    assert audit.images_at(mask) == "1, 3"
    assert audit.images_at(np.ones(10, dtype=bool)) == "0, 1, 2, 3, 4, 5, 6, 7 and 2 more"
    assert audit.images_at(np.ones(9, dtype=bool)) == "0, 1, 2, 3, 4, 5, 6, 7 and 1 more"
    assert audit.images_at(np.ones(8, dtype=bool)) == "0, 1, 2, 3, 4, 5, 6, 7"


def test_a_shape_mismatch_fails():
    assert audit.relative_difference([1.0, 2.0], [1.0], vacuous_ok=True) == (
        INF, ["shape (2,) committed, (1,) recomputed"], 0)


# --- fresh attack: attacked ELBO against the certificate for the same noise ---


def test_certificate_violations_by_hand():
    attacked = [-10.0, -10.0, -10.0, NAN, -10.0, -10.0, -INF, -10.0]
    bound = [-9.0, -10.0005, -INF, -12.0, NAN, INF, -12.0, -9.9999]
    # below: -10 < -9 (0), +inf bound (5); inside the slack: 1 (1e-4 * 10 = 1e-3 > 5e-4), 7 (-10 > -9.9999 - 1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # inf - inf at the infinite bounds is masked, not warned about
        counts = audit.certificate_violations(attacked, bound, tolerance=1e-4)
    assert counts == {"below": 2, "nan": 2, "infinite_elbo": 1, "vacuous": 1}


def test_certificate_violations_slack_is_relative_to_the_bound():
    assert audit.certificate_violations([-100.02], [-100.0], 1e-4)["below"] == 1  # 0.02 > 1e-4 * 100
    assert audit.certificate_violations([-100.005], [-100.0], 1e-4)["below"] == 0
    assert audit.certificate_violations([-10.0], [-10.0], 0.0)["below"] == 0  # equal is not below
    assert audit.certificate_violations([-0.5], [0.5], 0.5)["below"] == 1  # slack 0.25 of |0.5|: -0.5 < 0.25


# --- finite: the committed per-image values and tables ---


def test_non_finite_names_the_row_and_allows_only_what_a_column_may_hold():
    values = np.array([[1.0, NAN, 2.0], [3.0, 4.0, 5.0], [-INF, NAN, INF]])
    labels = ["eps_attack 0", "eps_attack 0.05", "eps_attack 0.1"]
    problems, vacuous = audit.non_finite(values, labels, "f.npz [k]")
    assert problems == ["NaN in f.npz [k] at eps_attack 0 (1 of 3); eps_attack 0.1 (1 of 3)",
                        "+inf in f.npz [k] at eps_attack 0.1 (1 of 3)", "-inf in f.npz [k] at eps_attack 0.1 (1 of 3)"]
    assert vacuous == 0
    problems, vacuous = audit.non_finite(values, labels, "w", vacuous_ok=True, gap_ok=True)
    assert problems == ["NaN in w at eps_attack 0 (1 of 3); eps_attack 0.1 (1 of 3)"] and vacuous == 1
    assert audit.non_finite(np.array([1.0, 2.0]), ["a", "b"], "w") == ([], 0)


def per_example(nan_at=None):
    arrays = {"eps_attack": np.array([0.0, 0.05]),
              "unclipped/bound": np.array([[-5.0, -6.0], [-INF, -9.0]], dtype=np.float32),
              "unclipped/elbo_attacked": np.array([[-5.0, -6.0], [-7.0, -8.0]], dtype=np.float32),
              "unclipped/winner": np.array([[0, 0], [1, 2]]),
              "audit_elbo": np.array([-5.0, -6.0], dtype=np.float32),
              "audit_lb_clipped": np.array([-5.5, -INF], dtype=np.float32)}
    if nan_at:
        key, index = nan_at
        arrays[key][index] = NAN
    return arrays


def test_scan_per_example_says_vacuous_bounds_and_names_nan():
    assert audit.scan_per_example(per_example(), 0.05, "e.npz") == ([], 2)
    problems, _ = audit.scan_per_example(per_example(("unclipped/bound", (1, 1))), 0.05, "e.npz")
    assert problems == ["NaN in e.npz [unclipped/bound] at eps_attack 0.05, unclipped ball (1 of 2)"]
    problems, _ = audit.scan_per_example(per_example(("audit_lb_clipped", 0)), 0.05, "e.npz")
    assert problems == ["NaN in e.npz [audit_lb_clipped] at eps_train 0.05, clipped ball (1 of 2)"]
    problems, _ = audit.scan_per_example(per_example(("audit_elbo", 1)), 0.05, "e.npz")
    assert problems == ["NaN in e.npz [audit_elbo] at eps_train 0.05 (1 of 2)"]
    arrays = per_example()
    arrays["unclipped/elbo_attacked"][0, 0] = -INF  # an ELBO is never vacuous
    problems, _ = audit.scan_per_example(arrays, 0.05, "e.npz")
    assert problems == ["-inf in e.npz [unclipped/elbo_attacked] at eps_attack 0, unclipped ball (1 of 2)"]
    arrays = per_example()
    arrays["audit_elbo"][0] = -INF
    problems, vacuous = audit.scan_per_example(arrays, 0.05, "e.npz")
    assert problems == ["-inf in e.npz [audit_elbo] at eps_train 0.05 (1 of 2)"] and vacuous == 2
    arrays = {**per_example(), "eps_attack": np.array([0.0, NAN]), "clipped/extra": np.array([1.0, NAN])}
    problems, _ = audit.scan_per_example(arrays, 0.05, "e.npz")  # other keys are named by the key
    assert problems == ["NaN in e.npz [eps_attack] at eps_attack (1 of 2)", "NaN in e.npz [clipped/extra] at clipped/extra (1 of 2)"]


def test_scan_table_names_eps_ball_and_method():
    bounds = pd.DataFrame({"ball": ["unclipped", "clipped"], "eps_attack": [0.05, 0.1], "method": ["ibp", "crown"],
                           "bound": [-INF, NAN], "gap": [INF, 1.0], "violations": [0, 0]})
    problems, vacuous = audit.scan_table(bounds, "b.csv")
    assert problems == ["NaN in b.csv [bound] at eps_attack 0.1, clipped ball, crown (1 of 1)"] and vacuous == 1
    curve = pd.DataFrame({"eps_attack": [0.0, 0.05], "bound_clipped": [-1.0, -2.0], "elbo_attacked_clipped": [-1.0, NAN],
                          "min_margin_clipped": [0.0, INF]})
    problems, vacuous = audit.scan_table(curve, "c.csv")
    assert problems == ["NaN in c.csv [elbo_attacked_clipped] at eps_attack 0.05, clipped ball (1 of 1)"]
    radii = pd.DataFrame({"image": [0, 1], "method": ["ibp", "ibp"], "tau": ["5 nats", "5 nats"], "radius": [0.1, -INF]})
    problems, _ = audit.scan_table(radii, "r.csv")
    assert problems == ["-inf in r.csv [radius] at image 1, ibp, 5 nats (1 of 1)"]
    other = pd.DataFrame({"ball": ["clipped"], "method": ["crown"], "value": [NAN], "count": [3]})
    assert audit.scan_table(other, "o.csv") == (["NaN in o.csv [value] at clipped ball, crown (1 of 1)"], 0)


# --- outputs: every path dvc.lock records ---


LOCK = {
    "evaluate@m": {"outs": [{"path": "reports/eval/m", "hash": "md5", "md5": "d1.dir"},
                            {"path": "reports/curve.csv", "hash": "md5", "md5": "c1"}],
                   "deps": [{"path": "data/prepared/mnist.npz", "hash": "md5", "md5": "p1"},
                            {"path": "provae/bounds.py", "hash": "md5", "md5": "s1"}]},
    "certify@m": {"outs": [{"path": "reports/certify/m", "hash": "md5", "md5": "k1.dir"}],
                  "deps": [{"path": "provae/bounds.py", "hash": "md5", "md5": "s1"},
                           {"path": "reports/eval/m/per_example.npz", "hash": "md5", "md5": "e1"}]},
    "report": {"outs": [{"path": "reports/table.csv", "md5": "t1"}],
               "deps": [{"path": "reports/eval", "hash": "md5", "md5": "a1.dir"},
                        {"path": "data/prepared", "hash": "md5", "md5": "q1.dir"}]},
    "data@mnist": {"outs": [{"path": "data/prepared/mnist.npz", "hash": "md5", "md5": "p1"}]},
}


def test_locked_outputs_are_every_out_and_every_dep_made_by_a_stage():
    records = audit.locked_outputs(LOCK, cached={"data/prepared/mnist.npz"})
    assert sorted(records) == ["reports/certify/m", "reports/curve.csv", "reports/eval", "reports/eval/m",
                               "reports/eval/m/per_example.npz", "reports/table.csv"]
    assert records["reports/eval/m/per_example.npz"].md5s == {"e1": ["certify@m deps"]}
    assert records["reports/table.csv"].hash_name == "md5-dos2unix"  # DVC 2's entries carry no `hash`
    assert records["reports/eval/m"].hash_name == "md5"
    assert "data/prepared/mnist.npz" in audit.locked_outputs(LOCK, cached=set())  # cached only when DVC says so
    assert "data/prepared" in audit.locked_outputs(LOCK, cached=set())  # a folder around an output: recorded


def test_a_path_recorded_with_two_md5s_is_named():
    lock = {"a": {"outs": [{"path": "r/x.csv", "hash": "md5", "md5": "1"}]},
            "b": {"deps": [{"path": "r/x.csv", "hash": "md5", "md5": "2"}], "outs": []}}
    records = audit.locked_outputs(lock, set())
    assert records["r/x.csv"].md5s == {"1": ["a outs"], "2": ["b deps"]}
    assert audit.output_problem("r/x.csv", {"r/x.csv": "1"}, records, None) == (
        "dvc.lock records 2 different md5s for it (1: a outs; 2: b deps): a stage ran on an older version of it")
    lock["c"] = {"deps": [{"path": "r/x.csv", "hash": "md5", "md5": "2"}]}
    records = audit.locked_outputs(lock, set())
    assert records["r/x.csv"].md5s == {"1": ["a outs"], "2": ["b deps", "c deps"]}
    assert audit.output_problem("r/x.csv", {"r/x.csv": "2"}, records, None) == (
        "dvc.lock records 2 different md5s for it (1: a outs; 2: b deps, c deps): a stage ran on an older version of it")
    # Inside a folder, a path recorded twice is named even where it matches one of its records.
    lock["a"]["outs"].append({"path": "r", "hash": "md5", "md5": "9.dir"})
    records = audit.locked_outputs(lock, set())
    assert audit.output_problem("r", {"r": "8.dir", "r/x.csv": "2"}, records, ["r/x.csv"]) == "8.dir: differs in r/x.csv"


def test_a_folder_names_every_deepest_path_that_differs():
    lock = {"a": {"outs": [{"path": "f", "hash": "md5", "md5": "1.dir"}, {"path": "f/a", "hash": "md5", "md5": "2"},
                           {"path": "f/g", "hash": "md5", "md5": "3.dir"}, {"path": "f/g/b", "hash": "md5", "md5": "4"}]}}
    records = audit.locked_outputs(lock, set())
    found = {"f": "5.dir", "f/a": "6", "f/g": "7.dir", "f/g/b": "8"}
    assert audit.output_problem("f", found, records, ["f/a", "f/g/b"]) == "5.dir: differs in f/a, f/g/b"
    assert audit.output_problem("fg", {"fg": "0"}, {"fg": audit.Locked("md5", {"0": ["x outs"]})}, None) is None
    assert not audit.inside("fg", "f") and audit.inside("f/g", "f") and audit.inside("f", "f")


FOUND = {"reports/eval": "a1.dir", "reports/eval/m": "d1.dir", "reports/eval/m/per_example.npz": "e1",
         "reports/curve.csv": "c1", "reports/certify/m": "k1.dir", "reports/table.csv": "t1"}
INSIDE = ["reports/eval/m/details.json", "reports/eval/m/figure_arrays.npz", "reports/eval/m/per_example.npz"]


def test_output_problem_names_what_differs():
    records = audit.locked_outputs(LOCK, cached={"data/prepared/mnist.npz"})
    assert all(audit.output_problem(path, FOUND, records, INSIDE) is None for path in records)
    assert audit.output_problem("reports/eval/m", {**FOUND, "reports/eval/m": None}, records, None) == "missing"
    assert audit.output_problem("reports/curve.csv", {**FOUND, "reports/curve.csv": "c2"}, records, None) == (
        "md5 c2: the file differs")
    # The per-image file differs: its folder, and the folder around that, name the file (the deepest record).
    found = {**FOUND, "reports/eval": "a2.dir", "reports/eval/m": "d2.dir", "reports/eval/m/per_example.npz": "e2"}
    assert audit.output_problem("reports/eval/m", found, records, INSIDE) == (
        "d2.dir: differs in reports/eval/m/per_example.npz")
    assert audit.output_problem("reports/eval", found, records, INSIDE) == (
        "a2.dir: differs in reports/eval/m/per_example.npz")
    # Another file differs: the folders name the files no record covers, one of which it must be.
    found = {**FOUND, "reports/eval": "a2.dir", "reports/eval/m": "d2.dir"}
    assert audit.output_problem("reports/eval/m", found, records, INSIDE) == (
        "d2.dir: differs in a file dvc.lock records only through the folder: one of details.json, figure_arrays.npz")
    assert audit.output_problem("reports/eval", found, records, INSIDE) == "a2.dir: differs in reports/eval/m"
    # Every file inside is recorded and matches: the folder gained or lost one.
    assert audit.output_problem("reports/eval/m", found, records, ["reports/eval/m/per_example.npz"]) == (
        "d2.dir: a file was added or removed")


FILES = {"out/values.csv": "eps,bound\n0.05,-12.5\n", "out/more.json": '{"a": 1}\n', "out/sub/deep.txt": "deep\n",
         "out/scratch.tmp": "ignored\n", ".dvcignore": "*.tmp\n", "single.txt": "one\r\ntwo\n", "prepared.bin": "cached\n"}
DVC_YAML = {"stages": {
    "make": {"cmd": "true", "outs": [{"out": {"cache": False}}, {"single.txt": {"cache": False}}, "prepared.bin"]},
    "use": {"cmd": "true", "deps": ["single.txt", "prepared.bin"]}}}
# What `dvc commit` (DVC 3.67) records for FILES: each file's md5 (CRLF kept), the folder's .dir hash
# (its .dvcignore'd file left out). test_the_pinned_lock_is_what_dvc_records checks it against DVC itself.
SINGLE = {"path": "single.txt", "hash": "md5", "md5": "57b956583c81128dc3f31ecb9e4d84e6", "size": 9}
PREPARED = {"path": "prepared.bin", "hash": "md5", "md5": "7e8853a8645f6d6926df9a789efad80f", "size": 7}
PINNED = {"make": {"cmd": "true", "outs": [
              {"path": "out", "hash": "md5", "md5": "4fa186c631e80d79d19529927d17f7b6.dir", "size": 35, "nfiles": 3},
              PREPARED, SINGLE]},
          "use": {"cmd": "true", "deps": [PREPARED, SINGLE]}}


def write_dvc_project(root, lock: bool) -> None:
    for name, text in FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(text.encode())
    (root / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML))
    (root / ".dvc").mkdir()
    (root / ".dvc" / "config").write_text("[core]\n    no_scm = True\n")
    if lock:
        (root / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": PINNED}))


def test_the_pinned_lock_is_what_dvc_records(tmp_path):
    write_dvc_project(tmp_path, lock=False)
    run([sys.executable, "-m", "dvc", "commit", "--force", "-q"], tmp_path, {**os.environ, "DVC_NO_ANALYTICS": "1"})
    assert yaml.safe_load((tmp_path / "dvc.lock").read_text())["stages"] == PINNED


@pytest.fixture
def dvc_project(tmp_path):
    """A DVC project (no git): one stage's outputs (a folder, a file, and a file DVC caches), and a
    stage that reads two of them, as `dvc commit` records them."""
    write_dvc_project(tmp_path, lock=True)
    return SimpleNamespace(root=tmp_path, lock=yaml.safe_load((tmp_path / "dvc.lock").read_text())["stages"])


SUMMARY = ("outputs: every path dvc.lock records", "dvc.lock's md5 (DVC's hash, folders .dir)")


def test_outputs_check_agrees_with_dvc(dvc_project):
    """The cached file is not a committed output (DVC keeps it, not git): gone, it is not missing."""
    (dvc_project.root / "prepared.bin").unlink()
    (dvc_project.root / "out" / "scratch.tmp").write_text("changed, but .dvcignore'd\n")
    verdicts = audit.check_outputs(dvc_project)
    assert [(v.check, v.expected, v.found, v.passed) for v in verdicts] == [(*SUMMARY, "2 of 2 match", True)]


def test_outputs_check_names_the_changed_file(dvc_project):
    (dvc_project.root / "out" / "sub" / "deep.txt").write_text("deeP\n")  # one letter
    verdicts = audit.check_outputs(dvc_project)
    assert [(v.check, v.expected, v.passed) for v in verdicts] == [
        ("output out", "4fa186c631e80d79d19529927d17f7b6.dir (dvc.lock: make outs)", False), (*SUMMARY, False)]
    assert verdicts[0].found.endswith(".dir: differs in a file dvc.lock records only through the folder: one of "
                                      "more.json, sub/deep.txt, values.csv")
    assert verdicts[1].found == "1 of 2 match"


def test_outputs_check_names_missing_and_twice_recorded_paths(dvc_project):
    shutil.rmtree(dvc_project.root / "out")
    assert [(v.check, v.found) for v in audit.check_outputs(dvc_project)] == [
        ("output out", "missing"), (SUMMARY[0], "1 of 2 match")]  # and single.txt, after it, still hashed
    lock = yaml.safe_load((dvc_project.root / "dvc.lock").read_text())
    lock["stages"]["use"]["deps"][1] = {**SINGLE, "md5": "0" * 32}  # `use` ran on an older single.txt
    dvc_project.lock = lock["stages"]
    verdicts = {v.check: v for v in audit.check_outputs(dvc_project)}
    assert (verdicts["output out"].found, verdicts["output out"].passed) == ("missing", False)
    twice = verdicts["output single.txt"]
    assert twice.expected == f"{SINGLE['md5']} or {'0' * 32} (dvc.lock: make outs; use deps)"
    assert twice.found.startswith("dvc.lock records 2 different md5s for it")
    assert verdicts[SUMMARY[0]].found == "0 of 2 match"
    lock["stages"]["again"] = {"cmd": "true", "deps": [SINGLE]}  # two entries, one md5: listed together
    dvc_project.lock = lock["stages"]
    stale, _, twice, _ = audit.check_outputs(dvc_project)
    assert (stale.check, stale.expected, stale.found, stale.passed) == (
        "outputs: dvc.lock's stages", "each defined by dvc.yaml with params.yaml",
        "1 not defined (dvc.lock is stale): again", False)
    lock["stages"].update({f"gone{i}": {"cmd": "true"} for i in range(3)})
    assert audit.check_outputs(dvc_project)[0].found == "4 not defined (dvc.lock is stale): again, gone0, gone1, gone2"
    lock["stages"]["gone3"] = {"cmd": "true"}
    assert audit.check_outputs(dvc_project)[0].found == (
        "5 not defined (dvc.lock is stale): again, gone0, gone1, gone2 and 1 more")
    assert twice.expected.endswith("(dvc.lock: make outs, again deps; use deps)")
    assert twice.found.startswith(f"dvc.lock records 2 different md5s for it ({SINGLE['md5']}: make outs, again deps; ")


# --- checkpoints swapped with their metadata: the loader refuses the wrong (eps_train, seed) ---


@pytest.fixture
def two_checkpoints(tmp_path):
    from provae.data import PreparedData, save_prepared
    from provae.model import save_checkpoint

    images = (torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    data = tmp_path / "data.npz"
    save_prepared(PreparedData(images, torch.zeros(6, dtype=torch.uint8), images, torch.zeros(6, dtype=torch.uint8),
                               {"dataset": "mnist"}), data)
    paths = {}
    for eps, seed in ((0.0, 0), (0.05, 0), (0.05, 1)):
        paths[eps, seed] = tmp_path / f"eps{eps}-seed{seed}.pt"
        save_checkpoint(paths[eps, seed], small_model(seed), {"eps_train": eps, "seed": seed})
    return paths, data


def test_the_loader_takes_the_model_asked_for(two_checkpoints):
    paths, data = two_checkpoints
    loaded = audit.load_for_evaluation(paths[0.05, 1], 0.05, 1, data, "cpu")
    assert loaded.meta["eps_train"] == 0.05 and loaded.meta["seed"] == 1 and loaded.test_images.shape == (6, 1, 8, 8)


@pytest.mark.parametrize("a, b, key", [((0.0, 0), (0.05, 0), "eps_train"), ((0.05, 0), (0.05, 1), "seed")])
def test_swapped_checkpoints_with_their_metadata_are_refused(two_checkpoints, a, b, key):
    """Swap two checkpoint files (their metadata travels with them): loading either path as the
    model its name says fails, naming the path and what it was trained with."""
    paths, data = two_checkpoints
    first, second = paths[a].read_bytes(), paths[b].read_bytes()
    paths[a].write_bytes(second)
    paths[b].write_bytes(first)
    for path, (eps, seed), wrong in ((paths[a], a, b), (paths[b], b, a)):
        value = {"eps_train": wrong[0], "seed": wrong[1]}[key]
        expected = {"eps_train": eps, "seed": seed}[key]
        with pytest.raises(ValueError, match=f"{path.name} was trained with {key}={value}, not {expected}"):
            audit.load_for_evaluation(path, eps, seed, data, "cpu")


# --- finite, end to end on a project's files (no model run) ---


def finite_project(root, certify: bool) -> "audit.Project":
    """A project's files for the finite check: params, dvc.lock's commands, per-image values, curves."""
    params = {"datasets": ["mnist"], "grid": {"mnist-0.05-0": {"dataset": "mnist", "eps": 0.05, "seed": 0}}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "dvc.yaml").write_text("stages: {}\n")
    lock = {"evaluate@mnist-0.05-0": {"cmd": "python stages/evaluate.py --curve c/m.csv --out e/m"}}
    if certify:
        lock["certify@mnist-0.05-0"] = {"cmd": "python stages/certify.py --bounds k/b.csv --radii k/r.csv"}
        (root / "k").mkdir()
        pd.DataFrame({"ball": ["clipped"], "eps_attack": [0.05], "method": ["crown"], "bound": [-2.0], "gap": [1.0]}).to_csv(
            root / "k" / "b.csv", index=False)
        pd.DataFrame({"image": [0], "method": ["ibp"], "tau": ["5 nats"], "radius": [0.02]}).to_csv(root / "k" / "r.csv",
                                                                                                   index=False)
    (root / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": lock}))
    (root / "e" / "m").mkdir(parents=True)
    (root / "c").mkdir()
    np.savez(root / "e" / "m" / "per_example.npz", **per_example())
    pd.DataFrame({"eps_attack": [0.0, 0.05], "bound_unclipped": [-1.0, -INF]}).to_csv(root / "c" / "m.csv", index=False)
    return audit.Project(root)


def test_finite_check_names_the_model_file_key_eps_and_ball(tmp_path):
    project = finite_project(tmp_path, certify=False)
    assert project.dvc == {"stages": {}} and [m.name for m in project.models] == ["mnist-eps0.05-seed0"]
    with pytest.raises(KeyError, match="dvc.lock has no stage certify@mnist-0.05-0: run and commit the pipeline first"):
        project.locked("certify@mnist-0.05-0")
    [verdict] = audit.check_finite(project)
    assert (verdict.check, verdict.expected, verdict.found, verdict.passed) == (
        "finite mnist-eps0.05-seed0 (eps_train 0.05): per-image values, curves, certify",
        "no NaN; -inf only as a vacuous bound", "no NaN; vacuous (-inf) bound in 3 values", True)
    np.savez(tmp_path / "e" / "m" / "per_example.npz", **per_example(("audit_lb_clipped", 0)))
    [verdict] = audit.check_finite(project)
    assert not verdict.passed and verdict.found == (
        "NaN in e/m/per_example.npz [audit_lb_clipped] at eps_train 0.05, clipped ball (1 of 2); "
        "vacuous (-inf) bound in 3 values")
    (tmp_path / "c" / "m.csv").unlink()
    [verdict] = audit.check_finite(project)
    assert verdict.passed is False and verdict.found.startswith("FileNotFoundError: ") and verdict.found.endswith("m.csv'")


def test_finite_check_reads_certifys_tables(tmp_path):
    project = finite_project(tmp_path, certify=True)
    pd.DataFrame({"eps_attack": [0.0, 0.05], "bound_unclipped": [-1.0, -2.0]}).to_csv(tmp_path / "c" / "m.csv", index=False)
    np.savez(tmp_path / "e" / "m" / "per_example.npz", **{**per_example(), "audit_lb_clipped": np.array([-5.5, -6.0])})
    assert audit.check_finite(project)[0].found == "no NaN; vacuous (-inf) bound in 1 values"
    (tmp_path / "e" / "m" / "per_example.npz").write_bytes(b"")  # truncated: said, not passed
    assert audit.check_finite(project)[0].found == "EOFError: No data left in file"
    (tmp_path / "e" / "m" / "per_example.npz").write_bytes(b"PK\x03\x04 not a zip")
    assert audit.check_finite(project)[0].found.startswith("BadZipFile: ")
    np.savez(tmp_path / "e" / "m" / "per_example.npz", **{**per_example(), "unclipped/bound": np.ones((2, 2)),
                                                               "audit_lb_clipped": np.array([-5.5, -6.0])})
    assert audit.check_finite(project)[0].found == "no NaN"
    pd.DataFrame({"image": [0], "method": ["ibp"], "tau": ["5 nats"], "radius": [NAN]}).to_csv(tmp_path / "k" / "r.csv",
                                                                                              index=False)
    pd.DataFrame({"ball": ["clipped"], "eps_attack": [0.05], "method": ["crown"], "bound": [NAN], "gap": [INF]}).to_csv(
        tmp_path / "k" / "b.csv", index=False)
    [verdict] = audit.check_finite(project)
    assert not verdict.passed and verdict.found == (
        "NaN in k/b.csv [bound] at eps_attack 0.05, clipped ball, crown (1 of 1); "
        "NaN in k/r.csv [radius] at image 0, ibp, 5 nats (1 of 1)")


# --- the models of bound_training.models and certify_elbo.models: visited by the per-model checks ---

BOUND, LISTED = "elbo_crown", {"mnist-0.05-0": {"dataset": "mnist", "eps": 0.05, "seed": 0}}
VARIANT = "mnist-elbo_crown-eps0.05-seed0"  # the bound-trained model's output name
STAGES = yaml.safe_load((audit.ROOT / "dvc.yaml").read_text())["stages"]


def locked_cmd(kind: str, item: dict, bound: str = BOUND) -> str:
    """The command dvc.lock records for ``kind@<id>``: dvc.yaml's template, filled in as DVC does."""
    cmd = STAGES[kind]["do"]["cmd"]
    for key, value in (("item.dataset", item["dataset"]), ("item.eps", repr(item["eps"])), ("item.seed", item["seed"]),
                       ("bound_training.bound", bound)):
        cmd = cmd.replace("${" + key + "}", str(value))
    assert "${" not in cmd, cmd
    return cmd


def with_lists(root, bound_models=LISTED, elbo_models=LISTED) -> "audit.Project":
    """finite_project's files plus both lists in params.yaml: their stages' commands in dvc.lock
    (as dvc.yaml templates them) and their files (the grid model's, copied: finite)."""
    project = finite_project(root, certify=True)
    params = {**project.params, "bound_training": {"bound": BOUND, "models": bound_models},
              "certify_elbo": {"models": elbo_models, "examples": 16}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    lock = project.lock
    for model_id, item in bound_models.items():
        for kind in ("evaluate_bound", "certify_bound"):
            lock[f"{kind}@{model_id}"] = {"cmd": locked_cmd(kind, item)}
    for model_id, item in elbo_models.items():
        lock[f"certify_elbo@{model_id}"] = {"cmd": locked_cmd("certify_elbo", item)}
    (root / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": lock}))
    project = audit.Project(root)
    for audited in project.audited[1:]:
        evaluate = project.path_of(audited.stage("evaluate"), "--out")
        evaluate.mkdir(parents=True)
        shutil.copy(root / "e" / "m" / "per_example.npz", evaluate / "per_example.npz")
        copy(root / "c" / "m.csv", project.path_of(audited.stage("evaluate"), "--curve"))
        for flag, name in (("--bounds", "b.csv"), ("--radii", "r.csv")):
            copy(root / "k" / name, project.path_of(audited.stage("certify"), flag))
    for model in project.elbo_models:
        elbo_table(project.path_of(f"certify_elbo@{model.id}", "--bounds"))
        copy(root / "k" / "r.csv", project.path_of(f"certify_elbo@{model.id}", "--radii"))
    return project


def copy(source, target) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, target)


def elbo_table(path, bound=(-3.0, -2.5, -2.0), attacked_elbo=(-1.0, -1.0, -1.0)) -> None:
    """certify_elbo's bounds.csv: one row per method, the headline ball, at one eps_attack."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"ball": ["unclipped"] * 3, "eps_attack": [0.05] * 3, "method": ["ibp", "crown", "elbo"],
                  "bound": list(bound), "attacked_elbo": list(attacked_elbo),
                  "gap": [a - b for a, b in zip(attacked_elbo, bound)], "violations": [0, 0, 0],
                  "seconds_per_image": [0.1, 0.2, 1.5]}).to_csv(path, index=False)


def rows(verdicts) -> list[tuple]:
    return [(v.check, v.expected, v.found, v.passed) for v in verdicts]


def test_with_empty_lists_the_checked_models_and_verdicts_are_the_grids(tmp_path):
    before = finite_project(tmp_path, certify=True)
    verdicts = rows(audit.check_finite(before))
    assert before.audited == [audit.Audited(before.models[0])] and before.elbo_models == []
    for sections in ({"bound_training": {"bound": BOUND, "models": {}}, "certify_elbo": {"models": {}}},
                     {"bound_training": {"bound": BOUND, "models": None}, "certify_elbo": None}):
        (tmp_path / "params.yaml").write_text(yaml.safe_dump({**before.params, **sections}))
        project = audit.Project(tmp_path)
        assert [(a.name, a.stage("train"), a.bound) for a in project.audited] == [
            ("mnist-eps0.05-seed0", "train@mnist-0.05-0", None)]
        assert project.elbo_models == [] and rows(audit.check_finite(project)) == verdicts


def test_the_listed_models_are_named_and_staged_as_dvc_yaml_names_them(tmp_path):
    project = with_lists(tmp_path)
    grid, bound = project.audited
    assert (grid.name, grid.stage("evaluate")) == ("mnist-eps0.05-seed0", "evaluate@mnist-0.05-0")
    assert (bound.name, bound.bound, [bound.stage(k) for k in ("train", "evaluate", "certify")]) == (
        VARIANT, BOUND, ["train_bound@mnist-0.05-0", "evaluate_bound@mnist-0.05-0", "certify_bound@mnist-0.05-0"])
    assert [m.id for m in project.elbo_models] == ["mnist-0.05-0"]
    from provae.report.bound_training_files import bound_models, variant_name  # the report's names and models

    assert bound.name == variant_name(bound.model, BOUND) and [bound.model] == bound_models(project.params)
    assert audit.Audited(audit.GridModel("cifar10", 0.1, 2), "b").name == "cifar10-b-eps0.1-seed2"
    # the paths, read from the commands, are dvc.yaml's
    assert audit.per_example_path(project, bound) == tmp_path / f"reports/eval/{VARIANT}/per_example.npz"
    assert project.path_of("certify_elbo@mnist-0.05-0", "--bounds") == (
        tmp_path / "reports/certify_elbo/mnist-eps0.05-seed0/bounds.csv")


def test_finite_visits_the_bound_trained_model_and_certify_elbo(tmp_path):
    project = with_lists(tmp_path)
    assert rows(audit.check_finite(project)) == [
        ("finite mnist-eps0.05-seed0 (eps_train 0.05): per-image values, curves, certify",
         "no NaN; -inf only as a vacuous bound", "no NaN; vacuous (-inf) bound in 3 values", True),
        (f"finite {VARIANT} (eps_train 0.05): per-image values, curves, certify",
         "no NaN; -inf only as a vacuous bound", "no NaN; vacuous (-inf) bound in 3 values", True),
        ("finite mnist-eps0.05-seed0 (eps_train 0.05): certify_elbo's bounds, radii",
         "no NaN; -inf only as a vacuous bound", "no NaN", True)]


@pytest.mark.parametrize("key, index, where", [
    ("audit_lb_clipped", 0, "eps_train 0.05, clipped ball (1 of 2)"),
    ("unclipped/elbo_attacked", (1, 0), "eps_attack 0.05, unclipped ball (1 of 2)"),
])
def test_a_nan_in_a_bound_trained_models_per_image_values_fails_naming_it(tmp_path, key, index, where):
    project = with_lists(tmp_path)
    path = f"reports/eval/{VARIANT}/per_example.npz"
    np.savez(tmp_path / path, **per_example((key, index)))
    grid, bound, elbo = audit.check_finite(project)
    assert grid.passed and elbo.passed
    assert bound.check.startswith(f"finite {VARIANT} ") and not bound.passed
    assert bound.found.startswith(f"NaN in {path} [{key}] at {where}")


def test_a_nan_in_a_bound_trained_models_curve_or_certify_table_fails_naming_the_file(tmp_path):
    project = with_lists(tmp_path)
    curve = tmp_path / f"reports/attack_curves/{VARIANT}.csv"
    pd.DataFrame({"eps_attack": [0.0, 0.05], "bound_unclipped": [-1.0, NAN]}).to_csv(curve, index=False)
    radii = tmp_path / f"reports/certify/{VARIANT}/radii.csv"
    pd.DataFrame({"image": [0], "method": ["crown"], "tau": ["5 nats"], "radius": [NAN]}).to_csv(radii, index=False)
    [bound] = [v for v in audit.check_finite(project) if not v.passed]
    assert bound.found == (f"NaN in reports/attack_curves/{VARIANT}.csv [bound_unclipped] at eps_attack 0.05, "
                           f"unclipped ball (1 of 1); NaN in reports/certify/{VARIANT}/radii.csv [radius] at image 0, "
                           "crown, 5 nats (1 of 1); vacuous (-inf) bound in 2 values")


@pytest.mark.parametrize("column, values, found", [
    ("bound", dict(bound=(-3.0, NAN, -2.0)), "NaN in {path} [bound] at eps_attack 0.05, unclipped ball, crown (1 of 1)"),
    ("attacked_elbo", dict(attacked_elbo=(-1.0, -1.0, NAN)),
     "NaN in {path} [attacked_elbo] at eps_attack 0.05, unclipped ball, elbo (1 of 1)"),
    ("attacked_elbo", dict(attacked_elbo=(-INF, -1.0, -1.0)),  # an ELBO is never vacuous
     "-inf in {path} [attacked_elbo] at eps_attack 0.05, unclipped ball, ibp (1 of 1)"),
])
def test_a_nan_in_certify_elbos_bounds_fails_naming_the_file(tmp_path, column, values, found):
    project = with_lists(tmp_path)
    path = "reports/certify_elbo/mnist-eps0.05-seed0/bounds.csv"
    elbo_table(tmp_path / path, **values)
    *models, elbo = audit.check_finite(project)
    assert all(v.passed for v in models)
    assert elbo.check == "finite mnist-eps0.05-seed0 (eps_train 0.05): certify_elbo's bounds, radii"
    assert not elbo.passed and elbo.found.startswith(found.format(path=path))


def test_a_vacuous_bound_in_certify_elbos_bounds_is_said_not_failed(tmp_path):
    project = with_lists(tmp_path)
    elbo_table(tmp_path / "reports/certify_elbo/mnist-eps0.05-seed0/bounds.csv", bound=(-INF, -INF, -2.0))
    elbo = audit.check_finite(project)[-1]
    assert (elbo.found, elbo.passed) == ("no NaN; vacuous (-inf) bound in 2 values", True)  # and gap +inf: allowed


@pytest.mark.parametrize("stage", ["evaluate_bound@mnist-0.05-0", "certify_bound@mnist-0.05-0",
                                   "certify_elbo@mnist-0.05-0"])
def test_a_listed_models_stage_missing_from_dvc_lock_fails_naming_it(tmp_path, stage):
    project = with_lists(tmp_path)
    del project.lock[stage]
    verdicts = audit.check_finite(project)
    assert len(verdicts) == 3 and verdicts[0].passed
    [failed] = [v for v in verdicts if not v.passed]
    assert failed.found == f"KeyError: 'dvc.lock has no stage {stage}: run and commit the pipeline first'"
    assert failed.check.startswith(f"finite {VARIANT} " if "bound" in stage else "finite mnist-eps0.05-seed0 ")


def test_a_listed_model_outside_the_grid_is_refused(tmp_path):
    with_lists(tmp_path)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["certify_elbo"]["models"] = {"mnist-0.1-0": {"dataset": "mnist", "eps": 0.1, "seed": 0}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ValueError, match=r"certify_elbo.models names models that are not in the grid"):
        audit.Project(tmp_path)


# --- checkpoints, certificate and fresh attack of a bound-trained model, on small checkpoints ---


SIGMA0 = 0.7071067811865476


@pytest.fixture
def trained_project(tmp_path):
    """A project with one grid model and its twin trained on BOUND: small checkpoints (different
    weights, same eps_train and seed), prepared data, dvc.lock's train, train_bound, evaluate and
    evaluate_bound entries (md5s, data dep, params), and per_example.npz's audit records."""
    from provae.data import PreparedData, save_prepared
    from provae.model import save_checkpoint

    root, item = tmp_path, LISTED["mnist-0.05-0"]
    train = {"epochs": 1, "batch_size": 8}
    params = {"datasets": ["mnist"], "grid": LISTED, "clip": False, "model": {"sigma0": SIGMA0, "latent_dim": 4},
              "train": train, "bound_training": {"bound": BOUND, "models": LISTED}, "certify_elbo": {"models": {}},
              "evaluate": {"eps_attack": [0.0, 0.05], "attack_examples": 4, "score_samples": 1,
                           "audit_tolerance": 1e-4},
              "audit": {"attack_examples": 2, "attack_steps": 2, "tolerance_relative": 1e-4}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "dvc.yaml").write_text("stages: {}\n")
    images = (torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    data = root / "data" / "prepared" / "mnist.npz"
    data.parent.mkdir(parents=True)
    save_prepared(PreparedData(images, torch.zeros(6, dtype=torch.uint8), images, torch.zeros(6, dtype=torch.uint8),
                               {"dataset": "mnist"}), data)
    data_md5 = audit.file_md5(data)
    lock = {}
    for kind, weights, bound in (("train", 0, None), ("train_bound", 1, BOUND)):
        project_lock = {"cmd": locked_cmd(kind, item)}
        lock[f"{kind}@mnist-0.05-0"] = project_lock
        words = project_lock["cmd"].split()
        model_path = root / words[words.index("--model") + 1]
        model_path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"dataset": "mnist", "eps_train": 0.05, "seed": 0, "sigma0": SIGMA0, "clip": False, "latent_dim": 4,
                "train_params": train, "data_md5": data_md5, **({"bound": bound} if bound else {})}
        save_checkpoint(model_path, small_model(weights), meta)
        project_lock["deps"] = [{"path": "data/prepared/mnist.npz", "hash": "md5", "md5": data_md5}]
        project_lock["outs"] = [{"path": model_path.relative_to(root).as_posix(), "hash": "md5",
                                 "md5": audit.file_md5(model_path)}]
        project_lock["params"] = {"params.yaml": {"clip": False, "train": train,
                                                  **({"bound_training.bound": bound} if bound else {})}}
        evaluate = kind.replace("train", "evaluate")
        lock[f"{evaluate}@mnist-0.05-0"] = {"cmd": locked_cmd(evaluate, item)}
    (root / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": lock}))
    project = audit.Project(root)
    for audited in project.audited:  # what `evaluate` records for `make audit`, from each model's own checkpoint
        loaded = audit.load(project, SimpleNamespace(path=lambda dataset: data), audited)
        records = audit.audit_records(loaded.model, loaded.test_images[:4], 0.05, SIGMA0, 0)
        audit.per_example_path(project, audited).parent.mkdir(parents=True)
        np.savez(audit.per_example_path(project, audited), eps_attack=np.array([0.0, 0.05]), **records)
    return SimpleNamespace(project=project, data=SimpleNamespace(path=lambda dataset: data),
                           grid=root / "models/mnist/eps0.05-seed0.pt", bound=root / f"models/mnist/{BOUND}-eps0.05-seed0.pt")


def test_checkpoints_checks_the_bound_trained_checkpoint(trained_project):
    verdicts = rows(audit.check_checkpoints(trained_project.project))
    assert [(check, passed) for check, _, _, passed in verdicts] == [
        ("checkpoint models/mnist/eps0.05-seed0.pt: md5", True), ("checkpoint models/mnist/eps0.05-seed0.pt: metadata", True),
        (f"checkpoint models/mnist/{BOUND}-eps0.05-seed0.pt: md5", True),
        (f"checkpoint models/mnist/{BOUND}-eps0.05-seed0.pt: metadata", True)]


def test_a_tampered_bound_trained_checkpoint_fails_checkpoints(trained_project):
    data = bytearray(trained_project.bound.read_bytes())
    data[-30] ^= 1  # one bit, inside the archive's directory
    trained_project.bound.write_bytes(bytes(data))
    failed = [v for v in audit.check_checkpoints(trained_project.project) if not v.passed]
    assert failed and all(v.check.startswith(f"checkpoint models/mnist/{BOUND}-eps0.05-seed0.pt: ") for v in failed)
    assert failed[0].check.endswith(": md5") and failed[0].expected.endswith("(dvc.lock)")


def test_an_ibp_checkpoint_in_the_bound_trained_models_place_fails_its_metadata(trained_project):
    """The grid model's file copied over its bound-trained twin and dvc.lock's md5 updated: only
    the recorded bound tells them apart (and the certificate, below)."""
    project = trained_project.project
    shutil.copy(trained_project.grid, trained_project.bound)
    project.lock["train_bound@mnist-0.05-0"]["outs"][0]["md5"] = audit.file_md5(trained_project.bound)
    failed = rows(v for v in audit.check_checkpoints(project) if not v.passed)
    assert failed == [(f"checkpoint models/mnist/{BOUND}-eps0.05-seed0.pt: metadata", "params.yaml and dvc.lock's data",
                       f"bound: None, expected '{BOUND}'", False)]


def test_a_changed_training_bound_is_stale_for_the_bound_trained_checkpoint(trained_project):
    project = trained_project.project
    project.params["bound_training"]["bound"] = "ibp_other"
    project.audited = [project.audited[0], audit.Audited(project.audited[1].model, "ibp_other")]
    failed = rows(v for v in audit.check_checkpoints(project) if not v.passed)
    assert failed == [
        (f"checkpoint models/mnist/{BOUND}-eps0.05-seed0.pt: metadata", "params.yaml and dvc.lock's data",
         f"bound: '{BOUND}', expected 'ibp_other'", False),
        ("train_bound@mnist-0.05-0: params", "dvc.lock's params = params.yaml", "params.yaml changed: bound_training.bound",
         False)]


def test_a_bound_trained_model_missing_from_dvc_lock_fails_every_check_naming_the_stage(trained_project):
    project = trained_project.project
    del project.lock["train_bound@mnist-0.05-0"]
    missing = "dvc.lock has no stage train_bound@mnist-0.05-0: run and commit the pipeline first"
    assert rows(audit.check_checkpoints(project))[-1] == (f"checkpoint {VARIANT}", "a dvc.lock entry", f"'{missing}'", False)
    assert rows(audit.check_certificates(project, trained_project.data))[-1] == (
        f"certificate {VARIANT}", "loads and recomputes", f"KeyError: '{missing}'", False)
    assert rows(audit.check_fresh_attacks(project, trained_project.data))[-1] == (
        f"fresh attack {VARIANT}", "loads", f"KeyError: '{missing}'", False)


def test_certificate_and_fresh_attack_recompute_the_bound_trained_model(trained_project):
    project, data = trained_project.project, trained_project.data
    certificates = audit.check_certificates(project, data)
    assert [(v.check, v.passed) for v in certificates] == [
        (f"certificate {name}: {what} at eps_train 0.05, 4 images", True) for name in ("mnist-eps0.05-seed0", VARIANT)
        for what in ("ELBO", "LB, unclipped ball", "LB, clipped ball")]
    attacks = audit.check_fresh_attacks(project, data)
    assert [(v.check, v.found, v.passed) for v in attacks] == [
        (f"fresh attack {name}: 4 (image, eps, ball) triples", "0 below", True) for name in ("mnist-eps0.05-seed0", VARIANT)]


def test_the_certificate_check_reads_the_bound_trained_models_own_checkpoint(trained_project):
    """The grid model's weights under the bound-trained model's metadata: the loader takes it (same
    eps_train and seed), but its recomputed values are not the committed ones of evaluate_bound."""
    from provae.model import load_checkpoint, save_checkpoint

    meta = load_checkpoint(trained_project.bound).metadata
    save_checkpoint(trained_project.bound, load_checkpoint(trained_project.grid).model, meta)
    verdicts = audit.check_certificates(trained_project.project, trained_project.data)
    assert all(v.passed for v in verdicts[:3])
    assert [v.check for v in verdicts[3:] if not v.passed] == [
        f"certificate {VARIANT}: {what} at eps_train 0.05, 4 images" for what in ("ELBO", "LB, unclipped ball", "LB, clipped ball")]
