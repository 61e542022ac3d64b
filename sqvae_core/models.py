"""The model family: Gaussian SQ-VAE I-IV, vMF and NC SQ-VAE, VQ-VAE baselines, the modern
collapse fixes (FSQ, LFQ, SimVQ, rotation trick), a VAE.

Every model is   encoder -> quantizer -> decoder -> likelihood   and every forward returns a
`ModelOutput` holding what the app plots: the loss and its named terms, the reconstruction,
the code indices and detached scalar stats (mse, perplexity, entropy, σ²_φ or κ_φ, σ² or κ).

    model = build_model(ModelConfig(kind="gaussian_1"))
    out = model(x, temperature=1.0)      # x: (B, C, S, S) in [0, 1]
    out.loss.backward()

`MODELS` maps every kind name to its class (no string evaluation anywhere).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .config import MODEL_KINDS, ModelConfig
from .modern import LibraryQuantizer
from .nets import Decoder, Encoder
from .quantizers import GaussianSQ, QuantizerOutput, VectorQuantizer, VmfSQ
from .vmf_norm import log_cf


@dataclass
class ModelOutput:
    loss: torch.Tensor                       # scalar to minimise
    terms: dict[str, torch.Tensor]           # named parts of the loss (sum to loss)
    x_rec: torch.Tensor                      # (B, C, S, S) decoded image in [0, 1], detached
    indices: torch.Tensor | None             # (B, H, W) code indices; None for the VAE
    probs: torch.Tensor | None = None        # (B, H, W, K) P̂(z_q | z) for stochastic quantizers, detached
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # detached 0-dim tensors
    # Gradients flow through `loss` and `terms` only. x_rec and probs are for looking at: an output
    # that required grad but fed no loss would get a zero gradient buffer in every backward (autograd
    # fills it in), and a compiled step did fill P̂'s, (B, H, W, K), at ~0.55 ms of a 34 ms CPU step.


def check_images(x: torch.Tensor, cfg: ModelConfig) -> None:
    """Raise ValueError unless x is a float batch (B, C, S, S) of the model's image shape."""
    want = (cfg.image_channels, cfg.image_size, cfg.image_size)
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor of images (B, {want[0]}, {want[1]}, {want[2]}), got {type(x).__name__}")
    if x.ndim != 4 or tuple(x.shape[1:]) != want:
        raise ValueError(f"expected images of shape (B, {want[0]}, {want[1]}, {want[2]}) "
                         f"({'grey' if want[0] == 1 else 'RGB'} {want[1]}x{want[2]}), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"expected float images in [0, 1], got dtype {x.dtype}")


def per_image_sq_error(x_rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Σ_pixels (x − x̂)², one value per image (pixels in [0, 1]): the `mse` of docs/interface.md."""
    return (x_rec - x).pow(2).flatten(1).sum(1)


class GaussianLikelihood(nn.Module):
    """Decoder N(f_θ(Z_q), σ² I) on D = C·S·S pixels, per image, up to (D/2)·log 2π:

        learned σ²:  ‖x − f(Z_q)‖² / (2σ²) + (D/2) log σ²
        ARELBO:      σ² set to its optimum MSE/D, giving (D/2) log MSE + const; the constant
                     (D/2)(1 − log D) is dropped, as the official code does, so that loss values
                     (and the LR-plateau decisions taken on them) are the official ones.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.arelbo = cfg.arelbo
        self.dim = cfg.image_channels * cfg.image_size ** 2
        if not self.arelbo:
            self.log_var_x = nn.Parameter(torch.tensor(float(cfg.log_var_x_init)))

    def forward(self, logits: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (reconstruction loss, σ², x̂)."""
        x_rec = torch.sigmoid(logits)
        mse = per_image_sq_error(x_rec, x).mean()
        if self.arelbo:
            loss = 0.5 * self.dim * torch.log(mse)
            return loss, (mse / self.dim).detach(), x_rec
        var_x = self.log_var_x.exp()
        loss = mse / (2 * var_x) + 0.5 * self.dim * self.log_var_x
        return loss, var_x.detach(), x_rec


def full_precision(t: torch.Tensor):
    """Autocast off for what follows: with `--amp` only the encoder's and decoder's convolutions run
    in bf16; the quantizer and the likelihood stay fp32. bf16 keeps 8 bits of mantissa, so the logit
    −‖z − b_k‖²/(2σ²_φ), as ‖z‖² + ‖b_k‖² − 2zᵀb_k, would carry an error of about 2⁻⁸·‖z‖²/σ²_φ:
    as σ²_φ anneals towards 0 that is more than the gaps between neighbouring codes' logits.
    Devices without autocast (the meta device of the no-host-sync test) have nothing to turn off."""
    if not torch.amp.is_autocast_available(t.device.type):
        return contextlib.nullcontext()
    return torch.autocast(t.device.type, enabled=False)


def fp32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


class _Autoencoder(nn.Module):
    """Shared plumbing: validation, encode/quantize/decode, evaluation helpers."""

    discrete = True

    def __init__(self, cfg: ModelConfig, with_log_var: bool = False, out_channels: int | None = None):
        super().__init__()
        self.cfg = cfg.validate()
        design = cfg.design
        self.encoder = Encoder(cfg.input_channels, cfg.code_dim, cfg.num_rb, cfg.batch_norm, with_log_var, design)
        self.decoder = Decoder(out_channels or cfg.image_channels, cfg.code_dim, cfg.num_rb, cfg.batch_norm, design)
        self.quantizer: nn.Module | None = None

    # -- pieces the app and explore.py use -------------------------------------------
    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Continuous encoder output (z, log_var), each (B, d, H, W)."""
        check_images(x, self.cfg)
        return self.encoder(self.prepare_input(x))

    def quantize(self, z: torch.Tensor, log_var: torch.Tensor | None = None, *, mode: str | None = None,
                 temperature: float = 1.0, generator: torch.Generator | None = None) -> QuantizerOutput:
        return self.quantizer(z, log_var, mode=mode, temperature=temperature, generator=generator)

    def to_image(self, logits: torch.Tensor) -> torch.Tensor:
        """Decoder output -> image in [0, 1] (the likelihood's mean or mode)."""
        return torch.sigmoid(logits)

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.to_image(self.decoder(z_q))

    def codebook_vectors(self) -> torch.Tensor:
        return self.quantizer.codebook_vectors()

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        k, n = self.cfg.codebook_size, self.cfg.latent_size
        if indices.ndim != 3 or tuple(indices.shape[1:]) != (n, n):
            raise ValueError(f"expected code grids of shape (B, {n}, {n}), got {tuple(indices.shape)}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= k):
            raise ValueError(f"code indices must be in [0, {k}), got values in "
                             f"[{int(indices.min())}, {int(indices.max())}]")
        return self.decode(self.quantizer.lookup(indices.long()))

    @torch.no_grad()
    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic code grid (B, H, W) of images x."""
        z, log_var = self.encode(x)
        return self.quantize(z, log_var, mode="argmax").indices

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstruction (argmax quantization), in [0, 1]."""
        z, log_var = self.encode(x)
        return self.decode(self.quantize(z, log_var, mode="argmax").z_q)

    # -- the loss ---------------------------------------------------------------------
    def reconstruction(self, logits: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, dict, torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, *, temperature: float = 1.0, mode: str | None = None,
                generator: torch.Generator | None = None) -> ModelOutput:
        z, log_var = self.encode(x)                        # bf16 convolutions under --amp
        with full_precision(z):
            q = self.quantize(fp32(z), fp32(log_var), mode=mode, temperature=temperature, generator=generator)
        logits = self.decoder(q.z_q)                       # bf16 convolutions under --amp
        with full_precision(logits):
            rec_loss, rec_stats, x_rec = self.reconstruction(logits.float(), x)
        terms = {"reconstruction": rec_loss, **q.terms}
        stats = {"mse": per_image_sq_error(x_rec, x).mean().detach(), **q.stats, **rec_stats}
        return ModelOutput(loss=rec_loss + q.loss, terms=terms, x_rec=x_rec.detach(), indices=q.indices,
                           probs=None if q.probs is None else q.probs.detach(), stats=stats)


class GaussianSQVAE(_Autoencoder):
    """Gaussian SQ-VAE (variants I-IV) and `fixed_var` (σ²_φ frozen at var_q_init).

    Loss per image (paper Eq. 9):  ‖x − f(Z_q)‖²/(2σ²) + (D/2) log σ²
                                   + Σ‖z − z_q‖²/(2σ²_φ) − Σ H(P̂(z_q | z)).
    """

    def __init__(self, cfg: ModelConfig):
        variant = 1 if cfg.kind == "fixed_var" else int(cfg.kind[-1])
        super().__init__(cfg, with_log_var=variant > 1)
        self.quantizer = GaussianSQ(cfg.codebook_size, cfg.code_dim, variant, cfg.var_q_init,
                                    cfg.var_q_floor, learnable=cfg.kind != "fixed_var")
        self.likelihood = GaussianLikelihood(cfg)

    def reconstruction(self, logits, x):
        loss, var_x, x_rec = self.likelihood(logits, x)
        return loss, {"sigma2_x": var_x}, x_rec


class VQVAE(_Autoencoder):
    """VQ-VAE baselines: `vq` (codebook loss), `vq_ema` (EMA codebook), `vq_reset` (EMA + reset).

    Loss: MSE/data_variance (per-element mean, as in the VQ-VAE code) + quantizer losses.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.quantizer = VectorQuantizer(
            cfg.codebook_size, cfg.code_dim, cfg.beta, ema=cfg.kind != "vq", decay=cfg.ema_decay,
            eps=cfg.ema_eps, reset_after=cfg.reset_after if cfg.kind == "vq_reset" else None)

    def reconstruction(self, logits, x):
        x_rec = torch.sigmoid(logits)
        return F.mse_loss(x_rec, x) / self.cfg.data_variance, {}, x_rec


class ModernVQVAE(VQVAE):
    """FSQ, LFQ, SimVQ and VQ with the rotation trick (vector-quantize-pytorch; modern.py) on the
    same nets as every other kind, with the VQ baselines' reconstruction term (MSE/data_variance)
    plus the library quantizer's own loss terms."""

    def __init__(self, cfg: ModelConfig):
        _Autoencoder.__init__(self, cfg)
        self.quantizer = LibraryQuantizer(cfg.kind, cfg.codebook_size, cfg.code_dim, cfg.beta, cfg.ema_decay)


class _CategoricalSQVAE(_Autoencoder):
    """Grey-level classes c = round(x·(C−1)) in, C logits per pixel out; vMF quantization."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, out_channels=cfg.num_classes)
        self.quantizer = VmfSQ(cfg.codebook_size, cfg.code_dim, cfg.kappa_q_init, cfg.kappa_q_floor)

    def classes(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x[:, 0].clamp(0, 1) * (self.cfg.num_levels - 1)).long()

    def prepare_input(self, x):
        return F.one_hot(self.classes(x), self.cfg.num_classes).permute(0, 3, 1, 2).to(x.dtype)

    def to_image(self, logits):
        """The most probable grey level of each pixel, as an image in [0, 1]; with an odd C the
        official nets emit one padding class more, which is never read out."""
        c = self.cfg.num_levels
        return (logits[:, :c].argmax(1, keepdim=True).to(logits.dtype)) / (c - 1)


class VmfSQVAE(_CategoricalSQVAE):
    """vMF SQ-VAE: categorical pixels through a vMF decoder on the unit sphere S^{F−1}.

    F = C classes (rounded up to even with the official nets). With f̃ = f(Z_q)/‖f(Z_q)‖ and
    w_c the F unit basis vectors, each pixel's class vector w_x has density
    vMF(w_x; f̃, κ) = C_F(κ) exp(κ w_xᵀ f̃); reading classes out gives softmax_c(κ w_cᵀ f̃).
    Loss per image:  Σ_pixels [−log C_F(κ) − κ f̃_x]  + latent terms, with the constant
    (F/2)·log 2π of log C_F dropped as in the official code (same loss values as it).
    κ = exp(t) is learned (official: κ = 1/exp(u), the same with u = −t), which lets the
    model self-anneal (κ_φ rises with κ). With the official nets the decoder output goes
    through a softplus before it is normalised, as there.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.log_kappa_x = nn.Parameter(torch.tensor(math.log(cfg.kappa_x_init)))
        self.softplus = cfg.net == "official"

    def reconstruction(self, logits, x):
        if self.softplus:          # monotone: the argmax read-out (to_image) is unchanged
            logits = F.softplus(logits)
        f = F.normalize(logits, dim=1)
        kappa = self.log_kappa_x.exp()
        cos = f.gather(1, self.classes(x)[:, None]).squeeze(1)       # f̃_xᵀ w_x per pixel
        n_pix = cos[0].numel()
        n_cls = self.cfg.num_classes
        log_c = log_cf(kappa, n_cls).to(logits.dtype) + 0.5 * n_cls * math.log(2 * math.pi)
        loss = -n_pix * log_c - kappa * cos.flatten(1).sum(1).mean()
        return loss, {"kappa_x": kappa.detach()}, self.to_image(logits)


class NcSQVAE(_CategoricalSQVAE):
    """Naive categorical SQ-VAE: softmax cross-entropy decoder with no κ (cannot self-anneal).

    Loss per image:  −Σ_pixels log softmax(f(Z_q))_x  + κ_φ Σ(1 − z_qᵀz) − Σ H(P̂).
    """

    def reconstruction(self, logits, x):
        ce = F.cross_entropy(logits, self.classes(x), reduction="sum") / x.shape[0]
        return ce, {}, self.to_image(logits)


class GaussianVAE(_Autoencoder):
    """Continuous Gaussian VAE with the same nets: q(z|x) = N(μ, diag σ²), prior N(0, I).

    Loss per image: Gaussian reconstruction (as SQ-VAE) + KL = ½ Σ(μ² + σ² − log σ² − 1).
    """

    discrete = False

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, with_log_var=True)
        self.likelihood = GaussianLikelihood(cfg)

    def quantize(self, z, log_var=None, *, mode=None, temperature=1.0, generator=None):
        raise ValueError("the continuous VAE has no codebook to quantize with")

    def codebook_vectors(self):
        raise ValueError("the continuous VAE has no codebook")

    @torch.no_grad()
    def reconstruct(self, x):
        return self.decode(self.encode(x)[0])

    @torch.no_grad()
    def codes(self, x):
        raise ValueError("the continuous VAE has no codes")

    def forward(self, x, *, temperature=1.0, mode=None, generator=None):
        mu, log_var = self.encode(x)
        mu, log_var = fp32(mu), fp32(log_var)              # the sampling and KL in fp32 under --amp
        if self.training or mode == "sample":
            eps = torch.randn_like(mu) if generator is None else \
                torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
            z = mu + torch.exp(0.5 * log_var) * eps
        else:
            z = mu
        logits = self.decoder(z)
        with full_precision(logits):
            rec_loss, var_x, x_rec = self.likelihood(logits.float(), x)
        kl = 0.5 * (mu.pow(2) + log_var.exp() - log_var - 1).flatten(1).sum(1).mean()
        stats = {"mse": per_image_sq_error(x_rec, x).mean().detach(), "sigma2_x": var_x,
                 "kl": kl.detach()}
        return ModelOutput(loss=rec_loss + kl, terms={"reconstruction": rec_loss, "kl": kl},
                           x_rec=x_rec.detach(), indices=None, stats=stats)


MODELS: dict[str, type[_Autoencoder]] = {
    "gaussian_1": GaussianSQVAE, "gaussian_2": GaussianSQVAE,
    "gaussian_3": GaussianSQVAE, "gaussian_4": GaussianSQVAE,
    "fixed_var": GaussianSQVAE,
    "vmf": VmfSQVAE, "nc": NcSQVAE,
    "vq": VQVAE, "vq_ema": VQVAE, "vq_reset": VQVAE,
    "fsq": ModernVQVAE, "lfq": ModernVQVAE, "simvq": ModernVQVAE, "vq_rotation": ModernVQVAE,
    "vae": GaussianVAE,
}
assert set(MODELS) == set(MODEL_KINDS), "every kind in config.MODEL_KINDS needs a class"


def build_model(cfg: ModelConfig) -> _Autoencoder:
    cfg.validate()
    return MODELS[cfg.kind](cfg)

