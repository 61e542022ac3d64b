"""Evaluation with deterministic quantization over a whole split (docs/interface.md metrics).

- mse: per-image sum of squared error, pixels in [0, 1], averaged over images
- perplexity: exp(H(ū)), ū the average one-hot usage over all latent positions
- entropy: mean over latent positions of H(P̂_φ(z_q | z)) in nats (0 for VQ: deterministic)
- dead_codes: codes used by no latent position of the evaluated images
"""
from __future__ import annotations

import torch

from .models import per_image_sq_error
from .quantizers import perplexity_of_counts


@torch.no_grad()
def evaluate_model(model, images, *, device: torch.device | None = None, batch_size: int = 500) -> dict:
    """images: float32 (N, C, H, W) in [0, 1], or an ImageData, whose pixels become float32 one
    batch at a time (ImageData.batch): memory grows with the batch, not with the split."""
    device = device or next(model.parameters()).device
    take = images.batch if hasattr(images, "batch") else images.__getitem__
    was_training = model.training
    model.eval()
    k = model.cfg.codebook_size
    usage = torch.zeros(k, dtype=torch.long, device=device)
    sq_sum, loss_sum, ent_sum, n_pos, n = 0.0, 0.0, 0.0, 0, len(images)
    for i in range(0, n, batch_size):
        x = take(slice(i, i + batch_size)).to(device)
        out = model(x, mode="argmax")
        sq_sum += float(per_image_sq_error(out.x_rec, x).sum())
        loss_sum += float(out.loss) * len(x)
        if out.indices is not None:
            usage += torch.bincount(out.indices.reshape(-1), minlength=k)
            n_pos += out.indices.numel()
        if out.probs is not None:
            p = out.probs.clamp_min(1e-30)
            ent_sum += float(-(out.probs * p.log()).sum())
    model.train(was_training)
    res = {"mse": sq_sum / n, "loss": loss_sum / n, "n_images": n}
    if not model.discrete:
        return {**res, "perplexity": None, "entropy": None, "dead_codes": None, "codebook_size": None,
                "usage": None}
    return {**res, "perplexity": float(perplexity_of_counts(usage.double())), "entropy": ent_sum / n_pos if n_pos else 0.0,
            "dead_codes": int((usage == 0).sum()), "codebook_size": k, "usage": usage.tolist()}
