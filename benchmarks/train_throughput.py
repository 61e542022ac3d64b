"""Training throughput (images/s) and peak memory at the paper preset, against the official trainer's step.

    python benchmarks/train_throughput.py [--size 28|32|64] [--steps 30] [--rounds 7] [--threads N] [--compile]
                                          [--amp] [--python-wrapper] [--clock wall|cpu] [--device cpu|cuda]

The CPU's kind and ISA are printed first: ratios differ between CPU kinds. On a GPU
(benchmarks/gpu_check.sh) every round ends with a synchronize, so queued kernels count.

Same machine, same nets (the official SQ-VAE nets at that size: 28 = Fashion-MNIST K=256,
32 = CIFAR-10 K=512, 64 = CelebA K=512 with 6 blocks; d=64, batch 32, fp32):
  official-style  the step as the official trainer takes it: distances as ‖z‖² + ‖b‖² − 2zbᵀ,
                  its Gumbel noise −log(−log(u + 1e-10) + 1e-10), z_q and the decoder in NCHW,
                  the loss as its GaussianSQVAE writes it, three `.item()` reads per step, torch's
                  default Adam
  ours NCHW       sqvae_core's model and optimizer (fused Adam) through train.py's own step
                  (`train_step`, `Window`, `Batches`), NCHW convolutions
  ours            the same as `sqvae train` runs it on a CPU (channels_last convolutions): a run of
                  fewer than 5,000 steps, or --no-compile
  ours+compile    ... and torch.compile (with --compile), as `sqvae train` runs 5,000+ steps
                  (the paper preset) where a C++ compiler exists: device.compile_options, on a CPU
                  with the graph's host code in C++ (cpp_wrapper)
  ..., py wrap    (--python-wrapper) the same compiled with Python host code, as before
  ...+bf16        (--amp) bf16 autocast as `sqvae train --amp` runs it; measured only where bf16 is
                  native (device.amp_unavailable): elsewhere the run trains in fp32, and emulated
                  bf16 was 0.13-0.14x the official fp32 step on an AVX2-only AMD EPYC
Every variant runs `steps` steps in every round, in turn (interleaved: machine drift hits all
alike). Prints images/s (median over rounds), the median per-round ratio to official-style with
the range of the per-round ratios (on a shared VM, medians of 5 rounds moved by +-5% between runs:
read the range before a second decimal), and the process's peak RSS.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sqvae_core.config import ModelConfig  # noqa: E402
from sqvae_core.data import ImageData  # noqa: E402
from sqvae_core.models import build_model  # noqa: E402
from sqvae_core.nets import Decoder, Encoder  # noqa: E402
from sqvae_core.device import COMPILE_OPTIONS, amp_unavailable, compile_options, cpu_kind  # noqa: E402
from sqvae_core.train import (Batches, Dist, TrainConfig, Window, make_model, make_optimizer,  # noqa: E402
                              temperature_at, train_step)

B = 32
SETTINGS = {   # image size -> (channels, K, blocks, exp(s) at init)
    28: (1, 256, 2, 10.0),
    32: (3, 512, 2, 20.0),
    64: (3, 512, 6, 20.0),
}


def model_config(size: int, kind: str) -> ModelConfig:
    c, k, rb, s0 = SETTINGS[size]
    floor = 1.0 if kind == "gaussian_1" else 0.0
    return ModelConfig(kind=kind, image_channels=c, image_size=size, codebook_size=k, code_dim=64, num_rb=rb,
                       var_q_floor=floor, var_q_init=floor + s0)


class OfficialStyleNets(torch.nn.Module):
    """The official nets for cfg, and squared distances written as the official code writes them."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        design = cfg.design
        self.encoder = Encoder(cfg.image_channels, cfg.code_dim, cfg.num_rb, design=design)
        self.decoder = Decoder(cfg.image_channels, cfg.code_dim, cfg.num_rb, design=design)

    def distances(self, zf: torch.Tensor) -> torch.Tensor:
        """‖z‖² + ‖b‖² − 2zbᵀ, (N, K)."""
        return torch.sum(zf ** 2, dim=1, keepdim=True) + torch.sum(self.codebook ** 2, dim=1) \
            - 2 * torch.matmul(zf, self.codebook.t())


class OfficialStyleGaussianSQVAE(OfficialStyleNets):
    """Gaussian SQ-VAE I as the official code computes it (same nets), written here from its equations."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.codebook = torch.nn.Parameter(torch.randn(cfg.codebook_size, cfg.code_dim))
        self.log_param_q = torch.nn.Parameter(torch.tensor(math.log(cfg.var_q_init - 1.0)))
        self.dim_x = cfg.image_channels * cfg.image_size ** 2

    def forward(self, x, temperature):
        z, _ = self.encoder(x)
        bs, d, h, w = z.shape
        var_q = 1.0 + self.log_param_q.exp()
        zf = z.permute(0, 2, 3, 1).contiguous().view(-1, d)
        logit = -0.5 / var_q * self.distances(zf)
        p, log_p = torch.softmax(logit, -1), torch.log_softmax(logit, -1)
        u = torch.rand(logit.shape, device=logit.device)
        g = -torch.log(-torch.log(u + 1e-10) + 1e-10)
        enc = F.softmax((logit + g) / temperature, dim=-1)
        zq = torch.mm(enc, self.codebook).view(bs, h, w, d).permute(0, 3, 1, 2).contiguous()
        avg_p = p.detach().mean(0)
        perplexity = torch.exp(-torch.sum(avg_p * torch.log(avg_p + 1e-7)))
        x_rec = torch.sigmoid(self.decoder(zq))
        mse = F.mse_loss(x_rec, x, reduction="sum") / bs
        kld_d = torch.sum(p * log_p) / bs
        kld_c = torch.sum((z - zq) ** 2 * (0.5 / var_q), dim=(1, 2, 3)).mean()
        return self.dim_x * torch.log(mse) / 2 + kld_d + kld_c, mse, perplexity


class OfficialStyleVQVAE(OfficialStyleNets):
    """VQ-VAE over the same nets, written the same plain way."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        k = cfg.codebook_size
        self.codebook = torch.nn.Parameter(torch.empty(k, cfg.code_dim).uniform_(-1 / k, 1 / k))

    def forward(self, x, temperature):
        z, _ = self.encoder(x)
        bs, d, h, w = z.shape
        zf = z.permute(0, 2, 3, 1).contiguous().view(-1, d)
        idx = self.distances(zf).argmin(1)
        zq = self.codebook[idx]
        loss_q = F.mse_loss(zq, zf.detach()) + 0.25 * F.mse_loss(zf, zq.detach())
        zq = zf + (zq - zf).detach()
        x_rec = torch.sigmoid(self.decoder(zq.view(bs, h, w, d).permute(0, 3, 1, 2).contiguous()))
        mse = F.mse_loss(x_rec, x)
        counts = torch.bincount(idx, minlength=self.codebook.shape[0]).float()
        avg_p = counts / counts.sum()
        return mse + loss_q, mse, torch.exp(-torch.sum(avg_p * torch.log(avg_p + 1e-7)))


def official_style_step(model, images, tcfg):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    state = {"step": 0}
    g = torch.Generator().manual_seed(0)

    def step():
        x = images[torch.randint(0, len(images), (B,), generator=g)].to(tcfg.device)
        state["step"] += 1
        loss, mse, ppl = model(x, max(math.exp(-1e-5 * state["step"]), 0.0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss.item(), mse.item(), ppl.item()        # the official trainer's per-step logging
    return step


def ours_step(cfg: ModelConfig, images, tcfg: TrainConfig, channels_last: bool, compile_: bool, amp: bool = False,
              python_wrapper: bool = False):
    """train.py's own step: Batches -> train_step -> Window, a log-point read every 10 steps.
    python_wrapper: compile with the options train.py used before compile_options (Python host code)."""
    device = torch.device(tcfg.device)
    model = (make_model(TrainConfig(model=cfg), device) if channels_last else build_model(cfg).to(device)).train()
    opt = make_optimizer(model, 1e-3, device)
    options = COMPILE_OPTIONS if python_wrapper else compile_options(device)
    fwd = torch.compile(model, options=options) if compile_ else model
    tcfg = dataclasses.replace(tcfg, compile=compile_, amp=amp)     # compiled: train_step passes τ as a tensor
    pixels = (images * 255).round().to(torch.uint8)          # as the data sets store them
    batches = Batches(ImageData(pixels, None, "bench", "train", "memory", None, None), tcfg, Dist(), device)
    window = Window(cfg.kind, cfg.codebook_size, device)
    state = {"step": 0}

    def step():
        s = state["step"]
        outp = train_step(fwd, opt, batches(s), temperature_at(tcfg, s), tcfg, device, s)
        window.add(outp)
        state["step"] = s + 1
        if state["step"] % tcfg.log_every == 0:
            window.means()
    return step


def bench_interleaved(variants: dict, steps: int, rounds: int, warmup: int = 10, clock=time.perf_counter,
                      sync=lambda: None) -> dict:
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    ips = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            sync()
            t0 = clock()
            for _ in range(steps):
                fn()
            sync()        # a GPU's queued kernels count in the round that queued them
            ips[name].append(B * steps / (clock() - t0))
    base = next(iter(variants))
    out = {}
    for name, v in ips.items():
        ratios = [a / b for a, b in zip(v, ips[base])]
        out[name] = (statistics.median(v), statistics.median(ratios), min(ratios), max(ratios))
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=28, choices=sorted(SETTINGS))
    p.add_argument("--kinds", default="gaussian_1,vq")
    p.add_argument("--steps", type=int, default=30, help="steps per variant per round")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu or cuda (benchmarks/gpu_check.sh)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--amp", action="store_true", help="also bf16 autocast (`sqvae train --amp`), with --compile "
                   "if given")
    p.add_argument("--python-wrapper", action="store_true",
                   help="with --compile: also the compiled step with Python host code (train.py before "
                        "compile_options), to measure what the C++ wrapper gives on this CPU")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: the process's CPU time (with --threads 1, a measure that other load on a "
                        "shared machine barely moves; images per CPU-second)")
    args = p.parse_args()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    c = SETTINGS[args.size][0]
    images = torch.rand(2048, c, args.size, args.size)
    print(f"CPU: {cpu_kind()}")
    if cuda:
        print(f"GPU: {torch.cuda.get_device_name(args.device)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {B}, {c}x{args.size}x{args.size}, "
          f"{args.rounds} interleaved rounds of {args.steps} steps per variant (medians; ratio = median of "
          f"per-round ratios to official-style, their range in brackets), {args.clock} clock")
    no_amp = amp_unavailable(torch.device(args.device)) if args.amp else None
    if no_amp:     # what `sqvae train --amp` does here: emulated bf16 would only be slower
        print(f"--amp: {no_amp}; `sqvae train --amp` trains in fp32 here (the fp32 rows), so no bf16 "
              "row is measured")
    for kind in args.kinds.split(","):
        cfg = model_config(args.size, kind)
        tcfg = TrainConfig(model=cfg, batch_size=B, log_every=10, device=args.device)
        plain_cls = OfficialStyleVQVAE if kind.startswith("vq") else OfficialStyleGaussianSQVAE
        variants = {"official-style": official_style_step(plain_cls(cfg).to(args.device).train(), images, tcfg)}
        options = [("ours NCHW", False, False, False, False), ("ours (train <5k st.)", True, False, False, False)]
        if args.compile and args.python_wrapper:
            options += [("ours+compile, py wrap", True, True, False, True)]
        if args.compile:
            options += [("ours+compile (5k+)", True, True, False, False)]
        if args.amp and no_amp is None:
            options += [("ours+compile+bf16" if args.compile else "ours+bf16", True, args.compile, True, False)]
        for name, cl, comp, amp, py in options:
            variants[name] = ours_step(cfg, images, tcfg, cl, comp, amp, python_wrapper=py)
        for name, (ips, ratio, lo, hi) in bench_interleaved(variants, args.steps, args.rounds, clock=clock,
                                                             sync=sync).items():
            print(f"{kind:<11} {name:<21} {ips:8.0f} img/s   {ratio:.2f}x   ({lo:.2f}-{hi:.2f})")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:.0f} MB" + (f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MB"
                                       if cuda else ""))


if __name__ == "__main__":
    main()
