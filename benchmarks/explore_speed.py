"""Speed of the interactive parts of sqvae_core.explore, on whatever device `auto` picks.

    python benchmarks/explore_speed.py [--device auto] [--repeats 20] [--fresh-numba-cache]
                                       [--size 28|32|64] [--no-umap]

Prints:
  * a single-code edit decoded with the paper preset's net for --size (28: Fashion-MNIST K=256,
    2 blocks, 7x7 codes; 32: CIFAR-10 K=512, 3 channels, 8x8; 64: CelebA K=512, 3 channels,
    6 blocks, 16x16): median of 20 round trips of explore.edit_code (validation + lookup + decode
    + copy to CPU); target < 50 ms
  * prior samples at that size: 16 code grids drawn by the app's PixelCNN (hidden 64, 8 layers)
    and decoded, the Prior samples tab's work, median of 3, one thread (the app's default)
  * UMAP of a 512x64 codebook, measured in a FRESH child process: the cold first call (includes
    importing umap and numba's JIT or loading its on-disk cache) and the warm second call;
    target < 3 s warm. --fresh-numba-cache points NUMBA_CACHE_DIR at an empty temp dir for the
    child, which shows the true first-ever cost on a machine (everything compiled from scratch).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


SIZES = {28: ("fashion-mnist", 1), 32: ("cifar10", 3), 64: ("folder:x", 3)}    # the preset per image size


def paper_model(size: int):
    from sqvae_core.config import ModelConfig
    from sqvae_core.models import build_model
    from sqvae_core.train import paper_preset
    m = paper_preset(SIZES[size][0], "gaussian_1")["model"]
    return build_model(ModelConfig(kind="gaussian_1", **m))


def bench_edit(device_name: str, repeats: int, size: int = 28) -> dict:
    import torch
    from sqvae_core import explore
    from sqvae_core.device import resolve_device

    device = resolve_device(device_name)
    torch.manual_seed(0)
    model = paper_model(size).to(device).eval()
    cfg = model.cfg
    n, k = cfg.latent_size, cfg.codebook_size
    grid = torch.randint(0, k, (n, n))
    out = {"device": str(device), "threads": torch.get_num_threads()}
    default_threads = torch.get_num_threads()
    for label, threads in (("", default_threads), ("1thread_", 1)):
        torch.set_num_threads(threads)
        explore.edit_code(model, grid, 3, 3, 5)            # warm-up (allocator, kernels)
        times = []
        for i in range(repeats):
            t = time.perf_counter()
            img = explore.edit_code(model, grid, i % n, (3 * i) % n, (17 * i) % k)
            times.append(time.perf_counter() - t)
        assert img.shape == (cfg.image_channels, size, size)
        out.update({f"{label}median_ms": 1e3 * statistics.median(times), f"{label}min_ms": 1e3 * min(times),
                    f"{label}max_ms": 1e3 * max(times)})
    torch.set_num_threads(default_threads)
    out["desc"] = (f"K={k}, d={cfg.code_dim}, num_rb={cfg.num_rb}, {cfg.image_channels}x{size}x{size}, "
                   f"{n}x{n} codes")
    return out


def bench_samples(size: int, n: int = 16, repeats: int = 3) -> dict:
    """n prior samples drawn (app-sized PixelCNN, untrained: same cost) and decoded, CPU, one thread
    (the app's default, SQVAE_APP_THREADS=1)."""
    import torch
    from sqvae_core.prior import GatedPixelCNN, PriorConfig
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = paper_model(size).eval()
    g = model.cfg.latent_size
    prior = GatedPixelCNN(PriorConfig(num_codes=model.cfg.codebook_size, height=g, width=g)).eval()
    times = []
    for i in range(repeats + 1):
        t = time.perf_counter()
        codes = prior.sample(n, generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            imgs = model.decode_indices(codes)
        times.append(time.perf_counter() - t)
    assert imgs.shape == (n, model.cfg.image_channels, size, size)
    torch.set_num_threads(threads)
    return {"median_s": statistics.median(times[1:]), "n": n, "grid": g}


def umap_child() -> None:
    """Runs in a fresh process: time import, cold and warm UMAP of a 512x64 codebook."""
    t0 = time.perf_counter()
    import torch
    from sqvae_core import explore, maps
    from sqvae_core.config import ModelConfig
    from sqvae_core.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="gaussian_1", codebook_size=512, code_dim=64, num_rb=2)).eval()
    usage = torch.randint(0, 50, (512,))
    t_setup = time.perf_counter() - t0
    t = time.perf_counter()
    maps._load_umap()
    t_import = time.perf_counter() - t
    t = time.perf_counter()
    a = explore.codebook_map(model, usage, method="umap", seed=0)
    t_cold = time.perf_counter() - t
    t = time.perf_counter()
    b = explore.codebook_map(model, usage, method="umap", seed=0)
    t_warm = time.perf_counter() - t
    t = time.perf_counter()
    explore.codebook_map(model, usage, method="pca")
    t_pca = time.perf_counter() - t
    print(json.dumps({"setup_s": t_setup, "import_s": t_import, "cold_s": t_cold, "warm_s": t_warm,
                      "pca_s": t_pca, "deterministic": a == b, "points": len(a),
                      "numba_cache_dir": os.environ.get("NUMBA_CACHE_DIR") or "(in-tree, next to umap's sources)"}))


def bench_umap(fresh_cache: bool) -> dict:
    env = dict(os.environ)
    tmp = None
    if fresh_cache:
        tmp = tempfile.TemporaryDirectory(prefix="numba-cache-")
        env["NUMBA_CACHE_DIR"] = tmp.name
    try:
        out = subprocess.run([sys.executable, __file__, "--umap-child"], env=env, capture_output=True,
                             text=True, check=True, timeout=1800)
    finally:
        if tmp:
            tmp.cleanup()
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--fresh-numba-cache", action="store_true")
    ap.add_argument("--size", type=int, default=28, choices=sorted(SIZES))
    ap.add_argument("--no-umap", action="store_true", help="skip the UMAP timing")
    ap.add_argument("--umap-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.umap_child:
        umap_child()
        return

    e = bench_edit(args.device, args.repeats, args.size)
    print(f"single-code edit ({e['desc']}) on {e['device']}: median {e['median_ms']:.2f} ms "
          f"over {args.repeats} round trips (min {e['min_ms']:.2f}, max {e['max_ms']:.2f}; target < 50 ms) "
          f"{'OK' if e['median_ms'] < 50 else 'SLOW'} [torch threads: {e['threads']}]")
    print(f"  same with torch.set_num_threads(1): median {e['1thread_median_ms']:.2f} ms "
          f"(min {e['1thread_min_ms']:.2f}, max {e['1thread_max_ms']:.2f})")
    smp = bench_samples(args.size)
    print(f"prior samples: {smp['n']} grids of {smp['grid']}x{smp['grid']} drawn and decoded in "
          f"{smp['median_s']:.2f} s (median of 3, one torch thread as the app)")
    if hasattr(os, "getloadavg"):
        print(f"  (load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    if args.no_umap:
        return
    u = bench_umap(args.fresh_numba_cache)
    print(f"UMAP 512x64 codebook, fresh process{' with an EMPTY numba cache' if args.fresh_numba_cache else ''} "
          f"(numba cache: {u['numba_cache_dir']}):")
    print(f"  import umap {u['import_s']:.2f} s; cold first map {u['cold_s']:.2f} s "
          f"(import + cold = {u['import_s'] + u['cold_s']:.2f} s)")
    print(f"  warm second map {u['warm_s']:.2f} s (target < 3 s) {'OK' if u['warm_s'] < 3 else 'SLOW'}; "
          f"same result: {u['deterministic']}; PCA fallback {1e3 * u['pca_s']:.1f} ms")


if __name__ == "__main__":
    main()
