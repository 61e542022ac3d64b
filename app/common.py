"""Shared helpers of the SQ-VAE Explorer pages: settings, run listing, caches, figures, styling.

Settings come from the environment:
    SQVAE_CHECKPOINTS   shipped bundles      (default <repo>/checkpoints)
    SQVAE_RUNS          training runs        (default <repo>/runs)
    SQVAE_MAX_JOBS      concurrent trainings (default 1 on CPU)
    SQVAE_JOB_NICE      niceness of training processes (default 10; 0 = none)
    SQVAE_APP_UMAP      0 = never compute UMAP maps (PCA only), default 1
    SQVAE_APP_EVAL_IMAGES  test images of the quick evaluation (default 1000)
    SQVAE_APP_REFRESH   seconds between live refreshes of running trainings (default 2)
    SQVAE_APP_THREADS   torch intra-op threads for the app's own model calls (default 1)
    SQVAE_APP_PROGRESSIVE  0 = no progressive first paint on Explore (default 1)

The app only lists and serves run directories under those two roots; names are sanitised
([A-Za-z0-9_.-], no traversal, symlinks must stay inside the root). All model computation goes
through sqvae_core (rundir, evaluate, explore, prior); this module only caches and draws.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np                     # noqa: E402
import plotly.graph_objects as go      # noqa: E402
import streamlit as st                 # noqa: E402

from app import jobs as jobs_mod       # noqa: E402
from app.jobs import check_name, valid_name  # noqa: E402,F401

log = logging.getLogger("sqvae_app")

SOURCES = ("checkpoints", "runs")
from sqvae_core.config import MODEL_KINDS  # noqa: E402,F401  (one list of kinds)
DATASETS = ("fashion-mnist", "mnist", "cifar10", "fashion-mnist-cat8")
KIND_LABELS = {
    "gaussian_1": "Gaussian SQ-VAE I", "gaussian_2": "Gaussian SQ-VAE II", "gaussian_3": "Gaussian SQ-VAE III",
    "gaussian_4": "Gaussian SQ-VAE IV", "vmf": "vMF SQ-VAE", "nc": "naive categorical SQ-VAE",
    "vq": "VQ-VAE", "vq_ema": "VQ-VAE (EMA)", "vq_reset": "VQ-VAE (EMA + reset)",
    "fixed_var": "fixed σ²_φ SQ", "vae": "Gaussian VAE",
}
PRIOR_FILE = "prior.safetensors"
SAMPLES_DIR = "samples"


class _RunFlags(threading.local):
    in_entrypoint = False


RUN = _RunFlags()        # set by main.py around pg.run(): the page must not redraw the sidebar


# ------------------------------------------------------------------------- settings
def checkpoints_dir() -> Path:
    return Path(os.environ.get("SQVAE_CHECKPOINTS") or REPO / "checkpoints")


def runs_dir() -> Path:
    return Path(os.environ.get("SQVAE_RUNS") or REPO / "runs")


def roots() -> dict[str, Path]:
    return {"checkpoints": checkpoints_dir(), "runs": runs_dir()}


def umap_enabled() -> bool:
    return os.environ.get("SQVAE_APP_UMAP", "1").strip() not in ("0", "false", "no")


def progressive() -> bool:
    """Explore's progressive first paint (header + map first, the rest a moment later); env
    SQVAE_APP_PROGRESSIVE=0 sends the whole page in the first run."""
    return os.environ.get("SQVAE_APP_PROGRESSIVE", "1").strip() not in ("0", "false", "no")


def refresh_seconds() -> float:
    try:
        return min(60.0, max(0.2, float(os.environ.get("SQVAE_APP_REFRESH", "2"))))
    except ValueError:
        return 2.0


def eval_images() -> int:
    try:
        return max(16, min(10000, int(os.environ.get("SQVAE_APP_EVAL_IMAGES", "1000"))))
    except ValueError:
        return 1000


# ------------------------------------------------------------------------ run refs
@dataclass(frozen=True)
class RunRef:
    """A run directory under one of the two roots: label "runs/ship/gaussian_1"."""
    source: str
    name: str          # one or two sanitised components joined by "/"
    path: Path

    @property
    def label(self) -> str:
        return f"{self.source}/{self.name}"


def _inside(path: Path, root: Path) -> bool:
    try:
        return path.resolve().is_relative_to(root.resolve())
    except OSError:
        return False


def list_bundles(sources=SOURCES) -> list[RunRef]:
    """Run directories (holding config.json) directly under each root or one group level down
    (runs/ship/gaussian_1). Hidden and oddly named directories are skipped."""
    from sqvae_core.rundir import CONFIG
    out = []
    for source in sources:
        root = roots()[source]
        if not root.is_dir():
            continue
        try:
            children = sorted(root.iterdir())
        except OSError:
            continue
        for child in children:
            if not valid_name(child.name) or not child.is_dir() or not _inside(child, root):
                continue
            if (child / CONFIG).is_file():
                out.append(RunRef(source, child.name, child))
                continue
            try:
                grand = sorted(child.iterdir())
            except OSError:
                continue
            for g in grand:
                if valid_name(g.name) and g.is_dir() and (g / CONFIG).is_file() and _inside(g, root):
                    out.append(RunRef(source, f"{child.name}/{g.name}", g))
    return out


def resolve_label(label: str) -> RunRef:
    """RunRef of "checkpoints/NAME", "runs/NAME" or "runs/GROUP/NAME"; ValueError for anything else."""
    if not isinstance(label, str):
        raise ValueError("run label must be a string")
    parts = label.split("/")
    if len(parts) not in (2, 3) or parts[0] not in SOURCES:
        raise ValueError(f"unknown run {label!r}: expected checkpoints/NAME or runs/NAME")
    for p in parts[1:]:
        check_name(p)
    root = roots()[parts[0]]
    path = root.joinpath(*parts[1:])
    if not _inside(path, root):
        raise ValueError(f"run {label!r} points outside {root}")
    return RunRef(parts[0], "/".join(parts[1:]), path)


def run_ref(name: str) -> RunRef:
    """RunRef of a top-level run in the runs root."""
    return RunRef("runs", check_name(name), runs_dir() / name)


# -------------------------------------------------------------------------- guards
def _is_control_flow(e: BaseException) -> bool:
    return type(e).__module__.startswith("streamlit") and type(e).__name__ in (
        "RerunException", "StopException", "FragmentHandledException")


@contextlib.contextmanager
def guard(what: str):
    """Show any error of a page section as st.error and carry on with the rest of the page."""
    from sqvae_core.rundir import BundleError
    try:
        yield
    except BundleError as e:
        st.error(f"{what}: {e}")
    except Exception as e:           # noqa: BLE001 - the app must never crash
        if _is_control_flow(e):
            raise
        log.exception("%s failed", what)
        msg = " ".join(str(e).split()) or e.__class__.__name__
        st.error(f"{what} failed: {e.__class__.__name__}: {msg[:500]}")


# ------------------------------------------------------------------------ file stats
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


def bundle_key(path: Path) -> tuple[str, int, int]:
    """Cache key of a bundle: path + weights mtime + config mtime (new weights -> new entry)."""
    from sqvae_core.rundir import CONFIG, WEIGHTS
    path = Path(path)
    return str(path), mtime(path / WEIGHTS), mtime(path / CONFIG)


# ------------------------------------------------------------------- cached loaders
@st.cache_resource(max_entries=8, show_spinner=False)
def _load_bundle(path: str, weights_mtime: int, config_mtime: int):
    from sqvae_core.rundir import load_bundle
    return load_bundle(path, "cpu")


def get_bundle(path: Path):
    """The loaded bundle (model in eval mode on the CPU); BundleError for a broken one."""
    return _load_bundle(*bundle_key(path))


def read_status(path: Path) -> dict:
    from sqvae_core.rundir import read_status as rs
    return rs(Path(path))      # cheap and must see a dead pid at once: not cached


@st.cache_data(max_entries=64, show_spinner=False)
def _read_metrics(path: str, sig) -> list[dict]:
    from sqvae_core.rundir import read_metrics
    return read_metrics(Path(path))


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl rows, re-read only when the file changed (size or mtime)."""
    from sqvae_core.rundir import METRICS
    p = Path(path) / METRICS
    return _read_metrics(str(p), file_sig(p))


def read_config(path: Path) -> dict:
    from sqvae_core.rundir import CONFIG, read_json
    return read_json(Path(path) / CONFIG, "config.json")


def latest_step(path: Path, status: dict | None = None) -> int:
    """The newest step of a run: its last metrics row, or status.json's step (checkpoints)."""
    rows = read_metrics(path)
    steps = [r["step"] for r in rows[-50:] if isinstance(r.get("step"), int)]
    st_step = (status or {}).get("step")
    return max(steps + ([st_step] if isinstance(st_step, int) else []) + [0])


def last_val_row(rows: list[dict]) -> dict | None:
    vals = [r for r in rows if any(k.startswith("val_") for k in r)]
    return vals[-1] if vals else None


def _snapshot_sig(path: Path) -> tuple:
    folder = Path(path) / "snapshots"
    try:
        return tuple(sorted((p.name, p.stat().st_size) for p in folder.glob("step_*.safetensors")))
    except OSError:
        return ()


@st.cache_data(max_entries=16, show_spinner=False)
def _snapshots(path: str, sig: tuple) -> list[dict]:
    from sqvae_core.rundir import read_snapshots
    return [{"step": s["step"], "codebook": s["codebook"].numpy(), "usage": s["usage"].numpy()}
            for s in read_snapshots(Path(path))]


def snapshots(path: Path) -> list[dict]:
    """Codebook/usage snapshots as numpy arrays (re-read when a snapshot file appears)."""
    return _snapshots(str(path), _snapshot_sig(path))


@st.cache_data(max_entries=16, show_spinner=False)
def _snapshot_maps(path: str, sig: tuple, metric: str) -> list[list[dict]]:
    from sqvae_core import explore
    snaps = _snapshots(path, sig)
    if not snaps:
        return []
    return explore.aligned_maps([s["codebook"] for s in snaps], [s["usage"] for s in snaps],
                                method="pca", metric=metric)


def snapshot_maps(path: Path, metric: str) -> list[list[dict]]:
    """PCA maps of every snapshot on shared axes (explore.aligned_maps): animation frames."""
    return _snapshot_maps(str(path), _snapshot_sig(path), metric)


def _samples_sig(path: Path) -> tuple:
    folder = Path(path) / SAMPLES_DIR
    if not folder.is_dir():
        return ()
    return tuple(sorted((p.name, p.stat().st_size) for p in folder.iterdir() if p.is_file()))


def _samples_from_bundle(path: Path, channels: int, size: int, n: int) -> np.ndarray | None:
    """Test images a bundle ships in samples/ (PNG/JPG, sorted by name), or None.

    Files of the model's size are used as they are; files saved as a one-image grid with a uniform
    frame (sqvae_core.imageio pads 2 px: 32x32 for 28x28 images) have the frame cropped."""
    from PIL import Image
    folder = Path(path) / SAMPLES_DIR
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


@st.cache_data(max_entries=16, show_spinner=False)
def _shipped_samples(path: str, channels: int, size: int, n: int, samples_sig: tuple) -> np.ndarray | None:
    return _samples_from_bundle(Path(path), channels, size, n)


def display_images(bundle, n: int = 16) -> tuple[np.ndarray, str]:
    """Images for the originals-vs-reconstructions grid: the bundle's samples/ if it ships 8 or
    more, else the first n of the dataset's test split."""
    sig = _samples_sig(bundle.path)
    if sig:
        shipped = _shipped_samples(str(bundle.path), bundle.model_cfg.image_channels, bundle.model_cfg.image_size,
                                   n, sig)
        if shipped is not None and len(shipped) >= 8:
            return shipped[:n], f"{len(shipped[:n])} test images shipped in the bundle's samples/"
    imgs, _, source, _ = test_images(bundle)
    return imgs[:n], f"{source.split(' (')[0]} (test split, first {min(n, len(imgs))})"


@st.cache_data(max_entries=16, show_spinner=False)
def _test_images(path: str, dataset: str, channels: int, size: int, n: int, data_dir,
                 val_size, samples_sig: tuple) -> tuple[np.ndarray, np.ndarray | None, str, tuple | None]:
    """(images (N,C,S,S) float32, labels or None, source, class names): the dataset's test split
    (offline: the subset shipped in sqvae_core), or the bundle's samples/ if no dataset is found."""
    from sqvae_core.data import load_dataset
    try:
        data = load_dataset(dataset, "test", data_dir, download=False, image_size=size, channels=channels,
                            val_size=val_size if val_size is not None else 5000)
    except (FileNotFoundError, OSError, ValueError):
        shipped = _samples_from_bundle(Path(path), channels, size, n) if samples_sig else None
        if shipped is None:
            raise
        return shipped, None, f"{len(shipped)} images shipped in the bundle's samples/ (dataset not found)", None
    imgs = data.images[:n].numpy()
    labels = data.labels[:n].numpy() if data.labels is not None else None
    return imgs, labels, f"{data.source} (test split, first {len(imgs)})", data.class_names


def test_images(bundle, n: int | None = None):
    """Test images of a bundle's dataset: (images, labels, source, class_names), cached."""
    n = n or eval_images()
    train_cfg = bundle.config.get("train", {}) if isinstance(bundle.config.get("train"), dict) else {}
    return _test_images(str(bundle.path), bundle.dataset, bundle.model_cfg.image_channels,
                        bundle.model_cfg.image_size, n, train_cfg.get("data_dir"),
                        train_cfg.get("val_size"), _samples_sig(bundle.path))


def eval_json(bundle) -> dict | None:
    """A bundle's eval.json (full test-split evaluation written with shipped bundles), if it is
    at least as new as the weights; else None."""
    from sqvae_core.rundir import BundleError, WEIGHTS, read_json
    p = bundle.path / "eval.json"
    if not p.is_file() or mtime(p) < mtime(bundle.path / WEIGHTS):
        return None
    try:
        return read_json(p, "eval.json")
    except BundleError:
        return None


@st.cache_data(max_entries=16, show_spinner=False)
def _quick_eval(path: str, wm: int, cm: int, n: int) -> dict:
    import torch
    from sqvae_core.evaluate import evaluate_model
    bundle = _load_bundle(path, wm, cm)
    imgs = test_images(bundle, n)[0]
    res = evaluate_model(bundle.model, torch.from_numpy(imgs))
    res["usage"] = None if res.get("usage") is None else list(res["usage"])
    return res


def quick_eval(bundle) -> dict:
    """Deterministic evaluation on up to SQVAE_APP_EVAL_IMAGES test images (cached per weights)."""
    return _quick_eval(*bundle_key(bundle.path), eval_images())


@st.cache_data(max_entries=16, show_spinner=False)
def _dataset_codes(path: str, wm: int, cm: int, n: int) -> np.ndarray:
    import torch
    from sqvae_core import explore
    bundle = _load_bundle(path, wm, cm)
    return explore.dataset_codes(bundle.model, torch.from_numpy(test_images(bundle, n)[0])).numpy()


def dataset_codes(bundle) -> np.ndarray:
    return _dataset_codes(*bundle_key(bundle.path), eval_images())


@st.cache_data(max_entries=32, show_spinner=False)
def _pca_map(path: str, wm: int, cm: int, n: int) -> list[dict]:
    import torch
    from sqvae_core import explore
    bundle = _load_bundle(path, wm, cm)
    usage = _quick_eval(path, wm, cm, n)["usage"]
    return explore.codebook_map(bundle.model, None if usage is None else torch.tensor(usage), method="pca")


def pca_map(bundle) -> list[dict]:
    """Instant PCA map of the codebook with quick-eval usage (cached per weights)."""
    return _pca_map(*bundle_key(bundle.path), eval_images())


def umap_map(bundle) -> tuple[list[dict] | None, str]:
    """(UMAP map or None, state): state is "ready", "computing", "off" or an error message.
    The map is computed in a background thread (explore.cached_codebook_map, which also stores it
    in RUN_DIR/umap.json for the next server); until then the page shows the PCA map."""
    if not umap_enabled():
        return None, "off"
    import torch
    from sqvae_core import explore
    key = (*bundle_key(bundle.path), eval_images())
    worker = map_worker()
    got = worker.get(key)
    if got is None and not worker.pending(key):
        usage = quick_eval(bundle)["usage"]
        usage_t = None if usage is None else torch.tensor(usage)
        model, path = bundle.model, bundle.path
        worker.request(key, lambda: explore.cached_codebook_map(path, model, usage_t, method="umap"))
        for _ in range(6):                 # a map cached in umap.json comes back in a few ms
            time.sleep(0.05)
            got = worker.get(key)
            if got is not None:
                break
    if got is None:
        return None, "computing"
    return (got[1], "ready") if got[0] == "ok" else (None, str(got[1]))


# ---------------------------------------------------- UMAP in a background thread
class MapWorker:
    """Computes UMAP maps off the script thread, one at a time; the page shows PCA meanwhile.

    request(key, fn) queues fn() (a call into sqvae_core.explore) unless key is done or pending;
    get(key) -> None | ("ok", map) | ("error", message)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._results: dict[tuple, tuple[str, object]] = {}
        self._pending: dict[tuple, object] = {}
        self._wake = threading.Event()
        threading.Thread(target=self._loop, name="sqvae-umap", daemon=True).start()

    def get(self, key: tuple):
        with self._lock:
            return self._results.get(key)

    def request(self, key: tuple, fn) -> None:
        with self._lock:
            if key in self._results or key in self._pending:
                return
            self._pending[key] = fn
        self._wake.set()

    def pending(self, key: tuple) -> bool:
        with self._lock:
            return key in self._pending

    def _loop(self):
        while True:
            self._wake.wait()
            with self._lock:
                if not self._pending:
                    self._wake.clear()
                    continue
                key, fn = next(iter(self._pending.items()))
            try:
                result = ("ok", fn())
            except Exception as e:     # noqa: BLE001
                result = ("error", f"{e.__class__.__name__}: {e}")
            with self._lock:
                self._results[key] = result
                self._pending.pop(key, None)
                if len(self._results) > 64:
                    self._results.pop(next(iter(self._results)))


@st.cache_resource(show_spinner=False)
def map_worker() -> MapWorker:
    return MapWorker()


# ----------------------------------------------------------------------------- jobs
@st.cache_resource(show_spinner=False)
def _job_manager(root: str, max_jobs: int) -> jobs_mod.JobManager:
    return jobs_mod.JobManager(root, max_jobs)


def job_manager() -> jobs_mod.JobManager:
    jm = _job_manager(str(runs_dir().resolve()), jobs_mod.default_max_jobs())
    jm.pump()
    return jm


def new_run_name(prefix: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = "".join(c if c.isalnum() or c in "_.-" else "-" for c in prefix)[:60] or "run"
    name, i = f"{base}-{stamp}", 1
    while (runs_dir() / name).exists():
        i += 1
        name = f"{base}-{stamp}-{i}"
    return name


def start_demo_training(kind: str = "gaussian_1", steps: int | None = None, prefix: str | None = None) -> tuple[str, str]:
    """One click: `train --model KIND --preset demo` into a new run. Returns (name, state)."""
    name = new_run_name(prefix or f"demo-{kind}")
    opts = {"model": kind, "preset": "demo"}
    if steps:
        opts["steps"] = steps
    return name, job_manager().submit(name, opts)


# ----------------------------------------------------------------------- demo mode
DEMO_CSS = """
<style>
html, body, .stApp, [data-testid="stAppViewContainer"], [data-testid="stSidebar"], [data-testid="stHeader"] {
  background: #000 !important; color: #fff !important; }
.stApp p, .stApp li, .stApp label, .stApp span, .stApp td, .stApp th { font-size: 1.3rem; }
.stApp h1, .stApp h1 * { font-size: 3.4rem !important; color: #ffd400 !important; }
.stApp h2, .stApp h2 * { font-size: 2.5rem !important; color: #ffd400 !important; }
.stApp h3, .stApp h3 * { font-size: 2.0rem !important; color: #ffd400 !important; }
.stApp p, .stApp label, .stApp li, [data-testid="stMarkdownContainer"] { color: #fff !important; }
[data-testid="stCaptionContainer"], [data-testid="stCaptionContainer"] * { color: #ddd !important; font-size: 1.1rem !important; }
[data-testid="stMetricValue"], .sq-value { font-size: 2.8rem !important; color: #00e5ff !important; }
.sq-label { font-size: 1.3rem !important; color: #fff !important; opacity: 1 !important; }
button[data-testid^="stBaseButton"] { background: #111 !important; color: #fff !important;
  border: 2px solid #ffd400 !important; font-weight: 700 !important; }
button[data-testid^="stBaseButton"] p { color: #fff !important; }
button[data-testid="stBaseButton-primary"], button[data-testid="stBaseButton-primaryFormSubmit"] {
  background: #ffd400 !important; }
button[data-testid="stBaseButton-primary"] *, button[data-testid="stBaseButton-primaryFormSubmit"] * {
  color: #000 !important; }
.stApp input { font-size: 1.3rem !important; }
[data-testid="stHeader"] * { color: #fff !important; }
[data-testid="stAlertContainer"] { background: #151515 !important; border: 2px solid #00e5ff !important; }
[data-testid="stAlertContainer"] * { color: #fff !important; }
.stApp code { background: #222 !important; color: #fff !important; }
[role="tab"] p { font-size: 1.35rem !important; }
[role="tab"][aria-selected="true"] p { color: #ffd400 !important; }
</style>
"""
BASE_CSS = """
<style>
img { image-rendering: pixelated; }
[data-testid="stMetricValue"] { font-size: 1.6rem; }
.sq-card { display: flex; flex-wrap: wrap; gap: 0.4rem 1.6rem; margin: 0.2rem 0 0.3rem 0; }
.sq-tile { min-width: 6.5rem; }
.sq-label { font-size: 0.85rem; opacity: 0.75; }
.sq-value { font-size: 1.7rem; line-height: 1.25; font-weight: 400; }
</style>
"""


def demo_mode() -> bool:
    return bool(st.session_state.get("demo_mode", False))


def _sync_demo_param():
    st.query_params["demo"] = "1" if st.session_state.get("demo_mode") else "0"


def page_style():
    """Demo-mode state (also ?demo=1) and the app's CSS: before any page content."""
    if "demo_mode" not in st.session_state:
        st.session_state["demo_mode"] = st.query_params.get("demo", "0").lower() in ("1", "true", "yes", "on")
    st.html(BASE_CSS + (DEMO_CSS if demo_mode() else ""))      # style-only: no layout element


def sidebar_widgets():
    """Sidebar of every page: demo toggle and where the app reads runs from, bundle upload.
    main.py draws it after the page (it starts collapsed): the page's first chart comes sooner.
    page_style() has run before it (it sets the toggle's state)."""
    with st.sidebar:
        st.toggle("Demo mode (large type, high contrast)", key="demo_mode", on_change=_sync_demo_param)
        st.caption(f"Bundles: `{checkpoints_dir()}`  \nRuns: `{runs_dir()}`")
        upload_bundle()


def stop_page():
    """st.stop() for a page: under main.py, which draws the sidebar after a page that runs to its
    end, the sidebar is drawn here first (nothing is drawn after st.stop())."""
    if RUN.in_entrypoint:
        sidebar_widgets()
    st.stop()


def sidebar():
    """Style and sidebar, for a page script run on its own (tests: AppTest.from_file)."""
    page_style()
    sidebar_widgets()


def upload_bundle():
    """Sidebar uploader: a .zip of a run directory, validated and unpacked into RUNS/uploads/."""
    import re

    from sqvae_core import rundir as rd
    up = st.file_uploader("Upload a bundle (.zip of a run directory)", type=["zip"], key="bundle_upload")
    if up is None or st.session_state.get("_uploaded") == up.file_id:
        return
    st.session_state["_uploaded"] = up.file_id
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(up.name).stem).lstrip(".")[:60] or "bundle"
    name = f"{name}-{int(time.time())}"
    try:
        (runs_dir() / "uploads").mkdir(parents=True, exist_ok=True)
        dest = rd.import_bundle_zip(up.getvalue(), runs_dir() / "uploads", name)
        st.success(f"Uploaded as `runs/uploads/{dest.name}`; choose it in the bundle list.")
    except (rd.BundleError, OSError) as e:
        st.error(f"Upload refused: {e}")


def torch_threads() -> int:
    try:
        return max(1, int(os.environ.get("SQVAE_APP_THREADS", "1")))
    except ValueError:
        return 1


def page_setup(title: str | None):
    """Called at the top of every page: torch threads, sidebar (unless main.py draws it), the title
    (None: the page places its title itself).

    The app's model calls are small (one code grid, a few hundred images) and usually share the
    CPU with a training process: one intra-op thread (env SQVAE_APP_THREADS) avoids OpenMP
    oversubscription, which on a busy 2-core machine makes a 2 ms decode take 100+ ms. OpenMP
    settings are per thread, and every script run has its own, hence here."""
    import torch
    if torch.get_num_threads() != torch_threads():
        torch.set_num_threads(torch_threads())
    if not RUN.in_entrypoint:
        sidebar()
    if title:
        st.title(title)


# ------------------------------------------------------------------------- figures
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
DEMO_COLORS = ["#00e5ff", "#ffd400", "#ff4df0", "#7CFC00", "#ff8c00", "#ffffff", "#ff6b6b", "#9d8cff"]


def style(fig: go.Figure, height: int = 320, title: str | None = None) -> go.Figure:
    """Common layout; in demo mode large fonts, thick lines and a black high-contrast template."""
    if demo_mode():
        fig.update_layout(template="plotly_dark", paper_bgcolor="#000", plot_bgcolor="#000",
                          font=dict(size=22, color="#fff"), colorway=DEMO_COLORS,
                          height=int(height * 1.35), title_font=dict(size=28, color="#ffd400"),
                          legend=dict(font=dict(size=20)))
        fig.update_xaxes(gridcolor="#444", linecolor="#fff", tickfont=dict(size=20))
        fig.update_yaxes(gridcolor="#444", linecolor="#fff", tickfont=dict(size=20))
        fig.update_traces(selector=dict(type="scatter", mode="lines"), line=dict(width=4))
    else:
        fig.update_layout(template="plotly_white", height=height, colorway=COLORS)
    fig.update_layout(margin=dict(l=10, r=10, t=50 if title else 20, b=10))
    if title:
        fig.update_layout(title=dict(text=title, x=0.01, xanchor="left"))
    return fig


def plot(fig: go.Figure, key: str | None = None, modebar: bool = True, **kwargs):
    """st.plotly_chart with the demo template kept (Streamlit's theme would override it)."""
    return st.plotly_chart(fig, key=key, theme=None if demo_mode() else "streamlit",
                           config={"displaylogo": False, "displayModeBar": modebar and not demo_mode()}, **kwargs)


def image_grid(images: np.ndarray, ncol: int | None = None, pad: int = 2, scale: int = 3,
               pad_value: float = 1.0) -> np.ndarray:
    """Tile images (N, C, H, W) in [0, 1] into one uint8 array (H', W') or (H', W', 3)."""
    images = np.asarray(images, dtype=np.float32)
    n, c, h, w = images.shape
    ncol = ncol or n
    nrow = -(-n // ncol)
    canvas = np.full((c, nrow * (h + pad) + pad, ncol * (w + pad) + pad), pad_value, np.float32)
    for i in range(n):
        r, q = divmod(i, ncol)
        canvas[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = images[i]
    out = (np.clip(canvas, 0, 1) * 255 + 0.5).astype(np.uint8)
    if scale > 1:
        out = out.repeat(scale, axis=1).repeat(scale, axis=2)
    return out[0] if c == 1 else out.transpose(1, 2, 0)


def card_html(items: list[tuple[str, object]]) -> str:
    """A row of label/value tiles as one HTML block (one element instead of a column per metric)."""
    import html
    tiles = "".join(f'<div class="sq-tile"><div class="sq-label">{html.escape(str(k))}</div>'
                    f'<div class="sq-value">{html.escape(str(v))}</div></div>' for k, v in items)
    return f'<div class="sq-card">{tiles}</div>'


def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def to_numpy(t) -> np.ndarray:
    return t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)


def metrics_csv(rows: list[dict]) -> bytes:
    import pandas as pd
    return pd.DataFrame(rows).to_csv(index=False).encode()


def fmt(v, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def series(rows: list[dict], key: str) -> tuple[list, list]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and "step" in r:
            xs.append(r["step"])
            ys.append(v)
    return xs, ys


def line_figure(rows: list[dict], keys: list[str], title: str, *, log_y: bool = False,
                secondary: list[str] | None = None, names: dict | None = None, height: int = 300) -> go.Figure | None:
    """Lines of metric keys over steps (val_ keys as markers); None if no key has data."""
    from plotly.subplots import make_subplots
    secondary = secondary or []
    fig = make_subplots(specs=[[{"secondary_y": bool(secondary)}]])
    any_data = False
    for key in keys + secondary:
        xs, ys = series(rows, key)
        if not xs:
            continue
        any_data = True
        mode = "lines+markers" if key.startswith("val_") or len(xs) < 25 else "lines"
        fig.add_trace(go.Scatter(x=xs, y=ys, mode=mode, name=(names or {}).get(key, key)),
                      secondary_y=key in secondary)
    if not any_data:
        return None
    fig.update_xaxes(title_text="step")
    if secondary:
        fig.update_yaxes(title_text=(names or {}).get(secondary[0], secondary[0]), secondary_y=True, showgrid=False)
    if log_y:
        fig.update_yaxes(type="log", secondary_y=False)
    style(fig, height, title)
    fig.update_layout(legend=dict(orientation="h", yanchor="top", y=-0.28, xanchor="left", x=0),
                      margin=dict(b=70 if not demo_mode() else 110))
    return fig
