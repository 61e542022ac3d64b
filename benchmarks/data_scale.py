"""Start-up time and peak memory of training on a large folder of JPEGs (issue 22, item 5).

    python benchmarks/data_scale.py [--work /tmp/sqvae_data_scale] [--sizes 20000,200000]
                                    [--old PATH] [--old-max 20000]

For each size N it builds (once; reused when present) a flat folder of N JPEGs at CelebA's size,
178x218 (smooth random colour fields with a random ellipse: random-ish, ~10 kB each; made in parallel
over the CPUs), then runs, twice with the same empty cache directory ($XDG_CACHE_HOME under --work),

    sqvae train --steps 5 --image-size 64 --center-crop 140 --dataset folder:PATH

and prints for each run: the start-up time (launch until status.json says "running", i.e. data
opened and model built, the loop about to start), the whole command's wall time, and its peak RSS
(the child's own ru_maxrss from os.wait4, which counts the pages of the memory map it touched). The first run decodes the folder into the cache; the second opens the cache.

--old PATH runs the same command with the code checked out at PATH (for the figures before the
cache: `git worktree add --detach PATH 3268a27`) for sizes up to --old-max. The old code has no
disk cache, so its two runs cost the same; it is run once.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
W, H = 178, 218            # CelebA's aligned faces
CHUNK = 1000


def _make_chunk(args) -> int:
    folder, start, stop = args
    import numpy as np
    from PIL import Image, ImageDraw
    for i in range(start, stop):
        path = Path(folder) / f"{i + 1:06d}.jpg"
        if path.exists():
            continue
        rng = np.random.default_rng(i)
        small = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)          # a smooth colour field ...
        im = Image.fromarray(small).resize((W, H), Image.Resampling.BICUBIC)
        draw = ImageDraw.Draw(im)                                        # ... with a face-sized ellipse
        cx, cy, rx, ry = rng.integers(60, 118), rng.integers(80, 138), rng.integers(25, 60), rng.integers(30, 75)
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        tmp = path.with_suffix(".tmp")
        im.save(tmp, "JPEG", quality=90)
        os.replace(tmp, path)
    return stop - start


def make_folder(work: Path, n: int) -> Path:
    folder = work / f"jpegs_{n}"
    done = folder / ".complete"
    if done.is_file() and done.read_text().strip() == str(n):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    chunks = [(str(folder), s, min(s + CHUNK, n)) for s in range(0, n, CHUNK)]
    with ProcessPoolExecutor(max_workers=len(os.sched_getaffinity(0))) as pool:
        for _ in pool.map(_make_chunk, chunks):
            pass
    done.write_text(str(n))
    print(f"made {n} JPEGs in {folder} in {time.time() - t0:.0f} s", flush=True)
    return folder


def run_train(code: Path, folder: Path, out: Path, cache: Path) -> dict:
    """One `sqvae train` run of the code at `code`: start-up s, wall s, peak RSS of the child."""
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=str(code), XDG_CACHE_HOME=str(cache), SQVAE_OFFLINE="1")
    cmd = [sys.executable, "-m", "sqvae_core", "train", "--steps", "5", "--image-size", "64", "--center-crop", "140",
           "--dataset", f"folder:{folder}", "--out", str(out), "--quiet", "--no-compile"]
    t0 = time.time()
    with open(out.parent / f"{out.name}.stderr", "w") as err_file:
        proc = subprocess.Popen(cmd, cwd=str(code), env=env, stdout=subprocess.DEVNULL, stderr=err_file)
        startup, rusage, status = None, None, None
        while rusage is None:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)     # this child's own rusage, not the max of all
            if pid:
                rusage = ru
                break
            if startup is None:
                try:
                    if json.loads((out / "status.json").read_text()).get("state") == "running":
                        startup = time.time() - t0
                except (OSError, ValueError):
                    pass
            time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.time() - t0
    err = (out.parent / f"{out.name}.stderr").read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {err[-2000:]}")
    return {"startup": startup, "wall": wall, "peak_gb": rusage.ru_maxrss / 2 ** 20,   # ru_maxrss: KiB on Linux
            "stderr": [ln for ln in err.splitlines() if ln.startswith("folder:")]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/sqvae_data_scale")
    ap.add_argument("--sizes", default="20000,200000")
    ap.add_argument("--old", default=None, help="a checkout of the code before the cache (e.g. commit 3268a27)")
    ap.add_argument("--old-max", type=int, default=20000, help="run the old code only up to this size")
    ap.add_argument("--only-make", action="store_true", help="build the folders and stop")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    folders = {n: make_folder(work, n) for n in sizes}
    if args.only_make:
        return
    rows = []
    for n in sizes:
        if args.old and n <= args.old_max:
            r = run_train(Path(args.old), folders[n], work / "runs" / f"old_{n}", Path(tempfile.mkdtemp(dir=work)))
            rows.append((n, "old (3268a27), any start", r))
    for n in sizes:
        cache = work / "cache" / str(n)
        shutil.rmtree(cache, ignore_errors=True)
        for label in ("new, first start", "new, second start"):
            rows.append((n, label, run_train(ROOT, folders[n], work / "runs" / f"new_{n}", cache)))
    print(f"\n{'images':>8}  {'code':<28} {'start-up s':>10} {'wall s':>8} {'peak RSS GB':>11}")
    for n, label, r in rows:
        print(f"{n:>8}  {label:<28} {r['startup']:>10.1f} {r['wall']:>8.1f} {r['peak_gb']:>11.2f}")
    for n, label, r in rows:
        for line in r["stderr"]:
            print(f"[{n} {label}] {line}")


if __name__ == "__main__":
    main()
