"""Exploring a trained discrete-latent model: codebook maps, code edits, interpolation, galleries.

The tools live in three modules over one code space (codespace.py: a model's, or the decoder a
RunLogger run saved); this module re-exports them under their old names:

    maps.py       codebook_map, aligned_maps, cached_codebook_map    2-D UMAP / PCA maps of the codebook
    edits.py      code_distances, candidate_codes, kth_neighbours, neighbour_grids, neighbour_edit,
                  edit_code, paint_codes, interpolate, decode_latent_mix, cell_pixel_box
    galleries.py  code_gallery, mean_patch, nearest_images
    codespace.py  CodeSpace, ModelSpace, as_space, code_metric, dataset_codes, code_usage

Conventions:
  * Codes are always the deterministic (argmax) codes; every function runs the model in eval mode
    under no_grad (and restores train mode afterwards if it was set).
  * Inputs may live on any device (they are moved to the model's); every result is on the CPU.
  * Codebook distances: Euclidean for the Gaussian SQ-VAE and VQ-VAE kinds, cosine
    (1 - cos) for the vMF / NC kinds (kinds.py: metric "cosine"); ties are broken by code index.
  * Neighbour ranks follow the paper's Neighbor-k: the code itself is rank 1 (Neighbor-1 is the
    identity), Neighbor-k replaces every code by its (k-1)-th nearest OTHER code.
  * Bad input (a code >= K or < 0, a cell outside the grid, images of the wrong size or channel
    count) raises ValueError with a one-line message; the continuous VAE has no codebook, so
    codebook operations raise ValueError for it (interpolation works, in continuous space).
"""
from __future__ import annotations

from .codespace import CodeSpace, ModelSpace, as_space, code_metric, code_usage, dataset_codes
from .edits import (MAX_INTERPOLATION_STEPS, candidate_codes, cell_pixel_box, code_distances, decode_latent_mix,
                    edit_code, interpolate, kth_neighbours, neighbour_edit, neighbour_grids, paint_codes)
from .galleries import code_gallery, mean_patch, nearest_images
from .maps import MAP_CACHE_ENTRIES, MAP_FILE, MAP_METHODS, aligned_maps, cached_codebook_map, codebook_map

__all__ = [
    "CodeSpace", "ModelSpace", "as_space", "code_metric", "dataset_codes", "code_usage",
    "codebook_map", "aligned_maps", "cached_codebook_map", "MAP_FILE", "MAP_CACHE_ENTRIES", "MAP_METHODS",
    "code_distances", "candidate_codes", "kth_neighbours", "neighbour_grids", "neighbour_edit",
    "interpolate", "decode_latent_mix", "cell_pixel_box", "edit_code", "paint_codes", "MAX_INTERPOLATION_STEPS",
    "code_gallery", "mean_patch", "nearest_images",
]
