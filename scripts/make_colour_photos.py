"""Colour photographs cut into patches: the data of the shipped colour bundle.

    python scripts/make_colour_photos.py OUT_DIR [--size 32] [--seed 0] [--photos astronaut,coffee,...]

Needs scikit-image (requirements-dev.txt; `pip install scikit-image`) and scikit-learn (installed
with umap-learn, a requirement). The photographs are those the two wheels carry inside them, no
download: scikit-image's `skimage.data` astronaut, chelsea, coffee, hubble_deep_field,
immunohistochemistry, retina, rocket, stereo_motorcycle (left view), and scikit-learn's sample
images china and flower: 10 real colour photographs. (`skimage.data`'s other colour images are
either synthetic, such as colorwheel and logo, or fetched with pooch at first use.)

Each photo is resized (Lanczos) so that its shorter side is 8*size pixels (the fine scale) and
also to 4*size (the coarse scale: more of the scene per patch). Patches of size x size are taken
every size/4 pixels at both scales. The split holds out regions, not patches: the fine-scale photo
is cut into blocks of 2*size x 2*size, and in every photo a fixed-seed 15% of its blocks go to val
and 15% to test. A patch belongs to a split when every pixel it covers (at the fine scale) lies in
blocks of that split; patches across blocks of different splits are dropped, so no test patch
shares a pixel with a training patch.

The product's folder data set splits a folder by a fixed-seed 80/10/10 permutation of its sorted
file list (sqvae_core.data._split_order, seed 0). This script draws exactly 80/10/10 patches from
the three pools (fixed seed, the largest count the pools allow) and names the files so that the
permutation puts each pool's patches in its own split: `sqvae train --dataset folder:OUT_DIR`
trains on the training regions, validates on the val regions, and `sqvae eval` tests on the test
regions. OUT_DIR/patches.csv says, for each file, its split, photo, scale and position; the
command that made the folder is kept in OUT_DIR/.sqvae_rebuild (sqvae_core.data.REBUILD_FILE),
which a run trained on it stores and `sqvae eval` names when the folder is missing.

Deterministic: the same arguments (and the same Pillow, scikit-image and scikit-learn files) write
the same bytes.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from sqvae_core.data import REBUILD_FILE, _split_order  # noqa: E402

#: the photographs, in a fixed order (load_photo reads them)
PHOTOS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "retina",
          "rocket", "stereo_motorcycle", "china", "flower")
SPLITS = ("train", "val", "test")
HELD_OUT = 0.15             # fraction of each photo's blocks for val, and again for test
SPLIT_SEED = 0              # the seed the product's folder split uses (load_dataset's default)


def load_photo(name: str) -> np.ndarray:
    """uint8 (H, W, 3) of one photograph, read from the installed wheels (no download)."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image
        img = load_sample_image(f"{name}.jpg")
    else:
        import skimage.data
        img = getattr(skimage.data, name)()
        if name == "stereo_motorcycle":
            img = img[0]                      # (left, right, disparity): the left view
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"{name}: expected an RGB uint8 photo, got {img.dtype} {img.shape}")
    return img


def resize_short(img: np.ndarray, short: int) -> np.ndarray:
    h, w = img.shape[:2]
    f = short / min(h, w)
    size = (max(short, round(w * f)), max(short, round(h * f)))
    return np.asarray(Image.fromarray(img).resize(size, Image.LANCZOS))


def block_splits(h: int, w: int, block: int, rng: np.random.Generator) -> np.ndarray:
    """(rows, cols) int array over the fine-scale photo: 0 train, 1 val, 2 test."""
    rows, cols = -(-h // block), -(-w // block)
    n = rows * cols
    k = max(1, round(HELD_OUT * n))
    perm = rng.permutation(n)
    grid = np.zeros(n, np.int64)
    grid[perm[:k]] = 1
    grid[perm[k:2 * k]] = 2
    return grid.reshape(rows, cols)


def photo_pools(name: str, img: np.ndarray, size: int, rng: np.random.Generator):
    """The patches of one photo by split: {split: [(scale, y, x, patch uint8 (size, size, 3))]}."""
    fine = resize_short(img, 8 * size)
    block, stride = 2 * size, size // 4
    grid = block_splits(fine.shape[0], fine.shape[1], block, rng)
    pools = {s: [] for s in SPLITS}
    for scale, factor in (("fine", 1), ("coarse", 2)):      # factor: fine pixels per pixel
        im = fine if factor == 1 else resize_short(img, 8 * size // factor)
        h, w = im.shape[:2]
        for y in range(0, h - size + 1, stride):
            for x in range(0, w - size + 1, stride):
                # blocks under the patch's footprint on the fine photo (clipped to it)
                y0, y1 = y * factor, min((y + size) * factor, fine.shape[0]) - 1
                x0, x1 = x * factor, min((x + size) * factor, fine.shape[1]) - 1
                under = np.unique(grid[y0 // block:y1 // block + 1, x0 // block:x1 // block + 1])
                if len(under) == 1:
                    pools[SPLITS[int(under[0])]].append((scale, y, x, im[y:y + size, x:x + size]))
    return pools


def build(out: Path, size: int = 32, seed: int = 0, photos=PHOTOS) -> dict:
    """Write the folder; -> {"photos": [...], "train": n, "val": n, "test": n}."""
    if size % 4:
        raise ValueError(f"--size must be a multiple of 4, got {size}")
    rng = np.random.default_rng(seed)
    pools = {s: [] for s in SPLITS}
    for name in photos:
        for s, items in photo_pools(name, load_photo(name), size, rng).items():
            pools[s] += [(name, *it) for it in items]
    # the largest n with an exact 80/10/10 the pools can fill (the product's split sizes)
    n = len(pools["train"]) + len(pools["val"]) + len(pools["test"])
    while (n - 2 * int(round(0.1 * n)) > len(pools["train"])
           or int(round(0.1 * n)) > min(len(pools["val"]), len(pools["test"]))):
        n -= 1
    order, bounds = _split_order(n, SPLIT_SEED)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("patch_*.png"):
        old.unlink()
    rows = []
    counts = {}
    for s in SPLITS:
        a, b = bounds[s]
        pick = rng.choice(len(pools[s]), size=b - a, replace=False)   # a shuffled subset: mixed photos
        files = np.sort(order[a:b])                                    # the file indices of split s
        counts[s] = b - a
        for i, j in zip(files, pick):
            name, scale, y, x, patch = pools[s][j]
            fname = f"patch_{int(i):05d}.png"
            Image.fromarray(np.ascontiguousarray(patch)).save(out / fname, optimize=False)
            rows.append((fname, s, name, scale, y, x))
    rows.sort()
    with open(out / "patches.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(("file", "split", "photo", "scale", "y", "x"))
        w.writerows(rows)
    cmd = (f"python scripts/make_colour_photos.py {out} --size {size}" + (f" --seed {seed}" if seed else "")
           + (f" --photos {','.join(photos)}" if tuple(photos) != PHOTOS else ""))
    (out / REBUILD_FILE).write_text(cmd + "\n")
    return {"photos": list(photos), **counts}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out")
    p.add_argument("--size", type=int, default=32, help="patch side in pixels (a multiple of 4; default 32)")
    p.add_argument("--seed", type=int, default=0, help="the seed of the held-out blocks and the patch draw")
    p.add_argument("--photos", default=",".join(PHOTOS),
                   help=f"comma-separated subset of the photos (default: all {len(PHOTOS)})")
    a = p.parse_args(argv)
    photos = tuple(n for n in a.photos.split(",") if n)
    unknown = sorted(set(photos) - set(PHOTOS))
    if unknown or not photos:
        p.error(f"--photos: unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(PHOTOS)}")
    try:
        got = build(Path(a.out), a.size, a.seed, photos)
    except ImportError as e:
        sys.exit(f"make_colour_photos.py: {e}; install scikit-image (pip install scikit-image)")
    print(f"wrote {got['train']} train, {got['val']} val and {got['test']} test patches of {a.size}x{a.size} "
          f"from {len(got['photos'])} photos to {a.out}")


if __name__ == "__main__":
    main()
