"""`--preset paper` is the official SQ-VAE setup (github sony/sqvae, vision/), piece by piece.

Parameter counts below were read off the official nets (instantiated outside this project);
the equations are the ones its model and quantizer compute, recomputed here by hand.
"""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from scipy.special import ive

from sqvae_core.config import ModelConfig
from sqvae_core.data import load_dataset
from sqvae_core.models import build_model
from sqvae_core.train import (Dist, Progress, TrainConfig, apply_preset, make_optimizer, make_scheduler,
                              paper_preset, resolve, temperature_at, validate_and_log)


def paper_model(dataset: str, kind: str) -> ModelConfig:
    cfg = apply_preset(TrainConfig(model=ModelConfig(kind=kind), dataset=dataset), "paper")
    return cfg.model


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# (dataset, kind) -> (encoder, decoder, total) parameters of the official model
OFFICIAL_COUNTS = {
    ("fashion-mnist", "gaussian_1"): (116_128, 116_065, 248_578),
    ("mnist", "gaussian_1"): (116_128, 116_065, 240_386),
    ("cifar10", "gaussian_1"): (154_336, 154_147, 341_252),
    ("folder:faces", "gaussian_1"): (319_584, 278_179, 630_532),      # CelebA, 64x64
    ("folder:faces", "gaussian_4"): (360_928, 278_179, 671_876),
    ("folder:masks", "vmf"): (196_756, 154_071, 354_989),             # CelebAMask-HQ, 19 classes
}


@pytest.mark.parametrize("dataset,kind", list(OFFICIAL_COUNTS))
def test_paper_preset_has_the_official_parameter_counts(dataset, kind):
    cfg = paper_model(dataset, kind)
    if kind == "vmf":
        cfg.num_levels = 19
    model = build_model(cfg)
    enc, dec, total = OFFICIAL_COUNTS[(dataset, kind)]
    assert (n_params(model.encoder), n_params(model.decoder)) == (enc, dec)
    # + codebook + the learned scalar of σ²_φ / κ_φ (+ the decoder's κ for vMF)
    assert n_params(model) == total


@pytest.mark.parametrize("dataset,grid", [("fashion-mnist", 7), ("cifar10", 8), ("folder:x", 16)])
def test_official_nets_give_the_official_latent_grids(dataset, grid):
    model = build_model(paper_model(dataset, "gaussian_1")).eval()
    c, s = model.cfg.image_channels, model.cfg.image_size
    with torch.no_grad():
        out = model(torch.rand(2, c, s, s), mode="argmax")
    assert out.indices.shape == (2, grid, grid) and out.x_rec.shape == (2, c, s, s)


def test_official_init():
    torch.manual_seed(0)
    model = build_model(paper_model("folder:x", "gaussian_4"))
    convs = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    w = torch.cat([m.weight.flatten() for m in convs])
    assert abs(float(w.mean())) < 1e-3 and abs(float(w.std()) - 0.02) < 2e-4
    g = torch.cat([m.weight for m in bns])
    assert abs(float(g.mean()) - 1) < 5e-3 and abs(float(g.std()) - 0.02) < 2e-3
    assert all(float(m.bias.abs().max()) == 0 for m in bns)
    cb = model.quantizer.codebook
    assert abs(float(cb.std()) - 1) < 0.02     # codebook ~ N(0, 1)


@pytest.mark.parametrize("dataset,kind,var_q", [
    ("fashion-mnist", "gaussian_1", 11.0),   # σ²_φ = exp(0) + exp(log 10)
    ("cifar10", "gaussian_1", 21.0),         # exp(0) + exp(log 20)
    ("fashion-mnist", "gaussian_4", 10.0),   # exp(v) + exp(log 10): the scalar part
])
def test_paper_variance_parametrisation(dataset, kind, var_q):
    q = build_model(paper_model(dataset, kind)).quantizer
    assert math.isclose(q.var_floor + float(q.log_var_q.exp()), var_q, rel_tol=1e-6)
    z = torch.randn(1, 64, 2, 2)
    log_var = torch.full_like(z, math.log(0.5))
    var = q.effective_variance(z, log_var if kind != "gaussian_1" else None)
    expect = var_q + (0.5 if kind != "gaussian_1" else 0.0)
    assert torch.allclose(var, torch.full_like(var, expect))


def test_paper_vmf_parametrisation():
    model = build_model(paper_model("fashion-mnist-cat8", "vmf"))
    assert model.cfg.code_dim == 65                                  # d + 1, as the official vMF code
    q = model.quantizer
    assert math.isclose(q.kappa_floor + float(q.log_kappa_q.exp()), 1.05, rel_tol=1e-6)   # 1 + exp(log 0.05)
    assert math.isclose(float(model.log_kappa_x.exp()), 100.0, rel_tol=1e-6)             # 1 / 0.01


def test_paper_training_setup():
    cfg = apply_preset(TrainConfig(model=ModelConfig(kind="gaussian_1"), dataset="fashion-mnist"), "paper")
    assert (cfg.batch_size, cfg.lr, cfg.lr_schedule, cfg.plateau_factor, cfg.plateau_patience) == (32, 1e-3, "plateau", 0.5, 3)
    assert (cfg.epochs, cfg.val_per_epoch, cfg.val_size, cfg.val_split, cfg.drop_last) == (100, True, 10_000, "last", False)
    assert (cfg.temperature_init, cfg.temperature_decay, cfg.temperature_min) == (1.0, 1e-5, 0.0)
    assert cfg.best_by == "loss" and TrainConfig().best_by == "mse"   # the official best.pt: lowest val loss
    assert cfg.model.net == "official" and cfg.model.arelbo and not cfg.amp and cfg.model.batch_norm
    vae = apply_preset(TrainConfig(model=ModelConfig(kind="vae"), dataset="fashion-mnist"), "paper")
    assert not vae.model.batch_norm      # our VAE baseline decodes its posterior mean: no batch-norm
    assert temperature_at(cfg, 0) == math.exp(-1e-5)                  # the official step count starts at 1
    assert paper_preset("folder:x", "gaussian_1")["epochs"] == 70      # CelebA
    with pytest.raises(ValueError, match="paper preset has no setting"):
        paper_preset("mnist", "vmf")


def test_paper_preset_resolves_to_the_official_split_and_epochs():
    try:
        data = load_dataset("fashion-mnist", "train", download=False, allow_subset=False,
                            val_size=10_000, val_from_end=True)
    except FileNotFoundError:
        pytest.skip("needs the full Fashion-MNIST (apt-get install dataset-fashion-mnist)")
    cfg = apply_preset(TrainConfig(model=ModelConfig(kind="gaussian_1"), dataset="fashion-mnist"), "paper")
    val = load_dataset("fashion-mnist", "val", download=False, allow_subset=False, val_size=10_000, val_from_end=True)
    full = load_dataset("fashion-mnist", "train", download=False, allow_subset=False, val_size=0)
    assert len(data) == 50_000 and len(val) == 10_000
    assert torch.equal(data.images, full.images[:50_000]) and torch.equal(val.images, full.images[50_000:])
    resolved, _, _ = resolve(cfg, Dist(), data, val)
    assert resolved.steps == 100 * 1563 and resolved.val_every == 1563        # 50,000 / 32, last batch of 16
    assert cfg.epochs == 100 and cfg.val_every == 500                          # the caller's config is untouched


def test_plateau_halves_the_lr_after_three_validations_without_gain(monkeypatch):
    import sqvae_core.train as tr
    cfg = TrainConfig(lr=1e-3, lr_schedule="plateau")
    model = build_model(ModelConfig(codebook_size=8, code_dim=8, num_rb=1))
    opt = make_optimizer(model, cfg.lr, torch.device("cpu"))
    sched = make_scheduler(cfg, opt)
    losses = iter([100.0, 99.0, 99.995, 99.5, 99.2, 99.1, 99.0])   # gains below 1e-4 relative don't count
    monkeypatch.setattr(tr, "evaluate_model", lambda *a, **k: {"mse": 1.0, "loss": next(losses)})
    writer = SimpleNamespace(metrics=lambda row: None)
    lrs = []
    for _ in range(7):
        validate_and_log(model, SimpleNamespace(images=None), cfg, Progress(), torch.device("cpu"), writer,
                         sched, None, main=False)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == [1e-3] * 5 + [5e-4] * 2


@pytest.mark.parametrize("best_by,kept", [("mse", [1, 2]), ("loss", [1, 3])])
def test_best_weights_are_kept_at_the_lowest_chosen_validation_figure(tmp_path, monkeypatch, best_by, kept):
    """best.safetensors is written at each new low of the figure best_by names, never at the
    other's: the MSE falls at validations 1 and 2, the loss at 1 and 3."""
    import sqvae_core.train as tr
    from sqvae_core import rundir as rd
    cfg = TrainConfig(best_by=best_by)
    model = build_model(ModelConfig(codebook_size=8, code_dim=8, num_rb=1))
    figures = iter([(5.0, 10.0), (4.0, 11.0), (4.5, 9.0)])
    monkeypatch.setattr(tr, "evaluate_model", lambda *a, **k: dict(zip(("mse", "loss"), next(figures))))
    writer, p, written = SimpleNamespace(metrics=lambda row: None), Progress(best_by=best_by), []
    for step in (1, 2, 3):
        p.step = step
        validate_and_log(model, SimpleNamespace(images=None), cfg, p, torch.device("cpu"), writer, None,
                         tmp_path, main=True)
        meta = rd.load_weights(tmp_path / rd.BEST)[1]
        if int(meta["step"]) == step:
            written.append(step)
    assert written == kept and meta["best_by"] == best_by
    assert float(meta[f"val_{best_by}"]) == {"mse": 4.0, "loss": 9.0}[best_by] == p.best
    with pytest.raises(ValueError, match="best-by must be one of mse, loss"):
        TrainConfig(best_by="fd").validate()


def test_gaussian_sq_vae_loss_is_the_official_equation():
    """Our Gaussian SQ-VAE I loss on a batch equals the official model's, computed by hand from
    the same encoder output and Gumbel noise."""
    torch.manual_seed(0)
    model = build_model(paper_model("fashion-mnist", "gaussian_1")).train()
    x = torch.rand(4, 1, 28, 28)
    out = model(x, temperature=0.7, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        z, _ = model.encoder(x)
        zf = z.permute(0, 2, 3, 1).reshape(-1, 64)
        cb = model.quantizer.codebook
        var_q = 1.0 + float(model.quantizer.log_var_q.exp())
        dist = (zf ** 2).sum(1, keepdim=True) + (cb ** 2).sum(1) - 2 * zf @ cb.t()
        logit = -0.5 / var_q * dist
        u = torch.rand(logit.shape, generator=torch.Generator().manual_seed(1))
        g = -torch.log(-torch.log(u + 1e-10) + 1e-10)
        zq = F.softmax((logit + g) / 0.7, -1) @ cb
        zq = zq.reshape(4, 7, 7, 64).permute(0, 3, 1, 2)
        x_rec = torch.sigmoid(model.decoder(zq))
        mse = F.mse_loss(x_rec, x, reduction="sum") / 4
        p = torch.softmax(logit, -1)
        official = 784 * torch.log(mse) / 2 + (p * torch.log_softmax(logit, -1)).sum() / 4 \
            + ((z - zq) ** 2 * 0.5 / var_q).sum((1, 2, 3)).mean()
    assert math.isclose(float(out.loss), float(official), rel_tol=1e-5)


def test_vmf_loss_is_the_official_equation():
    """vMF reconstruction term: −κ Σ cos − D·[(m−1) log κ − κ − log ive(m−1, κ)] per image, with
    the decoder output through a softplus, on the sphere of F = 2·ceil(C/2) dimensions."""
    torch.manual_seed(0)
    cfg = paper_model("folder:masks", "vmf")
    cfg.num_levels = 19
    model = build_model(cfg)
    assert cfg.num_classes == 20 and model.decoder.convt[-1].out_channels == 20
    labels = torch.randint(0, 19, (2, 1, 64, 64))
    x = labels.float() / 18
    logits = torch.randn(2, 20, 64, 64)
    loss, stats, _ = model.reconstruction(logits, x)
    f = F.normalize(F.softplus(logits), dim=1)
    cos = f.gather(1, labels).sum((1, 2, 3)).mean()
    kappa, m = 100.0, 10
    log_norm = (m - 1) * math.log(kappa) - kappa - math.log(ive(m - 1, kappa))
    assert math.isclose(float(loss), float(-kappa * cos - 64 * 64 * log_norm), rel_tol=1e-5)


def test_configs_written_before_the_official_nets_load_as_legacy():
    old = ModelConfig(kind="gaussian_1", codebook_size=16, code_dim=16, num_rb=1).to_dict()
    del old["net"], old["kappa_q_floor"]
    cfg = ModelConfig.from_dict(old)
    assert cfg.net == "legacy" and cfg.design == "legacy"
    enc = build_model(cfg).encoder
    assert len(enc.conv) == 7 and isinstance(enc.conv[6], torch.nn.Conv2d)   # the 3x3 conv at 28x28
    assert ModelConfig().design == "28"


def test_vmf_read_out_never_picks_the_padding_class():
    cfg = paper_model("folder:masks", "vmf")
    cfg.num_levels = 19
    model = build_model(cfg)
    logits = torch.zeros(1, 20, 4, 4)
    logits[:, 19] = 5.0               # the padding class scores highest everywhere
    logits[:, 7] = 1.0
    img = model.to_image(logits)
    assert img.max() <= 1 and torch.allclose(img, torch.full_like(img, 7 / 18))


def test_bundles_of_the_paper_preset_keep_its_validation_split(tmp_path):
    """Scores and the prior read a run's val split as it was trained: the last val_size images."""
    from sqvae_core import rundir as rd
    from sqvae_core.scores import bundle_split
    cfg = paper_model("fashion-mnist", "gaussian_1")
    cfg.codebook_size, cfg.code_dim, cfg.num_rb = 8, 8, 1
    model = build_model(cfg)
    rd.atomic_write_json(tmp_path / rd.CONFIG, {"model": cfg.to_dict(), "dataset": "fashion-mnist",
                                                "train": {"val_size": 100, "val_split": "last"}})
    rd.save_weights(tmp_path / rd.WEIGHTS, model.state_dict())
    b = rd.load_bundle(tmp_path)
    val, _, _ = bundle_split(b, "val")
    train_all = load_dataset("fashion-mnist", "train", val_size=0)
    assert len(val) == 100 and torch.equal(val, train_all.images[-100:])
