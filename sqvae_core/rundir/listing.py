"""Listing run directories: the one lister of the project (`sqvae list` and the app)."""
from __future__ import annotations

import os
import re
from pathlib import Path

from .io import CONFIG

RUN_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,100}")


def valid_run_name(name) -> bool:
    """A directory name a listed run may have: [A-Za-z0-9_.-], at most 100 characters, no
    leading dot, no '..' (no hidden directories, no path tricks)."""
    return isinstance(name, str) and bool(RUN_NAME_RE.fullmatch(name)) and not name.startswith(".") \
        and ".." not in name


#: Environment variables naming where runs and bundles live (the app reads the same two).
RUNS_ENV, CHECKPOINTS_ENV = "SQVAE_RUNS", "SQVAE_CHECKPOINTS"


def default_run_dirs() -> list[str]:
    """What `sqvae list` scans without arguments: $SQVAE_RUNS (else runs) and $SQVAE_CHECKPOINTS
    (else checkpoints), relative to the working directory, as the app's directories are."""
    return [os.environ.get(RUNS_ENV) or "runs", os.environ.get(CHECKPOINTS_ENV) or "checkpoints"]


def list_runs(root: str | Path) -> list[Path]:
    """Run directories (holding config.json): root itself if it is one, else those directly under
    root and, one group level down, under its sub-directories (runs/ship/gaussian_1), in name order.
    Hidden or oddly named directories and symlinks that lead out of root are skipped. The one lister
    of the project: `sqvae list` and the app show the same runs."""
    root = Path(root)
    if (root / CONFIG).is_file():
        return [root]

    def children(folder: Path) -> list[Path]:
        try:
            return sorted(p for p in folder.iterdir() if valid_run_name(p.name) and p.is_dir() and _inside(p, root))
        except OSError:
            return []

    out = []
    for child in children(root):
        if (child / CONFIG).is_file():
            out.append(child)
        else:
            out.extend(g for g in children(child) if (g / CONFIG).is_file())
    return out


def _inside(path: Path, root: Path) -> bool:
    try:
        return path.resolve().is_relative_to(root.resolve())
    except OSError:
        return False

