"""One code space: what the code tools (maps.py, edits.py) need of a discrete latent model.

    space.codebook        (K, d) float tensor on the CPU (BundleError / ValueError when there is none)
    space.codebook_size   K
    space.metric          "euclidean" or "cosine" (vMF / NC: unit-norm codes; kinds.py)
    space.grid_shape      the shape of one code grid, (H, W)
    space.decode(grids)   images (B, C, S, S) in [0, 1] on the CPU from code grids (B, *grid_shape)
    space.example_grids   (B, *grid_shape) long: code grids to edit (a bundle: its images' codes)
    space.example_images  (B, C, S, S) or None: the images those grids came from

Two kinds satisfy it: `ModelSpace(model, images)` around a model of models.build_model (a Bundle's),
and runlogger.LoggedDecoder, the decoder a RunLogger run saved. Functions of maps.py and edits.py
take either, or a model itself (`as_space`).

Also here, the helpers every tool shares: codes of images (`dataset_codes`, `code_usage`), eval
mode under no_grad (`inference`), and the checks of codes, cells and images that turn bad input
into one-line ValueErrors.
"""
from __future__ import annotations

import contextlib
import operator
from typing import Protocol, runtime_checkable

import torch

from .kinds import KINDS
from .models import check_images


@runtime_checkable
class CodeSpace(Protocol):
    codebook_size: int
    metric: str
    grid_shape: tuple[int, ...]

    @property
    def codebook(self) -> torch.Tensor: ...

    def decode(self, indices: torch.Tensor) -> torch.Tensor: ...

    @property
    def example_grids(self) -> torch.Tensor: ...

    @property
    def example_images(self) -> torch.Tensor | None: ...


# ------------------------------------------------------------------------ small helpers
def device_of(model: torch.nn.Module) -> torch.device:
    """The device of the model's parameters."""
    return next(model.parameters()).device


@contextlib.contextmanager
def inference(model: torch.nn.Module):
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


def require_codebook(model, what: str) -> None:
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


def as_int(value, name: str) -> int:
    """A Python int from an int-like value (int, numpy int, 0-dim integer tensor); bools refused."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
            return int(value)
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def check_code(space, code, name: str = "code") -> int:
    """A valid code index in [0, K) as an int, else ValueError('code 300 is out of range ...')."""
    c = as_int(code, name)
    k = as_space(space).codebook_size
    if not 0 <= c < k:
        raise ValueError(f"{name} {c} is out of range for a codebook of K={k} (valid codes are 0..{k - 1})")
    return c


def as_images(model, x, name: str = "images") -> torch.Tensor:
    """(C, S, S) or (B, C, S, S) float images of the model's shape, on the model's device."""
    if isinstance(x, torch.Tensor) and x.ndim == 3:
        x = x.unsqueeze(0)
    try:
        check_images(x, model.cfg)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    return x.to(device_of(model))


def as_grid(space, indices) -> torch.Tensor:
    """One code grid (H, W) or (1, H, W) of valid integer codes as a (1, H, W) long CPU tensor."""
    space = as_space(space)
    shape, k = tuple(space.grid_shape), space.codebook_size
    t = torch.as_tensor(indices)
    if t.ndim == len(shape) + 1 and t.shape[0] == 1:
        t = t[0]
    if tuple(t.shape) != shape:
        want = ", ".join(map(str, shape))
        raise ValueError(f"expected one code grid of shape ({want}) or (1, {want}), got {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"a code grid must hold integer code indices, got dtype {t.dtype}")
    t = t.long()
    bad = (t < 0) | (t >= k)
    if bool(bad.any()):
        where = tuple(int(v) for v in bad.nonzero()[0])
        cell = f"(row {where[0]}, col {where[1]})" if len(where) == 2 else str(where)
        raise ValueError(f"code {int(t[where])} at cell {cell} is out of range for a "
                         f"codebook of K={k} (valid codes are 0..{k - 1})")
    return t.unsqueeze(0).cpu()


def check_cell(space, row, col) -> tuple[int, int]:
    """(row, col) of a cell inside the (square) code grid, else ValueError."""
    space = as_space(space)
    n = space.grid_shape[0]
    r, c = as_int(row, "row"), as_int(col, "col")
    if len(space.grid_shape) != 2 or not (0 <= r < n and 0 <= c < space.grid_shape[1]):
        raise ValueError(f"cell (row {r}, col {c}) is outside the {n}x{n} code grid "
                         f"(rows and cols are 0..{n - 1})")
    return r, c


# --------------------------------------------------------------------- codes and usage
def dataset_codes(model, images, batch_size: int = 256) -> torch.Tensor:
    """Deterministic code grids (N, H, W) of all images, computed in batches (CPU long tensor)."""
    require_codebook(model, "codes")
    if isinstance(images, torch.Tensor) and images.ndim == 3:
        images = images.unsqueeze(0)
    check_images(images, model.cfg)
    batch_size = max(1, as_int(batch_size, "batch_size"))
    out = []
    with inference(model):
        for i in range(0, images.shape[0], batch_size):
            out.append(model.codes(as_images(model, images[i:i + batch_size])).cpu())
    n = model.cfg.latent_size
    return torch.cat(out) if out else torch.empty(0, n, n, dtype=torch.long)


def code_usage(model, images, batch_size: int = 256) -> torch.Tensor:
    """How many cells of the images use each code (deterministic codes): LongTensor (K,)."""
    require_codebook(model, "code usage")
    codes = dataset_codes(model, images, batch_size)
    return torch.bincount(codes.reshape(-1), minlength=model.cfg.codebook_size)


# ----------------------------------------------------------------------- the two spaces
class ModelSpace:
    """A model of models.build_model as a CodeSpace: its codebook and metric, decode_indices, and
    the codes of `images` (computed on first use, or given as `grids`) as example grids."""

    def __init__(self, model: torch.nn.Module, images: torch.Tensor | None = None,
                 grids: torch.Tensor | None = None):
        self.model, self.example_images, self._grids = model, images, grids
        self.codebook_size = model.cfg.codebook_size
        self.metric = code_metric(model)
        n = model.cfg.latent_size
        self.grid_shape = (n, n)

    @property
    def codebook(self) -> torch.Tensor:
        require_codebook(self.model, "codebook")
        with inference(self.model):
            return self.model.codebook_vectors().detach().float().cpu()

    def decode(self, indices: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        require_codebook(self.model, "decode codes")
        indices = torch.as_tensor(indices).long()
        with inference(self.model):
            return torch.cat([self.model.decode_indices(indices[i:i + batch_size].to(device_of(self.model))).cpu()
                              for i in range(0, max(1, len(indices)), batch_size)])

    @property
    def example_grids(self) -> torch.Tensor:
        if self._grids is None:
            if self.example_images is None:
                raise ValueError("this code space has no example images to take code grids from")
            self._grids = dataset_codes(self.model, self.example_images)
        return self._grids


def as_space(x) -> CodeSpace:
    """A CodeSpace as it is; a model (nn.Module) as its ModelSpace."""
    return ModelSpace(x) if isinstance(x, torch.nn.Module) else x
