"""Model configuration: one small dataclass that rebuilds any model in the registry.

Configs are also read back from run directories and uploaded bundles, so `validate`
refuses anything outside sane bounds *before* a tensor is allocated.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from .kinds import KINDS, check_codebook_size, kinds_of

# Model kinds, as named on the command line (docs/interface.md): the catalogue's (kinds.py), which
# the registry in models.py maps to classes. The groups below are the catalogue's families.
MODEL_KINDS = tuple(KINDS)
GAUSSIAN_KINDS = kinds_of("gaussian")          # Gaussian SQ-VAE I-IV and fixed_var
CATEGORICAL_KINDS = kinds_of("categorical")    # vmf, nc
VQ_KINDS = kinds_of("vq")                      # the 2017 VQ-VAE baselines
MODERN_KINDS = kinds_of("modern")              # FSQ, LFQ, SimVQ, rotation trick (vector-quantize-pytorch)

# Hard limits for configs from untrusted files (a K of 10^9 must be refused, not allocated).
MAX_CODEBOOK_SIZE = 65536
MAX_CODE_DIM = 2048
MAX_IMAGE_SIZE = 256
MAX_RES_BLOCKS = 16
MAX_PARAMS = 200_000_000
NETS = ("official", "legacy")   # nets.py


@dataclass
class ModelConfig:
    kind: str = "gaussian_1"
    image_channels: int = 1        # 1 (grey) or 3 (RGB); categorical models read grey levels
    image_size: int = 28           # H = W; the latent grid is image_size / 4 (/8 for 64x64 label maps)
    codebook_size: int = 256       # K
    code_dim: int = 64             # d, also the width of the conv nets
    num_rb: int = 2                # residual blocks in encoder and decoder
    batch_norm: bool = True
    net: str = "official"          # "official": the official SQ-VAE nets and init (nets.py);
                                   # "legacy": bundles made before them (a config without `net`)
    # Gaussian SQ-VAE: sigma^2_phi = var_q_floor + exp(s) (+ encoder variance exp(v) for II-IV).
    # The official code has sigma^2_phi = exp(v) + exp(s) with v = 0 for variant I, i.e. a
    # floor of 1 there (the paper preset sets it); ours defaults to no floor. The logged
    # sigma2_q is always the effective value.
    var_q_init: float = 10.0       # initial var_q_floor + exp(s) (fixed forever for fixed_var)
    var_q_floor: float = 0.0
    # vMF / NC SQ-VAE: kappa_phi = kappa_q_floor + exp(s) (official: 1 + exp(s))
    kappa_q_init: float = 1.0      # initial kappa_q_floor + exp(s)
    kappa_q_floor: float = 0.0
    num_levels: int = 8            # C, grey-level classes of categorical data (vmf, nc)
    kappa_x_init: float = 1.0      # decoder concentration kappa (vmf); official: 1/0.01 = 100
    # Gaussian decoder: sigma^2 learned from log_var_x_init, or ARELBO (sigma^2 = MSE / D)
    arelbo: bool = True
    log_var_x_init: float = 0.0
    # VQ-VAE baselines (van den Oord et al. 2017; EMA from its appendix)
    beta: float = 0.25             # commitment weight
    ema_decay: float = 0.99
    ema_eps: float = 1e-5          # Laplace smoothing of EMA cluster sizes
    reset_after: int = 200         # vq_reset: re-seed codes unused for this many steps
    data_variance: float = 1.0     # VQ reconstruction loss is MSE / data_variance (as in VQ-VAE)

    @property
    def categorical(self) -> bool:
        return self.kind in CATEGORICAL_KINDS

    @property
    def num_classes(self) -> int:
        """Classes the categorical nets see and emit: C, rounded up to even with the official nets
        (the official vMF decoder lives on S^(F-1) with F = 2*ceil(C/2))."""
        c = self.num_levels
        return c + c % 2 if self.net == "official" else c

    @property
    def design(self) -> str:
        """The net design nets.py builds: "legacy", or with the official nets, by input,
        "28" (28x28), "64" (64x64 images), "64label" (64x64 label maps), else "32"."""
        if self.net == "legacy":
            return "legacy"
        if self.image_size == 64:
            return "64label" if self.categorical else "64"
        return "28" if self.image_size == 28 else "32"

    @property
    def latent_size(self) -> int:
        """Side of the code grid: the image side / 8 for "64label" (three stride-2 convs), else / 4."""
        return self.image_size // (8 if self.design == "64label" else 4)

    @property
    def input_channels(self) -> int:
        """Channels the encoder sees: one-hot levels for categorical data, else the image."""
        return self.num_classes if self.categorical else self.image_channels

    def validate(self) -> "ModelConfig":
        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(f"invalid model config: {msg}")

        need(self.kind in MODEL_KINDS, f"kind must be one of {', '.join(MODEL_KINDS)}; got {self.kind!r}")
        for name in ("image_channels", "image_size", "codebook_size", "code_dim", "num_rb",
                     "num_levels", "reset_after"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool), f"{name} must be an integer, got {v!r}")
        need(self.image_channels in (1, 3), f"image_channels must be 1 or 3, got {self.image_channels}")
        need(8 <= self.image_size <= MAX_IMAGE_SIZE and self.image_size % 4 == 0,
             f"image_size must be a multiple of 4 in [8, {MAX_IMAGE_SIZE}], got {self.image_size}")
        need(2 <= self.codebook_size <= MAX_CODEBOOK_SIZE,
             f"codebook size K must be in [2, {MAX_CODEBOOK_SIZE}], got {self.codebook_size}")
        need(2 <= self.code_dim <= MAX_CODE_DIM,
             f"code dim d must be an integer in [2, {MAX_CODE_DIM}], got {self.code_dim}")
        try:
            check_codebook_size(self.kind, self.codebook_size)
        except ValueError as e:
            need(False, str(e))
        need(self.net in NETS, f"net must be one of {', '.join(NETS)}, got {self.net!r}")
        need(1 <= self.num_rb <= MAX_RES_BLOCKS, f"num_rb must be in [1, {MAX_RES_BLOCKS}], got {self.num_rb}")
        need(2 <= self.num_levels <= 256, f"num_levels must be in [2, 256], got {self.num_levels}")
        for name in ("var_q_init", "kappa_q_init", "kappa_x_init", "beta", "data_variance"):
            v = getattr(self, name)
            need(isinstance(v, (int, float)) and math.isfinite(v) and v > 0, f"{name} must be a positive number, got {v!r}")
        for name in ("var_q_floor", "kappa_q_floor"):
            v = getattr(self, name)
            need(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0, f"{name} must be >= 0, got {v!r}")
        need(self.var_q_init > self.var_q_floor, "var_q_init must exceed var_q_floor")
        need(self.kappa_q_init > self.kappa_q_floor, "kappa_q_init must exceed kappa_q_floor")
        need(0.0 < self.ema_decay < 1.0, f"ema_decay must be in (0, 1), got {self.ema_decay}")
        need(self.kind not in CATEGORICAL_KINDS or self.image_channels == 1,
             "categorical models (vmf, nc) take single-channel grey-level images")
        # Rough parameter count of the conv nets: refuse giant models before allocating.
        d = self.code_dim
        approx = (2 * self.num_rb + 4) * 10 * d * d + self.codebook_size * d
        need(approx <= MAX_PARAMS, f"model too large (~{approx:,} parameters, limit {MAX_PARAMS:,})")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        if not isinstance(d, dict):
            raise ValueError(f"invalid model config: expected a JSON object, got {type(d).__name__}")
        if "net" not in d:   # written before the official nets existed
            d = {**d, "net": "legacy"}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"invalid model config: unknown keys {unknown}")
        types = {f.name: type(getattr(cls(), f.name)) for f in fields(cls)}
        clean = {}
        for k, v in d.items():
            t = types[k]
            if t is float and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            if not isinstance(v, t) or (t is int and isinstance(v, bool)):
                raise ValueError(f"invalid model config: {k} must be {t.__name__}, got {v!r}")
            clean[k] = v
        return cls(**clean).validate()
