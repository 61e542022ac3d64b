"""Fréchet distance (FID-style) in the feature space of a small image classifier.

Inception features are overkill (and unavailable offline) for 28x28 / 32x32
toy datasets, so we train a small CNN (:class:`FeatureClassifier`) on the
dataset's labels and measure the Fréchet distance between Gaussians fitted to
its penultimate-layer features of two image sets::

    FD = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2})

Numerics (see :func:`frechet_distance_from_stats`): everything in float64;
the matrix square root of ``S_a @ S_b`` is computed with
``scipy.linalg.sqrtm``; if the result is not finite (singular / nearly
singular covariances, e.g. fewer samples than feature dimensions) the
computation is retried with ``eps * I`` added to both covariances (eps = 1e-6
times the mean covariance diagonal); the (tiny, numerical) imaginary part of
the result is dropped (real part taken).  Tiny negative results caused by
round-off are clamped to 0.

FD values are only comparable when computed with the *same* classifier
checkpoint and similar sample sizes (the estimator is biased upward for small
N).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import rundir as rd
from .checks import as_tensor, check_int, check_positive, config_from_dict
from .device import as_device

__all__ = [
    "ClassifierConfig",
    "FeatureClassifier",
    "train_classifier",
    "accuracy",
    "extract_features",
    "save_classifier",
    "load_classifier",
    "frechet_distance",
    "frechet_distance_from_stats",
    "fd_between",
]

CLASSIFIER_FORMAT = "sqvae_core.fd.FeatureClassifier"


@dataclass
class ClassifierConfig:
    """Configuration of :class:`FeatureClassifier` (square ``image_size`` x ``image_size`` inputs)."""

    in_channels: int = 1
    image_size: int = 28
    num_classes: int = 10
    feature_dim: int = 128
    width: int = 32  # channels of the first conv block (second block uses 2*width)

    def validate(self) -> "ClassifierConfig":
        check_int("in_channels", self.in_channels, 1, 16)
        check_int("image_size", self.image_size, 4, 512)
        check_int("num_classes", self.num_classes, 2, 100_000)
        check_int("feature_dim", self.feature_dim, 2, 4096)
        check_int("width", self.width, 1, 512)
        return self

    def to_dict(self) -> dict:
        """JSON-safe dict (numpy scalars converted to Python numbers)."""
        return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ClassifierConfig":
        return config_from_dict(cls, data, ("in_channels", "image_size", "num_classes", "feature_dim"))


class FeatureClassifier(nn.Module):
    """Small CNN: 2 x (conv3x3-ReLU-conv3x3-ReLU-maxpool2) -> avgpool 4x4 -> FC(feature_dim)-ReLU -> FC(classes).

    Inputs are float images ``(B, C, S, S)`` in [0, 1] (uint8 is scaled by
    1/255).  ``features(x)`` returns the penultimate activations ``(B, feature_dim)``.
    """

    def __init__(self, config: ClassifierConfig | Mapping[str, Any] | None = None):
        super().__init__()
        if config is None:
            config = ClassifierConfig()
        cfg = config.validate() if isinstance(config, ClassifierConfig) else ClassifierConfig.from_dict(config)
        self.config = dataclasses.replace(cfg)
        w = cfg.width
        self.body = nn.Sequential(
            nn.Conv2d(cfg.in_channels, w, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
        )
        self.fc = nn.Linear(2 * w * 16, cfg.feature_dim)
        self.out = nn.Linear(cfg.feature_dim, cfg.num_classes)

    def _check_images(self, x: Any, name: str = "images") -> Tensor:
        cfg = self.config
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        exp = (cfg.in_channels, cfg.image_size, cfg.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != exp:
            raise ValueError(f"{name} must have shape (B, {exp[0]}, {exp[1]}, {exp[2]}), got {tuple(x.shape)}")
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        elif not x.is_floating_point():
            raise ValueError(f"{name} must be float images in [0, 1] (or uint8), got dtype {x.dtype}")
        return x

    def features(self, x: Tensor) -> Tensor:
        x = self._check_images(x).to(self.fc.weight.device, self.fc.weight.dtype)
        return F.relu(self.fc(self.body(x - 0.5)))

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.features(x))


# --------------------------------------------------------------------------- #
# data helpers
# --------------------------------------------------------------------------- #
def _as_labels(labels: Any, n: int, num_classes: int | None, name: str = "labels") -> Tensor:
    y = as_tensor(labels, name)
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise ValueError(f"{name} must have an integer dtype, got {y.dtype}")
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), got {tuple(y.shape)}")
    if n and (int(y.min()) < 0 or (num_classes is not None and int(y.max()) >= num_classes)):
        raise ValueError(f"{name} must be in [0, {num_classes}), got min={int(y.min())}, max={int(y.max())}")
    return y.long()


def _infer_config(images: Tensor, labels: Tensor, num_classes: int | None, feature_dim: int, width: int):
    if images.ndim != 4 or images.shape[2] != images.shape[3]:
        raise ValueError(f"images must have shape (N, C, S, S), got {tuple(images.shape)}")
    nc = num_classes if num_classes is not None else max(2, int(labels.max()) + 1)
    return ClassifierConfig(
        in_channels=int(images.shape[1]),
        image_size=int(images.shape[2]),
        num_classes=nc,
        feature_dim=feature_dim,
        width=width,
    ).validate()


@torch.no_grad()
def _batched(model: FeatureClassifier, images: Tensor, fn, batch_size: int) -> Tensor:
    check_int("batch_size", batch_size, 1, 1 << 20)
    images = model._check_images(images)
    was = model.training
    model.eval()
    try:
        outs = [fn(images[s : s + batch_size]).cpu() for s in range(0, images.shape[0], batch_size)]
    finally:
        model.train(was)
    if not outs:
        raise ValueError("images is empty")
    return torch.cat(outs)


def extract_features(model: FeatureClassifier, images: Any, batch_size: int = 256) -> Tensor:
    """Penultimate features ``(N, feature_dim)`` (float32, CPU), model in eval mode."""
    return _batched(model, as_tensor(images, "images"), model.features, batch_size)


def accuracy(model: FeatureClassifier, images: Any, labels: Any, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on ``images`` / integer ``labels``."""
    images = as_tensor(images, "images")
    y = _as_labels(labels, images.shape[0] if images.ndim else 0, model.config.num_classes)
    logits = _batched(model, images, model, batch_size)
    return float((logits.argmax(1) == y).float().mean())


def train_classifier(
    images: Any,
    labels: Any,
    *,
    val_images: Any = None,
    val_labels: Any = None,
    epochs: int = 3,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    device: Any = None,
    num_classes: int | None = None,
    feature_dim: int = 128,
    width: int = 32,
) -> tuple[FeatureClassifier, dict]:
    """Train a :class:`FeatureClassifier` with Adam + cross-entropy.

    The config is inferred from ``images (N, C, S, S)`` and ``labels`` (number
    of classes = max label + 1 unless ``num_classes`` is given).  Returns the
    model (eval mode) and ``{"test_accuracy", "train_accuracy", "train_loss",
    "epochs", "history"}``; ``test_accuracy`` is measured on
    ``val_images``/``val_labels`` (None if not given).  Deterministic for a
    given seed; the global RNG state is restored afterwards.
    """
    check_int("epochs", epochs, 1, 10_000)
    check_int("batch_size", batch_size, 1, 1 << 20)
    check_positive("lr", lr)
    x = as_tensor(images, "images")
    if x.ndim != 4 or x.shape[0] == 0:
        raise ValueError(f"images must be a non-empty (N, C, S, S) array, got shape {tuple(x.shape)}")
    y = _as_labels(labels, x.shape[0], num_classes)
    cfg = _infer_config(x, y, num_classes, feature_dim, width)
    if (val_images is None) != (val_labels is None):
        raise ValueError("val_images and val_labels must be given together")
    dev = as_device(device)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FeatureClassifier(cfg).to(dev)
        x = model._check_images(x)
        if val_images is not None:
            vx = model._check_images(as_tensor(val_images, "val_images"), "val_images")
            vy = _as_labels(val_labels, vx.shape[0], cfg.num_classes, "val_labels")
        gen = torch.Generator().manual_seed(int(seed))
        opt = torch.optim.Adam(model.parameters(), lr=float(lr))
        history = []
        for epoch in range(1, epochs + 1):
            model.train()
            perm = torch.randperm(x.shape[0], generator=gen)
            tot, cnt = 0.0, 0
            for s in range(0, x.shape[0], batch_size):
                idx = perm[s : s + batch_size]
                xb, yb = x[idx].to(dev), y[idx].to(dev)
                loss = F.cross_entropy(model(xb), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                tot += float(loss.detach()) * len(idx)
                cnt += len(idx)
            row = {"epoch": epoch, "train_loss": tot / cnt}
            if val_images is not None:
                row["val_accuracy"] = accuracy(model, vx, vy)
            history.append(row)
    model.eval()
    info = {
        "test_accuracy": accuracy(model, vx, vy) if val_images is not None else None,
        "train_accuracy": accuracy(model, x, y),
        "train_loss": history[-1]["train_loss"],
        "epochs": epochs,
        "history": history,
    }
    return model, info


# --------------------------------------------------------------------------- #
# Fréchet distance
# --------------------------------------------------------------------------- #
def _as_features(f: Any, name: str) -> np.ndarray:
    if isinstance(f, Tensor):
        f = f.detach().cpu().double().numpy()
    a = np.asarray(f, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, F) array, got shape {a.shape}")
    if a.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 samples to estimate a covariance, got {a.shape[0]}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN/inf")
    return a


def _sqrtm(m: np.ndarray) -> np.ndarray:
    # Singular products (dead ReLU units, N < F) trigger a LinAlgWarning although
    # the trace of the square root stays accurate (~1e-13 relative in tests);
    # non-finite results are handled by the caller's eps*I fallback.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        with np.errstate(all="ignore"):
            return scipy.linalg.sqrtm(m)


def frechet_distance_from_stats(mu_a: Any, sigma_a: Any, mu_b: Any, sigma_b: Any) -> float:
    """Fréchet distance between N(mu_a, sigma_a) and N(mu_b, sigma_b), in float64.

    ``||mu_a - mu_b||^2 + Tr(sigma_a) + Tr(sigma_b) - 2 Tr((sigma_a sigma_b)^{1/2})``.
    The square root uses ``scipy.linalg.sqrtm``; if it is not finite, both
    covariances get ``eps * I`` (eps = 1e-6 * mean diagonal, at least 1e-12)
    added and it is recomputed; the real part is taken (the imaginary part is
    round-off for PSD inputs).  Round-off negatives are clamped to 0.
    """
    mu_a = np.atleast_1d(np.asarray(mu_a, dtype=np.float64))
    mu_b = np.atleast_1d(np.asarray(mu_b, dtype=np.float64))
    s_a = np.atleast_2d(np.asarray(sigma_a, dtype=np.float64))
    s_b = np.atleast_2d(np.asarray(sigma_b, dtype=np.float64))
    d = mu_a.shape[0]
    if mu_a.shape != (d,) or mu_b.shape != (d,) or s_a.shape != (d, d) or s_b.shape != (d, d):
        raise ValueError(
            f"inconsistent shapes: mu_a {mu_a.shape}, mu_b {mu_b.shape}, sigma_a {s_a.shape}, sigma_b {s_b.shape}"
        )
    for name, arr in (("mu_a", mu_a), ("mu_b", mu_b), ("sigma_a", s_a), ("sigma_b", s_b)):
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} contains NaN/inf")
    diff = mu_a - mu_b
    covmean = _sqrtm(s_a @ s_b)
    if not np.isfinite(covmean).all():
        eps = max(1e-12, 1e-6 * float(np.mean(np.concatenate([np.diag(s_a), np.diag(s_b)]))))
        offset = np.eye(d) * eps
        covmean = _sqrtm((s_a + offset) @ (s_b + offset))
        if not np.isfinite(covmean).all():
            raise ValueError("matrix square root of sigma_a @ sigma_b is not finite even after regularisation")
    covmean = np.real(covmean)
    fd = float(diff @ diff + np.trace(s_a) + np.trace(s_b) - 2.0 * np.trace(covmean))
    return max(fd, 0.0)


def frechet_distance(feats_a: Any, feats_b: Any) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``(N_a, F)`` and ``(N_b, F)``.

    Means and (unbiased, N-1) covariances in float64; see
    :func:`frechet_distance_from_stats` for the matrix-square-root details.
    Symmetric in its arguments (up to round-off).
    """
    a = _as_features(feats_a, "feats_a")
    b = _as_features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    return frechet_distance_from_stats(
        a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    )


def fd_between(model: FeatureClassifier, images_a: Any, images_b: Any, batch_size: int = 256) -> float:
    """Fréchet distance between the classifier features of two image sets."""
    fa = extract_features(model, images_a, batch_size)
    fb = extract_features(model, images_b, batch_size)
    return frechet_distance(fa, fb)


# --------------------------------------------------------------------------- #
# checkpoints
# --------------------------------------------------------------------------- #
def save_classifier(model: FeatureClassifier, path: Any) -> None:
    """Save weights + config (JSON metadata) as safetensors, atomically."""
    if not isinstance(model, FeatureClassifier):
        raise ValueError(f"model must be a FeatureClassifier, got {type(model).__name__}")
    rd.save_tagged(model, CLASSIFIER_FORMAT, path)


def load_classifier(path: Any, device: Any = None) -> FeatureClassifier:
    """Load a classifier saved by :func:`save_classifier` (validated; never unpickles; rundir.BundleError)."""
    return rd.load_tagged(path, CLASSIFIER_FORMAT, ClassifierConfig.from_dict, FeatureClassifier, device)
