"""Per-step cost of RunLogger.log, measured in one run on tight loops, with and without logging.

    python benchmarks/runlogger_overhead.py                 # ~1 min on a 2-core CPU
    python benchmarks/runlogger_overhead.py --device cuda

Two loops, each timed with and without the log() call in interleaved blocks; the medians of
the blocks are reported, so load from other processes shifts both sides alike:

  bare      nothing but log(step, indices=<64x7x7 int64>, codebook=<(256, 32)>, loss=, commit=,
            mse=) with tensors made once: the logger's own cost per call, including its log
            points (every 10 calls) and snapshots with a status write (every 100), the defaults.
            Without logging the loop body is empty.
  training  one step of sqvae_core's `vq` model (K=256, d=32, batch 64, 28x28 inputs): Adam,
            forward, backward, then the same log() call: the cost next to a small real step.

Times are the process's CPU time on a CPU (so other processes sharing the machine do not inflate
them; with several torch threads it counts every thread's time) and wall time on CUDA. Prints µs
per step for each side, the difference (the overhead) and the ratio.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from sqvae_core import ModelConfig, RunLogger, build_model


def timed_blocks(body_plain, body_logged, steps_per_block: int, blocks: int, sync, clock) -> tuple[float, float]:
    """Seconds per step of each block of each body, blocks interleaved plain/logged."""
    plain, logged = [], []
    step = 0
    for _ in range(blocks):
        for body, out in ((body_plain, plain), (body_logged, logged)):
            sync()
            t = clock()
            for _ in range(steps_per_block):
                step += 1
                body(step)
            sync()
            out.append((clock() - t) / steps_per_block)
    return plain, logged


def report(name: str, plain: list[float], logged: list[float]) -> None:
    """Medians, their difference and ratio; the spread is the interquartile range of the
    per-block ratios, how far apart two blocks of the same loop land on this machine."""
    p, q = statistics.median(plain), statistics.median(logged)
    ratio = "(empty loop: no ratio)"
    if name != "bare":
        r = sorted(b / a for a, b in zip(plain, logged))
        ratio = f"ratio {q / p:6.3f} (per-block ratios, IQR {r[len(r) // 4]:.3f}-{r[(3 * len(r)) // 4]:.3f})"
    print(f"{name:<9} without log {p * 1e6:9.1f} µs/step   with log {q * 1e6:9.1f} µs/step   "
          f"overhead {(q - p) * 1e6:7.1f} µs/step   {ratio}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--bare-steps", type=int, default=2000, help="calls per block, bare loop")
    p.add_argument("--train-steps", type=int, default=20, help="steps per block, training loop")
    p.add_argument("--blocks", type=int, default=41)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # CPU: the process's CPU time (all its threads), which other processes on a shared machine do
    # not inflate; CUDA: wall time between synchronizations (the GPU's work is not CPU time)
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    torch.manual_seed(0)
    k, d, b = 256, 32, 64

    with tempfile.TemporaryDirectory() as tmp:
        # ---------------------------------------------------------------- bare calls
        idx = torch.randint(k, (b, 7, 7), device=device)
        cb = torch.randn(k, d, device=device)
        loss, commit, mse = (torch.rand((), device=device) for _ in range(3))
        with RunLogger(f"{tmp}/bare", codebook_size=k) as log:
            def bare_logged(step):
                log.log(step, indices=idx, codebook=cb, loss=loss, commit=commit, mse=mse)
            plain, logged = timed_blocks(lambda step: None, bare_logged, args.bare_steps, args.blocks, sync, clock)
        report("bare", plain, logged)

        # ------------------------------------------------------------- training step
        model = build_model(ModelConfig(kind="vq", codebook_size=k, code_dim=d, num_rb=1)).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        x = torch.rand(b, 1, 28, 28, device=device)

        def train_step():
            out = model(x)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            return out

        for _ in range(5):
            train_step()                                        # warm-up
        with RunLogger(f"{tmp}/train", codebook_size=k) as log:
            def train_logged(step):
                out = train_step()
                log.log(step, indices=out.indices, codebook=model.codebook_vectors(), loss=out.loss,
                        mse=out.stats["mse"])
            plain, logged = timed_blocks(lambda step: train_step(), train_logged, args.train_steps, args.blocks, sync,
                                         clock)
        report("training", plain, logged)
    print(f"device {device.type}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.blocks} interleaved blocks, {'wall' if device.type == 'cuda' else 'process CPU'} time")


if __name__ == "__main__":
    main()
