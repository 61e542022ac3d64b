"""Training throughput (images/s) and peak memory at the paper's Fashion-MNIST preset.

    python benchmarks/train_throughput.py [--steps 30] [--rounds 7] [--threads N] [--compile]

Compares, on the same machine and batch (32 images of 28x28, K=256, d=64, 2 res blocks):
  plain  - a plain eager implementation of the same net and loss, written the way the
           official SQ-VAE code is (per-step .item() logging, distances via an explicit
           ‖z‖² + ‖b‖² − 2zbᵀ, Gumbel softmax from torch.nn.functional)
  ours   - sqvae_core's model, optimizer (fused Adam) and train step (stats stay on device
           between log points; logits without the per-row ‖z‖² term, one fused addmm)
  ours+channels_last   - what `sqvae train` runs on a CPU (NHWC convolutions)
  ours+compile, ours+compile+channels_last - torch.compile, as `train --compile` (with --compile)
and prints images/s, the ratio to `plain`, and the process's peak RSS.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sqvae_core.config import ModelConfig  # noqa: E402
from sqvae_core.models import build_model  # noqa: E402
from sqvae_core.nets import Decoder, Encoder  # noqa: E402
from sqvae_core.train import make_optimizer  # noqa: E402

B, K, D = 32, 256, 64


class PlainGaussianSQVAE(torch.nn.Module):
    """The same nets and Gaussian SQ-VAE I loss (ARELBO), written plainly."""

    def __init__(self):
        super().__init__()
        self.encoder = Encoder(1, D, 2)
        self.decoder = Decoder(1, D, 2)
        self.codebook = torch.nn.Parameter(torch.randn(K, D))
        self.log_param_q = torch.nn.Parameter(torch.tensor(2.3))

    def forward(self, x, temperature=1.0):
        z, _ = self.encoder(x)
        bs, d, h, w = z.shape
        zf = z.permute(0, 2, 3, 1).contiguous().view(-1, d)
        var_q = self.log_param_q.exp()
        dist = torch.sum(zf ** 2, dim=1, keepdim=True) + torch.sum(self.codebook ** 2, dim=1) \
            - 2 * torch.matmul(zf, self.codebook.t())
        logit = -0.5 * dist / var_q
        enc = F.gumbel_softmax(logit, tau=temperature, hard=False)
        zq = torch.mm(enc, self.codebook).view(bs, h, w, d).permute(0, 3, 1, 2).contiguous()
        x_rec = torch.sigmoid(self.decoder(zq))
        mse = F.mse_loss(x_rec, x, reduction="sum") / bs
        loss_rec = 784 * torch.log(mse) / 2
        p = torch.softmax(logit, -1)
        kld_d = torch.sum(p * torch.log_softmax(logit, -1)) / bs
        kld_c = torch.sum(0.5 * (zf - zq.permute(0, 2, 3, 1).reshape(-1, d)) ** 2 / var_q) / bs
        return loss_rec + kld_d + kld_c, mse


class PlainVQVAE(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = Encoder(1, D, 2)
        self.decoder = Decoder(1, D, 2)
        self.codebook = torch.nn.Parameter(torch.empty(K, D).uniform_(-1 / K, 1 / K))

    def forward(self, x, temperature=1.0):
        z, _ = self.encoder(x)
        bs, d, h, w = z.shape
        zf = z.permute(0, 2, 3, 1).contiguous().view(-1, d)
        dist = torch.sum(zf ** 2, dim=1, keepdim=True) + torch.sum(self.codebook ** 2, dim=1) \
            - 2 * torch.matmul(zf, self.codebook.t())
        zq = self.codebook[dist.argmin(1)]
        loss_q = F.mse_loss(zq, zf.detach()) + 0.25 * F.mse_loss(zf, zq.detach())
        zq = zf + (zq - zf).detach()
        x_rec = torch.sigmoid(self.decoder(zq.view(bs, h, w, d).permute(0, 3, 1, 2).contiguous()))
        mse = F.mse_loss(x_rec, x)
        return mse + loss_q, mse


def seconds(step_fn, x, steps):
    t0 = time.perf_counter()
    for _ in range(steps):
        step_fn(x)
    return time.perf_counter() - t0


def bench_interleaved(variants: dict, steps: int, rounds: int, warmup: int = 10) -> dict:
    """images/s of each variant, median over rounds; in each round every variant runs `steps`
    steps in turn, so machine drift (clock, other load) hits all of them alike. Also the median
    over rounds of each variant's ratio to the first one (the plain baseline)."""
    for fn, x in variants.values():
        for _ in range(warmup):
            fn(x)
    ips = {name: [] for name in variants}
    for _ in range(rounds):
        for name, (fn, x) in variants.items():
            ips[name].append(B * steps / seconds(fn, x, steps))
    base = next(iter(variants))
    return {name: (statistics.median(v), statistics.median(a / b for a, b in zip(v, ips[base])))
            for name, v in ips.items()}


def plain_step(model, opt):
    def step(x):
        loss, mse = model(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item(), mse.item()        # per-step logging, as the official trainer does
    return step


def ours_step(model, opt, log_every=10):
    state = {"i": 0}

    def step(x):
        out = model(x, temperature=1.0)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        state["i"] += 1
        if state["i"] % log_every == 0:
            float(out.loss.detach())        # one host sync per log point
    return step


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30, help="steps per variant per round")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.rand(B, 1, 28, 28)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {B}, K={K}, d={D}, "
          f"{args.rounds} interleaved rounds of {args.steps} steps per variant (medians; ratio = median of "
          f"per-round ratios to plain)")
    for kind, plain_cls in (("gaussian_1", PlainGaussianSQVAE), ("vq", PlainVQVAE)):
        plain = plain_cls().train()
        variants = {"plain eager": (plain_step(plain, torch.optim.Adam(plain.parameters(), 1e-3)), x)}
        options = [("ours", False, False), ("ours+channels_last", True, False)]
        if args.compile:
            options += [("ours+compile", False, True), ("ours+compile+channels_last", True, True)]
        for name, cl, comp in options:
            model = build_model(ModelConfig(kind=kind, codebook_size=K, code_dim=D, num_rb=2)).train()
            xx = x
            if cl:
                model = model.to(memory_format=torch.channels_last)
                xx = x.contiguous(memory_format=torch.channels_last)
            opt = make_optimizer(model, 1e-3, torch.device("cpu"))   # what train.py uses
            fwd = torch.compile(model) if comp else model
            variants[name] = (ours_step(fwd, opt), xx)
        for name, (ips, ratio) in bench_interleaved(variants, args.steps, args.rounds).items():
            print(f"{kind:<11} {name:<27} {ips:8.0f} img/s   {ratio:.2f}x")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:.0f} MB")


if __name__ == "__main__":
    main()
