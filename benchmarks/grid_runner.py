"""Grid-runner benchmark: a tiny grid through Ray (scripts/run_grid.py) vs serial `dvc repro`, and Ray's own cost per task.

Temporary copies of the project with the tiny profile and a grid of --models MNIST models run
`dvc repro data train evaluate` (one stage at a time, torch on every core), the same with
OMP_NUM_THREADS=1 (the thread count of a one-CPU Ray task: this separates what running stages side by
side gains from what torch's threading costs on a busy machine), and
`scripts/run_grid.py data train evaluate --num-cpus N` (N one-CPU tasks at a time). Then, on a fresh local
Ray of N CPUs: the wall time of ray.init, of --noop-tasks independent no-op tasks (per task) and of a chain
of dependent ones (per hop: a task whose argument is the previous task's result). Prints JSON (seconds,
milliseconds where named).

    python benchmarks/grid_runner.py [--models 4] [--num-cpus 2] [--noop-tasks 200]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from conftest import copy_project, write_idx_mirror  # noqa: E402  (the tests' project copy, not a second one)

EPS = [0.0, 0.05, 0.02, 0.1, 0.01, 0.2, 0.15, 0.03]


def environment(scratch: Path) -> dict:
    mirror = Path(os.environ.get("PROVAE_DATA_MIRROR") or ROOT.parent / "shared" / "data")
    if not (mirror / "mnist" / "SHA256SUMS").is_file():
        mirror = write_idx_mirror(scratch / "mirror")
    return {**os.environ, "DVC_NO_ANALYTICS": "1", "PROVAE_DATA_MIRROR": str(mirror),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.com",
            "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.com"}


def tiny_grid(folder: Path, env: dict, models: int) -> Path:
    repo = copy_project(folder, env)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["grid"] = {f"mnist-{eps}-0": {"dataset": "mnist", "eps": eps, "seed": 0} for eps in EPS[:models]}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "commit", "-qam", "grid"], cwd=repo, env=env, check=True)
    return repo


def timed(args: list[str], repo: Path, env: dict) -> float:
    started = time.perf_counter()
    subprocess.run(args, cwd=repo, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return round(time.perf_counter() - started, 1)


def ray_overhead(num_cpus: int, tasks: int) -> dict:
    import ray

    started = time.perf_counter()
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    init = time.perf_counter() - started

    @ray.remote(num_cpus=1)
    def noop(_=None):
        return None

    ray.get([noop.remote() for _ in range(num_cpus * 4)])  # workers up before the clock starts
    started = time.perf_counter()
    ray.get([noop.remote() for _ in range(tasks)])
    independent = (time.perf_counter() - started) / tasks
    started = time.perf_counter()
    ref = noop.remote()
    for _ in range(tasks - 1):
        ref = noop.remote(ref)
    ray.get(ref)
    chained = (time.perf_counter() - started) / tasks
    ray.shutdown()
    return {"ray_init_s": round(init, 1), "noop_task_ms": round(1000 * independent, 2),
            "chained_noop_task_ms": round(1000 * chained, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=4, choices=range(1, len(EPS) + 1))
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--noop-tasks", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="grid_runner-") as scratch:
        env = environment(Path(scratch))
        repro = ["dvc", "repro", "data", "train", "evaluate"]
        serial, one_thread, through_ray = (tiny_grid(Path(scratch) / name, env, args.models)
                                           for name in ("serial", "one_thread", "ray"))
        results = {"models": args.models, "stages": 1 + 2 * args.models, "num_cpus": args.num_cpus,
                   "load_average_before": os.getloadavg()[0],
                   "dvc_repro_s": timed(repro, serial, env),
                   "dvc_repro_one_thread_s": timed(repro, one_thread, {**env, "OMP_NUM_THREADS": "1"}),
                   "run_grid_s": timed([sys.executable, "scripts/run_grid.py", "data", "train", "evaluate",
                                        "--num-cpus", str(args.num_cpus), "--logs", "grid_logs"], through_ray, env)}
        status = json.loads((through_ray / "grid_logs" / "status.json").read_text())
        results["run_grid_stage_seconds_sum"] = round(sum(s["seconds"] for s in status.values()), 1)
    results["speedup"] = round(results["dvc_repro_s"] / results["run_grid_s"], 2)
    results["speedup_vs_one_thread"] = round(results["dvc_repro_one_thread_s"] / results["run_grid_s"], 2)
    results.update(ray_overhead(args.num_cpus, args.noop_tasks))
    results["load_average_after"] = os.getloadavg()[0]
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
