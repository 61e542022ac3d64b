"""Image grids to PNG (Pillow), for the CLI's figures and the app's downloads."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch


def to_grid(images: torch.Tensor, nrow: int = 8, pad: int = 2, pad_value: float = 1.0) -> np.ndarray:
    """(N, C, H, W) in [0, 1] -> uint8 array (rows*H', cols*W', C) with `pad` pixels between tiles."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N, 1|3, H, W), got {tuple(images.shape)}")
    n, c, h, w = images.shape
    cols = max(1, min(nrow, n))
    rows = (n + cols - 1) // cols
    grid = torch.full((c, rows * (h + pad) + pad, cols * (w + pad) + pad), pad_value)
    for i, img in enumerate(images.detach().float().cpu().clamp(0, 1)):
        r, q = divmod(i, cols)
        grid[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = img
    return (grid.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def png_bytes(images: torch.Tensor, nrow: int = 8, scale: int = 1) -> bytes:
    from PIL import Image
    arr = to_grid(images, nrow)
    img = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def save_png(images: torch.Tensor, path: str | Path, nrow: int = 8, scale: int = 1) -> Path:
    from .rundir import atomic_write_bytes
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"output must be a .png file, got {path}")
    if not path.parent.exists():
        raise ValueError(f"output folder does not exist: {path.parent}")
    atomic_write_bytes(path, png_bytes(images, nrow, scale))
    return path
