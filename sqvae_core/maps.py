"""Codebook maps: 2-D UMAP / PCA maps of a code space's codebook, one dict per code.

    codebook_map(space, usage)                 2-D UMAP / PCA map of the codebook, one dict per code
    aligned_maps(codebooks, usages)            maps of training snapshots that do not jump between frames
    cached_codebook_map(run_dir, space, usage) codebook_map stored in RUN_DIR/umap.json and reused

`space`: a codespace.CodeSpace (a model is taken as its ModelSpace). Distances follow the space's
metric: Euclidean, or cosine for vMF / NC (rows unit-normalised). umap-learn is imported lazily
(on the first UMAP map); numba's on-disk cache is switched on for umap's jitted functions so only
the very first process on a machine pays the JIT.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from .codespace import as_int, as_space, require_codebook
from .rundir import MAPS, MAX_JSON_BYTES, BundleError, atomic_write_json, read_json

log = logging.getLogger(__name__)

MAP_FILE = MAPS                  # cache of codebook maps inside a run directory
MAP_CACHE_ENTRIES = 8            # most recent maps kept in MAP_FILE
MAP_METHODS = ("umap", "pca")
CHAIN_LEARNING_RATE = 0.25       # UMAP learning rate of a snapshot initialised from the next frame


def _codebook_array(space) -> np.ndarray:
    """The space's codebook (K, d) as float32 numpy (unit rows for vMF / NC)."""
    require_codebook(getattr(space, "model", None), "codebook map")
    return space.codebook.float().numpy().copy()


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
    n = as_int(n_neighbors, "n_neighbors")
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
    return _umap_embed(x, metric=metric, n_neighbors=_neighbours_for(k, n_neighbors), seed=as_int(seed, "seed"),
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


def codebook_map(space, usage: torch.Tensor | None = None, *, method: str = "umap", seed: int = 0,
                 n_neighbors: int | None = None, init=None) -> list[dict]:
    """2-D map of the codebook (UMAP, or instant PCA), one {code, x, y, usage, dead} per code."""
    space = as_space(space)
    metric = space.metric
    x = _prepare(_codebook_array(space), metric)
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
    a snapshot identical to the next one reuses its layout. Pass metric=space.metric for
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


def cached_codebook_map(run_dir, space, usage: torch.Tensor | None = None, method: str = "umap", seed: int = 0,
                        *, n_neighbors: int | None = None) -> list[dict]:
    """codebook_map whose coordinates are stored in RUN_DIR/umap.json and reused while the codebook,
    method and seed are unchanged (usage/dead flags always come from the usage passed in)."""
    space = as_space(space)
    metric, seed = space.metric, as_int(seed, "seed")
    x = _prepare(_codebook_array(space), metric)
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

