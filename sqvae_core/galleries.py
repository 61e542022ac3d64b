"""Galleries: which images use a code, what it looks like on average, and the nearest training
images of a sample (a memorisation check), for a model of models.build_model."""
from __future__ import annotations

import math

import torch

from .codespace import as_int, check_code, dataset_codes, device_of, inference, require_codebook
from .edits import cell_pixel_box


def code_gallery(model, images, code, top: int = 16, *, codes: torch.Tensor | None = None,
                 batch_size: int = 256) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """Images using `code` most: [(image_index, count, [(row, col), ...])], by count then index.
    Pass codes=dataset_codes(model, images) to avoid re-encoding the images on every call."""
    require_codebook(model, "code gallery")
    c = check_code(model, code)
    top = as_int(top, "top")
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
    require_codebook(model, "mean patch")
    c = check_code(model, code)
    n, size = model.cfg.latent_size, model.cfg.image_size
    t0, b0, l0, _ = cell_pixel_box(model, 0, 0, clip=False)
    width, scale = b0 - t0, size // n
    pad = max(-t0, b0 - scale)
    positions = []
    if images is not None or codes is not None:
        if codes is None:
            codes = dataset_codes(model, images, batch_size)
        positions = (torch.as_tensor(codes).cpu() == c).nonzero()[:max(1, as_int(max_positions, "max_positions"))]
    if len(positions) == 0:
        grid = torch.full((1, n, n), c, dtype=torch.long)
        positions, source = torch.tensor([[0, n // 2, n // 2]]), grid
    else:
        source = torch.as_tensor(codes).cpu()
    total = torch.zeros(model.cfg.image_channels, width, width)
    count = torch.zeros(1, width, width)
    with inference(model):
        used = positions[:, 0].unique()
        for i in range(0, len(used), batch_size):
            batch = used[i:i + batch_size]
            dec = model.decode_indices(source[batch].to(device_of(model))).cpu()
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
    top = as_int(top, "top")
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
