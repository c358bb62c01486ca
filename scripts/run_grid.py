"""Run the pipeline's changed stages as Ray tasks, on this machine or on a Ray cluster, then record them with DVC.

    python scripts/run_grid.py train evaluate --plan                  # the stages it would run, as JSON
    python scripts/run_grid.py train evaluate                         # local Ray: this machine's CPUs and GPUs
    python scripts/run_grid.py train evaluate --num-cpus 8 --deadline-minutes 50
    python scripts/run_grid.py --address HEAD_IP:6379 --gpus-per-task train=0.25,evaluate=0.1

DVC makes the plan: every stage `dvc status` reports as changed (of the given stage groups; all of
them if none is given), each waiting for the planned stages whose outputs it reads. Each stage is
one Ray task that runs the command DVC resolved for it, with the CPUs (and, where the cluster has
GPUs, the GPU fraction) given for its kind of stage; a task's arguments are the results of the
tasks it waits for, so Ray starts it once they are done.

No disk is shared with the workers: a task gets its stage's dependencies (files and folders, with
their md5) through Ray's object store, runs the command in a scratch folder, and returns its
outputs the same way. The driver checks every md5 before it writes the outputs into the workspace,
each path atomically; a corrupted transfer makes the stage fail. A failed stage skips the stages
that wait for it; after `--deadline-minutes` no stage starts. Every stage gets a log in `--logs`
(with `status.json`), and the stages that finished are recorded with `dvc commit`.

Ray sets OMP_NUM_THREADS to a task's CPUs, and torch's float results depend on its thread count: with
one CPU per task the outputs are those of `OMP_NUM_THREADS=1 dvc repro`, byte for byte, but for the
wall times that checkpoints and evaluations record. The driver's PROVAE_* variables reach the stages.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import ray

Pack = dict[str, dict[str, tuple[str, bytes]]]  # top path (file or folder) -> {file path: (md5, bytes)}


class TransferError(Exception):
    """A file's bytes do not match the md5 its sender computed."""


# --- moving files: packs, md5s, atomic writes ---------------------------------------------------


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def files_of(top: Path) -> list[Path]:
    if top.is_file():
        return [top]
    return sorted(p for p in top.rglob("*") if p.is_file()) if top.is_dir() else []


def pack(root: Path, paths: list[str]) -> Pack:
    """Each path's files with their md5; a missing path packs to nothing (a stage that needed it fails)."""
    packed = {}
    for path in paths:
        top = root / path
        if top.exists():
            packed[path] = {}
            for file in files_of(top):
                data = file.read_bytes()
                packed[path][file.relative_to(root).as_posix()] = (md5(data), data)
    return packed


def verify(packed: Pack) -> None:
    for files in packed.values():
        for name, (expected, data) in files.items():
            if md5(data) != expected:
                raise TransferError(f"{name}: md5 {md5(data)} on arrival, {expected} when sent")


def unpack(packed: Pack, root: Path) -> None:
    """Write each path whole, replacing what was there; nothing is written unless every md5 matches."""
    verify(packed)
    for path, files in packed.items():
        replace(root / path, {root / name: data for name, (_, data) in files.items()})


def replace(target: Path, files: dict[Path, bytes]) -> None:
    """Build the new file or folder beside the old one, then swap: a reader never sees half of it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    incoming = target.with_name(f".{target.name}.incoming-{uuid.uuid4().hex[:8]}")
    for path, data in files.items():
        staged = incoming / path.relative_to(target) if path != target else incoming
        staged.parent.mkdir(parents=True, exist_ok=True)
        staged.write_bytes(data)
    if target not in files:
        incoming.mkdir(exist_ok=True)  # a folder, possibly empty
    if target.is_dir() and not target.is_symlink():
        retired = target.with_name(incoming.name + ".old")
        target.rename(retired)
        incoming.rename(target)
        shutil.rmtree(retired)
    else:
        os.replace(incoming, target)


# --- the plan: DVC's changed stages and who waits for whom -------------------------------------


def kind(name: str) -> str:
    return name.partition("@")[0]


def inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def plan(groups: list[str]) -> list[dict]:
    """The changed stages (of these groups), each with the planned stages it waits for and the
    dependencies it takes from the workspace (those no planned stage writes)."""
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    from dvc.repo import Repo

    with Repo(".") as repo:
        changed = set(repo.status())
        stages = [s for s in repo.index.stages if s.name in changed and (not groups or kind(s.name) in groups)]
        jobs = [{"name": s.name, "cmd": s.cmd if isinstance(s.cmd, str) else " && ".join(s.cmd),
                 "outs": [str(o.def_path) for o in s.outs], "deps": sorted({str(d.def_path) for d in s.deps})}
                for s in stages]
    for job in jobs:
        others = {out: other["name"] for other in jobs if other is not job for out in other["outs"]}
        # A folder dependency holding a planned output (the report's `reports/eval`) waits for it too,
        # and still travels: the rest of the folder comes from the workspace.
        job["waits_for"] = sorted({owner for dep in job["deps"] for out, owner in others.items()
                                   if inside(dep, out) or inside(out, dep)})
        job["inputs"] = [dep for dep in job.pop("deps") if not any(inside(dep, out) for out in others)]
    return in_order(jobs)


def seed(name: str) -> int:
    found = re.search(r"-(\d+)$", name)
    return int(found.group(1)) if found else -1


def in_order(jobs: list[dict]) -> list[dict]:
    """Each stage after those it waits for; among stages ready together, seed by seed, then dvc.yaml's
    order. Ray starts ready tasks roughly in submission order, so a deadline cuts the last seeds."""
    position = {job["name"]: i for i, job in enumerate(jobs)}
    ordered: list[dict] = []
    placed: set[str] = set()
    while len(ordered) < len(jobs):
        ready = [job for job in jobs if job["name"] not in placed and set(job["waits_for"]) <= placed]
        first = min(ready, key=lambda job: (seed(job["name"]), position[job["name"]]))
        ordered.append(first)
        placed.add(first["name"])
    return ordered


# --- one stage, on a Ray worker -------------------------------------------------------------------


def outcome(job: dict, state: str, why: str = "", **details) -> dict:
    return {"name": job["name"], "state": state, "why": why, "log": "", "files": {}, "started": None,
            "seconds": 0.0, "node": os.uname().nodename, **details}


def run_command(cmd: str, cwd: Path, env: dict) -> tuple[int, str]:
    """The command in a shell at the project's root, as DVC runs it. `python` is this worker's; the
    shipped project comes first on PYTHONPATH, so the code DVC hashed is the code that runs."""
    env = {**os.environ, **env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(cwd), os.environ.get("PYTHONPATH")]))}
    if not ray.get_gpu_ids():
        env["CUDA_VISIBLE_DEVICES"] = ""  # a stage given no GPU share must not use one unaccounted
    result = subprocess.run(cmd, shell=True, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return result.returncode, result.stdout.decode(errors="replace")


@ray.remote
def run_stage(job: dict, deadline: float, env: dict, *arrived) -> dict:
    """`arrived`: the packs of `job["inputs"]`, then the outcomes of the stages it waits for."""
    inputs, upstream = arrived[:len(job["inputs"])], arrived[len(job["inputs"]):]
    blocked = [u["name"] for u in upstream if u["state"] != "done"]
    if blocked:
        return outcome(job, "skipped", f"waits for {', '.join(blocked)}")
    if time.time() > deadline:
        return outcome(job, "not started", "the deadline had passed")
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="run_grid-") as scratch:
        try:
            for packed in [*inputs, *(u["files"] for u in upstream)]:
                unpack(packed, Path(scratch))
        except TransferError as error:
            return outcome(job, "failed", f"an input arrived corrupted: {error}", started=started)
        rc, log = run_command(job["cmd"], Path(scratch), env)
        files = pack(Path(scratch), job["outs"]) if rc == 0 else {}
    missing = [out for out in job["outs"] if out not in files]
    why = f"exit code {rc}" if rc else f"did not write {', '.join(missing)}" if missing else ""
    return outcome(job, "failed" if why else "done", why, log=log, files=files, started=started,
                   seconds=round(time.time() - started, 1))


# --- the driver -----------------------------------------------------------------------------------


def per_kind(text: str) -> dict[str, float]:
    """'0.25' (every kind) or 'train=0.25,evaluate=0.1' (the kinds named; others 0)."""
    if "=" not in text:
        return {"*": float(text or 0)}
    return {key.strip(): float(value) for key, value in (item.split("=") for item in text.split(","))}


def resources(name: str, cpus: dict, gpus: dict, has_gpus: bool) -> dict:
    """What the stage's task asks Ray for. GPU shares only where Ray has GPUs: elsewhere the task could never start."""
    return {"num_cpus": cpus.get(kind(name), cpus.get("*", 1)),
            "num_gpus": gpus.get(kind(name), gpus.get("*", 0)) if has_gpus else 0}


def connect(address: str | None, num_cpus: int | None) -> None:
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}  # stage output goes to --logs
    if address:
        ray.init(address=address, **quiet)
    else:
        # "local": a Ray of this machine alone, even where `ray start` already runs one here.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **quiet)


def submit(jobs: list[dict], deadline: float, cpus: dict, gpus: dict) -> dict:
    """One task per stage, in plan order; each input path goes into the object store once."""
    has_gpus = ray.cluster_resources().get("GPU", 0) > 0
    env = {key: value for key, value in os.environ.items() if key.startswith("PROVAE_")}
    shipped, refs = {}, {}
    for job in jobs:
        for path in job["inputs"]:
            if path not in shipped:
                shipped[path] = ray.put(pack(Path.cwd(), [path]))
        need = resources(job["name"], cpus, gpus, has_gpus)
        refs[job["name"]] = run_stage.options(name=job["name"], **need).remote(
            job, deadline, env, *(shipped[path] for path in job["inputs"]), *(refs[name] for name in job["waits_for"]))
    return refs


def fetch(job: dict, ref) -> dict:
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as error:  # the worker or its node died: nothing came back
        return outcome(job, "failed", f"{type(error).__name__}: {str(error).splitlines()[0]}")


def settle(job: dict, result: dict, settled: dict) -> dict:
    """A stage counts as done only if the stages it waits for are done here, in the workspace, and its
    own outputs arrive intact; then they are written into the workspace."""
    blocked = [f"{name} ({settled[name]['state']})" for name in job["waits_for"] if settled[name]["state"] != "done"]
    if blocked:
        return {**result, "state": "skipped", "why": f"waits for {', '.join(blocked)}", "files": {}}
    if result["state"] == "done":
        try:
            unpack(result["files"], Path.cwd())
        except TransferError as error:
            return {**result, "state": "failed", "why": f"outputs arrived corrupted: {error}", "files": {}}
    return {**result, "files": {}}


def write_log(logs: Path, job: dict, result: dict) -> None:
    verdict = result["state"] + (f": {result['why']}" if result["why"] else "")
    (logs / f"{job['name'].replace('@', '_').replace('/', '_')}.log").write_text(
        f"$ {job['cmd']}\n{result['log']}\n[{verdict}]\n")


def collect(jobs: list[dict], refs: dict, logs: Path, submitted: float) -> dict[str, dict]:
    """Settle the stages as their tasks finish. ray.wait keeps plan order among finished tasks, so a
    stage is settled after the stages it waits for."""
    logs.mkdir(parents=True, exist_ok=True)
    by_ref = {ref: job for job, ref in zip(jobs, refs.values())}
    pending, settled = list(refs.values()), {}
    while pending:
        [ready], pending = ray.wait(pending, num_returns=1)
        job = by_ref[ready]
        result = settle(job, fetch(job, ready), settled)
        result["started_at"] = round(result["started"] - submitted, 1) if result["started"] else None
        settled[job["name"]] = result
        write_log(logs, job, result)
        detail = result["why"] or f"({result['seconds']:.0f} s on {result['node']})"
        print(f"[{time.time() - submitted:6.0f} s] {result['state']:11} {job['name']} {detail}", flush=True)
    return settled


def commit(names: list[str]) -> None:
    from dvc.repo import Repo

    with Repo(".") as repo:
        for name in names:
            repo.commit(name, force=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("groups", nargs="*", help="stage groups, e.g. train evaluate (default: every changed stage)")
    parser.add_argument("--plan", action="store_true", help="print the plan as JSON and stop")
    parser.add_argument("--address", help="an existing Ray cluster: HOST:PORT, or 'auto' for the one `ray start` "
                                           "runs on this machine; default: a local Ray for this run alone")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: this machine's)")
    parser.add_argument("--cpus-per-task", type=per_kind, default="1", help="'1', or per kind: 'train=2,evaluate=1'")
    parser.add_argument("--gpus-per-task", type=per_kind, default="0",
                        help="GPU fraction, per kind: 'train=0.25,evaluate=0.1' (ignored where Ray has no GPU)")
    parser.add_argument("--deadline-minutes", type=float, default=float("inf"), help="no stage starts after this")
    parser.add_argument("--logs", default="grid_logs", help="a log per stage, and status.json")
    args = parser.parse_args(argv)

    jobs = plan(args.groups)
    if args.plan:
        print(json.dumps(jobs, indent=1))
        return 0
    if not jobs:
        print("nothing to run: dvc status reports no changed stage" + (f" in {' '.join(args.groups)}" if args.groups else ""))
        return 0
    connect(args.address, args.num_cpus)
    try:
        submitted = time.time()
        refs = submit(jobs, submitted + args.deadline_minutes * 60, args.cpus_per_task, args.gpus_per_task)
        settled = collect(jobs, refs, Path(args.logs), submitted)
    finally:
        ray.shutdown()
    done = [job["name"] for job in jobs if settled[job["name"]]["state"] == "done"]
    commit(done)
    status = {name: {key: result[key] for key in ("state", "why", "started_at", "seconds", "node")}
              for name, result in settled.items()}
    (Path(args.logs) / "status.json").write_text(json.dumps(status, indent=1) + "\n")
    states = [result["state"] for result in status.values()]
    print(json.dumps({state: states.count(state) for state in sorted(set(states))}))
    return 0 if len(done) == len(jobs) else 1


if __name__ == "__main__":
    sys.exit(main())
