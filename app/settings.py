"""The app's settings (environment variables) and the constants its pages share.

    SQVAE_CHECKPOINTS   shipped bundles      (default <repo>/checkpoints)
    SQVAE_RUNS          training runs        (default <repo>/runs)
    SQVAE_MAX_JOBS      concurrent trainings (default 1 on CPU; app/jobs.py)
    SQVAE_JOB_NICE      niceness of training processes (default 10; 0 = none; app/jobs.py)
    SQVAE_APP_UMAP      0 = never compute UMAP maps (PCA only), default 1
    SQVAE_APP_EVAL_IMAGES  test images of the quick evaluation (default 1000)
    SQVAE_APP_REFRESH   seconds between live refreshes of running trainings (default 2)
    SQVAE_APP_THREADS   torch intra-op threads for the app's own model calls (default 1)
    SQVAE_APP_PROGRESSIVE  0 = no progressive first paint on Explore (default 1)
    SQVAE_READ_ONLY     1 = visitors only look: no control starts, stops, resumes or deletes trainings
                        or sweeps, uploads bundles or imports checkpoints, and the functions behind them
                        refuse (default 0)

Read on every call (tests and benchmarks change them between runs). No Streamlit, no torch.
"""
from __future__ import annotations

import os
from pathlib import Path

from sqvae_core.config import CATEGORICAL_KINDS, GAUSSIAN_KINDS, MODEL_KINDS  # noqa: F401  (one list of kinds)
from sqvae_core.kinds import DATASETS, KINDS, PRESETS  # noqa: F401  (the catalogue: torch-free)

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("checkpoints", "runs")          # the two roots the app lists and serves runs from
UPLOADS = "uploads"                        # the group under the runs root that sidebar uploads go into
PRESET_CHOICES = ("demo", "none", *(p for p in PRESETS if p != "demo"))  # "none": the trainer's defaults
SQ_VAE_KINDS = tuple(k for k in GAUSSIAN_KINDS if k != "fixed_var")   # Gaussian SQ-VAE I-IV, learned σ²_φ
KIND_LABELS = {**{k: v.label for k, v in KINDS.items()},
               "logged": "logged run (RunLogger)"}      # app/runs.LOGGED: a run of your own loop, no model


def checkpoints_dir() -> Path:
    return Path(os.environ.get("SQVAE_CHECKPOINTS") or REPO / "checkpoints")


def runs_dir() -> Path:
    return Path(os.environ.get("SQVAE_RUNS") or REPO / "runs")


def roots() -> dict[str, Path]:
    return {"checkpoints": checkpoints_dir(), "runs": runs_dir()}


def _flag(name: str) -> bool:
    return os.environ.get(name, "1").strip().lower() not in ("0", "false", "no")


def _number(name: str, default, kind, lo, hi):
    try:
        return min(hi, max(lo, kind(os.environ.get(name, default))))
    except ValueError:
        return kind(default)


class ReadOnlyError(PermissionError):
    """An action a read-only dashboard does not allow."""


def read_only() -> bool:
    """SQVAE_READ_ONLY set to 1/true/yes/on (anything else, or unset: the full app)."""
    return os.environ.get("SQVAE_READ_ONLY", "").strip().lower() in ("1", "true", "yes", "on")


def refuse_if_read_only(action: str) -> None:
    """The one check behind every control that changes what the server runs or stores."""
    if read_only():
        raise ReadOnlyError(f"this dashboard is read-only (SQVAE_READ_ONLY=1): {action} is turned off")


def umap_enabled() -> bool:
    return _flag("SQVAE_APP_UMAP")


def progressive() -> bool:
    """Explore's progressive first paint (header + map first, the rest a moment later)."""
    return _flag("SQVAE_APP_PROGRESSIVE")


def refresh_seconds() -> float:
    return _number("SQVAE_APP_REFRESH", "2", float, 0.2, 60.0)


def eval_images() -> int:
    return _number("SQVAE_APP_EVAL_IMAGES", "1000", int, 16, 10000)


def torch_threads() -> int:
    return _number("SQVAE_APP_THREADS", "1", int, 1, 1024)
