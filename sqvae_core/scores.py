"""A run's PixelCNN prior and the paper's generation-quality scores (Table 2 columns).

    train_run_prior(run_dir)  -> fits the prior on the run's training code grids, stores
                                 prior.safetensors + prior.json (NLL in bits per code beside
                                 log2 K and the unigram entropy of the test codes)
    score_run(bundle)         -> Fréchet distances in the feature space of a small classifier:
                                 rFD (reconstructions), generation (prior samples),
                                 Neighbor-3/5/10 edits and interpolations, each against test images

The classifier for a dataset lives in checkpoints/fd_classifier/<dataset>.safetensors
(scripts/train_fd_classifier.py makes it; checkpoints/README.md gives its test accuracy).
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch

from . import rundir as rd
from .data import DatasetNotFoundError, load_dataset
from .explore import dataset_codes, decode_latent_mix, neighbour_edit
from .fd import extract_features, frechet_distance, load_classifier
from .prior import PriorConfig, PriorFitConfig, fit_prior, load_prior, nll_bits_per_code, save_prior, unigram_entropy_bits

PRIOR_WEIGHTS, PRIOR_SUMMARY = rd.PRIOR, rd.PRIOR_SUMMARY
REPO_CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"


def _require_discrete(bundle: rd.Bundle, what: str) -> None:
    if not bundle.model.discrete:
        raise ValueError(f"{what}: the continuous VAE ({bundle.path}) has no code grids")


def bundle_split(bundle: rd.Bundle, split: str, data_dir: str | None = None, max_images: int | None = None):
    """The run's dataset split (images, labels), as configured at training time."""
    opts = bundle.run_config.data_options
    try:
        data = load_dataset(bundle.dataset, split, data_dir or opts.data_dir, val_size=opts.val_size,
                            val_from_end=opts.val_from_end, image_size=bundle.model_cfg.image_size,
                            channels=bundle.model_cfg.image_channels, center_crop=opts.center_crop)
    except DatasetNotFoundError as e:
        rebuild = bundle.run_config.data_rebuild
        if not rebuild:
            raise
        raise DatasetNotFoundError(f"{e}; it is generated: rebuild it with `{rebuild}`") from None
    if max_images:
        data = data.head(max_images)
    return data.images, data.labels, data


def stored_usage(bundle: rd.Bundle) -> tuple[torch.Tensor, str] | None:
    """Per-code usage the bundle already stores for its weights, for when its data set is absent:
    eval.json's `usage` (the whole test split, deterministic codes) when made from these weights,
    else the last codebook snapshot's (a training window's codes) when it is of the weights' step.
    -> (LongTensor (K,), where it comes from) or None."""
    k = bundle.model_cfg.codebook_size
    run = rd.RunDir(bundle.path)
    ev = run.eval(bundle.weights)
    if ev is not None and ev.usage is not None and len(ev.usage) == k:
        return torch.tensor(ev.usage, dtype=torch.long), f"eval.json ({ev.n_test or '?'} test images)"
    snaps = run.snapshots()
    step = bundle.weights.step
    if snaps and len(snaps[-1]["usage"]) == k and (step is None or snaps[-1]["step"] == step):
        return snaps[-1]["usage"], f"the codebook snapshot of step {snaps[-1]['step']} (training codes)"
    return None


# ------------------------------------------------------------------------- the prior
def train_run_prior(run: str | Path | rd.Weights, fit: PriorFitConfig | None = None, *, steps: int | None = None,
                    batch_size: int | None = None, hidden: int = 64, layers: int = 8, conditional: bool = True,
                    max_images: int | None = None, data_dir: str | None = None, seed: int | None = None,
                    device: torch.device | str = "cpu", log=None) -> dict:
    """Fit a Gated PixelCNN to the run's training code grids (a run directory: of its last weights;
    a Weights: of those, e.g. its best-validation ones), as `fit` says (default: stop on a
    validation-NLL plateau, keep the best weights; `steps`, `batch_size`, `seed` override its
    fields); store it in the run dir. The summary (prior.json) says where and why the fit stopped:
    `steps`, `best_step`, `best_val_nll_bits`, `stop_reason`, `fit` (the config as run), `message`."""
    weights = run if isinstance(run, rd.Weights) else rd.Weights(run)
    run_dir = weights.run
    bundle = rd.RunDir(run_dir).load(weights.which, device)
    _require_discrete(bundle, "prior train")
    t0 = time.time()
    tr_x, tr_y, data = bundle_split(bundle, "train", data_dir, max_images)
    va_x, va_y, _ = bundle_split(bundle, "val", data_dir, max_images and max(max_images // 10, 100))
    te_x, te_y, _ = bundle_split(bundle, "test", data_dir, max_images and max(max_images // 5, 200))
    tr_c, va_c, te_c = (dataset_codes(bundle.model, x) for x in (tr_x, va_x, te_x))
    k, n = bundle.model_cfg.codebook_size, bundle.model_cfg.latent_size
    use_labels = conditional and tr_y is not None and data.num_labels
    cfg = PriorConfig(num_codes=k, height=n, width=n, hidden=hidden, layers=layers,
                      num_classes=data.num_labels if use_labels else None)

    def progress(row):
        if log:
            log(f"prior step {row['step']}: train {row['train_nll_bits']:.3f} bits/code"
                + (f", val {row['val_nll_bits']:.4f}" if row.get("val_nll_bits") is not None else ""))

    # the prior is compute-bound (batch 64 x 49 positions x 8 gated layers): it uses every intra-op
    # thread it is given (2 threads: 0.077 s/step vs 0.145 s on 1, hidden 64, K=128)
    res = fit_prior(tr_c, va_c, cfg, fit, steps=steps, batch_size=batch_size, seed=seed, device=device,
                    train_labels=tr_y if use_labels else None,
                    val_labels=va_y if use_labels else None, callback=progress)
    prior = res.model
    summary = {
        "nll_bits_per_code": nll_bits_per_code(prior, te_c, te_y if use_labels else None),
        "unigram_bits": unigram_entropy_bits(te_c, k),
        "uniform_bits": math.log2(k),
        "split": "test", "n_test_grids": int(te_c.shape[0]), "n_train_grids": int(tr_c.shape[0]),
        **res.summary(), "message": res.message(),
        "conditional": bool(use_labels), "config": cfg.to_dict(),
        "weights_step": bundle.weights.step,      # the autoencoder weights whose codes it models
        "train_seconds": round(time.time() - t0, 1), "history": res.history,
    }
    save_prior(prior, Path(run_dir) / PRIOR_WEIGHTS)
    rd.atomic_write_json(Path(run_dir) / PRIOR_SUMMARY, summary)
    return summary


def load_run_prior(bundle: rd.Bundle):
    """The run's stored prior, checked against the model's K and grid size."""
    path = bundle.path / PRIOR_WEIGHTS
    if not path.is_file():
        raise rd.BundleError(f"{bundle.path} has no PixelCNN prior yet; fit one with: "
                             f"sqvae prior train {bundle.path}")
    try:
        prior = load_prior(path, device=next(bundle.model.parameters()).device,
                           num_codes=bundle.model_cfg.codebook_size)
    except ValueError as e:
        raise rd.BundleError(f"prior of {bundle.path}: {e}") from None
    n = bundle.model_cfg.latent_size
    if (prior.config.height, prior.config.width) != (n, n):
        raise rd.BundleError(f"prior of {bundle.path} is for {prior.config.height}x{prior.config.width} grids, "
                             f"the model makes {n}x{n}")
    return prior


def prior_summary(bundle: rd.Bundle) -> rd.PriorSummary | None:
    """The run's prior.json, None without one (BundleError for a broken one)."""
    return rd.RunDir(bundle.path).prior_summary


@torch.no_grad()
def sample_images(bundle: rd.Bundle, prior, n: int, *, temperature: float = 1.0, label: int | None = None,
                  seed: int = 0, labels: torch.Tensor | None = None,
                  max_n: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """n images decoded from prior samples: (images (n, C, S, S), code grids (n, H, W)).
    A conditional prior samples class `label`, or one class per image from `labels` (n,), or
    without either a uniformly drawn class per image (GatedPixelCNN.sample)."""
    if not 1 <= n <= max_n:
        raise ValueError(f"--n must be in [1, {max_n}], got {n}")
    device = next(bundle.model.parameters()).device
    if labels is not None:
        labels = labels.to(device=device, dtype=torch.long) if prior.config.num_classes is not None else None
    if label is not None:
        if prior.config.num_classes is None:
            raise ValueError("this prior is unconditional; drop --label")
        if not 0 <= label < prior.config.num_classes:
            raise ValueError(f"--label must be in [0, {prior.config.num_classes}), got {label}")
        labels = torch.full((n,), label, dtype=torch.long, device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    codes = prior.sample(n, temperature=temperature, labels=labels, generator=g)
    images = torch.cat([bundle.model.decode_indices(codes[i:i + 256]) for i in range(0, n, 256)])
    return images.cpu(), codes.cpu()


# ----------------------------------------------------------------- Fréchet distances
def classifier_path(dataset: str) -> Path:
    base = "fashion-mnist" if dataset.startswith("fashion-mnist") else dataset
    root = Path(os.environ.get("SQVAE_CHECKPOINTS", REPO_CHECKPOINTS))
    return root / "fd_classifier" / f"{base}.safetensors"


def load_fd_classifier(dataset: str):
    path = classifier_path(dataset)
    if not path.is_file():
        raise rd.BundleError(f"no feature classifier for {dataset} at {path}; "
                             f"make one with: python scripts/train_fd_classifier.py {dataset}")
    return load_classifier(path)


@torch.no_grad()
def interpolation_midpoints(model, x_a: torch.Tensor, x_b: torch.Tensor, t: float = 0.5,
                            batch_size: int = 256) -> torch.Tensor:
    """decode(quantize((1−t)·z_a + t·z_b)) for aligned batches of image pairs."""
    return torch.cat([decode_latent_mix(model, model.encode(x_a[i:i + batch_size]),
                                        model.encode(x_b[i:i + batch_size]), t)[0]
                      for i in range(0, len(x_a), batch_size)])


# Generation FD's sample count and rounds: at 1,000 images one round's FD moved by ±15% between
# sampling seeds, at 10,000 by ±6%; the mean of two rounds of 10,000 by about ±4%.
GEN_FD_IMAGES = 10_000
GEN_FD_ROUNDS = 2


@torch.no_grad()
def score_run(bundle: rd.Bundle, *, n: int = 1000, data_dir: str | None = None, seed: int = 0,
              with_prior: bool = True, n_gen: int = GEN_FD_IMAGES, gen_rounds: int = GEN_FD_ROUNDS) -> dict:
    """Table 2 columns for one model: FDs against n test images (lower is better); generation FD
    against n_gen of them, the mean of gen_rounds sampling rounds (generation_fd)."""
    clf = load_fd_classifier(bundle.dataset)
    model = bundle.model
    device = next(model.parameters()).device
    test_x, _, _ = bundle_split(bundle, "test", data_dir, n)
    test_x = test_x.to(device)

    def fd(images):
        return frechet_distance(extract_features(clf, test_x.cpu()), extract_features(clf, images.cpu()))

    recon = torch.cat([model.reconstruct(test_x[i:i + 256]) for i in range(0, len(test_x), 256)])
    res = {"n_fd_images": len(test_x), "mse": float((recon - test_x).pow(2).flatten(1).sum(1).mean()),
           "rfd": fd(recon)}
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(test_x), generator=g)
    res["fd_interpolation"] = fd(interpolation_midpoints(model, test_x, test_x[perm.to(device)]))
    if model.discrete:
        for k in (3, 5, 10):
            res[f"fd_neighbor_{k}"] = fd(neighbour_edit(model, test_x, k)[0])
        if with_prior and (bundle.path / PRIOR_WEIGHTS).is_file():
            res.update(generation_fd(bundle, clf, n_gen, rounds=gen_rounds, data_dir=data_dir))
            summary = prior_summary(bundle)
            res["prior_nll_bits"] = summary and summary.nll_bits_per_code
    return res


@torch.no_grad()
def generation_fd(bundle: rd.Bundle, clf, n: int = GEN_FD_IMAGES, *, rounds: int = GEN_FD_ROUNDS,
                  data_dir: str | None = None) -> dict:
    """FD between the prior's samples, decoded, and n test images (all of a smaller test split): the
    mean over `rounds` sampling seeds. A conditional prior draws image i with test image i's class,
    so both sides have the test split's class mix."""
    test_x, test_y, _ = bundle_split(bundle, "test", data_dir, n)
    ref = extract_features(clf, test_x)
    prior = load_run_prior(bundle)
    labels = None if test_y is None else torch.as_tensor(test_y).long()
    fds = []
    for seed in range(rounds):
        samples, _ = sample_images(bundle, prior, len(test_x), seed=seed, labels=labels, max_n=len(test_x))
        fds.append(frechet_distance(ref, extract_features(clf, samples)))
    return {"fd_generation": sum(fds) / len(fds), "fd_generation_rounds": fds, "n_gen_images": len(test_x)}
