"""Training jobs launched by the app: separate processes, a concurrency cap, a persisted queue.

    jm = JobManager(runs_root)                      # one per runs directory and server process
    jm.submit("g1-demo", {"model": "gaussian_1", "preset": "demo"})   # -> "running" | "queued"
    jm.stop("g1-demo")                              # SIGTERM: the trainer checkpoints, marks "stopped"
    jm.resume("g1-demo")                            # python -m sqvae_core train --out ... --resume
    jm.jobs()                                       # what the Train page lists

Every training is `python -m sqvae_core train ... --out RUNS/NAME --quiet` started with
subprocess.Popen(start_new_session=True), stdout+stderr into RUNS/NAME/train.log. Nothing trains
in the app's own threads. At most `max_jobs` trainings run at once (env SQVAE_MAX_JOBS; default 1
on CPU, one per GPU with CUDA); the rest wait in a queue that lives in RUNS/.sqvae_jobs.json, so a
browser refresh, a second tab or a restarted server sees the same queue. A daemon thread reaps
finished children (Popen.poll, so no zombies) and starts queued jobs as slots free up; at
interpreter exit (atexit) every child still running gets SIGTERM (then SIGKILL after a grace
period), so the runs end as "stopped" and can be resumed. Trainings run under `nice -n 10`
(env SQVAE_JOB_NICE) so the app's pages stay responsive while they use the CPU.

This module has no Streamlit import: the pages, the tests and the benchmarks use it alike.
"""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from app.settings import refuse_if_read_only
from sqvae_core import rundir as rd
from sqvae_core.cli import TRAIN_FLAGS

REPO = Path(__file__).resolve().parents[1]     # trainers run from here, with it on PYTHONPATH
REGISTRY = ".sqvae_jobs.json"
LOG_FILE = "train.log"
ACTIVE = ("queued", "starting", "running")       # states of a job that is not over yet
FINAL_STATES = ("finished", "failed", "stopped")
# option name (as in the form / queue file) -> CLI flag; only flags the CLI knows are accepted
OPTION_FLAGS = {flag[2:].replace("-", "_"): flag for flag in TRAIN_FLAGS}
COMPILE_CHOICES = ("auto", "on", "off")      # the one switch option: --compile / --no-compile / neither
OPTION_FLAGS["model"] = "--model"
STOP_GRACE = 10.0        # seconds between SIGTERM and SIGKILL at app exit


def check_name(name) -> str:
    """A run name (sqvae_core.rundir.valid_run_name: [A-Za-z0-9_.-], no leading dot, no '..'), or ValueError."""
    if not rd.valid_run_name(name):
        raise ValueError(f"invalid run name {name!r}: use letters, digits, '_', '-', '.' "
                         f"(at most 100, not starting with '.', no '..')")
    return name


def check_run_name(name) -> str:
    """NAME or GROUP/NAME (runs/ship/gaussian_1), every part a valid name."""
    parts = name.split("/") if isinstance(name, str) else [name]
    if not 1 <= len(parts) <= 2:
        raise ValueError(f"invalid run name {name!r}: NAME or GROUP/NAME")
    for p in parts:
        check_name(p)
    return name


def job_nice() -> int:
    """Niceness of training processes (env SQVAE_JOB_NICE, default 10, 0 = none): on a small CPU
    the browser sessions then get the cores first and a training uses what is left."""
    try:
        return min(19, max(0, int(os.environ.get("SQVAE_JOB_NICE", "10"))))
    except ValueError:
        return 10


def default_max_jobs() -> int:
    env = os.environ.get("SQVAE_MAX_JOBS", "").strip()
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            pass
    try:
        import torch
        if torch.cuda.is_available():
            return max(1, torch.cuda.device_count())
    except Exception:
        pass
    return 1


def train_argv(run_dir: Path, options: dict, resume: bool = False, python: str | None = None) -> list[str]:
    """The command line of one training (a list, never a shell string)."""
    argv = [python or sys.executable, "-m", "sqvae_core", "train", "--out", str(run_dir)]
    for key, value in options.items():
        if value is None or value == "":
            continue
        if key == "compile":             # "auto" (the trainer decides: 5,000+ steps), "on" or "off"
            if value not in COMPILE_CHOICES:
                raise ValueError(f"training option compile must be one of {', '.join(COMPILE_CHOICES)}, got {value!r}")
            argv += {"on": ["--compile"], "off": ["--no-compile"], "auto": []}[value]
            continue
        if key == "amp":                 # a switch: --amp when true
            if not isinstance(value, bool):
                raise ValueError(f"training option amp must be true or false, got {value!r}")
            argv += ["--amp"] if value else []
            continue
        flag = OPTION_FLAGS.get(key)
        if flag is None:
            raise ValueError(f"unknown training option {key!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"training option {key} must be a number or a string, got {value!r}")
        text = str(value)
        if text.startswith("-") and not isinstance(value, (int, float)):
            raise ValueError(f"training option {key}={value!r} must not start with '-'")
        argv += [flag, text]
    if resume:
        argv.append("--resume")
    argv.append("--quiet")
    return argv


def spawn(argv: list[str], log_path: Path) -> subprocess.Popen:
    """Start a command of ours as its own session (a browser refresh or the app's exit does not take it
    down with a signal meant for the app), from the repo with it on PYTHONPATH, niced (job_nice),
    stdout and stderr appended to log_path after a line with the command. Trainings and sweeps alike."""
    shown = " ".join(argv[1:])
    nice, nice_bin = job_nice(), shutil.which("nice")
    if nice and nice_bin:      # `nice` execs the command: same pid, and every thread it starts is niced
        argv = [nice_bin, "-n", str(nice)] + argv
        shown = f"(nice {nice}) {shown}"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("PYTHONUNBUFFERED", "1")
    with open(log_path, "ab") as log:
        log.write(f"\n$ {shown}\n".encode())
        log.flush()
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=str(REPO), env=env, start_new_session=True, close_fds=True)


def _is_our_trainer(pid: int, run_dir: Path) -> bool:
    """True only if pid is a `sqvae_core train` process writing run_dir (never signal a stranger)."""
    if not rd.pid_alive(pid):
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return False     # no /proc (macOS): refuse rather than guess
    if "sqvae_core" not in " ".join(args) or "train" not in args:
        return False
    try:
        out = Path(args[args.index("--out") + 1])
    except (ValueError, IndexError):
        return False
    try:
        return out.resolve() == Path(run_dir).resolve()
    except OSError:
        return False


def log_tail(run_dir: Path, lines: int = 5, max_bytes: int = 8192) -> str:
    path = Path(run_dir) / LOG_FILE
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - max_bytes))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    # tqdm-style carriage returns: keep the last state of each line
    rows = [r.split("\r")[-1] for r in text.splitlines() if r.strip()]
    return "\n".join(rows[-lines:])


class JobManager:
    """Trainings of one runs directory, started by this server process (see module docstring)."""

    def __init__(self, runs_root, max_jobs: int | None = None, *, python: str | None = None,
                 poll_interval: float = 1.0, start_thread: bool = True):
        self.root = Path(runs_root)
        self.max_jobs = max_jobs or default_max_jobs()
        self.python = python or sys.executable
        self.poll_interval = poll_interval
        self._procs: dict[str, subprocess.Popen] = {}
        self._lock = threading.RLock()
        self._closed = False
        self._state = self._read_registry()
        atexit.register(self.shutdown)
        if start_thread:
            threading.Thread(target=self._pump_forever, name=f"sqvae-jobs:{self.root}", daemon=True).start()

    # ------------------------------------------------------------------ registry file
    @property
    def registry_path(self) -> Path:
        return self.root / REGISTRY

    def _read_registry(self) -> dict:
        state = {"queue": [], "jobs": {}}
        try:
            raw = rd.read_json(self.registry_path, "job registry")
        except rd.BundleError:
            return state
        for item in raw.get("queue", []) if isinstance(raw.get("queue"), list) else []:
            try:
                name = check_run_name(item["name"])
                opts = dict(item.get("options") or {})
                train_argv(self.root / name, opts)        # validates every option
                state["queue"].append({"name": name, "options": opts, "resume": bool(item.get("resume")),
                                       "submitted": float(item.get("submitted", time.time()))})
            except (KeyError, TypeError, ValueError):
                continue         # a hand-edited or hostile entry is dropped, not run
        jobs = raw.get("jobs") if isinstance(raw.get("jobs"), dict) else {}
        for name, job in jobs.items():
            try:
                check_run_name(name)
            except ValueError:
                continue
            if isinstance(job, dict):
                state["jobs"][name] = {k: job.get(k) for k in
                                       ("pid", "started", "ended", "returncode", "options", "resume", "stop_requested")}
        return state

    def _save(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            rd.atomic_write_json(self.registry_path, self._state)
        except OSError:
            pass         # a read-only runs dir: the queue still works for this process

    # ----------------------------------------------------------------------- actions
    def run_dir(self, name: str) -> Path:
        return self.root / check_run_name(name)

    def submit(self, name: str, options: dict, *, resume: bool = False) -> str:
        """Start a training now if a slot is free, else queue it. Returns "running" or "queued"."""
        refuse_if_read_only("starting or resuming a training")
        check_run_name(name)
        options = {k: v for k, v in dict(options).items() if v is not None and v != ""}
        run_dir = self.root / name
        train_argv(run_dir, options, resume)          # validate before touching anything
        with self._lock:
            if name in self._procs or any(q["name"] == name for q in self._state["queue"]):
                raise ValueError(f"a job named {name!r} is already running or queued")
            if not resume and ((run_dir / rd.CONFIG).exists() or (run_dir / rd.CHECKPOINT).exists()):
                raise ValueError(f"a run named {name!r} already exists in {self.root}; choose another name")
            if resume and rd.pid_alive((self._state["jobs"].get(name) or {}).get("pid")):
                raise ValueError(f"run {name!r} is still running")
            self._state["queue"].append({"name": name, "options": options, "resume": resume,
                                         "submitted": time.time()})
            self._save()
            self.pump()
            return "running" if name in self._procs else "queued"

    def new_name(self, prefix: str) -> str:
        """PREFIX-YYYYmmdd-HHMMSS[-i], a name no run in the root has yet."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = "".join(c if c.isalnum() or c in "_.-" else "-" for c in prefix)[:60].lstrip(".") or "run"
        name, i = f"{base}-{stamp}", 1
        while (self.root / name).exists():
            i += 1
            name = f"{base}-{stamp}-{i}"
        return name

    def start_demo(self, kind: str = "gaussian_1", steps: int | None = None) -> tuple[str, str]:
        """One click: `train --model KIND --preset demo` into a new run. Returns (name, state)."""
        name = self.new_name(f"demo-{kind}")
        return name, self.submit(name, {"model": kind, "preset": "demo", "steps": steps})

    def resume(self, name: str, steps: int | None = None) -> str:
        """Continue a stopped/interrupted run from its checkpoint (optionally to a new total of steps)."""
        refuse_if_read_only("resuming a training")
        run_dir = self.run_dir(name)
        if not (run_dir / rd.CONFIG).is_file():
            raise ValueError(f"run {name!r} has no config.json to resume from")
        if rd.RunDir(run_dir).is_logged:
            raise ValueError(f"run {name!r} is a logged run (RunLogger): its loop runs outside the app, "
                             f"there is no checkpoint to resume")
        return self.submit(name, {"steps": steps} if steps else {}, resume=True)

    def stop(self, name: str) -> str:
        """Dequeue a queued job, or SIGTERM a running one (the trainer saves and marks "stopped").
        A logged run (RunLogger) is never signalled: its loop is someone's own process."""
        refuse_if_read_only("stopping a training")
        check_run_name(name)
        if rd.RunDir(self.root / name).is_logged:
            return "not running"
        with self._lock:
            before = len(self._state["queue"])
            self._state["queue"] = [q for q in self._state["queue"] if q["name"] != name]
            if len(self._state["queue"]) != before:
                self._save()
                return "dequeued"
            proc = self._procs.get(name)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                self._state["jobs"].setdefault(name, {})["stop_requested"] = time.time()
                self._save()
                return "stopping"
            # re-attach: a trainer started by an earlier server process, or from the command line
            run_dir = self.root / name
            pid = rd.RunDir(run_dir).status.pid
            if pid is None:
                pid = (self._state["jobs"].get(name) or {}).get("pid")
            if isinstance(pid, int) and _is_our_trainer(pid, run_dir):
                os.kill(pid, signal.SIGTERM)
                self._state["jobs"].setdefault(name, {})["stop_requested"] = time.time()
                self._save()
                return "stopping"
        return "not running"

    # ------------------------------------------------------------------ bookkeeping
    def _launch(self, entry: dict) -> None:
        name = entry["name"]
        run_dir = self.root / name
        run_dir.mkdir(parents=True, exist_ok=True)
        proc = spawn(train_argv(run_dir, entry["options"], entry["resume"], self.python), run_dir / LOG_FILE)
        self._procs[name] = proc
        self._state["jobs"][name] = {"pid": proc.pid, "started": time.time(), "ended": None, "returncode": None,
                                     "options": entry["options"], "resume": entry["resume"],
                                     "stop_requested": None}

    def _active_count(self) -> int:
        n = sum(1 for p in self._procs.values() if p.poll() is None)
        # trainers started by an earlier server process that are still alive use slots too
        for name, job in self._state["jobs"].items():
            if name not in self._procs and job.get("returncode") is None and rd.pid_alive(job.get("pid")) \
                    and _is_our_trainer(job["pid"], self.root / name):
                n += 1
        return n

    def pump(self) -> None:
        """Reap finished children and start queued jobs while slots are free."""
        with self._lock:
            if self._closed:
                return
            changed = False
            for name, proc in list(self._procs.items()):
                rc = proc.poll()                      # reaps: no zombies
                if rc is not None:
                    job = self._state["jobs"].setdefault(name, {})
                    job.update(returncode=rc, ended=time.time())
                    del self._procs[name]
                    changed = True
            active = self._active_count()
            while active < self.max_jobs and self._state["queue"]:
                entry = self._state["queue"].pop(0)
                changed = True
                try:
                    self._launch(entry)
                    active += 1
                except (OSError, ValueError) as e:
                    self._state["jobs"][entry["name"]] = {"pid": None, "started": time.time(), "ended": time.time(),
                                                          "returncode": -1, "options": entry["options"],
                                                          "resume": entry["resume"], "launch_error": str(e)}
            if changed:
                self._save()

    def _pump_forever(self) -> None:
        while not self._closed:
            try:
                self.pump()
            except Exception:
                pass
            time.sleep(self.poll_interval)

    # ---------------------------------------------------------------------- queries
    def queue(self) -> list[dict]:
        with self._lock:
            return [dict(q) for q in self._state["queue"]]

    def is_running(self, name: str) -> bool:
        with self._lock:
            proc = self._procs.get(name)
            if proc is not None:
                return proc.poll() is None
            job = self._state["jobs"].get(name) or {}
        return job.get("returncode") is None and rd.pid_alive(job.get("pid")) and \
            _is_our_trainer(job["pid"], self.root / name)

    def job_state(self, name: str) -> dict:
        """{"name", "state", "step", "error", "pid", "queued_at"} for a run or a queued job.

        states: queued, starting (process up, no status yet), running, finished, failed, stopped,
        interrupted (status says running, process gone), unknown (no status, not ours)."""
        with self._lock:
            q = next((q for q in self._state["queue"] if q["name"] == name), None)
            job = dict(self._state["jobs"].get(name) or {})
            proc = self._procs.get(name)
        if q is not None:
            pos = [x["name"] for x in self.queue()].index(name) + 1
            return {"name": name, "state": "queued", "step": 0, "error": None, "pid": None, "position": pos,
                    "resume": q["resume"]}
        run_dir = self.root / name
        st = rd.RunDir(run_dir).status
        alive = proc.poll() is None if proc is not None else False
        state = st.state
        out = {"name": name, "state": state, "step": 0 if st.problem else st.step, "error": st.error,
               "pid": st.pid or job.get("pid")}
        if alive:
            started = job.get("started") or 0
            fresh = st.updated is not None and st.updated >= started - 1
            if state in ("unknown", "interrupted") or (state in FINAL_STATES and not fresh):
                out["state"] = "starting"          # resumed run whose old status is still on disk
                out["error"] = None
        elif job and job.get("returncode") not in (None, 0) and (
                state in ("unknown", "interrupted", "running") or
                (st.updated is not None and st.updated < (job.get("started") or 0) - 1)):
            if job.get("stop_requested"):
                out.update(state="stopped", error="stopped before training began")
            else:
                out.update(state="failed", error=job.get("launch_error") or log_tail(run_dir, 3)
                           or f"the training process exited with code {job.get('returncode')}")
        return out

    def jobs(self) -> list[dict]:
        """Every job this registry knows (queued first, then newest started first)."""
        with self._lock:
            queued = [q["name"] for q in self._state["queue"]]
            started = sorted(self._state["jobs"].items(), key=lambda kv: -(kv[1].get("started") or 0))
        names = queued + [n for n, _ in started if n not in queued]
        return [self.job_state(n) for n in names]

    # ----------------------------------------------------------------------- cleanup
    def shutdown(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM every child still running, wait up to `grace` s, then SIGKILL; reap all."""
        with self._lock:
            self._closed = True
            procs = list(self._procs.items())
        for _, p in procs:
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGTERM)
                except OSError:
                    pass
        deadline = time.time() + grace
        for _, p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                try:
                    p.kill()
                    p.wait(timeout=5)
                except OSError:
                    pass
        with self._lock:
            for name, p in procs:
                job = self._state["jobs"].setdefault(name, {})
                job.update(returncode=p.returncode, ended=time.time())
                self._procs.pop(name, None)
            self._save()
