"""Edits in a code space: rank codes by codebook distance, the paper's Neighbor-k, one-cell edits,
and (with a model) latent interpolation and the pixels a cell reaches.

    code_distances / candidate_codes(space, code)   codes by distance from one code (itself first)
    kth_neighbours(space, k) / neighbour_grids      the paper's Neighbor-k replacement, decoded
    edit_code(space, grid, row, col, code)          decode a grid with one cell changed
    paint_codes(space, grid, mask, code)            ... with a painted region changed
    neighbour_edit(model, images, k)                Neighbor-k of images (their codes, then decoded)
    interpolate(model, x_a, x_b)                    latent-space path vs. pixel-space mixture
    cell_pixel_box(model, row, col)                 the pixels a change of one cell can reach

`space`: a codespace.CodeSpace (a model is taken as its ModelSpace, a RunLogger decoder as it is).
Neighbour ranks follow the paper's Neighbor-k: codes are ranked by distance INCLUDING the code
itself at rank 1, so Neighbor-1 is the identity (the plain reconstruction) and Neighbor-k replaces
every code by its (k-1)-th nearest OTHER code; ties are broken by code index.
"""
from __future__ import annotations

import math

import torch

from .codespace import (as_grid, as_images, as_int, as_space, check_cell, check_code, dataset_codes, inference,
                        require_codebook)
from .rundir import BundleError

MAX_INTERPOLATION_STEPS = 256


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


def _space(x, what: str):
    """x as a CodeSpace, ValueError for the continuous VAE (no codebook)."""
    require_codebook(x, what)
    return as_space(x)


def _codebook(space) -> torch.Tensor:
    """The space's codebook (K, d); BundleError for a RunLogger decoder saved without one."""
    cb = space.codebook
    if cb is None:
        raise BundleError("the run saved no codebook with its decoder (pass codebook= to log() before save_decoder)")
    return cb


def code_distances(space, code) -> torch.Tensor:
    """Distances (K,) from one code to every code under the space's metric (float64)."""
    space = _space(space, "codebook distances")
    c = check_code(space, code)
    return _distance_rows(_codebook(space), torch.tensor([c]), space.metric)[0]


def candidate_codes(space, code, n: int | None = None) -> torch.Tensor:
    """Codes sorted by codebook distance from `code` (the code itself first), the first n of them."""
    space = _space(space, "candidate codes")
    c = check_code(space, code)
    k = space.codebook_size
    n = k if n is None else as_int(n, "n")
    if not 1 <= n <= k:
        raise ValueError(f"n must be in [1, K={k}], got {n}")
    return _ranked(_codebook(space), torch.tensor([c]), space.metric)[0, :n].clone()


def kth_neighbours(space, k: int, chunk: int = 1024) -> torch.Tensor:
    """Neighbor-k map (K,): rank-k code of each code, the code itself being rank 1 (k=1: identity)."""
    space = _space(space, "Neighbor-k")
    size = space.codebook_size
    k = as_int(k, "k")
    if not 1 <= k <= size:
        raise ValueError(f"Neighbor-k needs k in [1, K={size}] (k=1 is the code itself), got {k}")
    cb, metric = _codebook(space), space.metric
    out = torch.empty(size, dtype=torch.long)
    for i in range(0, size, chunk):
        rows = torch.arange(i, min(i + chunk, size))
        out[rows] = _ranked(cb, rows, metric)[:, k - 1]
    return out


def neighbour_grids(space, k: int, grids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbor-k of code grids (B, *grid_shape): every code replaced by its rank-k code.
    Returns (the edited grids decoded (B, C, S, S), the edited grids)."""
    space = _space(space, "Neighbor-k")
    codes = kth_neighbours(space, k)[torch.as_tensor(grids).long().cpu()]
    return space.decode(codes), codes


def neighbour_edit(model, images, k: int, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbor-k edit of images: their codes (dataset_codes), each replaced by its rank-k code, decoded.
    Returns (edited images (B, C, S, S), edited code grids (B, H, W))."""
    return neighbour_grids(model, k, dataset_codes(model, images, batch_size))


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
    steps = as_int(steps, "steps")
    if not 2 <= steps <= MAX_INTERPOLATION_STEPS:
        raise ValueError(f"steps must be in [2, {MAX_INTERPOLATION_STEPS}], got {steps}")
    a, b = as_images(model, x_a, "x_a"), as_images(model, x_b, "x_b")
    if a.shape[0] != 1 or b.shape[0] != 1:
        raise ValueError(f"interpolate takes one image each, got batches of {a.shape[0]} and {b.shape[0]}")
    t = torch.linspace(0, 1, steps, dtype=torch.float64)
    with inference(model):
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
    r, c = check_cell(model, row, col)
    (t, b), (lft, rgt) = _reach(model, r, r), _reach(model, c, c)
    if clip:
        s = model.cfg.image_size
        t, lft, b, rgt = max(t, 0), max(lft, 0), min(b, s - 1), min(rgt, s - 1)
    return t, b + 1, lft, rgt + 1


def edit_code(space, indices, row, col, new_code) -> torch.Tensor:
    """Decode a code grid with one cell (row, col) set to new_code: image (C, S, S)."""
    space = _space(space, "code edit")
    grid = as_grid(space, indices)
    r, c = check_cell(space, row, col)
    code = check_code(space, new_code)
    grid = grid.clone()
    grid[0, r, c] = code
    return space.decode(grid)[0]


def paint_codes(space, indices, mask, code) -> torch.Tensor:
    """Decode a code grid with every cell where mask (H, W) is True set to `code`: image (C, S, S)."""
    space = _space(space, "code painting")
    grid = as_grid(space, indices)
    code = check_code(space, code)
    n = space.grid_shape[0]
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
    return space.decode(grid)[0]

