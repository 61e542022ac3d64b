"""Explore's side of a logged run (sqvae_core.runlogger): the decoder saved with
RunLogger.save_decoder, cached per file, and the Neighbor-k and code-edit images made with it.

A logged run has no model to rebuild; only when its config.json has a "decoder" and the run lies
under a local root (never an upload: torch.export.load may unpickle parts of decoder.pt2) are its
codes decoded here. The code math (ranking codes in the saved codebook) is the decoder's own.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import streamlit as st

from app import settings
from app.cache import torch_ready
from app.runs import RunRef, file_sig


def decoder_offered(ref: RunRef, config) -> bool:
    """A saved decoder the app may load: in config.json (a sqvae_core.rundir.RunConfig), and the run not an upload."""
    return config.decoder is not None and ref.source in settings.SOURCES and \
        ref.name.split("/")[0] != settings.UPLOADS


@st.cache_resource(max_entries=4, show_spinner=False)
def _decoder(path: str, sig: tuple):
    from sqvae_core.runlogger import load_decoder
    return load_decoder(path)


def decoder(path: Path):
    """The run's LoggedDecoder (re-loaded when decoder.pt2 or codes.safetensors change); BundleError if broken."""
    from sqvae_core.runlogger import CODES, DECODER
    torch_ready()
    return _decoder(str(path), (file_sig(Path(path) / DECODER), file_sig(Path(path) / CODES)))


def _images(x) -> np.ndarray:
    return x.detach().float().clamp(0, 1).numpy()


def originals(dec, n: int) -> np.ndarray | None:
    """The images saved with the codes (first n), or None."""
    return None if dec.images is None else _images(dec.images[:n])


def neighbour_images(path: Path, k: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(decoded codes, Neighbor-k decoded) of the first n saved code grids, (n, C, S, S) each."""
    from sqvae_core.edits import neighbour_grids
    dec = decoder(path)
    codes = dec.indices[:n]
    return _images(dec.decode(codes)), _images(neighbour_grids(dec, k, codes)[0])


def decode_grid(path: Path, grid: np.ndarray) -> np.ndarray:
    """One code grid (H, W) decoded: (C, S, S)."""
    import torch
    return _images(decoder(path).decode(torch.as_tensor(np.asarray(grid), dtype=torch.long)[None]))[0]


def candidates(path: Path, code: int, n: int) -> tuple[list[int], np.ndarray]:
    """The n codes nearest to `code` in the saved codebook (itself first) and every code's distance to it."""
    from sqvae_core.edits import candidate_codes, code_distances
    dec = decoder(path)
    return candidate_codes(dec, code, min(n, dec.codebook_size)).tolist(), code_distances(dec, code).numpy()
