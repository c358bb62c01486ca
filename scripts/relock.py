"""`make relock`: re-lock stages whose only change is code, with evidence that their outputs did not move.

    python scripts/relock.py                # check, then `dvc commit -f` exactly the eligible stages
    python scripts/relock.py --dry-run      # the plan and the checks, nothing committed
    python scripts/relock.py --base v1      # compare the working tree with another commit (default HEAD)

Every stage lists the modules it imports as deps, so any edit of the code (even a rename) makes
dvc.lock stale for outputs a GPU made. `dvc commit` re-locks without re-running; this script first
gathers the evidence that the new code computes the same outputs:
0. plan: stages `dvc status` shows with modified code deps (*.py, or folders of them) alone are eligible;
   the others (params, data, models, outputs, command changed) are listed and left alone;
1. equivalence: the tiny profile's pipeline, run with the base commit's files and then with the
   working tree's, writes byte-identical outputs (md5 of every out in dvc.lock) for the stages of
   the eligible kinds (train, evaluate, certify, ...);
2. certificate: `scripts/audit.py`'s check of every committed model's per-image ELBO and bound,
   recomputed with the new code (tolerance as the audit);
3. report: `scripts/audit.py`'s byte-identical re-run of the report.
Only when all pass, `dvc commit -f` of the eligible stages. Otherwise exit 1 naming the output that
moved or the audit line that failed; nothing is committed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PROFILE = "tiny"
# What the pipeline writes (every out of dvc.yaml lives there) and DVC's own state. The working
# tree's copy takes these from the base copy's run, so `dvc repro` re-runs only the stages whose
# code changed; the working tree's own models and reports never enter the comparison.
OUTPUTS = ("dvc.lock", "models", "reports", "data", ".dvc")
# Stage scripts write timings (a checkpoint's wall time, seconds per image, ...), which differ from
# run to run. In the tiny copies every stage script (a `stages/*.py` process; DVC itself keeps its
# clock) sees a frozen clock, so equivalent code writes the same bytes, timings included (0 s).
FROZEN_CLOCK = """\
import sys, time
from pathlib import Path
if Path(sys.argv[0]).parent.name == "stages":
    time.time, time.time_ns = (lambda: 1.0e9), (lambda: 10**18)
    time.perf_counter, time.perf_counter_ns = (lambda: 0.0), (lambda: 0)
"""


class Refused(Exception):
    """A check failed: the message says what; nothing is committed."""


def sh(args: list, cwd: Path, env: dict) -> str:
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()[-3000:]
        raise Refused(f"`{shlex.join(map(str, args))}` failed in {cwd}:\n{output}")
    return result.stdout


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def kind(stage: str) -> str:
    return stage.split("@")[0]  # train@mnist-0.05-0 -> train


# --- 0. plan ---------------------------------------------------------------------------------


def is_code(root: Path, path: str) -> bool:
    """A module, or a package folder holding modules only (e.g. provae/report)."""
    if (root / path).is_dir():
        files = [p for p in (root / path).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        return bool(files) and all(p.suffix == ".py" for p in files)
    return path.endswith(".py")


def classify(status: dict, root: Path) -> tuple[dict[str, list[str]], dict[str, str]]:
    """`dvc status --json` -> (eligible stage -> its modified code deps, other stage -> why not).
    Only modified code can change what a stage computes without showing in its data, params or
    command; anything else needs `dvc repro`."""
    eligible, other = {}, {}
    for stage, changes in status.items():
        code, reasons = [], []
        for change in changes:
            for what, entries in (change.items() if isinstance(change, dict) else [(change, {})]):
                if what != "changed deps":
                    reasons.append(f"{what}: {', '.join(f'{p} {s}' for p, s in entries.items())}".rstrip(": "))
                    continue
                for path, state in entries.items():
                    if isinstance(state, dict):  # a params file: {key: modified}
                        reasons.append(f"params changed: {', '.join(state)}")
                    elif state == "modified" and is_code(root, path):
                        code.append(path)
                    else:
                        reasons.append(f"{path} {state}")
        if reasons or not code:
            other[stage] = "; ".join(reasons) or "changed"
        else:
            eligible[stage] = code
    return eligible, other


def plan(root: Path, env: dict) -> tuple[dict[str, list[str]], dict[str, str]]:
    return classify(json.loads(sh(["dvc", "status", "--json"], root, env) or "{}"), root)


# --- 1. equivalence on the tiny profile ------------------------------------------------------


def write_clock(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(FROZEN_CLOCK)
    return folder


def stage_env(copy: Path, clock: Path, env: dict) -> dict:
    """The copy's own provae (not the venv's editable install of the real checkout) and the clock."""
    return {**env, "PYTHONPATH": os.pathsep.join([str(clock), str(copy)])}


def source_files(root: Path) -> dict[str, str]:
    """The working tree's files that are not pipeline outputs (tracked, or untracked and not
    ignored), with their md5: what the working tree's copy runs, and what must not change until
    the commit."""
    names = sh(["git", "ls-files", "-co", "--exclude-standard"], root, os.environ).splitlines()
    inputs = committed_inputs(root)
    return {name: md5(root / name) for name in sorted(set(names))
            if (name.split("/")[0] not in OUTPUTS or any(name == i or name.startswith(i + "/") for i in inputs))
            and (root / name).is_file()}


def committed_inputs(root: Path) -> list[str]:
    """Deps in the output folders that no stage writes (the report's template, say): inputs the
    tiny copies need like code."""
    stages = yaml.safe_load((root / "dvc.lock").read_text())["stages"].values()
    outs = [out["path"] for stage in stages for out in stage.get("outs", [])]
    deps = {dep["path"] for stage in stages for dep in stage.get("deps", [])}
    return sorted(d for d in deps if d.split("/")[0] in OUTPUTS and d.split("/")[0] != "dvc.lock"
                  and not any(d == o or d.startswith(o + "/") or o.startswith(d + "/") for o in outs))


def base_copy(root: Path, base: str, folder: Path, env: dict) -> None:
    """The base commit as committed (its outputs too: on a commit already at the tiny profile,
    `dvc repro` finds them up to date), with the tiny profile applied by its own script."""
    folder.mkdir(parents=True)
    sh(["sh", "-c", f"git archive --format=tar {base} | tar -x -C {shlex.quote(str(folder))}"], root, env)
    prepare(folder, env)


def working_copy(root: Path, base: Path, folder: Path, files: dict[str, str], env: dict) -> None:
    """The base copy's run (outputs, lock, DVC cache) with the working tree's code and config."""
    folder.mkdir(parents=True)
    for name in OUTPUTS:
        source = base / name
        if source.is_dir():  # not .dvc/tmp: DVC's state of the other folder
            shutil.copytree(source, folder / name, ignore=lambda d, _: ["tmp"] if Path(d).name == ".dvc" else [])
        elif source.is_file():
            shutil.copy2(source, folder / name)
    for name in files:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, folder / name)
    prepare(folder, env)


def prepare(folder: Path, env: dict) -> None:
    sh([sys.executable, "scripts/profile.py", PROFILE, "--write"], folder, env)
    # DVC and DVCLive want a git repository with a commit; an empty one will do.
    sh(["git", "init", "-q"], folder, env)
    sh(["git", "-c", "user.name=relock", "-c", "user.email=relock@localhost", "commit", "-q", "--allow-empty",
        "-m", "relock copy"], folder, env)
    if not (folder / ".dvc").is_dir():
        sh(["dvc", "init", "-q"], folder, env)


def repro(folder: Path, clock: Path, env: dict) -> float:
    started = time.time()
    sh(["dvc", "repro"], folder, stage_env(folder, clock, env))
    return time.time() - started


def locked_outs(folder: Path) -> dict[str, dict[str, str]]:
    lock = yaml.safe_load((folder / "dvc.lock").read_text())["stages"]
    return {stage: {out["path"]: out["md5"] for out in entry.get("outs", [])} for stage, entry in lock.items()}


def moved_files(base: Path, work: Path, path: str) -> list[tuple[str, str, str]]:
    """(file, base md5, new md5) for every file of an out that differs; a folder out file by file."""
    a, b = base / path, work / path
    files = {p.relative_to(a) for p in a.rglob("*") if p.is_file()} | {p.relative_to(b) for p in b.rglob("*") if p.is_file()}
    pairs = [(a / f, b / f) for f in sorted(files)] if a.is_dir() or b.is_dir() else [(a, b)]
    found = [(old.relative_to(base).as_posix(), md5(old) if old.is_file() else "missing",
              md5(new) if new.is_file() else "missing") for old, new in pairs]
    return [row for row in found if row[1] != row[2]]


def compare(base: Path, work: Path, kinds: set[str], env: dict) -> list[str]:
    """Every out of the tiny stages of the changed kinds, base run against working-tree run."""
    old, new = locked_outs(base), locked_outs(work)
    # The profile's stages only: dvc.lock keeps entries of the committed grid's other models.
    defined = {s for copy in (base, work) for s in sh(["dvc", "stage", "list", "--name-only"], copy, env).split()}
    stages = sorted(s for s in defined if kind(s) in kinds)
    missing = kinds - {kind(s) for s in stages}
    if missing:  # no stage of that kind in the tiny profile: no evidence for it
        raise Refused(f"the {PROFILE} profile runs no stage of kind {', '.join(sorted(missing))}")
    moved, lines = [], []
    for stage in stages:
        if stage not in old or stage not in new:
            moved.append(f"{stage}: in the {'working tree' if stage in new else 'base'}'s run only")
            continue
        for path in sorted(set(old[stage]) | set(new[stage])):
            a, b = old[stage].get(path), new[stage].get(path)
            if a == b:
                lines.append(f"  {stage}: {path} identical ({a})")
            else:  # the lock's md5 of a folder is of its listing: name the files
                moved += [f"{stage}: {f}: md5 {x} (base) -> {y} (working tree)"
                          for f, x, y in moved_files(base, work, path)] or [f"{stage}: {path}: {a} -> {b}"]
    if moved:
        raise Refused(f"outputs moved on the {PROFILE} profile:\n  " + "\n  ".join(moved))
    return lines


# --- 2, 3. certificate and report, by the audit -------------------------------------------


def audit(root: Path, env: dict) -> str:
    """audit.py's `certificate` and `report` checks on this checkout, importing the working tree's
    code (PYTHONPATH); `fresh_attack` and `rerun` cost minutes and test the attack, not the code's
    equivalence; `checkpoints` would fail on any stale params, which are not ours to judge;
    `outputs` and `finite` judge the committed outputs, not the code (`make audit` runs them)."""
    command = [sys.executable, root / "scripts" / "audit.py", "--root", root,
               "--skip", "checkpoints", "fresh_attack", "rerun", "outputs", "finite"]
    result = subprocess.run([str(c) for c in command], cwd=root, capture_output=True, text=True,
                            env={**env, "PYTHONPATH": str(root)})
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0:
        failed = [line for line in lines if line.rstrip().endswith("FAIL")] or lines[-5:] + [result.stderr[-2000:]]
        raise Refused("audit.py (certificate, report) failed:\n  " + "\n  ".join(failed))
    return lines[-1] if lines else ""


# --- commit ----------------------------------------------------------------------------------


def commit(root: Path, stages: list[str], files: dict[str, str], env: dict) -> None:
    """`dvc commit -f` records the files as they are now: they must be those the checks ran on."""
    changed = [name for name, digest in files.items() if not (root / name).is_file() or md5(root / name) != digest]
    if changed:
        raise Refused(f"the working tree changed during the checks: {', '.join(changed)}")
    sh(["dvc", "commit", "-f", *stages], root, env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="HEAD", help="the commit whose code made the locked outputs")
    parser.add_argument("--dry-run", action="store_true", help="run the checks, commit nothing")
    parser.add_argument("--workdir", help="keep the tiny copies here (default: a temporary folder)")
    parser.add_argument("--exclude", nargs="*", default=[], help="stages to leave to `dvc repro` although only "
                        "their code changed: those whose outputs the new code changes on purpose")
    args = parser.parse_args()
    env = {**os.environ, "DVC_NO_ANALYTICS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    mirror = ROOT.parent / "shared" / "data"
    if not env.get("PROVAE_DATA_MIRROR") and mirror.is_dir():
        env["PROVAE_DATA_MIRROR"] = str(mirror)
    try:
        base = sh(["git", "rev-parse", "--verify", f"{args.base}^{{commit}}"], ROOT, env).strip()
        eligible, other = plan(ROOT, env)
        for stage in args.exclude:
            if stage in eligible:
                del eligible[stage]
                other[stage] = "excluded (--exclude): the new code changes its outputs; re-run it"
        print(f"relock: {ROOT} against {args.base} ({base[:10]})")
        print("eligible (only code deps changed):" if eligible else "eligible: none")
        for stage, code in eligible.items():
            print(f"  {stage}: {', '.join(code)}")
        if other:
            print("not eligible (need `dvc repro`):")
            for stage, why in other.items():
                print(f"  {stage}: {why}")
        if not eligible:
            print("nothing to re-lock")
            return
        kinds = {kind(s) for s in eligible}
        with tempfile.TemporaryDirectory(prefix="provae-relock-") as temp:
            work_dir = Path(args.workdir).resolve() if args.workdir else Path(temp)
            for name in ("base", "work", "clock"):
                shutil.rmtree(work_dir / name, ignore_errors=True)
            clock = write_clock(work_dir / "clock")
            files = source_files(ROOT)
            print(f"check 1: {PROFILE} profile, stages of kind {', '.join(sorted(kinds))}: base vs working tree")
            base_copy(ROOT, base, work_dir / "base", env)
            seconds = repro(work_dir / "base", clock, env)
            working_copy(ROOT, work_dir / "base", work_dir / "work", files, env)
            seconds_new = repro(work_dir / "work", clock, env)
            print("\n".join(compare(work_dir / "base", work_dir / "work", kinds, env)))
            print(f"  byte-identical (runs: base {seconds:.0f} s, working tree {seconds_new:.0f} s)")
            print("checks 2-3: audit.py certificate and report, working tree's code:")
            print(f"  {audit(ROOT, env)}")
            if args.dry_run:
                print(f"dry run: would `dvc commit -f` {' '.join(eligible)}")
                return
            commit(ROOT, list(eligible), files, env)
        print(f"committed (dvc commit -f): {' '.join(eligible)}")
    except Refused as error:
        print(f"REFUSED: {error}\nnothing committed", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
