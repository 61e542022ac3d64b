"""The modern fixes for codebook collapse, from vector-quantize-pytorch, behind our quantizer interface.

    fsq          FSQ (Mentzer et al. 2023): each of a few projected dimensions rounded to a fixed
                 grid of levels; K = prod(levels); no codebook to collapse, no auxiliary loss
    lfq          LFQ (MAGVIT-v2, Yu et al. 2023): the signs of log2 K projected dimensions; an
                 entropy penalty (low per-code entropy, high batch entropy) spreads the usage
    simvq        SimVQ (Zhu et al. 2024): a frozen random codebook through one learned linear map,
                 so every code moves with every gradient; rotation-trick gradients
    vq_rotation  VQ-VAE with the rotation trick (Fifty et al., ICLR 2025): nearest code as VQ-VAE,
                 gradients through a rotation and rescaling of z onto it instead of straight-through;
                 the library's EMA codebook update

The quantization math is the library's: this module only builds its classes with the keyword
arguments below (the README's table of the modern kinds says why each is not the default), calls them, and turns
what they return into a `QuantizerOutput`. Code usage (perplexity, dead codes) is counted from the
indices the library returns, the same way as for every other kind.

`codebook_vectors()` is the effective codebook: what the decoder receives for each code index
(FSQ's grid of levels and LFQ's ±1 corners through the library's output projection, an affine map
that keeps the grid's shape; SimVQ's transformed codebook; the VQ codebook).
"""
from __future__ import annotations

import torch
from torch import nn

from .kinds import fsq_levels
from .quantizers import QuantizerOutput, _check_z, count_codes_, perplexity_of_counts


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def make_library_quantizer(kind: str, codebook_size: int, code_dim: int, beta: float = 0.25,
                           decay: float = 0.99) -> nn.Module:
    """The vector-quantize-pytorch module of a kind, with every non-default keyword argument here."""
    import vector_quantize_pytorch as vqp
    k, d = codebook_size, code_dim
    if kind == "fsq":
        # dim=d: the library projects d -> len(levels) and back (Linear layers with bias)
        return vqp.FSQ(levels=list(fsq_levels(k)), dim=d)
    if kind == "lfq":
        # commitment β as MAGVIT-v2 (0.25; the library's default is 0); entropy weight 0.1 as there
        return vqp.LFQ(dim=d, codebook_size=k, commitment_loss_weight=beta)
    if kind == "simvq":
        # channel_first: our z is (B, d, H, W); rotation trick and commitment weights are the defaults
        return vqp.SimVQ(dim=d, codebook_size=k, channel_first=True)
    if kind == "vq_rotation":
        # EMA decay as our vq_ema (library default 0.8); commitment β as our VQ baselines (default 1);
        # the rotation trick named explicitly (it is the default for d > 1). sync_codebook: under DDP
        # each rank's EMA statistics are all-reduced so the codebooks stay identical; outside DDP no
        # collective is called (the library decides this once, at construction: its issue #105).
        return vqp.VectorQuantize(dim=d, codebook_size=k, decay=decay, commitment_weight=beta,
                                  rotation_trick=True, accept_image_fmap=True, sync_codebook=_distributed())
    raise ValueError(f"no vector-quantize-pytorch quantizer for kind {kind!r}")


class LibraryQuantizer(nn.Module):
    """One vector-quantize-pytorch quantizer, called as our quantizers are:

        out = quantizer(z)      # z: (B, d, H, W) -> out.z_q, out.indices, out.loss, out.terms, out.stats

    The quantizers are deterministic: `mode` and `temperature` are accepted and ignored (there is no
    P̂ to sample or relax, so `probs` is None). LFQ's per-code entropy (its soft assignment at the
    library's inverse temperature 100) is logged as `entropy` while training, the one kind of these
    where an entropy is defined."""

    def __init__(self, kind: str, codebook_size: int, code_dim: int, beta: float = 0.25, decay: float = 0.99):
        super().__init__()
        self.kind, self.k, self.d = kind, codebook_size, code_dim
        self.lib = make_library_quantizer(kind, codebook_size, code_dim, beta, decay)
        self.register_buffer("all_codes", torch.arange(codebook_size), persistent=False)

    def codebook_vectors(self) -> torch.Tensor:
        """(K, d): what the decoder receives for each code index."""
        if self.kind in ("fsq", "lfq"):
            return self.lib.indices_to_codes(self.all_codes)
        return self.lib.codebook

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices (B, H, W) -> z_q (B, d, H, W)."""
        return self.codebook_vectors()[indices].permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor, log_var: torch.Tensor | None = None, *, mode: str | None = None,
                temperature: float = 1.0, generator: torch.Generator | None = None) -> QuantizerOutput:
        _check_z(z, self.d)
        stats = {}
        if self.kind == "fsq":
            z_q, indices = self.lib(z)
            terms = {}
        elif self.kind == "lfq":
            (z_q, indices, aux), parts = self.lib(z, return_loss_breakdown=True)
            terms = {"entropy_aux": aux}     # 0.1·(per-code − batch entropy) + β·commitment
            if self.training:
                stats["entropy"] = parts.per_sample_entropy.detach()
        else:                                # simvq, vq_rotation
            z_q, indices, commit = self.lib(z)
            terms = {"commitment": commit}
        indices = indices.long()
        counts = count_codes_(torch.zeros(self.k, device=z.device), indices)
        stats["perplexity"] = perplexity_of_counts(counts).detach()
        loss = sum(terms.values()) if terms else z.new_zeros(())
        return QuantizerOutput(z_q=z_q, indices=indices, probs=None, loss=loss, terms=terms, stats=stats)
