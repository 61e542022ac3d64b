"""What Ray Tune costs: the same 8 trials through `sqvae sweep` and as `sqvae train` runs.

    python benchmarks/sweep_overhead.py [--steps 1200] [--out DIR] [--sweep-first]

A grid of 8 trials (lr x 4, seed x 2; K=64, d=32, one residual block, validation every 400
steps on 1000 images) runs twice on this machine:
  1. `sqvae sweep` on a local Ray with 2 CPUs, one CPU per trial (two trials at a time), Ray's
     start and shutdown included;
  2. the same 8 trainings as back-to-back `sqvae train` processes, two at a time, each with one
     thread (OMP_NUM_THREADS=1: a trial gets one thread from its one CPU, torch.set_num_threads).
It prints both wall times and their ratio (target <= 1.15), and the peak resident memory of Ray's
own processes during the sweep (gcs_server, raylet, the log monitor, agents: every descendant of
the sweep command that is neither a trial worker nor the command itself), read from /proc (Linux).
The trainings are checked to end at the same validation MSE both ways (same seeds, same code).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LRS = ("0.0005", "0.001", "0.002", "0.004")
SEEDS = ("0", "1")


def shared_flags(steps: int) -> list[str]:
    return ["--codebook-size", "64", "--code-dim", "32", "--num-rb", "1", "--steps", str(steps),
            "--val-every", "400", "--val-max-images", "1000", "--checkpoint-every", "400", "--no-compile"]


def _procs() -> dict[int, tuple[int, str, int]]:
    """pid -> (ppid, cmdline, rss bytes) of every process."""
    out = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            rss = 0
            for line in (p / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            continue
        out[int(p.name)] = (ppid, cmd, rss)
    return out


def ray_role(cmd: str) -> str | None:
    """The name of a Ray daemon from its command line; None for trial workers and anything else."""
    if cmd.startswith("ray::") or "default_worker.py" in cmd:
        return None                                    # a worker: it runs trials (or waits to)
    for key in ("gcs_server", "raylet", "log_monitor", "dashboard/agent", "runtime_env/agent", "dashboard.py",
                "monitor.py", "client.server", "ray_process_reaper"):
        if key in cmd:
            return key.split("/")[-1].replace(".py", "")
    return "other ray" if "ray" in cmd else None


def descendants(procs: dict, root: int) -> list[int]:
    kids, todo = [], [root]
    while todo:
        pid = todo.pop()
        for c, (ppid, _, _) in procs.items():
            if ppid == pid:
                kids.append(c)
                todo.append(c)
    return kids


def run_sweep(out: Path, steps: int, env: dict) -> dict:
    argv = [sys.executable, "-m", "sqvae_core", "sweep", "--out", str(out), "--grid", f"lr={','.join(LRS)}",
            "--grid", f"seed={','.join(SEEDS)}", "--cpus-per-trial", "1", *shared_flags(steps)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=open(out.parent / "sweep.log", "wb"))
    peak, peak_roles, driver_peak, workers_peak = 0, {}, 0, 0
    while proc.poll() is None:
        procs = _procs()
        roles: dict[str, int] = {}
        workers = 0
        for pid in descendants(procs, proc.pid):
            role = ray_role(procs[pid][1])
            if role:
                roles[role] = roles.get(role, 0) + procs[pid][2]
            elif procs[pid][1].startswith("ray::") or "default_worker.py" in procs[pid][1]:
                workers += procs[pid][2]
        if sum(roles.values()) > peak:
            peak, peak_roles = sum(roles.values()), roles
        driver_peak = max(driver_peak, procs.get(proc.pid, (0, "", 0))[2])
        workers_peak = max(workers_peak, workers)
        time.sleep(0.5)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"sqvae sweep failed ({proc.returncode}): {(out.parent / 'sweep.log').read_text()[-2000:]}")
    doc = json.loads((out / "sweep.json").read_text())
    mse = {tuple(str(t["params"][k]) for k in ("lr", "seed")): t["metrics"]["val_mse"] for t in doc["trials"]}
    return {"wall": wall, "ray_peak": peak, "ray_roles": peak_roles, "driver_peak": driver_peak,
            "workers_peak": workers_peak, "mse": mse}


def run_trains(out: Path, steps: int, env: dict) -> dict:
    env = {**env, "OMP_NUM_THREADS": "1"}
    jobs = [(lr, seed) for lr in LRS for seed in SEEDS]
    t0 = time.perf_counter()
    for i in range(0, len(jobs), 2):                   # two at a time, back to back
        procs = [subprocess.Popen([sys.executable, "-m", "sqvae_core", "train", "--out", str(out / f"lr{lr}_s{seed}"),
                                   "--lr", lr, "--seed", seed, "--quiet", *shared_flags(steps)],
                                  cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for lr, seed in jobs[i:i + 2]]
        for p in procs:
            if p.wait() != 0:
                raise SystemExit("sqvae train failed")
    wall = time.perf_counter() - t0
    mse = {}
    for lr, seed in jobs:
        rows = [json.loads(ln) for ln in (out / f"lr{lr}_s{seed}" / "metrics.jsonl").read_text().splitlines()]
        mse[(str(float(lr)), seed)] = [r for r in rows if "val_mse" in r][-1]["val_mse"]
    return {"wall": wall, "mse": mse}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1200, help="training steps per trial")
    ap.add_argument("--out", default=None, help="working directory (default: a temporary one)")
    ap.add_argument("--sweep-first", action="store_true", help="run the sweep before the trainings (on a shared "
                    "machine, run both orders: the load of others changes between the two halves)")
    args = ap.parse_args()
    base = Path(args.out or tempfile.mkdtemp(prefix="sweep_overhead_"))
    base.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(
        os.pathsep) if p]), "RAY_DEDUP_LOGS": "0"}
    env.pop("RAY_ADDRESS", None)                        # a local Ray, on this machine's 2 CPUs
    print(f"8 trials (lr {', '.join(LRS)} x seed {', '.join(SEEDS)}), {args.steps} steps each, on {os.cpu_count()} CPUs",
          flush=True)
    for half in (("sweep", "trains") if args.sweep_first else ("trains", "sweep")):
        if half == "trains":
            trains = run_trains(base / "trains", args.steps, env)
            print(f"sqvae train, two at a time:   {trains['wall']:7.1f} s", flush=True)
        else:
            sweep = run_sweep(base / "sweep", args.steps, env)
            print(f"sqvae sweep (local Ray):      {sweep['wall']:7.1f} s", flush=True)
    ratio = sweep["wall"] / trains["wall"]
    print(f"wall-time ratio sweep/train:  {ratio:7.3f}  (target <= 1.15: {'met' if ratio <= 1.15 else 'NOT met'})")
    mb = 1 / 2 ** 20
    print(f"Ray's own processes, peak RSS: {sweep['ray_peak'] * mb:.0f} MB  ("
          + ", ".join(f"{k} {v * mb:.0f}" for k, v in sorted(sweep["ray_roles"].items(), key=lambda kv: -kv[1])) + ")")
    print(f"sweep command (driver) peak RSS: {sweep['driver_peak'] * mb:.0f} MB; trial workers together, peak: "
          f"{sweep['workers_peak'] * mb:.0f} MB")
    diffs = [abs(sweep["mse"][k] - v) / v for k, v in trains["mse"].items() if k in sweep["mse"]]
    print(f"final val_mse, sweep vs train: {len(diffs)} of 8 trials compared, max relative difference {max(diffs):.2e}")


if __name__ == "__main__":
    main()
