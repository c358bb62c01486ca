"""scripts/run_grid.py: the grid's stages as Ray tasks (2 CPUs, tiny profile) give `dvc repro`'s outputs
byte for byte (but for the wall times two stages record); a failed stage skips its dependents while the
rest is committed; the deadline stops new starts; outputs that arrive corrupted are caught. Stage runs
happen in temporary copies of the project."""

import json
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import copy_project, run
from scripts import run_grid

pytestmark = pytest.mark.pipeline

MODELS = ["mnist-0.0-0", "mnist-0.05-0", "mnist-0.02-0", "mnist-0.1-0"]
BROKEN = "nosuch-0.03-0"  # a model of a dataset nobody prepares: its train stage fails


def edit_params(repo: Path, change) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    change(params)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def commit_all(repo: Path, env: dict, message: str) -> None:
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", message], repo, env)


def clone(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, symlinks=True)
    return target


WALL_TIMES = {"wall_time_s", "seconds"}  # clock readings that train's checkpoint and evaluate's details.json keep


def without_wall_times(value):
    if isinstance(value, dict):
        return {key: without_wall_times(item) for key, item in value.items() if key not in WALL_TIMES}
    return [without_wall_times(item) for item in value] if isinstance(value, list) else value


def content(path: Path):
    """A file's bytes; of the two kinds of file that record how long a run took, everything else they hold."""
    if path.suffix == ".pt":
        checkpoint = torch.load(path, weights_only=True)
        return (checkpoint["config"], {key: tensor.numpy().tobytes() for key, tensor in checkpoint["state_dict"].items()},
                without_wall_times(checkpoint["metadata"]))
    if path.name == "details.json":
        return without_wall_times(json.loads(path.read_text()))
    return path.read_bytes()


def files_of(repo: Path, out: str) -> list[str]:
    top = repo / out
    return [out] if top.is_file() else sorted(p.relative_to(repo).as_posix() for p in top.rglob("*") if p.is_file())


def lock_outs(repo: Path) -> dict[str, dict[str, str]]:
    """stage -> {out path: md5} as dvc.lock records them."""
    stages = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    return {name: {out["path"]: out["md5"] for out in stage.get("outs", [])} for name, stage in stages.items()}


def grid_run(repo: Path, env: dict, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    result = run([sys.executable, "scripts/run_grid.py", *args, "--logs", "grid_logs"], repo, env, check=False)
    status_file = repo / "grid_logs" / "status.json"
    return result, json.loads(status_file.read_text()) if status_file.is_file() else {}


def add_stages(repo: Path, env: dict, stages: dict) -> None:
    """Extra stages in the copy's dvc.yaml: shell commands that are fast, slow or failing on purpose."""
    pipeline = yaml.safe_load((repo / "dvc.yaml").read_text())
    pipeline["stages"].update(stages)
    (repo / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    (repo / "seed.txt").write_text("seed\n")
    commit_all(repo, env, "stages for the scheduler's tests")


def shell_stage(cmd: str, out: str, deps: tuple[str, ...] = ("seed.txt",)) -> dict:
    return {"cmd": cmd, "deps": list(deps), "outs": [{out: {"cache": False}}]}


@pytest.fixture(scope="module")
def project(tmp_path_factory, env):
    """The tiny profile with a grid of four MNIST models, trained and evaluated even more briefly
    (still deterministic), committed; nothing run yet."""
    repo = copy_project(tmp_path_factory.mktemp("project"), env)

    def shorter(params):
        for model in MODELS[2:]:
            dataset, eps, seed = model.split("-")
            params["grid"][model] = {"dataset": dataset, "eps": float(eps), "seed": int(seed)}
        params["train"].update(epochs=1, warmup_epochs=0, ramp_epochs=0.5, max_train_examples=256, monitor_examples=32)
        params["evaluate"].update(bound_train_examples=64, bound_test_examples=64, attack_examples=8,
                                  eps_attack=[0.0, 0.1], apgd_steps=2, eot_samples=1, latent_attack_steps=1,
                                  score_samples=1, audit_examples=4, example_count=2, sample_count=4)

    edit_params(repo, shorter)
    commit_all(repo, env, "a grid of four models")
    return repo


@pytest.fixture(scope="module")
def reference(project, tmp_path_factory, env):
    """`dvc repro` of the data, train and evaluate stages, one at a time, with torch on one thread: the
    thread count of a one-CPU Ray task (Ray sets OMP_NUM_THREADS), on which float results depend."""
    repo = clone(project, tmp_path_factory.mktemp("reference") / "repo")
    run(["dvc", "repro", "train", "evaluate"], repo, {**env, "OMP_NUM_THREADS": "1"})
    return repo


@pytest.fixture(scope="module")
def ray_run(project, tmp_path_factory, env):
    """The same stages, plus a broken model, through a local Ray of 2 CPUs (the default: no --address)."""
    repo = clone(project, tmp_path_factory.mktemp("ray") / "repo")
    edit_params(repo, lambda params: params["grid"].update({BROKEN: {"dataset": "nosuch", "eps": 0.03, "seed": 0}}))
    commit_all(repo, env, "a broken model")
    result, status = grid_run(repo, env, "data", "train", "evaluate", "--num-cpus", "2")
    return repo, result, status


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, env):
    """A Ray head of 2 CPUs on the loopback, started once, that runs join with --address; token
    authentication as on a real cluster (its token in the environment, not in ~/.ray)."""
    temp_dir = tempfile.mkdtemp(prefix="ray")  # short: Ray's socket paths must fit in 107 characters
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cluster_env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    log = open(Path(temp_dir) / "head.log", "w+")
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--num-cpus", "2",
         "--port", str(port), "--node-ip-address", "127.0.0.1", "--temp-dir", temp_dir,
         "--include-dashboard", "false", "--disable-usage-stats"],
        env=cluster_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        while "Ray runtime started" not in Path(log.name).read_text():
            assert head.poll() is None and time.time() < deadline, Path(log.name).read_text()
            time.sleep(1)
        yield f"127.0.0.1:{port}", cluster_env
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        head.wait(timeout=120)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


# --- moving files: pack, verify, unpack ---------------------------------------------------------


def test_a_pack_arrives_whole_and_replaces_what_was_there(tmp_path):
    sender, receiver = tmp_path / "sender", tmp_path / "receiver"
    (sender / "out" / "sub").mkdir(parents=True)
    (sender / "out" / "a.bin").write_bytes(b"\x00\x01")
    (sender / "out" / "sub" / "b.txt").write_text("b")
    (sender / "model.pt").write_bytes(b"weights")
    (receiver / "out").mkdir(parents=True)
    (receiver / "out" / "stale.txt").write_text("from an earlier run")
    (receiver / "model.pt").write_bytes(b"old weights")

    packed = run_grid.pack(sender, ["out", "model.pt", "never-written"])
    assert sorted(packed) == ["model.pt", "out"] and sorted(packed["out"]) == ["out/a.bin", "out/sub/b.txt"]
    run_grid.unpack(packed, receiver)
    assert sorted(p.relative_to(receiver).as_posix() for p in receiver.rglob("*") if p.is_file()) == [
        "model.pt", "out/a.bin", "out/sub/b.txt"]
    assert (receiver / "model.pt").read_bytes() == b"weights" and (receiver / "out" / "a.bin").read_bytes() == b"\x00\x01"


def test_a_corrupted_transfer_is_named_and_writes_nothing(tmp_path):
    sender, receiver = tmp_path / "sender", tmp_path / "receiver"
    (sender / "out").mkdir(parents=True)
    (sender / "out" / "a.bin").write_bytes(b"good bytes")
    (sender / "model.pt").write_bytes(b"weights")
    receiver.mkdir()
    (receiver / "model.pt").write_bytes(b"old weights")
    packed = run_grid.pack(sender, ["model.pt", "out"])
    md5, data = packed["out"]["out/a.bin"]
    packed["out"]["out/a.bin"] = (md5, bytes([data[0] ^ 1]) + data[1:])  # one flipped bit on the way

    with pytest.raises(run_grid.TransferError, match="out/a.bin"):
        run_grid.unpack(packed, receiver)
    assert [p.name for p in receiver.iterdir()] == ["model.pt"] and (receiver / "model.pt").read_bytes() == b"old weights"


# --- the plan and the resources -----------------------------------------------------------------


def test_stages_come_after_what_they_wait_for_and_seed_by_seed():
    jobs = [{"name": name, "waits_for": waits} for name, waits in [
        ("report", ["evaluate@m-0.0-1", "evaluate@m-0.0-0"]), ("evaluate@m-0.0-1", ["train@m-0.0-1"]),
        ("train@m-0.0-1", ["data@m"]), ("train@m-0.0-0", ["data@m"]), ("evaluate@m-0.0-0", ["train@m-0.0-0"]),
        ("data@m", [])]]
    assert [job["name"] for job in run_grid.in_order(jobs)] == [
        "data@m", "train@m-0.0-0", "evaluate@m-0.0-0", "train@m-0.0-1", "evaluate@m-0.0-1", "report"]


def test_resources_per_kind_of_stage():
    cpus, gpus = run_grid.per_kind("train=2"), run_grid.per_kind("train=0.25,evaluate=0.1")
    assert run_grid.resources("train@m-0.0-0", cpus, gpus, has_gpus=True) == {"num_cpus": 2, "num_gpus": 0.25}
    assert run_grid.resources("evaluate@m-0.0-0", cpus, gpus, has_gpus=True) == {"num_cpus": 1, "num_gpus": 0.1}
    assert run_grid.resources("certify@m-0.0-0", cpus, gpus, has_gpus=True) == {"num_cpus": 1, "num_gpus": 0}
    assert run_grid.resources("train@m-0.0-0", cpus, gpus, has_gpus=False) == {"num_cpus": 2, "num_gpus": 0}
    every_kind = run_grid.per_kind("4"), run_grid.per_kind("0.5")
    assert run_grid.resources("report", *every_kind, has_gpus=True) == {"num_cpus": 4, "num_gpus": 0.5}


def test_plan_takes_dvc_changed_stages_and_their_edges(project, env):
    result = run([sys.executable, "scripts/run_grid.py", "--plan"], project, env)
    jobs = {job["name"]: job for job in json.loads(result.stdout)}
    assert set(jobs) >= {"data@mnist", "report", *(f"{kind}@{model}" for kind in ("train", "evaluate") for model in MODELS)}
    evaluate = jobs["evaluate@mnist-0.05-0"]
    assert evaluate["waits_for"] == ["data@mnist", "train@mnist-0.05-0"]
    assert "models/mnist/eps0.05-seed0.pt" not in evaluate["inputs"] and "stages/evaluate.py" in evaluate["inputs"]
    assert evaluate["cmd"].startswith("python stages/evaluate.py --eps-train 0.05 --seed 0")
    # The report reads folders that evaluate stages write into: it waits for them, and the folders travel too.
    assert {f"evaluate@{model}" for model in MODELS} <= set(jobs["report"]["waits_for"])
    assert "reports/eval" in jobs["report"]["inputs"]


# --- whole runs -----------------------------------------------------------------------------------


def test_grid_through_ray_matches_dvc_repro_byte_for_byte(reference, ray_run):
    """Every out dvc.lock records, by md5; where the md5s differ, file by file, and then only in the
    checkpoints' and evaluations' records of wall time."""
    repo, result, status = ray_run
    expected, found = lock_outs(reference), lock_outs(repo)
    stages = ["data@mnist"] + [f"{kind}@{model}" for kind in ("train", "evaluate") for model in MODELS]
    assert set(expected) == set(stages)
    timed = set()
    for stage in stages:
        assert status[stage]["state"] == "done", (stage, status[stage], result.stdout)
        assert set(found[stage]) == set(expected[stage])
        for out in (out for out, md5 in expected[stage].items() if found[stage][out] != md5):
            assert files_of(repo, out) == files_of(reference, out), out
            for name in files_of(reference, out):
                assert content(repo / name) == content(reference / name), name
            timed.add(out)
    assert all(out.startswith(("models/", "reports/eval/")) for out in timed), timed
    assert sum(len(outs) for outs in expected.values()) == 2 + 4 * 3 + 4 * 3  # every out compared


def test_a_failed_stage_skips_its_dependents_and_the_rest_is_committed(ray_run, env):
    repo, result, status = ray_run
    assert result.returncode == 1
    assert status[f"train@{BROKEN}"]["state"] == "failed" and status[f"train@{BROKEN}"]["why"].startswith("exit code")
    assert status[f"evaluate@{BROKEN}"] == {**status[f"evaluate@{BROKEN}"], "state": "skipped",
                                              "why": f"waits for train@{BROKEN} (failed)"}
    assert "nosuch" in (repo / "grid_logs" / f"train_{BROKEN}.log").read_text()
    assert {p.stem for p in (repo / "grid_logs").glob("*.log")} == {name.replace("@", "_") for name in status}
    assert f"train@{BROKEN}" not in lock_outs(repo) and f"evaluate@{BROKEN}" not in lock_outs(repo)
    changed = json.loads(run(["dvc", "status", "--json", "data", "train", "evaluate"], repo, env).stdout)
    assert sorted(changed) == [f"evaluate@{BROKEN}", f"train@{BROKEN}"]


def test_the_deadline_stops_new_starts(project, cluster, tmp_path, env):
    address, cluster_env = cluster
    repo = clone(project, tmp_path / "repo")
    add_stages(repo, env, {
        "slow": shell_stage("sleep 25 && echo slow > slow.txt", "slow.txt"),
        "quick": shell_stage("echo quick > quick.txt", "quick.txt"),
        "after_slow": shell_stage("cat slow.txt > after_slow.txt", "after_slow.txt", deps=("slow.txt",)),
    })
    result, status = grid_run(repo, cluster_env, "slow", "quick", "after_slow", "--address", address,
                              "--deadline-minutes", "0.15")
    assert result.returncode == 1, result.stdout + result.stderr
    assert status["slow"]["state"] == status["quick"]["state"] == "done"
    assert status["slow"]["started_at"] <= 9 and status["quick"]["started_at"] <= 9
    assert status["after_slow"]["state"] == "not started" and status["after_slow"]["why"] == "the deadline had passed"
    assert (repo / "slow.txt").read_text() == "slow\n" and not (repo / "after_slow.txt").exists()
    assert sorted(lock_outs(repo)) == ["quick", "slow"]


# The driver of scripts/run_grid.py with one seam changed: make_a's outputs are damaged after its task
# returned them, before the driver checks and writes them.
DAMAGING_DRIVER = """
import sys
from scripts import run_grid

fetch = run_grid.fetch

def damaging_fetch(job, ref):
    result = fetch(job, ref)
    if job["name"] == "make_a":
        md5, data = result["files"]["a.txt"]["a.txt"]
        result["files"]["a.txt"]["a.txt"] = (md5, b"A" + data[1:])
    return result

run_grid.fetch = damaging_fetch
sys.exit(run_grid.main(sys.argv[1:]))
"""


def test_outputs_corrupted_on_the_way_back_fail_the_stage(project, cluster, tmp_path, env):
    address, cluster_env = cluster
    repo = clone(project, tmp_path / "repo")
    add_stages(repo, env, {
        "make_a": shell_stage("echo a > a.txt", "a.txt"),
        "use_a": shell_stage("cat a.txt a.txt > b.txt", "b.txt", deps=("a.txt",)),
        "make_c": shell_stage("echo c > c.txt", "c.txt"),
    })
    result = run([sys.executable, "-c", DAMAGING_DRIVER, "make_a", "use_a", "make_c", "--address", address,
                  "--logs", "grid_logs"], repo, cluster_env, check=False)
    assert result.returncode == 1, result.stdout + result.stderr

    status = json.loads((repo / "grid_logs" / "status.json").read_text())
    assert status["make_a"]["state"] == "failed"
    assert status["make_a"]["why"].startswith("outputs arrived corrupted: a.txt: md5 ")
    assert status["use_a"]["state"] == "skipped" and status["use_a"]["why"] == "waits for make_a (failed)"
    assert status["make_c"]["state"] == "done"
    assert not (repo / "a.txt").exists() and not (repo / "b.txt").exists()
    assert sorted(lock_outs(repo)) == ["make_c"]
