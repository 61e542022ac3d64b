"""Image arrays for display and download: grids, a marked box, PNG bytes (numpy only)."""
from __future__ import annotations

import io

import numpy as np


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


def mark_box(image: np.ndarray, box) -> np.ndarray:
    """(C,H,W) in [0,1] -> RGB (3,H,W) with a red rectangle on box = (top, bottom, left, right)."""
    rgb = np.repeat(image, 3, axis=0) if image.shape[0] == 1 else image.copy()
    t, b, l, r = box
    red = np.array([1.0, 0.1, 0.1])[:, None]
    rgb[:, t, l:r] = red
    rgb[:, b - 1, l:r] = red
    rgb[:, t:b, l] = red
    rgb[:, t:b, r - 1] = red
    return rgb


def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()
