"""Quantizers: one nn.Module each, one call, one small named result.

    out = quantizer(z)            # z: (B, d, H, W) encoder output
    out.z_q, out.indices, out.probs, out.loss, out.terms, out.stats

Stochastic quantizers (SQ-VAE, Takida et al. 2022) have no stop-gradient, EMA or reset;
the VQ-VAE baselines (van den Oord et al. 2017) have them. All loss terms are sums over
latent positions and dimensions, averaged over the batch ("per image"), except the VQ
losses, which keep VQ-VAE's customary per-element means.

Modes: "gumbel" (training: Gumbel-softmax relaxation at a temperature), "argmax"
(deterministic, used for evaluation and every figure), "sample" (a hard draw from P̂).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("gumbel", "argmax", "sample")


@dataclass
class QuantizerOutput:
    z_q: torch.Tensor                   # (B, d, H, W) what the decoder sees
    indices: torch.Tensor               # (B, H, W) int64, the deterministic code of each position
    probs: torch.Tensor | None          # (B, H, W, K) P̂(z_q = b_k | z), None for VQ
    loss: torch.Tensor                  # scalar: sum of the terms
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars for logging


# ---------------------------------------------------------------------------- helpers
def to_rows(z: torch.Tensor) -> torch.Tensor:
    """(B, d, H, W) -> (B*H*W, d), positions in raster order."""
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def from_rows(rows: torch.Tensor, b: int, h: int, w: int) -> torch.Tensor:
    """(B*H*W, d) -> (B, d, H, W)."""
    return rows.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()


def shifted_neg_half_distances(rows: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """zᵢᵀb_k − ½‖b_k‖² = −½‖z_i − b_k‖² + ½‖z_i‖², as an (N, K) matrix, in one fused matmul.

    Softmax, argmax and entropy over k do not change when a row gets a constant added, so the
    quantizers use this instead of −½‖z_i − b_k‖²: a third of the elementwise work of the hot
    path, and no cancellation between ‖z‖² and 2zᵀb."""
    return torch.addmm(codebook.pow(2).sum(1).mul(-0.5), rows, codebook.t())


def perplexity_of_counts(counts: torch.Tensor) -> torch.Tensor:
    """exp(H(ū)), ū = counts / Σ counts: the perplexity of a code-usage histogram (K,).
    The one definition: training stats, `evaluate` and RunLogger all use it."""
    p = counts / counts.sum()
    return torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum())


def count_codes_(counts: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Add each code's occurrences in `indices` to the histogram `counts` (K,), in place; returns
    it. The one way codes are counted while training (quantizer stats, train.Window, RunLogger):
    index_add_, unlike torch.bincount, never reads the largest index back to the host (a GPU sync)."""
    idx = indices.reshape(-1)
    return counts.index_add_(0, idx, torch.ones((), dtype=counts.dtype, device=idx.device).expand(idx.numel()))


def perplexity(indices: torch.Tensor, k: int) -> torch.Tensor:
    """Perplexity of the given code indices' usage."""
    return perplexity_of_counts(count_codes_(torch.zeros(k, device=indices.device), indices))


# SplitMix64's increment and output multipliers, as signed int64 (torch has no uint64 arithmetic)
_SPLITMIX = tuple(c - (1 << 64) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """z >> bits as on uint64 (torch's >> on int64 copies the sign bit in)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def counter_uniform(like: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Uniforms on torch.rand's grid {m·2⁻²⁴}, shaped like `like`: element i is the output of
    SplitMix64 (Steele, Lea & Flood 2014) at counter key + i, a whole-number hash
        z = (key + i)·γ;  z ^= z ≫ 30;  z *= c₁;  z ^= z ≫ 27;  z *= c₂;  z ^= z ≫ 31;  m = z ≫ 40
    (all mod 2⁶⁴), so the numbers are SplitMix64's own stream from a random start; two draws with
    independent 64-bit keys overlap with probability 2n/2⁶⁴. Why: torch's CPU generator (mt19937)
    makes one number after another, 1.2 ms for a step's 1568×256 uniforms, while this is a few
    vector instructions per element that torch.compile fuses into the Gumbel-softmax kernel: a
    compiled bf16 step 3.3% faster on AVX-512, fp32 1.2% (benchmarks/RESULTS.md); as AVX2 code,
    where int64 multiplies are emulated, about as slow as mt19937."""
    gamma, c1, c2 = _SPLITMIX
    # key is added before the multiply: inductor's range analysis overflows on arange·γ alone
    z = (torch.arange(like.numel(), dtype=torch.int64, device=like.device) + key) * gamma
    z = (z ^ _shift_right(z, 30)) * c1
    z = (z ^ _shift_right(z, 27)) * c2
    z = z ^ _shift_right(z, 31)
    return (_shift_right(z, 40).to(like.dtype) * 2.0 ** -24).view(like.shape)


def gumbel_softmax(logits: torch.Tensor, temperature: float | torch.Tensor,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """softmax((logits + g) / τ), g ~ Gumbel(0, 1) (Jang et al. 2017; Maddison et al. 2017).
    τ may be a 0-dim tensor: a compiled training step takes it so, because a new Python float
    every step would make torch.compile specialise on it and compile again.

    The uniforms under g come from torch's generator. A compiled step on a CPU instead draws one
    64-bit key from it and hashes counters (counter_uniform): the same distribution, a different
    stream, still fixed by the seed and restored on --resume with the generator's state."""
    if not isinstance(temperature, torch.Tensor) and not temperature > 0:
        raise ValueError(f"Gumbel-softmax temperature must be > 0, got {temperature}")
    if generator is not None:
        u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
    elif logits.device.type == "cpu" and torch.compiler.is_compiling():
        u = counter_uniform(logits, torch.randint(-2 ** 63, 2 ** 63 - 1, (), dtype=torch.int64))
    else:   # rand_like, unlike rand(shape), takes the symbolic batch size of an epoch's last batch
        u = torch.rand_like(logits)
    g = -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))
    # L/τ + g/τ rather than (L + g)/τ: inductor rewrites a softmax of a quotient (or product) into a
    # form that takes two maxima and tests every element for finiteness; a sum reaches it unchanged.
    inv_t = 1.0 / temperature
    return F.softmax(logits * inv_t + g * inv_t, dim=-1)


def _assignments(logits: torch.Tensor, mode: str, temperature: float,
                 generator: torch.Generator | None) -> torch.Tensor:
    """Weights over codes (N, K) with which the codebook is mixed."""
    if mode == "gumbel":
        return gumbel_softmax(logits, temperature, generator)
    if mode == "argmax":
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    if mode == "sample":
        idx = torch.multinomial(F.softmax(logits, -1), 1, generator=generator).squeeze(1)
        return F.one_hot(idx, logits.shape[-1]).to(logits.dtype)
    raise ValueError(f"quantizer mode must be one of {MODES}, got {mode!r}")


class _RowEntropy(torch.autograd.Function):
    """P̂ = softmax(L) over the last dimension and its entropy H(P̂) = −Σ_k p_k log p_k in nats, as
        H = log Σ_k e_k − Σ_k p_k s_k,   s = L − max L,  e = exp(s),  p = e / Σ e,
    with the gradient in closed form, ∂H/∂L_k = −p_k (log p_k + H). One exp an element forward
    and one pass backward: compiled, the quantizer's kernels take about 0.3 ms less of a CPU
    step than with autograd through log_softmax (benchmarks/RESULTS.md). P̂ is for looking at
    and gets no gradient (none is filled in for it)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor):
        shifted = logits - logits.amax(-1, keepdim=True)
        e = shifted.exp()
        total = e.sum(-1, keepdim=True)
        p = e / total
        log_total = total.log()
        entropy = log_total.squeeze(-1) - (p * shifted).sum(-1)
        ctx.mark_non_differentiable(p)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(p, shifted, log_total, entropy)
        return p, entropy

    @staticmethod
    def backward(ctx, _grad_p, grad_entropy):
        if grad_entropy is None:
            return None
        p, shifted, log_total, entropy = ctx.saved_tensors
        log_p = shifted - log_total
        return -grad_entropy.unsqueeze(-1) * p * (log_p + entropy.unsqueeze(-1))


def _entropy_rows(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """P̂ = softmax(logits) (no gradient) and its entropy per row H(P̂) in nats (with one)."""
    return _RowEntropy.apply(logits)


def _check_z(z: torch.Tensor, d: int) -> None:
    if z.ndim != 4 or z.shape[1] != d:
        raise ValueError(f"quantizer expects z of shape (B, {d}, H, W), got {tuple(z.shape)}")


# ------------------------------------------------------------------ Gaussian SQ-VAE
class GaussianSQ(nn.Module):
    """Gaussian stochastic quantization, variants I-IV of the SQ-VAE paper (Sec. 3-4).

    Dequantization p(z_i | Z_q) = N(z_q,i, σ²_φ I); quantization (Eq. 7)
        P̂(z_q,i = b_k | Z) = softmax_k(−‖z_i − b_k‖² / (2σ²_φ)),
    and the latent part of the loss (Eq. 9, per image)
        Σ_i ‖z_i − z_q,i‖² / (2σ²_φ)  −  Σ_i H(P̂(z_q,i | Z)).
    σ²_φ = floor + exp(s) (variant I: one learned scalar s) plus, for II-IV, the encoder's
    variance exp(v): II one per image, III one per position, IV one per dimension.
    `learnable=False` freezes σ²_φ at its initial value (the `fixed_var` baseline).
    """

    def __init__(self, codebook_size: int, code_dim: int, variant: int = 1, var_init: float = 10.0,
                 var_floor: float = 0.0, learnable: bool = True):
        super().__init__()
        if variant not in (1, 2, 3, 4):
            raise ValueError(f"Gaussian SQ variant must be 1-4, got {variant}")
        self.k, self.d, self.variant, self.var_floor = codebook_size, code_dim, variant, var_floor
        self.codebook = nn.Parameter(torch.randn(codebook_size, code_dim))  # official init
        s0 = torch.tensor(math.log(max(var_init - var_floor, 1e-8)))
        if learnable:
            self.log_var_q = nn.Parameter(s0)
        else:
            self.register_buffer("log_var_q", s0)

    def codebook_vectors(self) -> torch.Tensor:
        return self.codebook

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices (B, H, W) -> z_q (B, d, H, W)."""
        return self.codebook[indices].permute(0, 3, 1, 2).contiguous()

    def effective_variance(self, z: torch.Tensor, log_var: torch.Tensor | None) -> torch.Tensor:
        """σ²_φ as rows broadcastable against to_rows(z): (1, 1), (N, 1) or (N, d)."""
        var = self.var_floor + self.log_var_q.exp()
        if self.variant == 1:
            return var.reshape(1, 1)
        if log_var is None or log_var.shape != z.shape:
            raise ValueError(f"Gaussian SQ variant {self.variant} needs the encoder's log-variance "
                             f"of shape {tuple(z.shape)}")
        b, _, h, w = z.shape
        if self.variant == 2:    # one variance per image
            lv = log_var.mean(dim=(1, 2, 3), keepdim=True).expand(b, 1, h, w)
        elif self.variant == 3:  # one per latent position
            lv = log_var.mean(dim=1, keepdim=True)
        else:                    # one per dimension of each position
            lv = log_var
        return var + to_rows(lv.exp())

    def forward(self, z: torch.Tensor, log_var: torch.Tensor | None = None, *, mode: str | None = None,
                temperature: float = 1.0, generator: torch.Generator | None = None) -> QuantizerOutput:
        _check_z(z, self.d)
        mode = mode or ("gumbel" if self.training else "argmax")
        b, _, h, w = z.shape
        rows = to_rows(z)
        var = self.effective_variance(z, log_var)
        precision = 1.0 / var
        # logits = −‖z − b_k‖² / (2σ²_φ) up to a per-row constant (which softmax ignores)
        if var.shape[1] == 1:   # isotropic: (zᵀb_k − ½‖b_k‖²) / σ²_φ
            logits = precision * shifted_neg_half_distances(rows, self.codebook)
        else:                   # variant IV: Σ_j (z_j b_kj − ½ b_kj²) / σ²_φ,j
            logits = (rows * precision) @ self.codebook.t() - 0.5 * precision @ self.codebook.pow(2).t()
        probs, entropy = _entropy_rows(logits)
        weights = _assignments(logits, mode, temperature, generator)
        zq_rows = weights @ self.codebook
        # Eq. 9, per image: Σ‖z − z_q‖²/(2σ²_φ) − Σ H(P̂)
        rate = 0.5 * ((rows - zq_rows).pow(2) * precision).sum() / b
        neg_entropy = -entropy.sum() / b
        indices = logits.argmax(-1)
        stats = {
            "perplexity": perplexity(indices, self.k).detach(),
            "entropy": entropy.mean().detach(),
            "sigma2_q": var.mean().detach(),
        }
        return QuantizerOutput(
            z_q=from_rows(zq_rows, b, h, w), indices=indices.reshape(b, h, w),
            probs=probs.reshape(b, h, w, self.k), loss=rate + neg_entropy,
            terms={"latent_distortion": rate, "neg_entropy": neg_entropy}, stats=stats)


# ----------------------------------------------------------------------- vMF SQ-VAE
class VmfSQ(nn.Module):
    """von Mises-Fisher stochastic quantization (SQ-VAE paper, Sec. 4.2).

    Codes and encoder outputs live on the unit sphere. Dequantization
    p(z_i | Z_q) = vMF(z_q,i, κ_φ); quantization P̂(z_q,i = b_k | Z) = softmax_k(κ_φ b_kᵀ z_i);
    latent loss per image: κ_φ Σ_i (1 − z_q,iᵀ z_i) − Σ_i H(P̂).  κ_φ = floor + exp(s), s
    learned (the official code has a floor of 1).
    (The vMF normalisers of q(z|x) and p(z|z_q) share κ_φ and cancel.)
    """

    def __init__(self, codebook_size: int, code_dim: int, kappa_init: float = 1.0, kappa_floor: float = 0.0):
        super().__init__()
        self.k, self.d, self.kappa_floor = codebook_size, code_dim, kappa_floor
        self.codebook = nn.Parameter(torch.randn(codebook_size, code_dim))
        self.log_kappa_q = nn.Parameter(torch.tensor(math.log(kappa_init - kappa_floor)))

    def codebook_vectors(self) -> torch.Tensor:
        return F.normalize(self.codebook, dim=1)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        return self.codebook_vectors()[indices].permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor, log_var: torch.Tensor | None = None, *, mode: str | None = None,
                temperature: float = 1.0, generator: torch.Generator | None = None) -> QuantizerOutput:
        _check_z(z, self.d)
        mode = mode or ("gumbel" if self.training else "argmax")
        b, _, h, w = z.shape
        rows = F.normalize(to_rows(z), dim=1)
        codebook = self.codebook_vectors()
        kappa = self.kappa_floor + self.log_kappa_q.exp()
        logits = kappa * rows @ codebook.t()        # κ_φ b_kᵀ z_i
        probs, entropy = _entropy_rows(logits)
        zq_rows = _assignments(logits, mode, temperature, generator) @ codebook
        rate = kappa * (1 - (zq_rows * rows).sum(1)).sum() / b   # κ_φ Σ(1 − z_qᵀ z)
        neg_entropy = -entropy.sum() / b
        indices = logits.argmax(-1)
        stats = {"perplexity": perplexity(indices, self.k).detach(),
                 "entropy": entropy.mean().detach(), "kappa_q": kappa.detach()}
        return QuantizerOutput(
            z_q=from_rows(zq_rows, b, h, w), indices=indices.reshape(b, h, w),
            probs=probs.reshape(b, h, w, self.k), loss=rate + neg_entropy,
            terms={"latent_distortion": rate, "neg_entropy": neg_entropy}, stats=stats)


# -------------------------------------------------------------------------- VQ-VAE
class VectorQuantizer(nn.Module):
    """VQ-VAE: nearest neighbour, straight-through gradient, codebook + β·commitment loss.

        loss = ‖sg[z] − e‖² + β ‖z − sg[e]‖²   (per-element means, β = 0.25)

    Codebook initialised uniform in ±1/K, as in the original VQ-VAE code.
    `ema=True` replaces the codebook loss by exponential moving averages (decay 0.99,
    Laplace-smoothed cluster sizes; VQ-VAE appendix). `reset_after=N` (with EMA) re-seeds
    codes unused for N training steps from random encoder outputs of the current batch.
    """

    def __init__(self, codebook_size: int, code_dim: int, beta: float = 0.25, ema: bool = False,
                 decay: float = 0.99, eps: float = 1e-5, reset_after: int | None = None):
        super().__init__()
        self.k, self.d, self.beta, self.ema, self.decay, self.eps = codebook_size, code_dim, beta, ema, decay, eps
        self.reset_after = reset_after
        init = torch.empty(codebook_size, code_dim).uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
        if ema:
            self.register_buffer("codebook", init)
            self.register_buffer("ema_count", torch.zeros(codebook_size))
            self.register_buffer("ema_sum", init.clone())
            self.register_buffer("last_used", torch.zeros(codebook_size, dtype=torch.long))
            self.register_buffer("step", torch.zeros((), dtype=torch.long))
        else:
            self.codebook = nn.Parameter(init)

    def codebook_vectors(self) -> torch.Tensor:
        return self.codebook

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        return self.codebook[indices].permute(0, 3, 1, 2).contiguous()

    # Eager even in a compiled step: compiled, these in-place buffer updates went wrong (torch
    # 2.13: VQ-EMA's perplexity fell to 1 within 5 steps where eager stays at ~85; a test compares)
    @torch.compiler.disable
    @torch.no_grad()
    def _ema_update(self, rows: torch.Tensor, indices: torch.Tensor) -> None:
        onehot = F.one_hot(indices, self.k).to(rows.dtype)
        counts, sums = onehot.sum(0), onehot.t() @ rows
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)   # every rank sees the global batch statistics
            torch.distributed.all_reduce(sums)
        self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.ema_count.sum()
        smoothed = (self.ema_count + self.eps) / (n + self.k * self.eps) * n   # Laplace smoothing
        self.codebook.copy_(self.ema_sum / smoothed[:, None])
        self.step += 1
        self.last_used[counts > 0] = self.step
        if self.reset_after:
            # every dead code takes a random encoder output of the batch; written with `where` over
            # all K codes, so that no count of dead codes is read back to the host (a GPU sync)
            dead = (self.step - self.last_used) >= self.reset_after
            seeds = rows[torch.randint(0, rows.shape[0], (self.k,), device=rows.device)]
            self.codebook.copy_(torch.where(dead[:, None], seeds, self.codebook))
            self.ema_sum.copy_(torch.where(dead[:, None], seeds, self.ema_sum))
            self.ema_count.masked_fill_(dead, 1.0)
            self.last_used.copy_(torch.where(dead, self.step, self.last_used))

    def forward(self, z: torch.Tensor, log_var: torch.Tensor | None = None, *, mode: str | None = None,
                temperature: float = 1.0, generator: torch.Generator | None = None) -> QuantizerOutput:
        _check_z(z, self.d)
        b, _, h, w = z.shape
        rows = to_rows(z)
        indices = shifted_neg_half_distances(rows.detach(), self.codebook).argmax(-1)   # nearest code
        zq_rows = self.codebook[indices]
        commitment = F.mse_loss(rows, zq_rows.detach())
        terms = {"commitment": self.beta * commitment}
        if self.ema:
            if self.training:
                self._ema_update(rows.detach(), indices)
        else:
            terms["codebook"] = F.mse_loss(zq_rows, rows.detach())
        zq_rows = rows + (zq_rows - rows).detach()   # straight-through estimator
        stats = {"perplexity": perplexity(indices, self.k).detach()}
        return QuantizerOutput(
            z_q=from_rows(zq_rows, b, h, w), indices=indices.reshape(b, h, w), probs=None,
            loss=sum(terms.values()), terms=terms, stats=stats)
