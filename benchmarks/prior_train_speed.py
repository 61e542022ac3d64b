"""Training speed of the PixelCNN prior: today's step against each candidate, in one run.

    python benchmarks/prior_train_speed.py                       # synthetic 7x7 codes, K=256, 10 classes
    python benchmarks/prior_train_speed.py --run checkpoints/gaussian_1 --max-images 10000
    python benchmarks/prior_train_speed.py --quality-steps 400   # + val NLL of each variant after 400 steps
    python benchmarks/prior_train_speed.py --fit-steps 4000      # per-fit ratios for a fit of 4,000 steps

Variants (default prior: hidden 64, 8 layers, kernel 3; batch 64 unless named):

    old          today's step before this benchmark: the literal forward (_reference_forward), Adam
                 with a loop over parameters, eager fp32
    skip         the fit's forward: no dead last row of the vertical stack, no last-layer vertical
                 gate or h_out, h_out/h_skip fused (same logits)
    skip+fused   + fused Adam (fit_prior's eager step)
    channels_last  skip+fused with channels_last weights
    compile      skip+fused, torch.compile'd loss and backward (long fits; fp32 without native bf16)
    compile matmul  compile, the network as channels-last matmuls (GatedPixelCNN._logits_matmul;
                 fit_prior's fp32 step on an AVX2-only CPU: prior.step_form)
    compile+bf16 + bf16 autocast (fit_prior's default where bf16 is native: AMX/AVX512-BF16)
    compile+bf16 matmul  compile+bf16 as matmuls
    compile b128 compile at batch 128: per-step ratio per grid (a step sees twice the grids)
    compile+bf16 bN  compile + bf16 at batch N (32, 128, 256): the ratio per grid

Rounds are interleaved (old, v1, v2, ..., old, v1, ...) so that a machine shared with other jobs
slows every variant alike; each variant's figure is its fastest round. The process runs with
glibc's malloc keeping freed memory (device.keep_freed_host_memory), as fit_prior does, so "old"
gets it too, which it never had.

    python benchmarks/prior_train_speed.py --isolated --variants "compile+bf16 matmul"

--isolated runs each variant in a fresh process of its own instead, as a fit runs: "old" with
glibc's default malloc (as it ran), the others as fit_prior runs them. A process builds and warms
up its step, then times --child-rounds rounds; the parent alternates the processes for --rounds
rounds. Figures are the median round (CPU time) and the ratio of medians. In one process, the
old step's large allocations leave the heap big enough that the steps timed between them take
none of the page faults that the same step takes alone (RESULTS.md): interleaved figures are
not what a fit sees.

Times are CPU seconds of this process (process_time: the work, not the waiting on a busy machine)
beside wall seconds.
Per fit: compile time (CPU seconds of its warm-up, once) + steps x per-step time, for a fit of
--fit-steps steps (at batch N: --batch/N as many steps, the same grids seen). Quality: each variant
trained --quality-steps steps from the same seed; its validation NLL (bits/code) on the same grids.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sqvae_core import prior as P  # noqa: E402
from sqvae_core.device import cpu_has_native_bf16, cpu_kind, keep_freed_host_memory  # noqa: E402
from sqvae_core.prior import GatedPixelCNN, PriorConfig, PriorFitConfig  # noqa: E402

VARIANTS = ("old", "skip", "skip+fused", "channels_last", "compile", "compile matmul", "compile+bf16",
            "compile+bf16 matmul", "compile b128",
            "compile+bf16 b32", "compile+bf16 b128", "compile+bf16 b256")


def step_gflop(cfg: PriorConfig, batch: int) -> float:
    """Multiply-adds x 2 of one training step (forward and backward) as the fit computes it."""
    from torch.utils.flop_counter import FlopCounterMode
    model = GatedPixelCNN(cfg)
    x = torch.randint(cfg.num_codes, (batch, cfg.height, cfg.width))
    c = None if cfg.num_classes is None else torch.randint(cfg.num_classes, (batch,))
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model._logits(x, model._cond_index(c, batch, torch.device("cpu"))), x).backward()
    return counter.get_total_flops() / 1e9


def matmul_peak_gflops(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """This core's matrix-product rate at a large square size (CPU time: the work, not the wait)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.process_time()
        a @ b
        best = min(best, time.process_time() - t0)
    return 2 * n ** 3 / best / 1e9


def make_step(variant: str, cfg: PriorConfig, lr: float):
    """(model, step(x, c) -> loss) for a variant, from the same initial weights."""
    torch.manual_seed(0)
    model = GatedPixelCNN(cfg)
    dev = torch.device("cpu")
    if variant == "old":
        opt = torch.optim.Adam(model.parameters(), lr=lr)

        def step(x, c):
            x_emb = model.embed(x).permute(0, 3, 1, 2)
            loss = F.cross_entropy(P._reference_forward(model, x_emb, c), x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.detach()

        return model, step
    if variant == "skip":
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    if variant == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    fit = PriorFitConfig(compile=variant.startswith("compile"), bf16="bf16" in variant, lr=lr)
    precision = "bf16 autocast" if fit.bf16 else "fp32"
    return model, P._make_step(model, opt, fit, precision, dev, "matmul" if "matmul" in variant else "conv")


def batch_of(variant: str, batch: int) -> int:
    """A variant named "... bN" runs at batch N; the others at --batch."""
    m = re.search(r" b(\d+)$", variant)
    return int(m.group(1)) if m else batch


def isolated(args, variants: list[str]) -> None:
    """--isolated: each variant in fresh processes, alternated over --rounds; medians of rounds."""
    base = [sys.executable, os.path.abspath(__file__), "--max-images", str(args.max_images), "--batch",
            str(args.batch), "--steps-per-round", str(args.steps_per_round), "--threads", str(args.threads),
            "--lr", str(args.lr), "--child-rounds", str(args.child_rounds)] + (["--run", args.run] if args.run else [])
    print(f"CPU: {cpu_kind()}\ntorch {torch.__version__}, {args.threads} thread(s); each variant in a process of "
          f"its own, {args.rounds} processes each, {args.child_rounds} rounds of {args.steps_per_round} steps each\n")
    cpu = {v: [] for v in variants}
    warm = {v: [] for v in variants}
    for _ in range(args.rounds):
        for v in variants:
            r = subprocess.run(base + ["--child", v], capture_output=True, text=True)
            line = [ln for ln in r.stdout.splitlines() if ln.startswith("CHILD ")]
            if r.returncode != 0 or not line:
                raise SystemExit(f"variant {v!r} failed:\n{r.stderr[-2000:]}")
            doc = json.loads(line[-1][len("CHILD "):])
            cpu[v] += doc["rounds"]
            warm[v].append(doc["warm"])
    old = statistics.median(cpu["old"])
    print("| variant | batch | CPU ms/step (median round) | range of rounds | per step (per grid) vs old | "
          "warm-up CPU s |")
    print("|---|---|---|---|---|---|")
    for v in variants:
        t, bs = statistics.median(cpu[v]), batch_of(v, args.batch)
        print(f"| {v} | {bs} | {t * 1e3:.1f} | {min(cpu[v]) * 1e3:.1f}-{max(cpu[v]) * 1e3:.1f} | "
              f"{(old / args.batch) / (t / bs):.2f}x | {statistics.median(warm[v]):.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=None, help="a run directory whose code grids to fit (else synthetic)")
    ap.add_argument("--max-images", type=int, default=10000)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps-per-round", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fit-steps", type=int, default=4000, help="steps of the fit the per-fit ratios are for")
    ap.add_argument("--quality-steps", type=int, default=0, help="train each variant this many steps; val NLL")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--isolated", action="store_true", help="each variant in a fresh process of its own")
    ap.add_argument("--child-rounds", type=int, default=3, help="--isolated: timed rounds per process")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)   # --isolated's worker: one variant
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    variants = ["old"] + [v for v in args.variants if v != "old"]
    if args.isolated:
        return isolated(args, variants)
    if args.child != "old":
        keep_freed_host_memory()             # as fit_prior runs; an --isolated "old" runs as it ran

    if args.run:
        from sqvae_core import rundir as rd
        from sqvae_core.explore import dataset_codes
        from sqvae_core.scores import bundle_split
        b = rd.load_bundle(args.run, "cpu")
        tr_x, tr_y, data = bundle_split(b, "train", None, args.max_images)
        va_x, va_y, _ = bundle_split(b, "val", None, 2000)
        train, val = dataset_codes(b.model, tr_x), dataset_codes(b.model, va_x)
        k, n = b.model_cfg.codebook_size, b.model_cfg.latent_size
        cfg = PriorConfig(num_codes=k, height=n, width=n, num_classes=data.num_labels or None)
        tr_l = tr_y if data.num_labels else None
        va_l = va_y if data.num_labels else None
        source = f"{args.run}: {len(train)} training grids, {len(val)} validation grids"
    else:
        g = torch.Generator().manual_seed(0)
        cfg = PriorConfig(num_codes=256, height=7, width=7, num_classes=10)
        train = torch.randint(0, 256, (10000, 7, 7), generator=g)
        val = torch.randint(0, 256, (2000, 7, 7), generator=g)
        tr_l, va_l = torch.randint(0, 10, (10000,), generator=g), torch.randint(0, 10, (2000,), generator=g)
        source = "synthetic uniform codes (timing only)"
    if args.child is None:
        print(f"CPU: {cpu_kind()}\ntorch {torch.__version__}, {args.threads} thread(s); prior {cfg.to_dict()}\n"
              f"codes: {source}\n")

    gen = torch.Generator().manual_seed(1)

    def batch(v):
        idx = torch.randint(len(train), (batch_of(v, args.batch),), generator=gen)
        return train[idx], None if tr_l is None else torch.as_tensor(tr_l)[idx]

    if args.child is not None:               # --isolated's worker: this one variant, --child-rounds rounds
        variants, args.rounds = [args.child], args.child_rounds
    steps, warm = {}, {}
    for v in variants:                   # build and warm up (compilation happens here)
        model, step = make_step(v, cfg, args.lr)
        model.train()
        c0, w0 = time.process_time(), time.perf_counter()
        for _ in range(3):
            step(*batch(v))
        warm[v] = (time.process_time() - c0, time.perf_counter() - w0)
        steps[v] = step
    cpu = {v: [] for v in variants}
    wall = {v: [] for v in variants}
    for _ in range(args.rounds):
        for v in variants:
            xs = [batch(v) for _ in range(args.steps_per_round)]
            c0, w0 = time.process_time(), time.perf_counter()
            for x, c in xs:
                steps[v](x, c)
            cpu[v].append((time.process_time() - c0) / args.steps_per_round)
            wall[v].append((time.perf_counter() - w0) / args.steps_per_round)
    if args.child is not None:               # to the parent: one JSON line, no table
        print("CHILD " + json.dumps({"variant": args.child, "rounds": cpu[args.child], "warm": warm[args.child][0]}))
        return

    old = min(cpu["old"])
    old_fit = old * args.fit_steps
    print(f"| variant | batch | CPU ms/step | wall ms/step | per step (per grid) vs old | warm-up CPU s | "
          f"per fit of {args.fit_steps} steps vs old |")
    print("|---|---|---|---|---|---|---|")
    for v in variants:
        t, bs = min(cpu[v]), batch_of(v, args.batch)
        per_grid = (old / args.batch) / (t / bs)
        fit_steps = args.fit_steps * args.batch // bs
        compile_s = warm[v][0] if v.startswith("compile") else 0.0
        fit_ratio = old_fit / (compile_s + t * fit_steps)
        print(f"| {v} | {bs} | {t * 1e3:.1f} | {min(wall[v]) * 1e3:.1f} | {per_grid:.2f}x | {warm[v][0]:.1f} | "
              f"{fit_ratio:.2f}x |")

    # The ceiling: every product at this core's large-matmul rate, nothing else costing anything.
    flops, peak = step_gflop(cfg, args.batch), matmul_peak_gflops(torch.float32)
    floor_ms = flops / peak * 1e3
    print(f"\nCeiling: a step is {flops:.1f} GFLOP of products; at this core's fp32 matmul rate "
          f"({peak:.0f} GFLOP/s, 2048x2048) it cannot take under {floor_ms:.0f} ms: {old * 1e3 / floor_ms:.2f}x old "
          f"in fp32.")
    if cpu_has_native_bf16():
        peak16 = matmul_peak_gflops(torch.bfloat16)
        print(f"In bf16 ({peak16:.0f} GFLOP/s): {flops / peak16 * 1e3:.0f} ms, "
              f"{old * 1e3 / (flops / peak16 * 1e3):.2f}x old.")

    if args.quality_steps:
        print(f"\nValidation NLL after {args.quality_steps} steps (same seed, same grids; bits/code):\n")
        print("| variant | grids seen | val NLL | vs old |")
        print("|---|---|---|---|")
        base = None
        for v in variants:
            model, step = make_step(v, cfg, args.lr)
            model.train()
            g2 = torch.Generator().manual_seed(2)
            n = args.quality_steps * args.batch // batch_of(v, args.batch)
            for _ in range(n):
                idx = torch.randint(len(train), (batch_of(v, args.batch),), generator=g2)
                step(train[idx], None if tr_l is None else torch.as_tensor(tr_l)[idx])
            cond = None if va_l is None else torch.as_tensor(va_l).long()
            nll = P._mean_nll_bits(model, val.long(), cond)
            base = nll if base is None else base
            print(f"| {v} | {n * batch_of(v, args.batch)} | {nll:.4f} | {nll - base:+.4f} |")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
