"""What the app reads from run directories without a model: the list of runs, their labels,
config / status / metrics, and what a bundle already stores (eval.json, umap.json, samples/).

No torch here: Explore paints its first view (card and codebook map) from these files before
torch is imported (app/cache.py loads the model). The run-directory layout is in docs/interface.md;
the lister is sqvae_core.rundir.list_runs, the same as `sqvae list`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import streamlit as st

from app import settings
from sqvae_core import rundir as rd

CLOCK_SKEW_NS = 2_000_000_000  # a clone or copy writes a bundle's files within a moment, in any order


@dataclass(frozen=True)
class RunRef:
    """A run directory under one of the two roots: label "runs/ship/gaussian_1"."""
    source: str
    name: str          # one or two components joined by "/"
    path: Path

    @property
    def label(self) -> str:
        return f"{self.source}/{self.name}"


def safe_filename(name: str) -> str:
    """A run name as part of a download's file name ("ship/gaussian_1" -> "ship_gaussian_1")."""
    return name.replace("/", "_")


def list_bundles(sources=settings.SOURCES) -> list[RunRef]:
    """Runs under each root (sqvae_core.rundir.list_runs: NAME and GROUP/NAME), as RunRefs."""
    out = []
    for source in sources:
        root = settings.roots()[source]
        for path in rd.list_runs(root):
            if path != root:
                out.append(RunRef(source, path.relative_to(root).as_posix(), path))
    return out


def resolve_label(label: str) -> RunRef:
    """RunRef of "checkpoints/NAME", "runs/NAME" or "runs/GROUP/NAME"; ValueError for anything else."""
    if not isinstance(label, str):
        raise ValueError("run label must be a string")
    parts = label.split("/")
    if len(parts) not in (2, 3) or parts[0] not in settings.SOURCES:
        raise ValueError(f"unknown run {label!r}: expected checkpoints/NAME or runs/NAME")
    for p in parts[1:]:
        if not rd.valid_run_name(p):
            raise ValueError(f"invalid run name {p!r} in {label!r}")
    root = settings.roots()[parts[0]]
    path = root.joinpath(*parts[1:])
    try:
        inside = path.resolve().is_relative_to(root.resolve())
    except OSError:
        inside = False
    if not inside:
        raise ValueError(f"run {label!r} points outside {root}")
    return RunRef(parts[0], "/".join(parts[1:]), path)


def default_label(refs: list[RunRef]) -> str:
    """The bundle Explore opens on: the shipped Gaussian SQ-VAE (I-IV) with the lowest test MSE in
    its eval.json (one without eval.json ranks last), else the first shipped bundle, else the first run.
    MSEs of different data sets do not compare: only the Gaussian SQ-VAEs of the data set most of them
    share compete on MSE, the others rank after them (a colour bundle beside the Fashion-MNIST ones)."""
    shipped = [r for r in refs if r.source == "checkpoints"]

    def facts(ref):
        try:
            cfg = read_config(ref.path)
        except rd.BundleError:
            return None
        if cfg.kind not in settings.SQ_VAE_KINDS:
            return None
        ev = read_eval(rd.Weights(ref.path))
        return cfg.dataset, ev and ev.test_mse

    found = [(f, i) for i, r in enumerate(shipped) for f in [facts(r)] if f is not None]
    if found:
        sets = [d for (d, _), _ in found]
        main = max(sets, key=sets.count)        # ties: the first listed
        ranked = [((d != main, not isinstance(mse, (int, float)), mse if isinstance(mse, (int, float)) else 0.0), i)
                  for (d, mse), i in found]
        return shipped[min(ranked)[1]].label
    return (shipped or refs)[0].label


# ------------------------------------------------------------------------ file state
def mtime(path: Path) -> int:
    try:
        return Path(path).stat().st_mtime_ns
    except OSError:
        return 0


def file_sig(path: Path) -> tuple[int, int]:
    try:
        s = Path(path).stat()
        return s.st_mtime_ns, s.st_size
    except OSError:
        return 0, 0


def bundle_key(weights: rd.Weights) -> tuple[str, str, int, int]:
    """Cache key of a bundle's model: path, which weights ("last": model.safetensors, "best":
    best.safetensors), their mtime and the config's (new weights -> new entry)."""
    return str(weights.run), weights.which, mtime(weights.path), mtime(weights.run / rd.CONFIG)


def best_weights(path: Path, rows: list[dict]) -> rd.BestChoice | None:
    """The last and best steps and the figures that kept the best when the run keeps best-validation
    weights from another step than its last ones (a choice worth offering), else None. `rows`: the
    run's metrics.jsonl, already read by the page."""
    try:
        return rd.best_choice(path, rows)
    except (rd.BundleError, OSError, ValueError):
        return None


def _current(path: Path, weights: rd.Weights) -> bool:
    """A stored result is current unless the weights were written after it (beyond a clone's skew)."""
    return path.is_file() and mtime(path) >= mtime(weights.path) - CLOCK_SKEW_NS


# ------------------------------------------------------------------------ run files
def read_status(path: Path) -> rd.RunStatus:
    return rd.RunDir(path).status      # cheap and must see a dead pid at once: not cached


@st.cache_data(max_entries=64, show_spinner=False)
def _read_metrics(path: str, sig) -> list[dict]:
    return rd.read_metrics(Path(path))


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl rows, re-read only when the file changed (size or mtime)."""
    p = Path(path) / rd.METRICS
    return _read_metrics(str(p), file_sig(p))


def read_config(path: Path) -> rd.RunConfig:
    return rd.RunDir(path).config


LOGGED = "logged"        # the kind the app gives a run written by RunLogger (sqvae_core.runlogger)


def run_kind(config: rd.RunConfig) -> str | None:
    """The model kind of a config.json, "logged" for a RunLogger run (no model), None if unknown."""
    return LOGGED if config.logged else config.kind


def latest_step(path: Path, step: int | None = None) -> int:
    """The newest step of a run: its last metrics row, or status.json's `step` (checkpoints)."""
    return max(rd.Metrics(tuple(read_metrics(path)[-50:])).last_step, step if isinstance(step, int) else 0)


def last_val_row(rows: list[dict]) -> dict | None:
    return rd.Metrics(tuple(rows)).last_val()


# --------------------------------------------------------- what a bundle already stores
def read_eval(weights: rd.Weights) -> rd.RunEval | None:
    """A bundle's eval.json (whole test split, deterministic quantization), if current and made
    from the weights shown; else None. finish_bundles.py scores a run at its best-validation
    weights, so the eval.json beside it is not that of its last weights."""
    if not _current(weights.run / rd.EVAL, weights):
        return None
    return rd.RunDir(weights.run).eval(weights)


def prior_mismatch(weights: rd.Weights) -> str | None:
    """Why the run's prior does not belong to the weights shown (its prior.json names the step of
    the weights whose code grids it was fitted on), or None when it does or cannot tell."""
    try:
        summary = rd.RunDir(weights.run).prior_summary
        if summary is None or weights.made(summary):
            return None
        return (f"This prior was fitted on the code grids of the step-{summary.weights_step} weights, but "
                f"the model shown has the step-{weights.step} weights: its codebook differs, so "
                f"these samples are not this model's. Fit a prior for the last weights with "
                f"`python -m sqvae_core prior train {weights.run}`.")
    except (rd.BundleError, OSError):
        return None


def stored_evaluation(weights: rd.Weights, codebook_size: int) -> dict | None:
    """eval.json in the keys of sqvae_core.evaluate.evaluate_model (mse, perplexity, entropy,
    dead_codes, codebook_size, n_images, usage: K counts or None) plus "source"; None without one."""
    ev = read_eval(weights)
    if ev is None or ev.test_mse is None:
        return None
    usage = list(ev.usage) if ev.usage is not None and len(ev.usage) == codebook_size else None
    n = "?" if ev.n_test is None else ev.n_test
    return {"mse": ev.test_mse, "perplexity": ev.test_perplexity, "entropy": ev.test_entropy,
            "dead_codes": ev.dead_codes, "codebook_size": ev.codebook_size or codebook_size,
            "n_images": n, "usage": usage,
            "source": f"the bundle's eval.json ({n} test images, deterministic quantization)"}


def stored_map(path: Path, codebook_size: int, usage: list[int] | None, method: str = "umap") -> list[dict] | None:
    """The codebook map cached in umap.json (newest entry of that method, seed 0, K points) as
    sqvae_core.explore's points, or None if there is none or the weights are newer. The model's own
    map (keyed by a hash of its codebook) replaces it once the model is loaded."""
    p = Path(path) / rd.MAPS
    if not _current(p, rd.Weights(path)):
        return None
    try:
        entries = rd.read_json(p, rd.MAPS).get("entries")
    except rd.BundleError:
        return None
    for entry in reversed(list(entries.values()) if isinstance(entries, dict) else []):
        if not (isinstance(entry, dict) and entry.get("method") == method and entry.get("seed") == 0):
            continue
        xs, ys = entry.get("x"), entry.get("y")
        if isinstance(xs, list) and isinstance(ys, list) and len(xs) == len(ys) == codebook_size:
            return [{"code": i, "x": float(x), "y": float(y),
                     "usage": None if usage is None else int(usage[i]),
                     "dead": None if usage is None else usage[i] == 0} for i, (x, y) in enumerate(zip(xs, ys))]
    return None


def first_view(path: Path) -> dict | None:
    """What Explore's first paint shows, from stored files only: {"config", "evaluation", "points"
    (the UMAP codebook map coloured by the eval.json usage; None for the continuous VAE)}, or None
    when the bundle does not store all of it (then the page loads the model first)."""
    try:
        config = read_config(path)
    except rd.BundleError:
        return None
    k = config.codebook_size
    ev = None if k is None or config.logged else stored_evaluation(rd.Weights(path), k)
    if ev is None:
        return None
    if config.kind == "vae":
        return {"config": config, "evaluation": ev, "points": None}
    if ev["usage"] is None or not settings.umap_enabled():
        return None
    points = stored_map(path, k, ev["usage"])
    return None if points is None else {"config": config, "evaluation": ev, "points": points}


def samples_sig(path: Path) -> tuple:
    folder = Path(path) / rd.SAMPLES
    if not folder.is_dir():
        return ()
    return tuple(sorted((p.name, p.stat().st_size) for p in folder.iterdir() if p.is_file()))


def read_samples(path: Path, channels: int, size: int, n: int) -> np.ndarray | None:
    """Test images a bundle ships in samples/ (PNG/JPG, sorted by name) as (N, C, S, S) float32, or None.

    Files of the model's size are used as they are; files saved as a one-image grid with a uniform
    frame (sqvae_core.imageio pads 2 px: 32x32 for 28x28 images) have the frame cropped."""
    from PIL import Image
    folder = Path(path) / rd.SAMPLES
    if not folder.is_dir():
        return None
    out = []
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() not in (".png", ".jpg", ".jpeg") or p.stat().st_size > 4 << 20:
            continue
        try:
            with Image.open(p) as im:
                a = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0
        except Exception:       # noqa: BLE001 - a broken sample is skipped
            continue
        extra = a.shape[0] - size
        if a.shape[0] != a.shape[1] or extra < 0 or extra % 2 or extra > 8:
            continue
        if extra:
            pad = extra // 2
            frame = np.concatenate([a[:pad].ravel(), a[-pad:].ravel(), a[:, :pad].ravel(), a[:, -pad:].ravel()])
            if np.ptp(frame) > 1e-6:
                continue                    # not a plain frame: some other picture, not ours
            a = a[pad:-pad, pad:-pad]
        out.append(a[None] if channels == 1 else a.transpose(2, 0, 1))
        if len(out) >= n:
            break
    return np.stack(out) if out else None
