"""Writing a run while it trains (RunWriter) and telling whether its process still runs (pid_alive)."""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from .io import METRICS, SNAPSHOTS, STATUS, atomic_write_bytes, atomic_write_json, read_metrics, save_weights


def pid_alive(pid, host: str | None = None) -> bool:
    """Is process `pid` (on `host`, default this machine) running and not a zombie?"""
    if not isinstance(pid, int) or pid <= 0:
        return False
    if host and host != socket.gethostname():
        return True      # cannot tell for another machine; trust the file
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:   # a zombie (finished but not reaped) is not running
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return True




class RunWriter:
    """Everything a training process writes into RUN_DIR while it runs: metrics rows (appended and
    flushed, tailed live by the app), status.json and codebook snapshots (atomic). `sqvae train`
    makes one per process (enabled on rank 0 only; the others write nothing), RunLogger one."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        self._metrics = None

    def open(self, resume_step: int | None = None):
        if not self.enabled:
            return
        (self.path / SNAPSHOTS).mkdir(parents=True, exist_ok=True)
        mpath = self.path / METRICS
        if resume_step is not None and mpath.exists():
            # drop rows logged after the checkpoint we resume from (they will be redone)
            keep = [r for r in read_metrics(mpath) if r.get("step", 0) <= resume_step]
            atomic_write_bytes(mpath, "".join(json.dumps(r) + "\n" for r in keep).encode())
            for p in (self.path / SNAPSHOTS).glob("step_*.safetensors"):
                if int(p.stem.split("_")[-1]) > resume_step:
                    p.unlink()
        self._metrics = open(mpath, "a", buffering=1)

    def metrics(self, row: dict):
        if self.enabled:
            self._metrics.write(json.dumps(row) + "\n")
            self._metrics.flush()

    def status(self, state: str, step: int | None, error: str | None = None, **extra):
        if self.enabled:
            atomic_write_json(self.path / STATUS, {
                "state": state, "step": step, "error": error, "pid": os.getpid(),
                "host": socket.gethostname(), "updated": time.time(), **extra})

    def snapshot(self, step: int, codebook: torch.Tensor, usage: torch.Tensor):
        if self.enabled:
            save_weights(self.path / SNAPSHOTS / f"step_{step:08d}.safetensors",
                         {"codebook": codebook.detach().half(), "usage": usage.long()},
                         metadata={"step": str(step)})

    def close(self):
        if self._metrics:
            self._metrics.close()

