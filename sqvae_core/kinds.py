"""The catalogue of model kinds, data sets and presets: what the command line, the training loop,
the app and the tests offer, in one torch-free place (the app imports it without loading torch).

    KINDS["fsq"].label     "FSQ (finite scalar quantization)"
    KINDS["fsq"].stats     the per-step statistics train.Window logs for it
    KINDS["fsq"].metric    how its codes are compared (codebook map, Neighbor-k): "euclidean"
    KINDS["fsq"].anneal    which self-annealing panel the app draws (None: none)

Adding a model kind: its module (the quantizer or model class and its line in models.MODELS),
one entry below, and its tests (tests/test_models.py walks every entry). Nothing else lists kinds.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# Families, in the order the app and README group them.
FAMILIES = {
    "gaussian": "Gaussian SQ-VAE",
    "categorical": "vMF / NC SQ-VAE (categorical data)",
    "vq": "VQ-VAE baselines (2017)",
    "modern": "modern collapse fixes (vector-quantize-pytorch)",
    "continuous": "continuous",
}
ANNEAL_PANELS = ("gaussian", "vmf", "nc")   # σ²_φ with σ²; κ_φ with κ; κ_φ alone (NC has no κ)


@dataclass(frozen=True)
class Kind:
    name: str
    label: str
    family: str                         # a key of FAMILIES
    stats: tuple[str, ...]              # logged every step besides loss and mse (ModelOutput.stats keys)
    anneal: str | None = None           # ANNEAL_PANELS entry, None: no self-annealing to show
    codebook_rule: str | None = None    # "fsq" (K a product of FSQ levels), "pow2" (LFQ), None (any K)
    paper: dict = field(default_factory=dict)   # ModelConfig values the paper preset sets for this kind

    @property
    def discrete(self) -> bool:
        return self.family != "continuous"

    @property
    def categorical(self) -> bool:
        return self.family == "categorical"

    @property
    def vq_reconstruction(self) -> bool:
        """The VQ-VAE reconstruction term, MSE / data variance (the data fills the variance in)."""
        return self.family in ("vq", "modern")

    @property
    def metric(self) -> str | None:
        """Distance between codes: cosine for the unit-norm vMF/NC codebooks, else euclidean."""
        return None if not self.discrete else "cosine" if self.categorical else "euclidean"


_GAUSS = ("perplexity", "entropy", "sigma2_q", "sigma2_x")
_VQ = ("perplexity",)
KINDS: dict[str, Kind] = {k.name: k for k in (
    # σ²_φ = floor + exp(s) (+ exp(v) for II-IV); the official variant I has a floor of 1
    Kind("gaussian_1", "Gaussian SQ-VAE I", "gaussian", _GAUSS, "gaussian", paper=dict(var_q_floor=1.0)),
    Kind("gaussian_2", "Gaussian SQ-VAE II", "gaussian", _GAUSS, "gaussian"),
    Kind("gaussian_3", "Gaussian SQ-VAE III", "gaussian", _GAUSS, "gaussian"),
    Kind("gaussian_4", "Gaussian SQ-VAE IV", "gaussian", _GAUSS, "gaussian"),
    Kind("vmf", "vMF SQ-VAE", "categorical", ("perplexity", "entropy", "kappa_q", "kappa_x"), "vmf"),
    Kind("nc", "naive categorical SQ-VAE", "categorical", ("perplexity", "entropy", "kappa_q"), "nc"),
    Kind("vq", "VQ-VAE", "vq", _VQ),
    Kind("vq_ema", "VQ-VAE (EMA)", "vq", _VQ),
    Kind("vq_reset", "VQ-VAE (EMA + reset)", "vq", _VQ),
    Kind("fsq", "FSQ (finite scalar quantization)", "modern", _VQ, codebook_rule="fsq"),
    Kind("lfq", "LFQ (lookup-free quantization)", "modern", ("perplexity", "entropy"), codebook_rule="pow2"),
    Kind("simvq", "SimVQ", "modern", _VQ),
    Kind("vq_rotation", "VQ-VAE (EMA + rotation trick)", "modern", _VQ),
    # stochastic quantization with σ²_φ frozen at its initial value: SQ without self-annealing
    Kind("fixed_var", "fixed σ²_φ SQ", "gaussian", _GAUSS, "gaussian", paper=dict(var_q_floor=1.0)),
    # Not in the paper: our continuous baseline on the same nets, without their batch-norm in the
    # paper preset. It decodes its posterior mean at evaluation, and batch-norm statistics gathered on
    # sampled latents make that mean decode off-distribution: after 11 epochs with batch-norm, test
    # MSE 26.9 from the mean (0.93 from a posterior sample); without, validation MSE 8.5.
    Kind("vae", "Gaussian VAE", "continuous", ("sigma2_x", "kl"), paper=dict(batch_norm=False)),
)}


def kinds_of(*families: str) -> tuple[str, ...]:
    return tuple(k for k, v in KINDS.items() if v.family in families)


def kind(name: str) -> Kind:
    """The catalogue entry of a kind, or one line listing the valid names."""
    try:
        return KINDS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model kind {name!r}; choose one of {', '.join(KINDS)}") from None


# --------------------------------------------------------------------------- codebook sizes
# FSQ (Mentzer et al. 2023) quantizes each of len(levels) dimensions to its own number of levels,
# so K = prod(levels) exactly. Levels of 3-8 per dimension, as balanced as K allows (the FSQ paper
# uses 5-8; a level of 2 needs the library's symmetric variant, so none is used).
FSQ_LEVELS: dict[int, tuple[int, ...]] = {
    16: (4, 4), 32: (8, 4), 64: (4, 4, 4), 125: (5, 5, 5), 128: (8, 4, 4), 216: (6, 6, 6),
    256: (4, 4, 4, 4), 512: (8, 8, 8), 1000: (10, 10, 10), 1024: (8, 8, 4, 4), 2048: (8, 8, 8, 4),
    4096: (8, 8, 8, 8), 16384: (8, 8, 8, 8, 4), 65536: (8, 8, 8, 8, 4, 4),
}


def fsq_levels(k: int) -> tuple[int, ...]:
    """The FSQ levels whose product is K, or one line listing the K that have them."""
    if k not in FSQ_LEVELS:
        raise ValueError(f"fsq needs a codebook size K with FSQ levels; got {k}; valid K: "
                         + ", ".join(f"{n} {list(lv)}" for n, lv in FSQ_LEVELS.items()))
    return FSQ_LEVELS[k]


def check_codebook_size(name: str, k: int) -> None:
    """ValueError, in one line, when K does not suit the kind's quantizer."""
    rule = kind(name).codebook_rule
    if rule == "fsq":
        fsq_levels(k)
    elif rule == "pow2" and (k < 2 or k & (k - 1)):
        lo = 1 << max(1, (k - 1).bit_length() - 1)
        raise ValueError(f"lfq needs a codebook size K that is a power of two (one bit per code dimension); "
                         f"got {k}; nearest: {lo} or {lo * 2}")


# ------------------------------------------------------------------------ data sets, presets
DATASETS = ("fashion-mnist", "mnist", "cifar10", "fashion-mnist-cat8")   # plus "folder:PATH"
PRESETS = ("paper", "demo")   # train.paper_preset (the official setup), train.DEMO (~2 min on 2 cores)
