"""Sweeps from the app: started as `python -m sqvae_core sweep` processes, read from their files.

    start(out, grid_lines, options, ...)   validate (sqvae_core.sweep.SweepSpec, one line on error), then
                                           launch the command in its own session, log in OUT/sweep.log
    list_sweeps(root)                      directories under the runs root that hold a sweep.json
    view(out)                              sweep.json + each trial's metrics rows and run status
    stop(out)                              SIGINT to the sweep command (Ctrl-C): Tune stops every trial,
                                           each run directory stays resumable
    resume(out)                            the same command again, rebuilt from sweep.json's spec

The app never runs Ray trials in its own process: the command does (on the local Ray, or on
the cluster at $RAY_ADDRESS, which the command joins by itself), and the Sweep tab reads
sweep.json and the trials' run directories as they are written, like TensorBoard reads logdirs.
Sweeps keep running when the app exits (on a cluster they may run for days); Stop ends them.

No Streamlit import here.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sqvae_core import rundir as rd
from sqvae_core.sweep import SWEEP_FILE, SweepSpec, parse_grid, read_sweep

from app.jobs import spawn, train_argv
from app.settings import refuse_if_read_only

LOG_FILE = "sweep.log"
_PROCS: dict[str, subprocess.Popen] = {}     # sweeps this server started (polled: no zombies)


def ray_target() -> str:
    """Where a sweep started here runs: the cluster in $RAY_ADDRESS, else a local Ray."""
    addr = os.environ.get("RAY_ADDRESS", "").strip()
    return f"the Ray cluster at {addr}" if addr else "a local Ray instance (started by the sweep)"


def sweep_argv(out: Path, grid: dict[str, list], options: dict, *, samples: int = 1, search: str = "grid",
               scheduler: str = "fifo", metric: str = "val_mse", mode: str = "min",
               python: str | None = None) -> list[str]:
    """The command line of a sweep (a list, never a shell string); options are Train's (jobs.train_argv)."""
    train = train_argv(out, options, python=python)        # validates options, maps them to flags
    shared = train[train.index("--out") + 2:-1]            # drop "... train --out DIR" and "--quiet"
    argv = [python or sys.executable, "-m", "sqvae_core", "sweep", "--out", str(out)]
    for flag, values in grid.items():
        argv += ["--grid", f"{flag}={','.join(str(v) for v in values)}"]
    argv += ["--samples", str(samples), "--search", search, "--scheduler", scheduler, "--metric", metric,
             "--mode", mode]
    return argv + shared


def check_spec(out: Path, grid: dict, options: dict, **kw) -> SweepSpec:
    """Everything `sqvae sweep` would refuse, refused here first in one line (no process started)."""
    from sqvae_core.cli import build_parser
    argv = sweep_argv(out, grid, options, **kw)
    args = build_parser().parse_args(argv[3:])
    return SweepSpec.from_args(args).validate()


def parse_grid_text(text: str) -> dict[str, list]:
    """The form's grid: one FLAG=V1,V2 per line (or separated by ';'), as `--grid` takes them."""
    items = [ln.strip() for ln in (text or "").replace(";", "\n").splitlines() if ln.strip()]
    if not items:
        raise ValueError("give at least one grid line, FLAG=V1,V2 (e.g. lr=0.001,0.002)")
    return parse_grid(items)


def start(out: Path, grid: dict, options: dict, **kw) -> int:
    """Launch the sweep command writing OUT; returns its pid. ValueError (one line) on bad input or
    if OUT holds a sweep that is still running."""
    refuse_if_read_only("starting a sweep")
    out = Path(out)
    check_spec(out, grid, options, **kw)
    doc = read_sweep(out) if (out / SWEEP_FILE).is_file() else None
    if doc and is_running(doc):
        raise ValueError(f"the sweep in {out.name} is still running")
    return _launch(out, sweep_argv(out, grid, options, **kw))


def spec_argv(spec: dict, out: Path, python: str | None = None) -> list[str]:
    """The command line of the sweep a sweep.json's spec describes: running it again continues it."""
    from sqvae_core.cli import SWITCH_FLAGS
    argv = [python or sys.executable, "-m", "sqvae_core", "sweep", "--out", str(out)]
    for flag, values in spec["grid"].items():
        argv += ["--grid", f"{flag}={','.join(str(v) for v in values)}"]
    for key in ("samples", "search", "scheduler", "metric", "mode", "grace", "cpus_per_trial", "gpus_per_trial",
                "max_failures", "max_concurrent"):
        if spec.get(key) is not None:
            argv += [f"--{key.replace('_', '-')}", str(spec[key])]
    for dest, value in spec.get("train_flags", {}).items():
        if dest in SWITCH_FLAGS:
            argv += [f"--{dest.replace('_', '-')}"] if value else []
        elif dest == "compile":
            argv.append("--compile" if value else "--no-compile")
        else:
            argv += [f"--{dest.replace('_', '-')}", str(value)]
    return argv


def resume(out: Path) -> int:
    """Run an interrupted sweep's command again (it keeps the trials that are over); returns the pid."""
    refuse_if_read_only("resuming a sweep")
    doc = read_sweep(out)
    if not doc or "spec" not in doc:
        raise ValueError(f"{Path(out).name} holds no sweep.json to resume")
    if is_running(doc):
        raise ValueError(f"the sweep in {Path(out).name} is still running")
    return _launch(Path(out), spec_argv(doc["spec"], Path(out)))


def _launch(out: Path, argv: list[str]) -> int:
    _reap()
    if str(out.resolve()) in _PROCS:
        raise ValueError(f"a sweep in {out.name} was just started from here and is still running")
    out.mkdir(parents=True, exist_ok=True)
    proc = spawn(argv, out / LOG_FILE)
    _PROCS[str(out.resolve())] = proc
    return proc.pid


def _reap() -> None:
    for key, p in list(_PROCS.items()):
        if p.poll() is not None:
            del _PROCS[key]


def is_running(doc: dict) -> bool:
    """Is the sweep of this sweep.json being run now (its driver alive)?"""
    _reap()
    return doc.get("state") == "running" and rd.pid_alive(doc.get("pid"), doc.get("host"))


def state(doc: dict) -> str:
    """running | finished | interrupted (the driver stopped or died before the end) | starting."""
    if doc.get("state") == "running" and not is_running(doc):
        return "interrupted"
    return doc.get("state") or "starting"


def _is_our_sweep(pid: int) -> bool:
    """Only a `sqvae_core sweep` process is ever signalled."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return False
    return "sqvae_core" in args and "sweep" in args


def stop(out: Path) -> str:
    """SIGINT to the sweep's driver, as Ctrl-C: Tune stops its trials, the command writes sweep.json."""
    refuse_if_read_only("stopping a sweep")
    doc = read_sweep(out)
    if not doc or not is_running(doc) or doc.get("host") not in (None, os.uname().nodename):
        return "not running"
    pid = doc["pid"]
    if not _is_our_sweep(pid):
        return "not running"
    try:
        os.kill(pid, signal.SIGINT)           # the driver only: Tune then stops the trials itself
    except (ProcessLookupError, PermissionError):
        return "not running"
    return "stopping"


def list_sweeps(root: Path) -> list[Path]:
    """Sweep directories directly under the runs root (a sweep.json, or the log of one just
    started from here), newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if rd.valid_run_name(p.name) and ((p / SWEEP_FILE).is_file() or (p / LOG_FILE).is_file())]
    return sorted(found, key=lambda p: max(f.stat().st_mtime for f in (p / SWEEP_FILE, p / LOG_FILE) if f.exists()),
                  reverse=True)


def log_tail(out: Path, lines: int = 8, max_bytes: int = 8192) -> str:
    p = Path(out) / LOG_FILE
    if not p.is_file():
        return ""
    with open(p, "rb") as f:
        f.seek(max(0, p.stat().st_size - max_bytes))
        return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])


def view(out: Path) -> dict:
    """What the Sweep tab shows: the sweep.json document, its state, and per trial its metrics rows
    and its run directory's status (the live step comes from there, between validations)."""
    out = Path(out)
    doc = read_sweep(out) or {"trials": []}
    rows, status = {}, {}
    for t in doc.get("trials", []):
        run = out / t["name"]
        rows[t["name"]] = rd.read_metrics(run)
        status[t["name"]] = rd.RunDir(run).status if (run / rd.STATUS).is_file() else None
    if "spec" in doc:
        st = state(doc)
    else:     # no sweep.json yet: the command is starting, or it failed before (its log says why)
        _reap()
        st = "starting" if str(out.resolve()) in _PROCS else "not started"
    return {"doc": doc, "state": st, "rows": rows, "status": status, "updated": time.time()}
