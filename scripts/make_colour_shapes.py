"""A small generated colour image set: quick colour data for tests and demos.

    python scripts/make_colour_shapes.py OUT_DIR [--n 3000] [--size 64] [--seed 0]

Each image is a two-colour gradient background with 1-4 filled shapes (ellipses, rectangles,
triangles) in random colours, some with a darker outline: colour, edges and layout vary, so a
model must learn colour to reconstruct it. It was the shipped colour bundle's data until that
bundle moved to real photographs (scripts/make_colour_photos.py). Deterministic: the same seed writes the
same bytes (PNG files OUT_DIR/shape_00000.png ...). The command that made them is kept in
OUT_DIR/.sqvae_rebuild (sqvae_core.data.REBUILD_FILE): a run trained on the folder stores it, and
`sqvae eval` names it when the folder is missing.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def make_image(rng: np.random.Generator, size: int) -> Image.Image:
    a, b = np.array(_colour(rng), np.float32), np.array(_colour(rng), np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
    t = np.clip((np.cos(angle) * xx + np.sin(angle) * yy) + 0.5, 0, 1)[..., None]
    img = Image.fromarray((a * (1 - t) + b * t).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 5))):
        w, h = rng.uniform(0.2, 0.6, 2) * size
        x0, y0 = rng.uniform(-0.1, 1.0, 2) * size - (w / 2, h / 2)
        box = [float(x0), float(y0), float(x0 + w), float(y0 + h)]
        fill = _colour(rng)
        outline = tuple(c // 3 for c in fill) if rng.random() < 0.5 else None
        kind = rng.integers(0, 3)
        if kind == 0:
            draw.ellipse(box, fill=fill, outline=outline, width=2)
        elif kind == 1:
            draw.rectangle(box, fill=fill, outline=outline, width=2)
        else:
            pts = [(float(x), float(y)) for x, y in rng.uniform(0, 1, (3, 2)) * (w, h) + (x0, y0)]
            draw.polygon(pts, fill=fill, outline=outline)
    return img


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out")
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(a.seed)
    for i in range(a.n):
        make_image(rng, a.size).save(out / f"shape_{i:05d}.png", optimize=False)
    (out / ".sqvae_rebuild").write_text(
        f"python scripts/make_colour_shapes.py {a.out} --n {a.n} --size {a.size}"
        + (f" --seed {a.seed}" if a.seed else "") + "\n")
    print(f"wrote {a.n} images of {a.size}x{a.size} to {out}")


if __name__ == "__main__":
    main()
