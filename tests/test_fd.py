"""Tests for sqvae_core.fd (feature classifier + Fréchet distance)."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import scipy.linalg
import torch
from safetensors.torch import save_file

from sqvae_core.fd import (
    ClassifierConfig,
    FeatureClassifier,
    accuracy,
    extract_features,
    fd_between,
    frechet_distance,
    frechet_distance_from_stats,
    load_classifier,
    save_classifier,
    train_classifier,
)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Avoid OpenMP oversubscription slow-downs on a busy 2-core machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _lr_images(n, *, channels=1, size=28, seed=0):
    """Synthetic separable task: label 0 = bright left half, label 1 = bright right half."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    x = torch.rand(n, channels, size, size, generator=g) * 0.5
    half = size // 2
    bright = 0.25 + 0.25 * torch.rand(n, 1, 1, 1, generator=g)
    mask = torch.zeros(n, 1, 1, size)
    mask[labels == 0, ..., :half] = 1.0
    mask[labels == 1, ..., half:] = 1.0
    return (x + bright * mask).clamp(0, 1), labels


@pytest.fixture(scope="module")
def trained():
    x, y = _lr_images(1024, seed=0)
    vx, vy = _lr_images(256, seed=1)
    model, info = train_classifier(x, y, val_images=vx, val_labels=vy, epochs=1, batch_size=32,
                                   lr=3e-3, width=8, feature_dim=32, seed=0)
    return model, info, vx, vy


# --------------------------------------------------------------------------- classifier
def test_classifier_trains_on_separable_task(trained):
    model, info, vx, vy = trained
    assert info["test_accuracy"] > 0.8, info
    assert info["test_accuracy"] == pytest.approx(accuracy(model, vx, vy))
    assert 0.0 <= info["train_accuracy"] <= 1.0 and info["epochs"] == 1
    assert len(info["history"]) == 1 and "val_accuracy" in info["history"][0]
    assert model.config == ClassifierConfig(1, 28, 2, 32, 8)
    assert not model.training


def test_training_is_deterministic():
    x, y = _lr_images(64, seed=3)
    kw = dict(epochs=1, batch_size=16, width=4, feature_dim=8, seed=5)
    m1, i1 = train_classifier(x, y, **kw)
    m2, i2 = train_classifier(x, y, **kw)
    assert i1["train_loss"] == i2["train_loss"] and i1["test_accuracy"] is None
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_feature_shapes(channels, size):
    torch.manual_seed(0)
    m = FeatureClassifier(ClassifierConfig(channels, size, 10, 128, width=8))
    x = torch.rand(5, channels, size, size)
    assert m.features(x).shape == (5, 128)
    assert m(x).shape == (5, 10)
    u8 = (x * 255).round().to(torch.uint8)
    assert torch.allclose(m.features(u8), m.features(u8.float() / 255))
    assert extract_features(m, x, batch_size=2).shape == (5, 128)


def test_classifier_input_validation():
    m = FeatureClassifier(ClassifierConfig(1, 28, 10, 16, width=4))
    with pytest.raises(ValueError, match=r"\(B, 1, 28, 28\), got \(2, 3, 28, 28\)"):
        m(torch.rand(2, 3, 28, 28))
    with pytest.raises(ValueError, match="shape"):
        m(torch.rand(1, 28, 28))
    with pytest.raises(ValueError, match="dtype"):
        m(torch.zeros(2, 1, 28, 28, dtype=torch.int64))
    with pytest.raises(ValueError, match="labels"):
        accuracy(m, torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="labels must be in"):
        accuracy(m, torch.rand(2, 1, 28, 28), torch.tensor([0, 10]))
    x, y = _lr_images(8)
    with pytest.raises(ValueError, match="together"):
        train_classifier(x, y, val_images=x)
    with pytest.raises(ValueError, match="epochs"):
        train_classifier(x, y, epochs=0)


@pytest.mark.parametrize(
    "overrides,match",
    [({"in_channels": 0}, "in_channels"), ({"image_size": 10**6}, "image_size"),
     ({"num_classes": 1}, "num_classes"), ({"feature_dim": 10**7}, "feature_dim"),
     ({"width": "8"}, "width"), ({"bogus": 1}, "unknown")],
)
def test_classifier_config_validation(overrides, match):
    d = {"in_channels": 1, "image_size": 28, "num_classes": 10, "feature_dim": 16, **overrides}
    with pytest.raises(ValueError, match=match):
        ClassifierConfig.from_dict(d)


# --------------------------------------------------------------------------- Fréchet distance
def _correlated(n, d, seed, shift=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return (rng.normal(size=(n, d)) @ mix) * scale + shift


@pytest.mark.parametrize("n,d", [(500, 16), (300, 64), (100, 128)])
def test_fd_self_is_zero(n, d):
    a = _correlated(n, d, seed=0, shift=3.0, scale=5.0)
    scale = np.trace(np.cov(a, rowvar=False))
    assert frechet_distance(a, a) / scale < 1e-6
    assert frechet_distance(torch.from_numpy(a).float(), torch.from_numpy(a).float()) / scale < 1e-6


def test_fd_pure_mean_shift_is_exact():
    """Identical covariances: FD == ||shift||^2, so the trace terms must cancel (no clamping hides errors)."""
    a = _correlated(300, 64, seed=5, scale=4.0)
    shift = np.full(64, 0.01)
    scale = np.trace(np.cov(a, rowvar=False))
    assert abs(frechet_distance(a, a + shift) - shift @ shift) / scale < 1e-6


def test_fd_self_is_zero_for_classifier_features(trained):
    model, _, vx, _ = trained
    f = extract_features(model, vx)
    scale = float(np.trace(np.cov(f.double().numpy(), rowvar=False)))
    assert scale > 0
    assert frechet_distance(f, f) / scale < 1e-6


def test_fd_symmetric_and_positive():
    a = _correlated(400, 32, seed=1)
    b = _correlated(300, 32, seed=2, shift=0.5, scale=1.5)
    ab, ba = frechet_distance(a, b), frechet_distance(b, a)
    assert ab > 1.0
    assert ab == pytest.approx(ba, rel=1e-9)


def test_fd_from_stats_closed_form():
    rng = np.random.default_rng(0)
    d = 10
    mu_a, mu_b = rng.normal(size=d), rng.normal(size=d)
    va, vb = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(va) - np.sqrt(vb)) ** 2)
    got = frechet_distance_from_stats(mu_a, np.diag(va), mu_b, np.diag(vb))
    assert got == pytest.approx(expected, rel=1e-10)
    # non-commuting full covariances: Tr((A B)^{1/2}) = sum sqrt(eig(A^{1/2} B A^{1/2}))
    A = np.cov(_correlated(200, d, seed=3), rowvar=False)
    B = np.cov(_correlated(200, d, seed=4, scale=2.0), rowvar=False)
    ra = scipy.linalg.sqrtm(A).real
    tr = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(ra @ B @ ra), 0, None)))
    ref = np.trace(A) + np.trace(B) - 2 * tr
    assert frechet_distance_from_stats(np.zeros(d), A, np.zeros(d), B) == pytest.approx(ref, rel=1e-8)


def test_fd_singular_covariance_fallback():
    # rank-1 covariances (zero variance in most directions) still give a finite, correct value
    d = 6
    A = np.zeros((d, d)); A[0, 0] = 4.0
    B = np.zeros((d, d)); B[0, 0] = 1.0
    assert frechet_distance_from_stats(np.zeros(d), A, np.ones(d), B) == pytest.approx(d + 1.0, abs=1e-4)
    nilpotent = np.array([[0.0, 1.0], [0.0, 0.0]])  # sqrtm of a nilpotent matrix is not finite
    val = frechet_distance_from_stats(np.zeros(2), nilpotent, np.zeros(2), np.eye(2))
    assert np.isfinite(val)


def test_fd_grows_with_noise(trained):
    model, _, _, _ = trained
    x, _ = _lr_images(400, seed=7)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(8))
    sigmas = [0.0, 0.05, 0.1, 0.2, 0.4]
    fds = [fd_between(model, x, (x + s * z).clamp(0, 1)) for s in sigmas]
    assert fds[0] < 1e-6 * max(fds)
    assert all(b > a for a, b in zip(fds, fds[1:])), fds


def test_fd_grows_with_noise_random_init_features():
    torch.manual_seed(0)
    model = FeatureClassifier(ClassifierConfig(3, 32, 10, 64, width=8))
    x, _ = _lr_images(300, channels=3, size=32, seed=9)
    ref, _ = _lr_images(300, channels=3, size=32, seed=10)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(11))
    fds = [fd_between(model, ref, (x + s * z).clamp(0, 1), batch_size=64) for s in (0.0, 0.1, 0.3, 0.6)]
    assert all(b > a for a, b in zip(fds, fds[1:])), fds


def test_fd_between_matches_features(trained):
    model, _, vx, _ = trained
    a, b = vx[:128], vx[128:]
    assert fd_between(model, a, b, batch_size=50) == pytest.approx(
        frechet_distance(extract_features(model, a), extract_features(model, b)), rel=1e-6)


def test_fd_input_validation():
    a = np.random.default_rng(0).normal(size=(10, 4))
    with pytest.raises(ValueError, match="feature dimensions differ"):
        frechet_distance(a, a[:, :3])
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(a[:1], a)
    with pytest.raises(ValueError, match="2-D"):
        frechet_distance(a[0], a)
    bad = a.copy(); bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(a, bad)
    with pytest.raises(ValueError, match="inconsistent shapes"):
        frechet_distance_from_stats(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))


# --------------------------------------------------------------------------- checkpoints
def test_classifier_save_load_roundtrip(tmp_path, trained):
    model, _, vx, _ = trained
    p = tmp_path / "clf.safetensors"
    save_classifier(model, p)
    assert os.listdir(tmp_path) == ["clf.safetensors"]
    loaded = load_classifier(p)
    assert loaded.config == model.config and not loaded.training
    assert torch.equal(extract_features(model, vx), extract_features(loaded, vx))


def test_classifier_load_rejects_bad_files(tmp_path):
    m = FeatureClassifier(ClassifierConfig(1, 28, 10, 16, width=4))
    p = tmp_path / "c.safetensors"
    save_classifier(m, p)
    data = p.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="safetensors|truncated"):
        load_classifier(tmp_path / "trunc.safetensors")
    (tmp_path / "pickle.safetensors").write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    with pytest.raises(ValueError, match="pickle"):
        load_classifier(tmp_path / "pickle.safetensors")

    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    meta = {"format": "sqvae_core.fd.FeatureClassifier", "config": json.dumps(m.config.to_dict())}
    bad = dict(sd, **{"out.weight": torch.zeros(11, 16)})
    save_file(bad, str(tmp_path / "shape.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=r"'out.weight' has shape \(11, 16\), expected \(10, 16\)"):
        load_classifier(tmp_path / "shape.safetensors")
    absurd = dict(meta, config=json.dumps(dict(m.config.to_dict(), feature_dim=10**9)))
    save_file(sd, str(tmp_path / "absurd.safetensors"), metadata=absurd)
    with pytest.raises(ValueError, match="feature_dim"):
        load_classifier(tmp_path / "absurd.safetensors")
    # a prior checkpoint is not a classifier checkpoint
    from sqvae_core.prior import GatedPixelCNN, PriorConfig, save_prior

    save_prior(GatedPixelCNN(PriorConfig(8, 4, 4, hidden=4, layers=1)), tmp_path / "prior.safetensors")
    with pytest.raises(ValueError, match="format"):
        load_classifier(tmp_path / "prior.safetensors")
