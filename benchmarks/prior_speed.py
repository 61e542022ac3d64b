"""Sampling speed of the Gated PixelCNN prior.

Target: 64 grids of 7x7 with K=256 and default sizes (hidden=64, layers=8,
kernel=3) in under 1 s on a 2-core CPU.  Prints the median of 5 timed runs
after one warm-up run; ``--naive`` also times the "full forward per
position" baseline for comparison.

    python benchmarks/prior_speed.py [--n 64] [--K 256] [--size 7] [--repeats 5] [--naive]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sqvae_core.prior import GatedPixelCNN, PriorConfig  # noqa: E402


def _time(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def naive_sample(model: GatedPixelCNN, n: int, generator: torch.Generator) -> torch.Tensor:
    """Reference: one full-grid forward pass per position."""
    cfg = model.config
    codes = torch.zeros(n, cfg.height, cfg.width, dtype=torch.long)
    with torch.inference_mode():
        for i in range(cfg.height):
            for j in range(cfg.width):
                logits = model(codes)[:, :, i, j]
                codes[:, i, j] = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0]
    return codes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--K", type=int, default=256)
    ap.add_argument("--size", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--naive", action="store_true", help="also time the (slow) naive baseline, single-threaded")
    args = ap.parse_args()

    torch.manual_seed(0)
    cfg = PriorConfig(num_codes=args.K, height=args.size, width=args.size)
    model = GatedPixelCNN(cfg).eval()
    gen = torch.Generator().manual_seed(0)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, torch threads={torch.get_num_threads()}")
    print(f"config: {cfg}  ({n_params / 1e6:.2f}M params)")

    ts = _time(lambda: model.sample(args.n, generator=gen), args.repeats)
    med = statistics.median(ts)
    print(f"sample({args.n}) {args.size}x{args.size} K={args.K}: median {med * 1000:.1f} ms "
          f"over {args.repeats} runs (min {min(ts) * 1000:.1f}, max {max(ts) * 1000:.1f} ms) "
          f"-> {'OK' if med < 1.0 else 'SLOWER THAN'} 1 s target")

    if args.naive:
        old = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            tn = _time(lambda: naive_sample(model, args.n, gen), 1)
        finally:
            torch.set_num_threads(old)
        print(f"naive full-forward-per-position baseline: median {statistics.median(tn) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
