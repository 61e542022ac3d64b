"""Exploring a trained discrete-latent model: codebook maps, code edits, interpolation, galleries.

Everything here is a plain function of a model built by `models.build_model` (or loaded with
`rundir.load_bundle`) and image tensors (B, C, S, S) in [0, 1]:

    codebook_map(model, usage)                 2-D UMAP / PCA map of the codebook, one dict per code
    aligned_maps(codebooks, usages)            maps of training snapshots that do not jump between frames
    cached_codebook_map(run_dir, model, usage) codebook_map stored in RUN_DIR/umap.json and reused
    code_usage(model, images)                  how often each code is the deterministic code of a cell
    kth_neighbours(model, k) / neighbour_edit  the paper's Neighbor-k replacement
    interpolate(model, x_a, x_b)               latent-space path vs. pixel-space mixture
    edit_code / candidate_codes / paint_codes  change one cell or a painted region of a code grid
    code_gallery / mean_patch                  which images use a code, what it looks like on average
    nearest_images(sample, images)             memorisation check in pixel L2

Conventions:
  * Codes are always the deterministic (argmax) codes; every function runs the model in eval mode
    under no_grad (and restores train mode afterwards if it was set).
  * Inputs may live on any device (they are moved to the model's); every result is on the CPU.
  * Codebook distances: Euclidean for the Gaussian SQ-VAE and VQ-VAE kinds, cosine
    (1 - cos) for the vMF / NC kinds (kinds.py: metric "cosine"); ties are broken by code index.
  * Neighbour ranks follow the paper's Neighbor-k: codes are ranked by distance INCLUDING the code
    itself at rank 1, so Neighbor-1 is the identity (the plain reconstruction) and Neighbor-k
    replaces every code by its (k-1)-th nearest OTHER code.
  * Bad input (a code >= K or < 0, a cell outside the grid, images of the wrong size or channel
    count) raises ValueError with a one-line message; the continuous VAE has no codebook, so
    codebook operations raise ValueError for it (interpolation works, in continuous space).
  * umap-learn is imported lazily (on the first UMAP map); numba's on-disk cache is switched on
    for umap's jitted functions so only the very first process on a machine pays the JIT.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import math
import operator
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from .kinds import KINDS
from .models import check_images
from .rundir import MAPS, MAX_JSON_BYTES, BundleError, atomic_write_json, read_json

__all__ = [
    "code_metric", "dataset_codes", "code_usage",
    "codebook_map", "aligned_maps", "cached_codebook_map",
    "code_distances", "candidate_codes", "kth_neighbours", "neighbour_edit",
    "interpolate", "cell_pixel_box", "edit_code", "paint_codes",
    "code_gallery", "mean_patch", "nearest_images",
]

log = logging.getLogger(__name__)

MAP_FILE = MAPS                  # cache of codebook maps inside a run directory
MAP_CACHE_ENTRIES = 8            # most recent maps kept in MAP_FILE
MAX_INTERPOLATION_STEPS = 256
MAP_METHODS = ("umap", "pca")
CHAIN_LEARNING_RATE = 0.25       # UMAP learning rate of a snapshot initialised from the next frame


# ------------------------------------------------------------------------ small helpers
def _device(model: torch.nn.Module) -> torch.device:
    """The device of the model's parameters."""
    return next(model.parameters()).device


@contextlib.contextmanager
def _inference(model: torch.nn.Module):
    """Run the model in eval mode under no_grad; restore train mode afterwards if it was on."""
    was_training = model.training
    if was_training:
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training:
            model.train()


def _require_codebook(model, what: str) -> None:
    """ValueError for the continuous VAE, which has no codebook to map, rank or edit."""
    if not getattr(model, "discrete", True):
        raise ValueError(f"{what}: the continuous VAE has no codebook (its latents are continuous); "
                         f"use an SQ-VAE or VQ-VAE model")


def code_metric(model_or_kind) -> str:
    """The catalogue's metric: 'cosine' for vMF / NC models (unit-norm codes), else 'euclidean'
    (also for a kind the catalogue does not know, such as a RunLogger run's)."""
    kind = model_or_kind if isinstance(model_or_kind, str) else model_or_kind.cfg.kind
    entry = KINDS.get(kind)
    return (entry.metric if entry else None) or "euclidean"


def _int(value, name: str) -> int:
    """A Python int from an int-like value (int, numpy int, 0-dim integer tensor); bools refused."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
            return int(value)
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _check_code(model, code, name: str = "code") -> int:
    """A valid code index in [0, K) as an int, else ValueError('code 300 is out of range ...')."""
    c = _int(code, name)
    k = model.cfg.codebook_size
    if not 0 <= c < k:
        raise ValueError(f"{name} {c} is out of range for a codebook of K={k} (valid codes are 0..{k - 1})")
    return c


def _as_images(model, x, name: str = "images") -> torch.Tensor:
    """(C, S, S) or (B, C, S, S) float images of the model's shape, on the model's device."""
    if isinstance(x, torch.Tensor) and x.ndim == 3:
        x = x.unsqueeze(0)
    try:
        check_images(x, model.cfg)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    return x.to(_device(model))


def _as_grid(model, indices) -> torch.Tensor:
    """One code grid (H, W) or (1, H, W) of valid integer codes as a (1, H, W) long tensor."""
    n, k = model.cfg.latent_size, model.cfg.codebook_size
    t = torch.as_tensor(indices)
    if t.ndim == 3 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 2 or tuple(t.shape) != (n, n):
        raise ValueError(f"expected one code grid of shape ({n}, {n}) or (1, {n}, {n}), got {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"a code grid must hold integer code indices, got dtype {t.dtype}")
    t = t.long()
    bad = (t < 0) | (t >= k)
    if bool(bad.any()):
        r, c = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"code {int(t[r, c])} at cell (row {r}, col {c}) is out of range for a "
                         f"codebook of K={k} (valid codes are 0..{k - 1})")
    return t.unsqueeze(0).to(_device(model))


def _check_cell(model, row, col) -> tuple[int, int]:
    """(row, col) of a cell inside the latent grid, else ValueError."""
    n = model.cfg.latent_size
    r, c = _int(row, "row"), _int(col, "col")
    if not (0 <= r < n and 0 <= c < n):
        raise ValueError(f"cell (row {r}, col {c}) is outside the {n}x{n} code grid "
                         f"(rows and cols are 0..{n - 1})")
    return r, c


# --------------------------------------------------------------------- codes and usage
def dataset_codes(model, images, batch_size: int = 256) -> torch.Tensor:
    """Deterministic code grids (N, H, W) of all images, computed in batches (CPU long tensor)."""
    _require_codebook(model, "codes")
    if isinstance(images, torch.Tensor) and images.ndim == 3:
        images = images.unsqueeze(0)
    check_images(images, model.cfg)
    batch_size = max(1, _int(batch_size, "batch_size"))
    out = []
    with _inference(model):
        for i in range(0, images.shape[0], batch_size):
            out.append(model.codes(_as_images(model, images[i:i + batch_size])).cpu())
    n = model.cfg.latent_size
    return torch.cat(out) if out else torch.empty(0, n, n, dtype=torch.long)


def code_usage(model, images, batch_size: int = 256) -> torch.Tensor:
    """How many cells of the images use each code (deterministic codes): LongTensor (K,)."""
    _require_codebook(model, "code usage")
    codes = dataset_codes(model, images, batch_size)
    return torch.bincount(codes.reshape(-1), minlength=model.cfg.codebook_size)


# ------------------------------------------------------------------------ codebook maps
def _codebook_array(model) -> np.ndarray:
    """The model's codebook (K, d) as float32 numpy (unit rows for vMF / NC)."""
    _require_codebook(model, "codebook map")
    with _inference(model):
        return model.codebook_vectors().detach().float().cpu().numpy().copy()


def _prepare(codebook, metric: str) -> np.ndarray:
    """Codebook as a finite float32 (K, d) array; rows unit-normalised for the cosine metric."""
    x = codebook.detach().float().cpu().numpy() if isinstance(codebook, torch.Tensor) else np.asarray(codebook, np.float32)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 1:
        raise ValueError(f"expected a codebook of shape (K, d) with K >= 2, got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("the codebook contains NaN or inf")
    if metric == "cosine":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    elif metric != "euclidean":
        raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
    return x


def _neighbours_for(k: int, n_neighbors) -> int:
    """UMAP's n_neighbors adapted to small codebooks: min(15, K-1), at least 2."""
    if n_neighbors is None:
        return max(2, min(15, k - 1))
    n = _int(n_neighbors, "n_neighbors")
    if not 2 <= n < k:
        raise ValueError(f"n_neighbors must be in [2, K-1] = [2, {k - 1}], got {n}")
    return n


def _pca_axes(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean (d,), axes (d, 2)) of the top-2 principal components, each axis's largest loading positive."""
    mean = x.mean(0)
    _, _, vt = np.linalg.svd((x - mean).astype(np.float64), full_matrices=False)
    axes = np.zeros((x.shape[1], 2))
    m = min(2, vt.shape[0])
    axes[:, :m] = vt[:m].T
    for j in range(m):     # fix the sign: the largest-magnitude loading of each axis is positive
        if axes[np.argmax(np.abs(axes[:, j])), j] < 0:
            axes[:, j] *= -1
    return mean, axes


def _pca_project(x: np.ndarray, mean: np.ndarray, axes: np.ndarray) -> np.ndarray:
    """Coordinates (K, 2) of x on given PCA axes."""
    return ((x - mean).astype(np.float64) @ axes).astype(np.float32)


def _ensure_numba_cache() -> None:
    """Make sure numba can write its cache: if NUMBA_CACHE_DIR is unset and the in-tree cache next
    to umap's sources is not writable, point it to ~/.cache/sqvae/numba (or a temp dir).

    (Setting it unconditionally would orphan the caches numba already keeps next to umap's and
    pynndescent's sources and make the next process recompile everything.)"""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return
    spec = importlib.util.find_spec("umap")
    if spec and spec.origin:
        pkg = Path(spec.origin).parent
        target = pkg / "__pycache__"
        if os.access(target if target.exists() else pkg, os.W_OK):
            return
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    for cand in (base / "sqvae" / "numba", Path(tempfile.gettempdir()) / f"sqvae-numba-{getattr(os, 'getuid', lambda: 'user')()}"):
        try:
            cand.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(cand, os.W_OK):
            os.environ["NUMBA_CACHE_DIR"] = str(cand)
            if "numba" in sys.modules:
                sys.modules["numba"].core.config.reload_config()
            return


_UMAP_MODULE = None


def _load_umap():
    """Import umap-learn once, with numba's on-disk cache on for its jitted functions."""
    global _UMAP_MODULE
    if _UMAP_MODULE is not None:
        return _UMAP_MODULE
    _ensure_numba_cache()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import umap
    try:   # umap's own njit functions are declared without cache=True; switch the cache on
        from numba.core.caching import NullCache
        from numba.core.dispatcher import Dispatcher
        for name in ("umap.umap_", "umap.layouts", "umap.utils", "umap.spectral", "umap.distances", "umap.sparse"):
            mod = sys.modules.get(name) or importlib.import_module(name)
            for obj in vars(mod).values():
                if (isinstance(obj, Dispatcher) and isinstance(getattr(obj, "_cache", None), NullCache)
                        and getattr(obj.py_func, "__module__", "").startswith("umap")):
                    obj.enable_caching()
    except Exception as e:           # caching is an optimisation only
        log.debug("could not enable numba caching for umap: %s", e)
    _UMAP_MODULE = umap
    return umap


def _umap_embed(x: np.ndarray, *, metric: str, n_neighbors: int, seed: int,
                init: np.ndarray | None = None, learning_rate: float = 1.0) -> np.ndarray:
    """UMAP of the rows of x into 2-D, deterministic for a given seed (single-threaded)."""
    umap = _load_umap()
    reducer = umap.UMAP(n_components=2, n_neighbors=n_neighbors, metric=metric, random_state=seed,
                        n_jobs=1, init="spectral" if init is None else np.asarray(init, np.float32),
                        learning_rate=learning_rate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # n_jobs / spectral-init / numba cache notices
        return np.asarray(reducer.fit_transform(x), dtype=np.float32)


def _embed(x: np.ndarray, *, metric: str, method: str, seed: int, n_neighbors=None, init=None,
           learning_rate: float = 1.0) -> np.ndarray:
    """2-D coordinates (K, 2) of prepared codebook rows by UMAP or PCA (PCA also for K < 4)."""
    if method not in MAP_METHODS:
        raise ValueError(f"map method must be one of {MAP_METHODS}, got {method!r}")
    k = x.shape[0]
    if method == "pca" or k < 4:     # UMAP's spectral init needs more than a handful of points
        return _pca_project(x, *_pca_axes(x))
    if init is not None:
        init = np.asarray(init, dtype=np.float32)
        if init.shape != (k, 2) or not np.isfinite(init).all():
            raise ValueError(f"init must be a finite array of shape ({k}, 2), got {init.shape}")
    return _umap_embed(x, metric=metric, n_neighbors=_neighbours_for(k, n_neighbors), seed=_int(seed, "seed"),
                       init=init, learning_rate=learning_rate)


def _usage_vector(usage, k: int) -> torch.Tensor | None:
    """Usage counts as a CPU long tensor (K,), or None."""
    if usage is None:
        return None
    u = torch.as_tensor(usage).detach().cpu()
    if u.ndim != 1 or u.shape[0] != k:
        raise ValueError(f"usage must hold one count per code, shape ({k},), got {tuple(u.shape)}")
    if u.is_floating_point() and not torch.isfinite(u).all():
        raise ValueError("usage counts must be finite")
    if bool((u < 0).any()):
        raise ValueError("usage counts must be >= 0")
    return u.round().long() if u.is_floating_point() else u.long()


def _points(coords: np.ndarray, usage) -> list[dict]:
    """One dict {code, x, y, usage, dead} per code; usage and dead are None without usage."""
    u = _usage_vector(usage, coords.shape[0])
    return [{"code": i, "x": float(coords[i, 0]), "y": float(coords[i, 1]),
             "usage": None if u is None else int(u[i]), "dead": None if u is None else bool(u[i] == 0)}
            for i in range(coords.shape[0])]


def codebook_map(model, usage: torch.Tensor | None = None, *, method: str = "umap", seed: int = 0,
                 n_neighbors: int | None = None, init=None) -> list[dict]:
    """2-D map of the codebook (UMAP, or instant PCA), one {code, x, y, usage, dead} per code."""
    metric = code_metric(model)
    x = _prepare(_codebook_array(model), metric)
    coords = _embed(x, metric=metric, method=method, seed=seed, n_neighbors=n_neighbors, init=init)
    return _points(coords, usage)


def _procrustes(y: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """y moved onto ref by the best rotation/reflection, uniform scale and translation."""
    my, mr = y.mean(0), ref.mean(0)
    yc, rc = y - my, ref - mr
    norm = float((yc ** 2).sum())
    if norm == 0:
        return np.broadcast_to(mr, y.shape).astype(np.float32)
    u, s, vt = np.linalg.svd(yc.T.astype(np.float64) @ rc.astype(np.float64))
    return (s.sum() / norm * yc @ (u @ vt) + mr).astype(np.float32)


def aligned_maps(codebooks: list, usages: list | None = None, method: str = "umap", seed: int = 0, *,
                 metric: str = "euclidean", n_neighbors: int | None = None) -> list[list[dict]]:
    """Maps of training snapshots (same K) for an animation that does not jump between frames.

    PCA: every snapshot is projected on the LAST snapshot's axes (sign fixed), so frames share axes.
    UMAP: the last snapshot is mapped as codebook_map would; going backwards in time, each earlier
    snapshot's UMAP starts from the next frame's layout (init=array, gentler learning rate
    CHAIN_LEARNING_RATE) and is then Procrustes-aligned to it (rotation/reflection, scale, shift);
    a snapshot identical to the next one reuses its layout. Pass metric=code_metric(model) for
    vMF / NC runs.
    """
    if not isinstance(codebooks, (list, tuple)) or not codebooks:
        raise ValueError("aligned_maps needs a non-empty list of codebooks (K, d)")
    xs = [_prepare(c, metric) for c in codebooks]
    if len({x.shape for x in xs}) != 1:
        raise ValueError(f"all snapshots must have the same codebook shape, got {sorted({x.shape for x in xs})}")
    if usages is None:
        usages = [None] * len(xs)
    if len(usages) != len(xs):
        raise ValueError(f"got {len(usages)} usage vectors for {len(xs)} codebooks")
    if method not in MAP_METHODS:
        raise ValueError(f"map method must be one of {MAP_METHODS}, got {method!r}")
    coords: list[np.ndarray | None] = [None] * len(xs)
    if method == "pca" or xs[0].shape[0] < 4:
        mean, axes = _pca_axes(xs[-1])
        coords = [_pca_project(x, mean, axes) for x in xs]
    else:
        coords[-1] = _embed(xs[-1], metric=metric, method="umap", seed=seed, n_neighbors=n_neighbors)
        for i in range(len(xs) - 2, -1, -1):
            if np.array_equal(xs[i], xs[i + 1]):        # a frozen codebook does not wobble
                coords[i] = coords[i + 1]
                continue
            raw = _embed(xs[i], metric=metric, method="umap", seed=seed, n_neighbors=n_neighbors,
                         init=coords[i + 1], learning_rate=CHAIN_LEARNING_RATE)
            coords[i] = _procrustes(raw, coords[i + 1])
    return [_points(c, u) for c, u in zip(coords, usages)]


def _map_key(x: np.ndarray, metric: str, method: str, seed: int, n_neighbors) -> str:
    """Hash of the codebook bytes and every setting that changes its map."""
    params = {"shape": list(x.shape), "metric": metric, "method": method, "seed": seed}
    if method == "umap" and x.shape[0] >= 4:
        params["n_neighbors"] = _neighbours_for(x.shape[0], n_neighbors)
        try:
            from importlib.metadata import version
            params["umap"] = version("umap-learn")
        except Exception:
            pass
    h = hashlib.sha256(np.ascontiguousarray(x, dtype=np.float32).tobytes())
    h.update(json.dumps(params, sort_keys=True).encode())
    return h.hexdigest()


def _cached_coords(entry, k: int) -> np.ndarray | None:
    """Coordinates (K, 2) from a cache entry, or None if it is malformed."""
    if not isinstance(entry, dict):
        return None
    xs, ys = entry.get("x"), entry.get("y")
    if not (isinstance(xs, list) and isinstance(ys, list) and len(xs) == len(ys) == k):
        return None
    try:
        arr = np.array([xs, ys], dtype=np.float64).T
    except (TypeError, ValueError):
        return None
    return arr if np.isfinite(arr).all() else None


def cached_codebook_map(run_dir, model, usage: torch.Tensor | None = None, method: str = "umap", seed: int = 0,
                        *, n_neighbors: int | None = None) -> list[dict]:
    """codebook_map whose coordinates are stored in RUN_DIR/umap.json and reused while the codebook,
    method and seed are unchanged (usage/dead flags always come from the usage passed in)."""
    metric, seed = code_metric(model), _int(seed, "seed")
    x = _prepare(_codebook_array(model), metric)
    k = x.shape[0]
    key = _map_key(x, metric, method, seed, n_neighbors)
    path = Path(run_dir) / MAP_FILE
    try:
        stored = read_json(path, MAP_FILE) if path.is_file() else {}
    except BundleError as e:
        log.info("ignoring unreadable map cache: %s", e)
        stored = {}
    entries = stored.get("entries") if isinstance(stored.get("entries"), dict) else {}
    coords = _cached_coords(entries.get(key), k)
    if coords is None:
        raw = _embed(x, metric=metric, method=method, seed=seed, n_neighbors=n_neighbors)
        entry = {"method": method, "seed": seed, "metric": metric, "K": k,
                 "x": [float(v) for v in raw[:, 0]], "y": [float(v) for v in raw[:, 1]]}
        coords = _cached_coords(entry, k)
        kept = {kk: v for kk, v in entries.items() if kk != key}
        new = {"version": 1, "entries": {**dict(list(kept.items())[-(MAP_CACHE_ENTRIES - 1):]), key: entry}}
        while len(new["entries"]) > 1 and len(json.dumps(new, indent=1)) > MAX_JSON_BYTES:
            new["entries"].pop(next(iter(new["entries"])))       # drop the oldest to fit the size limit
        if len(json.dumps(new, indent=1)) <= MAX_JSON_BYTES:
            try:
                atomic_write_json(path, new)
            except OSError as e:      # a read-only bundle: the map is still returned
                log.info("could not write map cache %s: %s", path, e)
    return _points(coords, usage)


# ---------------------------------------------------------------- codebook neighbours
def _distance_rows(cb: torch.Tensor, rows: torch.Tensor, metric: str) -> torch.Tensor:
    """Distances (len(rows), K) in float64 from codes `rows` to every code."""
    cb = cb.double()
    if metric == "cosine":
        cb = torch.nn.functional.normalize(cb, dim=1)
        return 1.0 - cb[rows] @ cb.t()
    return torch.cdist(cb[rows], cb, compute_mode="donot_use_mm_for_euclid_dist")


def _ranked(cb: torch.Tensor, rows: torch.Tensor, metric: str) -> torch.Tensor:
    """Codes ranked by distance from each code in rows (itself first, ties by index): (len(rows), K)."""
    d = _distance_rows(cb, rows, metric)
    d[torch.arange(len(rows)), rows] = -math.inf        # the code itself is always rank 1
    return torch.sort(d, dim=1, stable=True).indices


def _codebook(model) -> torch.Tensor:
    """The codebook (K, d) on the CPU, detached."""
    with _inference(model):
        return model.codebook_vectors().detach().cpu()


def code_distances(model, code) -> torch.Tensor:
    """Distances (K,) from one code to every code under the model's metric (float64)."""
    _require_codebook(model, "codebook distances")
    c = _check_code(model, code)
    return _distance_rows(_codebook(model), torch.tensor([c]), code_metric(model))[0]


def candidate_codes(model, code, n: int | None = None) -> torch.Tensor:
    """Codes sorted by codebook distance from `code` (the code itself first), the first n of them."""
    _require_codebook(model, "candidate codes")
    c = _check_code(model, code)
    k = model.cfg.codebook_size
    n = k if n is None else _int(n, "n")
    if not 1 <= n <= k:
        raise ValueError(f"n must be in [1, K={k}], got {n}")
    return _ranked(_codebook(model), torch.tensor([c]), code_metric(model))[0, :n].clone()


def kth_neighbours(model, k: int, chunk: int = 1024) -> torch.Tensor:
    """Neighbor-k map (K,): rank-k code of each code, the code itself being rank 1 (k=1: identity)."""
    _require_codebook(model, "Neighbor-k")
    size = model.cfg.codebook_size
    k = _int(k, "k")
    if not 1 <= k <= size:
        raise ValueError(f"Neighbor-k needs k in [1, K={size}] (k=1 is the code itself), got {k}")
    cb, metric = _codebook(model), code_metric(model)
    out = torch.empty(size, dtype=torch.long)
    for i in range(0, size, chunk):
        rows = torch.arange(i, min(i + chunk, size))
        out[rows] = _ranked(cb, rows, metric)[:, k - 1]
    return out


def neighbour_edit(model, images, k: int, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbor-k edit: every code of the images replaced by its rank-k code, decoded.
    Returns (edited images (B, C, S, S), edited code grids (B, H, W))."""
    nb = kth_neighbours(model, k)
    codes = nb[dataset_codes(model, images, batch_size)]
    with _inference(model):
        imgs = [model.decode_indices(codes[i:i + batch_size].to(_device(model))).cpu()
                for i in range(0, codes.shape[0], batch_size)]
    return torch.cat(imgs), codes


# ---------------------------------------------------------------------- interpolation
def decode_latent_mix(model, enc_a: tuple, enc_b: tuple, w) -> tuple[torch.Tensor, torch.Tensor | None]:
    """decode(quantize((1−w)·z_a + w·z_b)), the encoder's log-variances mixed alike (exact at w = 0
    and 1); enc_* = model.encode(...) outputs, w a scalar or broadcastable tensor. Returns the
    images and the code indices (None for the continuous VAE, which decodes the mix directly)."""
    (za, lva), (zb, lvb) = enc_a, enc_b
    z = (1 - w) * za + w * zb
    if not getattr(model, "discrete", True):
        return model.decode(z), None
    lv = None if lva is None else (1 - w) * lva + w * lvb
    q = model.quantize(z, lv, mode="argmax")
    return model.decode(q.z_q), q.indices


def interpolate(model, x_a, x_b, steps: int = 8) -> dict:
    """Paths from image a to image b for t = 0 .. 1 (inclusive), each (steps, C, S, S):

    "latent": decode(quantize((1-t) z_a + t z_b)) with the continuous encoder outputs (and their
              log-variances) mixed, then quantized deterministically; for the VAE: decode of the mix.
    "pixel":  (1-t) x̂_a + t x̂_b, the straight line between the two reconstructions.
    Also "t" (steps,) and "indices" (steps, H, W) of the latent path (None for the VAE).
    """
    steps = _int(steps, "steps")
    if not 2 <= steps <= MAX_INTERPOLATION_STEPS:
        raise ValueError(f"steps must be in [2, {MAX_INTERPOLATION_STEPS}], got {steps}")
    a, b = _as_images(model, x_a, "x_a"), _as_images(model, x_b, "x_b")
    if a.shape[0] != 1 or b.shape[0] != 1:
        raise ValueError(f"interpolate takes one image each, got batches of {a.shape[0]} and {b.shape[0]}")
    t = torch.linspace(0, 1, steps, dtype=torch.float64)
    with _inference(model):
        (za, lva), (zb, lvb) = model.encode(a), model.encode(b)
        w = t.to(za.dtype).to(za.device).reshape(-1, 1, 1, 1)
        latent, indices = decode_latent_mix(model, (za, lva), (zb, lvb), w)
        indices = None if indices is None else indices.cpu()
        rec_a, rec_b = model.reconstruct(a), model.reconstruct(b)
        pixel = (1 - w) * rec_a + w * rec_b
    return {"latent": latent.cpu(), "pixel": pixel.cpu(), "t": t.float(), "indices": indices}


# ------------------------------------------------------------------ single-code edits
def _reach(model, lo: int, hi: int) -> tuple[int, int]:
    """Propagate an index interval [lo, hi] of the latent grid through the decoder's convolutions."""
    for m in model.decoder.modules():          # registration order = forward order in nets.Decoder
        if not isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            continue
        s, p, span = m.stride[0], m.padding[0], (m.kernel_size[0] - 1) * m.dilation[0]
        if isinstance(m, torch.nn.ConvTranspose2d):   # input i feeds outputs i*s - p .. i*s - p + span
            lo, hi = lo * s - p, hi * s - p + span
        else:                                         # output o reads inputs o*s - p .. o*s - p + span
            lo, hi = -((span - p - lo) // s), (hi + p) // s
    return lo, hi


def cell_pixel_box(model, row, col, clip: bool = True) -> tuple[int, int, int, int]:
    """Pixel box (top, bottom, left, right), half-open, that a change of code at one cell can reach:
    the cell's receptive field through the decoder (res-block 3x3 convs, then its transposed convs),
    computed from the decoder's layers. clip=False gives the unclipped box."""
    r, c = _check_cell(model, row, col)
    (t, b), (lft, rgt) = _reach(model, r, r), _reach(model, c, c)
    if clip:
        s = model.cfg.image_size
        t, lft, b, rgt = max(t, 0), max(lft, 0), min(b, s - 1), min(rgt, s - 1)
    return t, b + 1, lft, rgt + 1


def edit_code(model, indices, row, col, new_code) -> torch.Tensor:
    """Decode a code grid with one cell (row, col) set to new_code: image (C, S, S)."""
    _require_codebook(model, "code edit")
    grid = _as_grid(model, indices)
    r, c = _check_cell(model, row, col)
    code = _check_code(model, new_code)
    grid = grid.clone()
    grid[0, r, c] = code
    with _inference(model):
        return model.decode_indices(grid)[0].cpu()


def paint_codes(model, indices, mask, code) -> torch.Tensor:
    """Decode a code grid with every cell where mask (H, W) is True set to `code`: image (C, S, S)."""
    _require_codebook(model, "code painting")
    grid = _as_grid(model, indices)
    code = _check_code(model, code)
    n = model.cfg.latent_size
    m = torch.as_tensor(mask)
    if m.ndim == 3 and m.shape[0] == 1:
        m = m[0]
    if tuple(m.shape) != (n, n):
        raise ValueError(f"mask must have the code grid's shape ({n}, {n}), got {tuple(m.shape)}")
    if m.dtype != torch.bool:
        if m.is_floating_point() or not bool(((m == 0) | (m == 1)).all()):
            raise ValueError(f"mask must be boolean (or 0/1 integers), got dtype {m.dtype}")
        m = m.bool()
    grid = grid.clone()
    grid[0][m.to(grid.device)] = code
    with _inference(model):
        return model.decode_indices(grid)[0].cpu()


# ------------------------------------------------------------------- per-code gallery
def code_gallery(model, images, code, top: int = 16, *, codes: torch.Tensor | None = None,
                 batch_size: int = 256) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """Images using `code` most: [(image_index, count, [(row, col), ...])], by count then index.
    Pass codes=dataset_codes(model, images) to avoid re-encoding the images on every call."""
    _require_codebook(model, "code gallery")
    c = _check_code(model, code)
    top = _int(top, "top")
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    if codes is None:
        codes = dataset_codes(model, images, batch_size)
    codes = torch.as_tensor(codes).cpu()
    hits = codes == c
    counts = hits.flatten(1).sum(1)
    order = sorted((i for i in torch.nonzero(counts).flatten().tolist()), key=lambda i: (-int(counts[i]), i))
    return [(i, int(counts[i]), [tuple(p) for p in hits[i].nonzero().tolist()]) for i in order[:top]]


def mean_patch(model, code, images=None, *, codes: torch.Tensor | None = None, max_positions: int = 512,
               batch_size: int = 256) -> torch.Tensor:
    """Mean decoded patch of a code, (C, W, W) with W the decoder's receptive field of one cell.

    With images: the average, over (up to max_positions, first in dataset order) cells that use
    the code, of the window of the image's RECONSTRUCTION centred on that cell (pixels outside the
    image are left out of the average; pixels no window covers are 0). Without images, or if no
    image uses the code: the same window around the centre cell of a grid filled with the code.
    """
    _require_codebook(model, "mean patch")
    c = _check_code(model, code)
    n, size = model.cfg.latent_size, model.cfg.image_size
    t0, b0, l0, _ = cell_pixel_box(model, 0, 0, clip=False)
    width, scale = b0 - t0, size // n
    pad = max(-t0, b0 - scale)
    positions = []
    if images is not None or codes is not None:
        if codes is None:
            codes = dataset_codes(model, images, batch_size)
        positions = (torch.as_tensor(codes).cpu() == c).nonzero()[:max(1, _int(max_positions, "max_positions"))]
    if len(positions) == 0:
        grid = torch.full((1, n, n), c, dtype=torch.long)
        positions, source = torch.tensor([[0, n // 2, n // 2]]), grid
    else:
        source = torch.as_tensor(codes).cpu()
    total = torch.zeros(model.cfg.image_channels, width, width)
    count = torch.zeros(1, width, width)
    with _inference(model):
        used = positions[:, 0].unique()
        for i in range(0, len(used), batch_size):
            batch = used[i:i + batch_size]
            dec = model.decode_indices(source[batch].to(_device(model))).cpu()
            dec = torch.nn.functional.pad(dec, (pad, pad, pad, pad))
            inside = torch.nn.functional.pad(torch.ones(1, size, size), (pad, pad, pad, pad))
            where = {int(img): j for j, img in enumerate(batch)}
            for img, r, col in positions[torch.isin(positions[:, 0], batch)].tolist():
                top, left = r * scale + t0 + pad, col * scale + l0 + pad
                total += dec[where[img], :, top:top + width, left:left + width]
                count += inside[:, top:top + width, left:left + width]
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros(()))


# ------------------------------------------------------------------ memorisation check
def nearest_images(sample, images: torch.Tensor, top: int = 5, *, chunk_size: int = 4096
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest training images in pixel L2 of sample(s) (C, S, S) or (N, C, S, S): (indices, distances),
    each (top,) or (N, top), closest first. Candidates come from batched matrix products; the
    distances reported are recomputed exactly (an exact copy is at distance 0)."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty tensor (N, C, S, S), got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    if not images.is_floating_point():
        raise ValueError(f"expected float images in [0, 1], got dtype {images.dtype}")
    if not isinstance(sample, torch.Tensor):
        raise ValueError(f"sample must be a tensor (C, S, S) or (N, C, S, S), got {type(sample).__name__}")
    single = sample.ndim == 3
    s = sample.unsqueeze(0) if single else sample
    if s.ndim != 4 or tuple(s.shape[1:]) != tuple(images.shape[1:]):
        raise ValueError(f"sample has shape {tuple(sample.shape)} but the images are "
                         f"{tuple(images.shape[1:])} (C, S, S): image size and channel count must match")
    n = images.shape[0]
    top = _int(top, "top")
    if not 1 <= top <= n:
        raise ValueError(f"top must be in [1, {n}] (the number of images), got {top}")
    dev = images.device
    a = s.to(dev, torch.float32).flatten(1)
    a2 = a.pow(2).sum(1, keepdim=True)
    keep = min(n, 2 * top + 16)                   # slack for rounding of the expanded distance
    best_d = torch.full((a.shape[0], 0), math.inf, device=dev)
    best_i = torch.empty((a.shape[0], 0), dtype=torch.long, device=dev)
    for i in range(0, n, chunk_size):
        b = images[i:i + chunk_size].to(torch.float32).flatten(1)
        d2 = a2 - 2 * a @ b.t() + b.pow(2).sum(1)[None]
        d = torch.cat([best_d, d2], 1)
        idx = torch.cat([best_i, torch.arange(i, i + b.shape[0], device=dev).expand(a.shape[0], -1)], 1)
        best_d, pos = torch.topk(d, min(keep, d.shape[1]), dim=1, largest=False)
        best_i = idx.gather(1, pos)
    exact = (images[best_i].to(torch.float32).flatten(2) - a[:, None]).pow(2).sum(2).sqrt()
    # stable sort by (distance, index): pre-sort candidates by index, then stably by distance
    by_index = torch.argsort(best_i, dim=1)
    best_i, exact = best_i.gather(1, by_index), exact.gather(1, by_index)
    order = torch.argsort(exact, dim=1, stable=True)[:, :top]
    ind, dist = best_i.gather(1, order).cpu(), exact.gather(1, order).cpu()
    return (ind[0], dist[0]) if single else (ind, dist)
