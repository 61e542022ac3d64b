"""Everything the pages compute with a model, cached per weights file (Streamlit caches).

A bundle is loaded once per (path, weights mtime, config mtime) and every result below is keyed
by that too: new weights, new results. torch is imported here, when a page first asks for a
model (app/runs.py reads what needs none). All model math is in sqvae_core; this module only
caches it and shapes it as numpy for the pages.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import streamlit as st

from app import jobs, settings
from app.images import image_grid
from app.mapworker import MapWorker
from app.runs import bundle_key, file_sig, read_samples, samples_sig, stored_evaluation


def torch_ready():
    """Import torch with the app's thread count (env SQVAE_APP_THREADS, default 1): the app's model
    calls are small and usually share the CPU with a training, where OpenMP oversubscription makes
    a 2 ms decode take 100+ ms. OpenMP settings are per thread and every script run has its own."""
    import torch
    if torch.get_num_threads() != settings.torch_threads():
        torch.set_num_threads(settings.torch_threads())
    return torch


# ----------------------------------------------------------------------------- bundles
@st.cache_resource(max_entries=8, show_spinner=False)
def _load_bundle(path: str, which: str, weights_mtime: int, config_mtime: int):
    from sqvae_core.rundir import RunDir
    return RunDir(path).load(which, "cpu")


def get_bundle(weights):
    """The loaded bundle (model in eval mode on the CPU) with these weights (sqvae_core.rundir.Weights:
    a run's last or best-validation ones); BundleError for a broken one."""
    torch_ready()
    return _load_bundle(*bundle_key(weights))


def _key(bundle) -> tuple[str, str, int, int]:
    return bundle_key(bundle.weights)


# ------------------------------------------------------------------------------ images
@st.cache_data(max_entries=16, show_spinner=False)
def _test_images(path: str, dataset: str, channels: int, size: int, n: int, data_dir,
                 val_size: int, sig: tuple, center_crop: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray | None, str, tuple | None]:
    from sqvae_core.data import load_dataset
    try:
        data = load_dataset(dataset, "test", data_dir, download=False, image_size=size, channels=channels,
                            val_size=val_size, center_crop=center_crop)
    except (FileNotFoundError, OSError, ValueError):
        shipped = read_samples(Path(path), channels, size, n) if sig else None
        if shipped is None:
            raise
        return shipped, None, f"{len(shipped)} images shipped in the bundle's samples/ (dataset not found)", None
    imgs = data.batch(slice(0, n)).numpy()
    labels = data.labels[:n].numpy() if data.labels is not None else None
    return imgs, labels, f"{data.source} (test split, first {len(imgs)})", data.class_names


def test_images(bundle, n: int | None = None):
    """(images (N,C,S,S) float32, labels or None, source, class names) of the bundle's test split
    (offline: the subset shipped in sqvae_core), or its samples/ if no dataset is found."""
    n = n or settings.eval_images()
    opts = bundle.run_config.data_options
    return _test_images(str(bundle.path), bundle.dataset, bundle.model_cfg.image_channels,
                        bundle.model_cfg.image_size, n, opts.data_dir, opts.val_size, samples_sig(bundle.path),
                        opts.center_crop)


@st.cache_data(max_entries=16, show_spinner=False)
def _shipped_samples(path: str, channels: int, size: int, n: int, sig: tuple) -> np.ndarray | None:
    return read_samples(Path(path), channels, size, n)


def display_images(bundle, n: int = 16) -> tuple[np.ndarray, str]:
    """Images for the originals-vs-reconstructions grid: the bundle's samples/ if it ships 8 or
    more, else the first n of the dataset's test split."""
    sig = samples_sig(bundle.path)
    if sig:
        shipped = _shipped_samples(str(bundle.path), bundle.model_cfg.image_channels, bundle.model_cfg.image_size,
                                   n, sig)
        if shipped is not None and len(shipped) >= 8:
            return shipped[:n], f"{len(shipped[:n])} test images shipped in the bundle's samples/"
    imgs, _, source, _ = test_images(bundle)
    return imgs[:n], f"{source.split(' (')[0]} (test split, first {min(n, len(imgs))})"


# -------------------------------------------------------------------------- evaluation
@st.cache_data(max_entries=16, show_spinner=False)
def _quick_eval(key: tuple, n: int) -> dict:
    torch = torch_ready()
    from sqvae_core.evaluate import evaluate_model
    bundle = _load_bundle(*key)
    res = evaluate_model(bundle.model, torch.from_numpy(test_images(bundle, n)[0]))
    res["usage"] = None if res.get("usage") is None else list(res["usage"])
    res["source"] = f"quick eval on {res.get('n_images')} test images (deterministic quantization)"
    return res


def evaluation(bundle) -> dict:
    """The bundle's test-split numbers and per-code usage: its eval.json when current and complete
    (usage for a discrete model), else a deterministic evaluation on SQVAE_APP_EVAL_IMAGES images."""
    stored = stored_evaluation(bundle.weights, bundle.model_cfg.codebook_size)
    if stored is not None and (stored["usage"] is not None or not bundle.model.discrete):
        return stored
    return _quick_eval(_key(bundle), settings.eval_images())


@st.cache_data(max_entries=16, show_spinner=False)
def _dataset_codes(key: tuple, n: int) -> np.ndarray:
    torch = torch_ready()
    from sqvae_core import explore
    bundle = _load_bundle(*key)
    return explore.dataset_codes(bundle.model, torch.from_numpy(test_images(bundle, n)[0])).numpy()


def dataset_codes(bundle) -> np.ndarray:
    """Code grids (N, n, n) of the first SQVAE_APP_EVAL_IMAGES test images."""
    return _dataset_codes(_key(bundle), settings.eval_images())


# ---------------------------------------------------------------------- codebook maps
@st.cache_data(max_entries=32, show_spinner=False)
def _pca_map(key: tuple, usage: tuple | None) -> list[dict]:
    torch = torch_ready()
    from sqvae_core import explore
    bundle = _load_bundle(*key)
    return explore.codebook_map(bundle.model, None if usage is None else torch.tensor(usage), method="pca")


@st.cache_resource(show_spinner=False)
def map_worker() -> MapWorker:
    return MapWorker()


def umap_map(bundle, usage: list[int] | None) -> tuple[list[dict] | None, str]:
    """(UMAP map or None, state): state is "ready", "computing", "off" or an error message. The map
    is computed by the MapWorker thread (explore.cached_codebook_map, which also stores it in
    RUN_DIR/umap.json for the next server); until then the page shows the PCA map."""
    if not settings.umap_enabled():
        return None, "off"
    torch = torch_ready()
    from sqvae_core import explore
    key = (*_key(bundle), None if usage is None else hash(tuple(usage)))
    worker = map_worker()
    got = worker.get(key)
    if got is None and not worker.pending(key):
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


def codebook_map(bundle, usage: list[int] | None) -> tuple[list[dict], str, str]:
    """(points, "UMAP" | "PCA", UMAP state): the UMAP map when ready, else the instant PCA map."""
    pts, state = umap_map(bundle, usage)
    if pts is not None:
        return pts, "UMAP", state
    return _pca_map(_key(bundle), None if usage is None else tuple(usage)), "PCA", state


# ------------------------------------------------------------------------- snapshots
def _snapshot_sig(path: Path) -> tuple:
    try:
        return tuple(sorted((p.name, p.stat().st_size) for p in (Path(path) / "snapshots").glob("step_*.safetensors")))
    except OSError:
        return ()


@st.cache_data(max_entries=16, show_spinner=False)
def _snapshots(path: str, sig: tuple) -> list[dict]:
    from sqvae_core.rundir import RunDir
    return [{"step": s["step"], "codebook": s["codebook"].numpy(), "usage": s["usage"].numpy()}
            for s in RunDir(path).snapshots()]


def snapshots(path: Path) -> list[dict]:
    """Codebook/usage snapshots as numpy arrays (re-read when a snapshot file appears)."""
    return _snapshots(str(path), _snapshot_sig(path))


@st.cache_data(max_entries=16, show_spinner=False)
def _snapshot_maps(path: str, sig: tuple, kind: str) -> list[list[dict]]:
    from sqvae_core import explore
    snaps = _snapshots(path, sig)
    if not snaps:
        return []
    return explore.aligned_maps([s["codebook"] for s in snaps], [s["usage"] for s in snaps],
                                method="pca", metric=explore.code_metric(kind))


def snapshot_maps(path: Path, kind: str) -> list[list[dict]]:
    """PCA maps of every snapshot on shared axes (explore.aligned_maps): animation frames."""
    return _snapshot_maps(str(path), _snapshot_sig(path), kind)


# --------------------------------------------------------------------------- tools
@st.cache_data(max_entries=32, show_spinner=False)
def _reconstructions(key: tuple, n: int, source: str) -> np.ndarray:
    torch = torch_ready()
    b = _load_bundle(*key)
    x = display_images(b, n)[0] if source == "display" else test_images(b)[0][:n]
    return b.model.reconstruct(torch.from_numpy(x)).numpy()


def reconstructions(bundle, n: int, source: str = "test") -> np.ndarray:
    """Deterministic reconstructions of the first n test images ("test") or of the display grid's."""
    return _reconstructions(_key(bundle), n, source)


@st.cache_data(max_entries=64, show_spinner=False)
def _interpolation(key: tuple, i: int, j: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    torch = torch_ready()
    from sqvae_core import explore
    b = _load_bundle(*key)
    imgs = test_images(b)[0]
    res = explore.interpolate(b.model, torch.from_numpy(imgs[i]), torch.from_numpy(imgs[j]), steps)
    return res["latent"].numpy(), res["pixel"].numpy()


def interpolation(bundle, i: int, j: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(latent path, pixel cross-fade) between test images i and j."""
    return _interpolation(_key(bundle), i, j, steps)


@st.cache_data(max_entries=64, show_spinner=False)
def _gallery(key: tuple, n: int, code: int) -> tuple[list, np.ndarray]:
    torch = torch_ready()
    from sqvae_core import explore
    b = _load_bundle(*key)
    codes = torch.from_numpy(_dataset_codes(key, n))
    return (explore.code_gallery(b.model, None, code, top=16, codes=codes),
            explore.mean_patch(b.model, code, codes=codes).numpy())


def gallery(bundle, code: int) -> tuple[list, np.ndarray]:
    """([(image index, cells, share)] of the test images using code most, the code's mean patch)."""
    return _gallery(_key(bundle), settings.eval_images(), code)


# ------------------------------------------------------------------------- code spaces
@dataclass(frozen=True)
class Space:
    """A code space the Neighbor-k and Edit codes tabs work on (sqvae_core.codespace), as the caches
    key it: a bundle's model over its test images, or the decoder a logged run saved (RunLogger)."""
    key: tuple                  # ("bundle", *bundle_key) or ("logged", path, file signatures)
    label: str                  # the run's label: keys its edited grids in the session
    codebook_size: int

    @property
    def logged(self) -> bool:
        return self.key[0] == "logged"

    @property
    def item(self) -> str:
        """What one example code grid is."""
        return "saved grid" if self.logged else "test image"


def bundle_space(bundle, label: str) -> Space:
    return Space(("bundle", *_key(bundle)), label, bundle.model_cfg.codebook_size)


def logged_space(ref) -> Space:
    """The decoder a logged run saved (BundleError if broken). Only for runs under the local roots:
    torch.export.load may unpickle parts of decoder.pt2 (app/pages_/explore.py never offers an upload's)."""
    from sqvae_core.runlogger import CODES, DECODER
    key = ("logged", str(ref.path), file_sig(ref.path / DECODER), file_sig(ref.path / CODES))
    return Space(key, ref.label, _code_space(key).codebook_size)


@st.cache_resource(max_entries=8, show_spinner=False)
def _code_space(key: tuple):
    """The sqvae_core CodeSpace of a Space key: a ModelSpace over the bundle's test images (their codes
    from the dataset_codes cache), or the logged run's LoggedDecoder."""
    torch = torch_ready()
    if key[0] == "logged":
        from sqvae_core.runlogger import load_decoder
        return load_decoder(key[1])
    from sqvae_core.codespace import ModelSpace
    b, n = _load_bundle(*key[1:]), settings.eval_images()
    return ModelSpace(b.model, torch.from_numpy(test_images(b, n)[0]), torch.from_numpy(_dataset_codes(key[1:], n)))


def _numpy(x) -> np.ndarray:
    return x.detach().float().clamp(0, 1).numpy()


def examples(space: Space, n: int) -> tuple[np.ndarray | None, np.ndarray]:
    """(the first n example images, or None when the space has none, their code grids (n, H, W))."""
    s = _code_space(space.key)
    imgs = s.example_images
    return (None if imgs is None else _numpy(imgs[:n])), s.example_grids[:n].numpy()


@st.cache_data(max_entries=64, show_spinner=False)
def _neighbour(key: tuple, k: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    torch_ready()
    from sqvae_core.edits import neighbour_grids
    s = _code_space(key)
    grids = s.example_grids[:n]
    # a bundle's first row is its model's reconstructions, as on the Reconstructions tab
    decoded = _reconstructions(key[1:], n, "test") if key[0] == "bundle" else _numpy(s.decode(grids))
    return decoded, _numpy(neighbour_grids(s, k, grids)[0])


def neighbour(space: Space, k: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(the first n example grids decoded, their Neighbor-k edits decoded)."""
    return _neighbour(space.key, k, n)


def candidates(space: Space, code: int, n: int) -> tuple[list[int], np.ndarray]:
    """The n codes nearest to code (itself first) and the distances from code to every code."""
    from sqvae_core import edits
    s = _code_space(space.key)
    return edits.candidate_codes(s, code, min(n, s.codebook_size)).tolist(), edits.code_distances(s, code).numpy()


def edit(space: Space, grid: np.ndarray, row: int, col: int, code: int) -> tuple[np.ndarray, np.ndarray, tuple | None]:
    """(the grid decoded, the grid with cell (row, col) set to code decoded, the pixel box that cell
    reaches: a bundle's model only, else None)."""
    torch = torch_ready()
    from sqvae_core import edits
    s = _code_space(space.key)
    g = torch.from_numpy(np.ascontiguousarray(grid))
    box = None if space.logged else edits.cell_pixel_box(s.model, row, col)
    return _numpy(s.decode(g[None]))[0], _numpy(edits.edit_code(s, g, row, col, code)), box


@st.cache_data(max_entries=64, show_spinner=False)
def _previews(key: tuple, grid_bytes: bytes, shape: tuple, row: int, col: int, codes: tuple) -> np.ndarray:
    torch = torch_ready()
    from sqvae_core.edits import edit_code
    s = _code_space(key)
    grid = torch.from_numpy(np.frombuffer(grid_bytes, dtype=np.int64).reshape(shape).copy())
    imgs = np.stack([_numpy(edit_code(s, grid, row, col, c)) for c in codes])
    return image_grid(imgs, ncol=len(codes), scale=3)


def previews(space: Space, grid: np.ndarray, row: int, col: int, codes: list[int]) -> np.ndarray:
    """One image row: the grid with cell (row, col) set to each of codes, decoded."""
    g = np.asarray(grid, dtype=np.int64)
    return _previews(space.key, g.tobytes(), g.shape, row, col, tuple(int(c) for c in codes))


@st.cache_resource(max_entries=4, show_spinner=False)
def _prior(path: str, mt: int, num_codes: int):
    from sqvae_core.prior import load_prior
    return load_prior(path, "cpu", num_codes=num_codes)


def prior(bundle, path: Path):
    """The bundle's PixelCNN prior (ValueError/OSError for a broken file)."""
    from app.runs import mtime
    torch_ready()
    return _prior(str(path), mtime(path), bundle.model_cfg.codebook_size)


@st.cache_data(max_entries=32, show_spinner=False)
def _prior_samples(key: tuple, prior_path: str, pm: int, temperature: float, label, seed: int, n: int) -> np.ndarray:
    torch = torch_ready()
    b = _load_bundle(*key)
    p = _prior(prior_path, pm, b.model_cfg.codebook_size)
    labels = torch.tensor(label) if isinstance(label, tuple) else label
    codes = p.sample(n, temperature=temperature, labels=labels, generator=torch.Generator().manual_seed(int(seed)))
    with torch.no_grad():
        return b.model.decode_indices(codes).numpy()


def prior_samples(bundle, path: Path, temperature: float, label, seed: int, n: int) -> np.ndarray:
    """n decoded prior samples (label: None, a class, or a tuple of one class per sample)."""
    from app.runs import mtime
    return _prior_samples(_key(bundle), str(path), mtime(path), float(temperature), label, int(seed), n)


# ----------------------------------------------------------------------------- jobs
@st.cache_resource(show_spinner=False)
def _job_manager(root: str, max_jobs: int) -> jobs.JobManager:
    return jobs.JobManager(root, max_jobs)


def job_manager() -> jobs.JobManager:
    """The server's one JobManager for the runs directory (its queue pumped on every call)."""
    jm = _job_manager(str(settings.runs_dir().resolve()), jobs.default_max_jobs())
    jm.pump()
    return jm
