"""Every stage output is written to a side file and renamed into place (`provae.files`): a stage
interrupted while writing leaves the earlier outputs whole. Checked on the helpers, then on the
evaluate stage, interrupted in this process and killed (SIGKILL) in another one."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from provae.files import atomic_path, atomic_write, file_digest, write_json

from stage_project import ROOT, project  # noqa: F401  (a fixture)


def test_file_digest_is_md5_by_default_and_takes_any_hashlib_algorithm(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(bytes(range(256)) * 5000)  # more than one block
    assert file_digest(path) == hashlib.md5(path.read_bytes()).hexdigest()
    assert file_digest(path, "sha256") == hashlib.sha256(path.read_bytes()).hexdigest()


def test_write_json_is_sorted_indented_and_ends_with_a_newline(tmp_path):
    write_json(tmp_path / "new" / "x.json", {"b": 1, "a": [1.5]})
    assert (tmp_path / "new" / "x.json").read_text() == '{\n  "a": [\n    1.5\n  ],\n  "b": 1\n}\n'


@pytest.mark.parametrize("mode", ["w", "wb"])
def test_an_interrupted_write_keeps_the_old_file_and_leaves_no_side_file(tmp_path, mode):
    target = tmp_path / "out.csv"
    target.write_text("old\n")
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(target, mode) as handle:
            handle.write("half" if mode == "w" else b"half")
            handle.flush()
            assert target.read_text() == "old\n"  # nothing visible before the rename
            raise KeyboardInterrupt
    assert target.read_text() == "old\n" and os.listdir(tmp_path) == ["out.csv"]
    with atomic_write(target, mode) as handle:
        handle.write("new\n" if mode == "w" else b"new\n")
    assert target.read_text() == "new\n" and os.listdir(tmp_path) == ["out.csv"]


def test_the_side_file_keeps_the_name_a_library_derives_from_it(tmp_path):
    """torch.save names the archive inside a checkpoint after the file: `x.pt.partial` -> `x.pt`, as before."""
    with atomic_path(tmp_path / "x.pt") as partial:
        assert partial == tmp_path / "x.pt.partial"
        partial.write_bytes(b"1")
    assert (tmp_path / "x.pt").read_bytes() == b"1" and not partial.exists()


def outputs_of(project) -> dict[str, bytes]:
    paths = [project.curve, project.metrics, *sorted(p for p in project.eval.iterdir() if p.suffix != ".partial")]
    return {str(path.relative_to(project.folder)): path.read_bytes() for path in paths}


def change_params(project) -> None:
    """Other settings, so a completed re-run would write other bytes than the first run did."""
    params = yaml.safe_load((project.folder / "params.yaml").read_text())
    params["evaluate"]["attack_examples"] = 5
    (project.folder / "params.yaml").write_text(yaml.safe_dump(params))


def test_evaluate_interrupted_mid_write_keeps_its_earlier_outputs(project, monkeypatch):
    assert project.run("evaluate", monkeypatch) is None
    before = outputs_of(project)
    assert set(before) == {"curve.csv", "metrics.json", "eval/details.json", "eval/figure_arrays.npz",
                           "eval/per_example.npz"}
    change_params(project)
    real, calls = np.savez_compressed, []

    def interrupted(handle, **arrays):  # the second .npz (per_example) stops half-written
        calls.append(handle.name)
        if len(calls) == 2:
            handle.write(b"PK\x03\x04 half an archive")
            raise KeyboardInterrupt
        real(handle, **arrays)

    monkeypatch.setattr(np, "savez_compressed", interrupted)
    with pytest.raises(KeyboardInterrupt):
        project.run("evaluate", monkeypatch)
    after = outputs_of(project)
    assert after["eval/figure_arrays.npz"] != before["eval/figure_arrays.npz"]  # the one written before
    assert {key: value for key, value in after.items() if key != "eval/figure_arrays.npz"} == {
        key: value for key, value in before.items() if key != "eval/figure_arrays.npz"}
    assert not list(project.folder.rglob("*.partial"))


KILLED_RUN = """
import os, runpy, sys, time
import numpy as np
sys.path.insert(0, {stages!r})
def stalled(handle, **arrays):  # half an archive on disk, then wait to be killed
    handle.write(b"PK\\x03\\x04 half an archive"); handle.flush(); os.fsync(handle.fileno())
    open("writing", "w").close()
    time.sleep(600)
np.savez_compressed = stalled
sys.argv = {argv!r}
runpy.run_path({stage!r}, run_name="__main__")
"""


def test_evaluate_killed_mid_write_keeps_its_earlier_outputs(project, monkeypatch):
    assert project.run("evaluate", monkeypatch) is None
    before = outputs_of(project)
    change_params(project)
    code = KILLED_RUN.format(stages=str(ROOT / "stages"), argv=project.argv("evaluate"),
                             stage=str(ROOT / "stages" / "evaluate.py"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-c", code], cwd=project.folder, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not (project.folder / "writing").exists():
        assert process.poll() is None, process.communicate()[1].decode()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert outputs_of(project) == before  # the half-written file is the side file, never an output
    assert json.loads(project.metrics.read_text())["violations"] == 0
    assert [path.name for path in project.eval.glob("*.partial")] == ["figure_arrays.npz.partial"]
