"""Run many pipeline stages side by side on one machine (one GPU, or many CPU cores), with the
stages' own commands, then record them with DVC.

`dvc repro` runs one stage at a time; these models are small, so one of them leaves a GPU mostly
idle. This script runs the commands DVC would run, several at once, in the order of a plan:

    python scripts/run_grid.py plan train evaluate attack_strength > plan.json   # needs DVC
    python scripts/run_grid.py run plan.json --jobs 12 --deadline 480            # needs only the stages' imports
    dvc commit -f $(python scripts/run_grid.py done plan.json status.json)       # record what finished

`plan` lists, for the given stage groups, every stage `dvc status` reports as changed, in
priority order (seed by seed, each seed's stages in pipeline order), with the stages each one
waits for. `run` starts the highest-priority stage whose inputs are ready, up to `--jobs` at a
time, stops starting stages after `--deadline` seconds, writes each stage's log and a status
file, and never starts a stage whose inputs failed. A plan entry may also name a `cwd` (another
copy of the project, e.g. with other params for an experiment). The machine running it needs the project's
working tree and the stages' Python packages, not DVC.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def plan(groups: list[str]) -> list[dict]:
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    from dvc.repo import Repo

    repo = Repo(".")
    changed = set(repo.status())
    stages = [s for s in repo.index.stages if s.name.split("@")[0] in groups and s.name in changed]
    produced = {str(out): s.name for s in stages for out in s.outs}

    def waits_for(stage) -> list[str]:
        # A dependency inside another planned stage's output folder waits for that stage too.
        return sorted({owner for dep in stage.deps for out, owner in produced.items()
                       if owner != stage.name and (str(dep) == out or str(dep).startswith(out + "/"))})

    def priority(stage) -> tuple:
        group, _, item = stage.name.partition("@")
        seed = item.rsplit("-", 1)[-1]
        return (int(seed) if seed.isdigit() else 0, groups.index(group))

    return [{"name": s.name, "cmd": s.cmd, "waits_for": waits_for(s)} for s in sorted(stages, key=priority)]


def run(jobs: list[dict], workers: int, deadline: float, log_dir: Path, status_path: Path, env: dict) -> dict:
    log_dir.mkdir(parents=True, exist_ok=True)
    status = {job["name"]: {"state": "waiting"} for job in jobs}
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    started = time.time()

    def save() -> None:
        status_path.write_text(json.dumps(status, indent=1) + "\n")

    while True:
        for name, (process, began) in list(running.items()):
            if process.poll() is not None:
                status[name] = {"state": "done" if process.returncode == 0 else "failed", "rc": process.returncode,
                                "seconds": round(time.time() - began, 1), "started_at": round(began - started, 1)}
                del running[name]
                print(f"[{time.time() - started:6.0f} s] {status[name]['state']:6} {name} "
                      f"({status[name]['seconds']:.0f} s)", flush=True)
        for job in jobs:
            if status[job["name"]]["state"] == "waiting" and any(status[w]["state"] in ("failed", "skipped")
                                                                 for w in job["waits_for"]):
                status[job["name"]] = {"state": "skipped", "why": "an input failed"}
        ready = [job for job in jobs if status[job["name"]]["state"] == "waiting"
                 and all(status[w]["state"] == "done" for w in job["waits_for"])]
        late = time.time() - started > deadline
        while ready and len(running) < workers and not late:
            job = ready.pop(0)
            log = open(log_dir / f"{job['name'].replace('@', '_').replace('/', '_')}.log", "w")
            running[job["name"]] = (subprocess.Popen(job["cmd"], shell=True, stdout=log, stderr=subprocess.STDOUT,
                                                     env=env, cwd=job.get("cwd")), time.time())
            status[job["name"]] = {"state": "running"}
        save()
        if not running and (late or not ready):
            break
        time.sleep(1)
    for job in jobs:
        if status[job["name"]]["state"] == "waiting":
            status[job["name"]] = {"state": "not started", "why": "deadline" if late else "inputs never ready"}
    save()
    return status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    planned = commands.add_parser("plan", help="print the plan (JSON) for these stage groups, in this order")
    planned.add_argument("groups", nargs="+", help="stage groups, e.g. train evaluate attack_strength")
    ran = commands.add_parser("run", help="run a plan")
    ran.add_argument("plan")
    ran.add_argument("--jobs", type=int, default=os.cpu_count())
    ran.add_argument("--deadline", type=float, default=float("inf"), help="seconds after which no stage starts")
    ran.add_argument("--logs", default="grid_logs")
    ran.add_argument("--status", default="grid_status.json")
    finished = commands.add_parser("done", help="print the stages of a plan that finished")
    finished.add_argument("plan")
    finished.add_argument("status")
    args = parser.parse_args()
    if args.command == "plan":
        json.dump(plan(args.groups), sys.stdout, indent=1)
        print()
    elif args.command == "run":
        jobs = json.loads(Path(args.plan).read_text())
        status = run(jobs, args.jobs, args.deadline, Path(args.logs), Path(args.status), dict(os.environ))
        counts = {state: sum(s["state"] == state for s in status.values()) for state in {s["state"] for s in status.values()}}
        print(json.dumps(counts))
        sys.exit(0 if counts.get("done", 0) == len(jobs) else 1)
    else:
        status = json.loads(Path(args.status).read_text())
        print(" ".join(job["name"] for job in json.loads(Path(args.plan).read_text())
                       if status.get(job["name"], {}).get("state") == "done"))


if __name__ == "__main__":
    main()
