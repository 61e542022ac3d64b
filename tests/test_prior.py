"""Tests for sqvae_core.prior (Gated PixelCNN prior over code grids)."""

from __future__ import annotations

import json
import math
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from sqvae_core import prior as prior_mod
from sqvae_core.prior import (
    GatedPixelCNN,
    PriorConfig,
    PriorFitConfig,
    _reference_forward,
    fit_prior,
    load_prior,
    nll_bits_per_code,
    save_prior,
    unigram_entropy_bits,
)



@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """The ops here are tiny; on a busy 2-core box OpenMP oversubscription makes
    multi-threaded torch 10x slower, so run this module single-threaded."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


CAUSAL_CASES = [
    pytest.param(nc, k, hw, id=f"cls{nc}-k{k}-{hw[0]}x{hw[1]}")
    for nc in (None, 3)
    for k in (3, 5)
    for hw in ((7, 7), (8, 8))
]


def _model(K=16, H=7, W=7, *, hidden=8, layers=8, kernel=3, num_classes=None, seed=0, dropout=0.0):
    torch.manual_seed(seed)
    m = GatedPixelCNN(PriorConfig(K, H, W, hidden=hidden, layers=layers, kernel=kernel,
                                  num_classes=num_classes, dropout=dropout))
    if num_classes is not None:  # non-trivial class embeddings
        with torch.no_grad():
            for layer in m.layers:
                layer.cond.weight.normal_(0.0, 1.0)
    return m.eval()


def _labels(nc, B, seed=0):
    if nc is None:
        return None
    return torch.randint(0, nc, (B,), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- causality
@pytest.mark.parametrize("nc,kernel,hw", CAUSAL_CASES)
def test_causality_jacobian(nc, kernel, hw):
    """d logits[p] / d embedded input[q] is exactly 0 for q >= p and non-zero for every q < p."""
    H, W = hw
    K = 16
    m = _model(K, H, W, kernel=kernel, num_classes=nc)
    P = H * W
    codes = torch.randint(0, K, (P, H, W), generator=torch.Generator().manual_seed(1))
    captured = {}

    def hook(mod, inp, out):
        out.retain_grad()
        captured["emb"] = out

    handle = m.embed.register_forward_hook(hook)
    try:
        logits = m(codes, _labels(nc, P))  # (P, K, H, W); sample b probes position b
    finally:
        handle.remove()
    proj = torch.randn(K, generator=torch.Generator().manual_seed(2))
    rows = torch.arange(P) // W
    cols = torch.arange(P) % W
    sel = logits[torch.arange(P), :, rows, cols]  # (P, K)
    (sel @ proj).sum().backward()
    dep = captured["emb"].grad.abs().sum(-1).reshape(P, P)  # dep[p, q]: influence of q on p

    for p in range(P):
        i, j = divmod(p, W)
        # q >= p (including p itself): no influence at all (mask A + causal stacks)
        assert torch.all(dep[p, p:] == 0), f"position {(i, j)} depends on itself/future: {dep[p, p:]}"
        # every earlier position influences p (full receptive field for 8 layers)
        assert torch.all(dep[p, :p] > 0), f"position {(i, j)} misses earlier positions"
        if j > 0:
            assert dep[p, p - 1] > 0  # left neighbour (mask A horizontal)
        if i > 0:
            assert dep[p, p - W] > 0  # above (vertical stack, down-shifted)
            if j + 1 < W:
                assert dep[p, p - W + 1] > 0, "blind spot: up-right neighbour ignored"


@pytest.mark.parametrize("nc,kernel,hw", CAUSAL_CASES)
def test_causality_perturbation(nc, kernel, hw):
    """Changing the code at q never changes logits at p <= q, but changes later positions."""
    H, W = hw
    K = 16
    m = _model(K, H, W, kernel=kernel, num_classes=nc, hidden=12, layers=3)
    P = H * W
    base = torch.randint(0, K, (H, W), generator=torch.Generator().manual_seed(3))
    batch = base.repeat(P + 1, 1, 1)
    for q in range(P):
        i, j = divmod(q, W)
        batch[q + 1, i, j] = (base[i, j] + 1 + q % (K - 1)) % K
    lab = None if nc is None else torch.full((P + 1,), 1)
    with torch.no_grad():
        out = m(batch, lab).permute(0, 2, 3, 1).reshape(P + 1, P, K)
    diff = (out[1:] - out[0]).abs().amax(-1)  # (q, p)
    for q in range(P):
        i, j = divmod(q, W)
        assert diff[q, : q + 1].max() < 1e-5, f"changing {(i, j)} altered logits at or before it"
        if j + 1 < W:
            assert diff[q, q + 1] > 1e-5, f"right neighbour of {(i, j)} ignores it"
        if i + 1 < H:
            assert diff[q, q + W] > 1e-5, f"position below {(i, j)} ignores it"
        if i + 1 < H and j > 0:
            assert diff[q, q + W - 1] > 1e-5, "blind spot: (i+1, j-1) ignores (i, j)"


def test_first_position_is_input_independent():
    m = _model(K=32, num_classes=None)
    a = torch.randint(0, 32, (6, 7, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = m(a)
    assert torch.allclose(out[:, :, 0, 0], out[:1, :, 0, 0].expand(6, -1), atol=1e-6)


# --------------------------------------------------------------------------- incremental path
@pytest.mark.parametrize("nc,kernel,hw", [(None, 3, (7, 7)), (4, 5, (8, 8)), (2, 3, (5, 9))])
def test_incremental_logits_match_forward(nc, kernel, hw):
    H, W = hw
    m = _model(20, H, W, hidden=16, layers=5, kernel=kernel, num_classes=nc)
    codes = torch.randint(0, 20, (6, H, W), generator=torch.Generator().manual_seed(5))
    lab = _labels(nc, 6)
    with torch.no_grad():
        full = m(codes, lab)
    inc = m._incremental_logits(codes, lab)
    assert torch.allclose(full, inc, atol=1e-5, rtol=1e-5), (full - inc).abs().max()


def _naive_sample(m, n, temperature, labels, gen):
    cfg = m.config
    codes = torch.zeros(n, cfg.height, cfg.width, dtype=torch.long)
    with torch.no_grad():
        for i in range(cfg.height):
            for j in range(cfg.width):
                logits = m(codes, labels)[:, :, i, j]
                probs = torch.softmax(logits.float() / temperature, -1)
                codes[:, i, j] = torch.multinomial(probs, 1, generator=gen).squeeze(1)
    return codes


@pytest.mark.parametrize("nc", [None, 3])
def test_sample_matches_naive_full_forward_sampling(nc):
    m = _model(12, 6, 7, hidden=16, layers=4, num_classes=nc)
    lab = _labels(nc, 8)
    fast = m.sample(8, labels=lab, generator=torch.Generator().manual_seed(7))
    slow = _naive_sample(m, 8, 1.0, lab, torch.Generator().manual_seed(7))
    assert torch.equal(fast, slow)


# --------------------------------------------------------------------------- sampling
def test_sample_shape_dtype_range():
    m = _model(K=37, H=8, W=8, hidden=16, layers=3, num_classes=5)
    s = m.sample(9, generator=torch.Generator().manual_seed(0))
    assert s.shape == (9, 8, 8) and s.dtype == torch.long
    assert int(s.min()) >= 0 and int(s.max()) < 37
    s2 = m.sample(3, labels=2, temperature=2.5)
    assert s2.shape == (3, 8, 8)
    s3 = m.sample(4, labels=torch.tensor([0, 1, 2, 4]))
    assert s3.shape == (4, 8, 8)
    # deterministic for a seeded generator, varied across seeds
    a = m.sample(9, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, s)
    b = m.sample(9, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(a, b)


def test_sample_restores_training_mode_and_threads():
    m = _model(K=8, hidden=8, layers=2, dropout=0.3)
    m.train()
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        m.sample(2)  # runs single-threaded internally
        assert torch.get_num_threads() == 2
        m.sample(2, threads=None)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(old)
    assert m.training


def test_low_temperature_is_greedy():
    m = _model(K=24, H=7, W=7, hidden=16, layers=4)
    a = m.sample(5, temperature=1e-3, generator=torch.Generator().manual_seed(0))
    b = m.sample(5, temperature=1e-3, generator=torch.Generator().manual_seed(123))
    assert torch.equal(a, b)
    # greedy argmax decoding with the full forward pass
    g = torch.zeros(1, 7, 7, dtype=torch.long)
    with torch.no_grad():
        for i in range(7):
            for j in range(7):
                g[0, i, j] = m(g)[0, :, i, j].argmax()
    assert torch.equal(a, g.expand(5, -1, -1))


def test_conditioning_changes_samples():
    m = _model(K=16, H=7, W=7, hidden=16, layers=4, num_classes=4)
    s0 = m.sample(16, labels=0, generator=torch.Generator().manual_seed(0))
    s1 = m.sample(16, labels=1, generator=torch.Generator().manual_seed(0))
    su = m.sample(16, labels=None, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(s0, s1)
    assert not torch.equal(s0, su)
    codes = torch.randint(0, 16, (2, 7, 7))
    with torch.no_grad():
        assert not torch.allclose(m(codes, torch.tensor([0, 0])), m(codes, torch.tensor([3, 3])))


def test_conditional_prior_without_labels_samples_the_data_classes():
    """A conditional prior is fitted on labelled grids only; sampled without a label it draws a class per
    grid. Data: class c is the constant grid of code c. Through the never-trained "unconditional"
    embedding (what labels=None did before) the samples were not such grids; now every sample is one,
    and the four classes come out about equally often."""
    K, n_cls = 4, 4
    labels = torch.arange(200) % n_cls
    train = labels[:, None, None].expand(200, 3, 3).clone()
    res = fit_prior(train, None, PriorConfig(K, 3, 3, hidden=16, layers=2, num_classes=n_cls),
                    steps=150, batch_size=32, lr=1e-2, train_labels=labels, eval_every=150)
    s = res.model.sample(400, generator=torch.Generator().manual_seed(0))
    constant = (s == s[:, :1, :1]).flatten(1).all(1)
    assert constant.float().mean() > 0.97
    counts = torch.bincount(s[:, 0, 0], minlength=K)
    assert counts.min() > 60, counts
    # the same draw as passing the classes it picked with the same generator
    g = torch.Generator().manual_seed(0)
    picked = torch.randint(n_cls, (400,), generator=g)
    assert torch.equal(s, res.model.sample(400, labels=picked, generator=g))


# --------------------------------------------------------------------------- validation
def test_invalid_codes_raise():
    m = _model(K=16, H=7, W=7, hidden=8, layers=2)
    good = torch.zeros(2, 7, 7, dtype=torch.long)
    m(good)
    with pytest.raises(ValueError, match=r"\[0, 16\).*max=16"):
        m(torch.full((2, 7, 7), 16))
    with pytest.raises(ValueError, match="min=-1"):
        m(torch.full((2, 7, 7), -1))
    with pytest.raises(ValueError, match=r"expected \(B, 7, 7\), got \(2, 8, 7\)"):
        m(torch.zeros(2, 8, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="3 dims"):
        m(torch.zeros(7, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="integer dtype"):
        m(torch.zeros(2, 7, 7))
    with pytest.raises(ValueError, match="torch.Tensor"):
        m(np.zeros((2, 7, 7), dtype=np.int64))
    with pytest.raises(ValueError, match="unconditional"):
        m(good, torch.tensor([0, 1]))


def test_invalid_labels_raise():
    m = _model(K=16, hidden=8, layers=2, num_classes=3)
    codes = torch.zeros(2, 7, 7, dtype=torch.long)
    m(codes)  # labels optional
    with pytest.raises(ValueError, match="labels must be in"):
        m(codes, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        m(codes, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="labels must be in"):
        m.sample(2, labels=-1)


@pytest.mark.parametrize("t", [0.0, -1.0, float("nan"), float("inf"), "1"])
def test_invalid_temperature_raises(t):
    m = _model(K=8, hidden=8, layers=2)
    with pytest.raises(ValueError, match="temperature"):
        m.sample(2, temperature=t)


def test_invalid_n_raises():
    m = _model(K=8, hidden=8, layers=2)
    with pytest.raises(ValueError, match="n must"):
        m.sample(0)


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"num_codes": 1}, "num_codes"),
        ({"num_codes": 65537}, "num_codes"),
        ({"height": 0}, "height"),
        ({"width": -3}, "width"),
        ({"hidden": 4097}, "hidden"),
        ({"hidden": 0}, "hidden"),
        ({"layers": 65}, "layers"),
        ({"layers": 0}, "layers"),
        ({"kernel": 4}, "odd"),
        ({"kernel": 1}, "kernel"),
        ({"num_classes": 0}, "num_classes"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": float("nan")}, "dropout"),
        ({"hidden": 3.5}, "hidden must be an int"),
        ({"layers": True}, "layers must be an int"),
    ],
)
def test_config_validation(overrides, match):
    d = {"num_codes": 16, "height": 7, "width": 7, **overrides}
    with pytest.raises(ValueError, match=match):
        PriorConfig.from_dict(d)
    with pytest.raises(ValueError, match=match):
        GatedPixelCNN(PriorConfig(**d))


def test_config_from_dict_keys():
    with pytest.raises(ValueError, match="missing"):
        PriorConfig.from_dict({"num_codes": 16, "height": 7})
    with pytest.raises(ValueError, match="unknown"):
        PriorConfig.from_dict({"num_codes": 16, "height": 7, "width": 7, "evil": 1})
    cfg = PriorConfig.from_dict({"num_codes": 16, "height": 7, "width": 7})
    assert cfg == PriorConfig(16, 7, 7)


# --------------------------------------------------------------------------- training
def _structured_codes(n, K=16, H=7, W=7, seed=0):
    """Row-wise 'stripes': a code mostly copies its left neighbour, rows mostly copy the row above."""
    rng = np.random.default_rng(seed)
    c = np.zeros((n, H, W), dtype=np.int64)
    for i in range(H):
        if i == 0:
            c[:, 0, 0] = rng.integers(0, K, n)
        else:
            keep = rng.random(n) < 0.7
            c[:, i, 0] = np.where(keep, c[:, i - 1, 0], rng.integers(0, K, n))
        for j in range(1, W):
            keep = rng.random(n) < 0.85
            c[:, i, j] = np.where(keep, c[:, i, j - 1], rng.integers(0, K, n))
    return torch.from_numpy(c)


@pytest.mark.slow
def test_fit_prior_beats_unigram_entropy():
    K = 16
    train = _structured_codes(2000, K, seed=0)
    val = _structured_codes(400, K, seed=1)
    cfg = PriorConfig(K, 7, 7, hidden=32, layers=3)
    rows = []
    res = fit_prior(train, val, cfg, steps=200, batch_size=32, lr=3e-3, eval_every=100,
                    seed=0, callback=rows.append, fit=PriorFitConfig(compile=False))
    model, hist = res.model, res.history
    assert [r["step"] for r in hist] == [100, 200]
    assert rows == hist and res.stop_reason == "steps" and res.steps == 200
    assert set(hist[0]) == {"step", "train_nll_bits", "val_nll_bits"}
    uni = unigram_entropy_bits(val, K)
    val_nll = nll_bits_per_code(model, val)
    assert val_nll == pytest.approx(hist[-1]["val_nll_bits"])   # fixed count: the last weights
    assert uni > 3.5  # codes are ~uniform marginally ...
    assert val_nll < uni - 1.5, (val_nll, uni)  # ... but highly predictable from context
    assert not model.training
    s = model.sample(4, generator=torch.Generator().manual_seed(0))
    assert s.shape == (4, 7, 7)


def test_fit_prior_conditional_and_early_stop():
    K = 8
    train = _structured_codes(64, K, seed=2) % K
    labels = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(0))
    cfg = {"num_codes": K, "height": 7, "width": 7, "hidden": 8, "layers": 2, "num_classes": 3}
    res = fit_prior(train, None, cfg, steps=50, batch_size=8, eval_every=5,
                    train_labels=labels, callback=lambda row: row["step"] >= 10)
    assert [r["step"] for r in res.history] == [5, 10] and res.stop_reason == "callback"
    assert res.history[-1]["val_nll_bits"] is None and res.best_step is None
    with pytest.raises(ValueError, match="train_codes values"):
        fit_prior(train + K, None, cfg, steps=1)
    with pytest.raises(ValueError, match="train_codes grid shape"):
        fit_prior(train[:, :6], None, cfg, steps=1)


def test_fit_prior_is_deterministic():
    train = _structured_codes(64, 8, seed=3) % 8
    cfg = PriorConfig(8, 7, 7, hidden=8, layers=2)
    r1 = fit_prior(train, train, cfg, steps=10, batch_size=8, eval_every=10, seed=4)
    r2 = fit_prior(train, train, cfg, steps=10, batch_size=8, eval_every=10, seed=4)
    assert r1.history == r2.history
    for a, b in zip(r1.model.state_dict().values(), r2.model.state_dict().values()):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- plateau stop
def _flat_validation(monkeypatch, values):
    """Replace the fit's validation NLL by `values`, one per evaluation, recording the weights
    each evaluation saw: a synthetic loss curve whose best point is known."""
    seen = []

    def fake(model, codes, cond, batch_size=500):
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return values[len(seen) - 1]

    monkeypatch.setattr(prior_mod, "_mean_nll_bits", fake)
    return seen


def test_plateau_stop_on_a_flat_loss_keeps_the_best_weights(monkeypatch):
    # 5.0 -> 4.0 improves by 20%; then 3.999, 3.998 are lower but by < 0.2% of 4.0: not improvements,
    # yet 3.998 is the best value, whose weights are kept; the 4th stale evaluation (step 60) stops.
    values = [5.0, 4.0, 3.999, 3.998, 3.9995, 4.1, 1.0, 1.0]
    seen = _flat_validation(monkeypatch, values)
    train = _structured_codes(200, 8, seed=5) % 8
    fit = PriorFitConfig(eval_every=10, patience=4, batch_size=8, lr=1e-2, compile=False)
    res = fit_prior(train, train[:20], PriorConfig(8, 7, 7, hidden=8, layers=2), fit)
    assert res.stop_reason == "plateau" and res.steps == 60 and len(res.history) == 6
    assert [r["val_nll_bits"] for r in res.history] == values[:6]
    assert res.best_step == 40 and res.best_val_nll_bits == 3.998
    final = res.model.state_dict()
    assert all(torch.equal(final[k], seen[3][k]) for k in final)            # the weights of step 40 ...
    assert not all(torch.equal(final[k], seen[5][k]) for k in final)        # ... not the last ones
    assert "stopped at step 60 (plateau" in res.message() and "kept step 40" in res.message()
    summary = res.summary()
    assert {"steps", "best_step", "best_val_nll_bits", "stop_reason", "fit"} <= set(summary)
    assert PriorFitConfig.from_dict(summary["fit"]) == res.config
    json.dumps(summary)


def test_plateau_hard_cap_and_held_out_validation(monkeypatch):
    seen = _flat_validation(monkeypatch, [5.0 - i for i in range(5)])    # always improving
    train = _structured_codes(100, 8, seed=6) % 8
    res = fit_prior(train, None, PriorConfig(8, 7, 7, hidden=8, layers=2),
                    PriorFitConfig(max_steps=50, eval_every=10, batch_size=8, compile=False))
    assert res.stop_reason == "max_steps" and res.steps == 50 and len(seen) == 5
    assert res.best_step == 50 and "hard cap max_steps=50" in res.message()
    assert res.n_val_grids == 10     # 10% of the training grids held out (under val_grids=2000)
    with pytest.raises(ValueError, match="plateau stop needs validation grids"):
        fit_prior(train[:5], None, PriorConfig(8, 7, 7, hidden=8, layers=2), PriorFitConfig(compile=False))


def test_bf16_is_on_where_native_and_says_so_where_asked_for_without(monkeypatch):
    """bf16=None (the default) fits in bf16 where it is native and quietly in fp32 elsewhere;
    bf16=True where it is not native says why in the precision and the message; both record what ran."""
    train = _structured_codes(40, 8, seed=9) % 8
    cfg = PriorConfig(8, 7, 7, hidden=8, layers=2)
    quick = dict(steps=2, eval_every=2, batch_size=4, compile=False)

    monkeypatch.setattr(prior_mod, "amp_unavailable", lambda dev: None)
    res = fit_prior(train, None, cfg, PriorFitConfig(**quick))
    assert res.config.bf16 is True and res.precision == "bf16 autocast" and "bf16 autocast" in res.message()
    res = fit_prior(train, None, cfg, PriorFitConfig(**quick, bf16=False))
    assert res.config.bf16 is False and res.precision == "fp32"

    monkeypatch.setattr(prior_mod, "amp_unavailable", lambda dev: "this CPU has no native bf16")
    res = fit_prior(train, None, cfg, PriorFitConfig(**quick))
    assert res.config.bf16 is False and res.precision == "fp32"
    res = fit_prior(train, None, cfg, PriorFitConfig(**quick, bf16=True))
    assert res.config.bf16 is True and res.precision == "fp32 (bf16 asked: this CPU has no native bf16)"
    assert "fp32 (bf16 asked: this CPU has no native bf16)" in res.message()
    assert PriorFitConfig.from_dict(res.summary()["fit"]).bf16 is True


def test_plateau_fit_really_converges_and_keeps_its_best_weights():
    """On real (overfittable) data: few training grids, so the validation NLL turns up again."""
    train = _structured_codes(16, 8, seed=7) % 8
    val = _structured_codes(200, 8, seed=8) % 8
    fit = PriorFitConfig(eval_every=20, patience=3, batch_size=16, lr=1e-2, max_steps=2000, compile=False)
    res = fit_prior(train, val, PriorConfig(8, 7, 7, hidden=16, layers=2), fit)
    vals = [r["val_nll_bits"] for r in res.history]
    assert res.stop_reason == "plateau" and res.steps < 2000
    assert res.best_val_nll_bits == min(vals) and res.best_step == res.history[vals.index(min(vals))]["step"]
    assert nll_bits_per_code(res.model, val) == pytest.approx(res.best_val_nll_bits, rel=1e-5)


# --------------------------------------------------------------------------- weight averaging
def test_weight_average_is_the_bias_corrected_recurrence():
    """avg_t = avg_{t-1} + (1 - β_t)(θ_t - avg_{t-1}), β_t = min(β, (1+t)/(10+t)), recomputed by hand;
    swapped_in shows the average inside the block and gives the model its own weights back after it,
    an exception included."""
    m = torch.nn.Linear(3, 2)
    avg = prior_mod._WeightAverage(m, 0.9)
    ref = [p.detach().clone() for p in m.parameters()]
    for t in range(1, 100):                          # (1+t)/(10+t) reaches β = 0.9 at t = 80
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.full_like(p, float(t * t % 7)))
        avg.update()
        beta = min(0.9, (1 + t) / (10 + t))
        ref = [r + (1 - beta) * (p.detach() - r) for r, p in zip(ref, m.parameters())]
    for a, r in zip(avg.avg, ref):
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-6)
    own = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(RuntimeError, match="inside"):
        with avg.swapped_in():
            for p, a in zip(m.parameters(), avg.avg):
                assert torch.equal(p, a)
            raise RuntimeError("inside")
    assert all(torch.equal(p, o) for p, o in zip(m.parameters(), own))


def test_averaged_fit_keeps_and_validates_the_averaged_weights():
    """A fixed one-step fit with ema keeps θ0 + (1 - β_1)(θ1 - θ0) (θ0: the seeded initial weights,
    θ1: the one-step fit's without averaging, β_1 = 2/11); a plateau fit with ema keeps the averaged
    weights its best validation NLL was measured on."""
    train = _structured_codes(64, 8, seed=3) % 8
    cfg = PriorConfig(8, 7, 7, hidden=8, layers=2)
    quick = dict(steps=1, batch_size=8, eval_every=1, seed=4, compile=False, bf16=False)
    raw = fit_prior(train, train, cfg, PriorFitConfig(**quick, ema=0.0)).model.state_dict()
    res = fit_prior(train, train, cfg, PriorFitConfig(**quick, ema=0.5))
    torch.manual_seed(4)
    init = GatedPixelCNN(cfg).state_dict()
    for k, v in res.model.state_dict().items():
        torch.testing.assert_close(v, init[k] + (1 - 2 / 11) * (raw[k] - init[k]), rtol=1e-6, atol=1e-7)
    assert "weights averaged (EMA 0.5)" in res.message()
    assert nll_bits_per_code(res.model, train) == pytest.approx(res.history[-1]["val_nll_bits"], rel=1e-6)

    val = _structured_codes(200, 8, seed=8) % 8
    fit = PriorFitConfig(eval_every=20, patience=3, batch_size=16, lr=1e-2, max_steps=400, compile=False,
                         bf16=False, ema=0.9)
    res = fit_prior(_structured_codes(16, 8, seed=7) % 8, val, PriorConfig(8, 7, 7, hidden=16, layers=2), fit)
    assert nll_bits_per_code(res.model, val) == pytest.approx(res.best_val_nll_bits, rel=1e-5)
    assert PriorFitConfig.from_dict(res.summary()["fit"]).ema == 0.9


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"ema": 1.0}, r"ema must be in \[0, 1\), got 1.0"),
        ({"ema": -0.1}, r"ema must be in \[0, 1\), got -0.1"),
        ({"steps": 0}, r"steps must be in \[1, 1000000000\], got 0"),
        ({"max_steps": -1}, r"max_steps must be in \[1, 1000000000\], got -1"),
        ({"eval_every": 300, "max_steps": 200}, r"eval_every must be <= max_steps \(200\) .* got 300"),
        ({"patience": 0}, r"patience must be in \[1, 10000\], got 0"),
        ({"min_improvement": 1.0}, r"min_improvement must be in \[0, 1\), got 1.0"),
        ({"min_improvement": float("nan")}, "min_improvement must be a float"),
        ({"val_fraction": 0.0}, r"val_fraction must be in \(0, 0.5\], got 0.0"),
        ({"val_fraction": 0.6}, r"val_fraction must be in \(0, 0.5\], got 0.6"),
        ({"val_grids": 0}, r"val_grids must be in \[1, 100000000\], got 0"),
        ({"batch_size": 2.5}, "batch_size must be an int"),
        ({"lr": 0.0}, "lr must be a positive float, got 0.0"),
        ({"lr": 2.0}, "lr must be <= 1, got 2.0"),
        ({"compile": "yes"}, "compile must be true, false or null"),
        ({"bf16": 1}, r"bf16 must be true, false or null \(automatic\), got 1"),
        ({"patience": True}, "patience must be an int"),
    ],
)
def test_fit_config_refusals(overrides, match):
    with pytest.raises(ValueError, match=match):
        PriorFitConfig.from_dict(overrides)
    with pytest.raises(ValueError, match=match):
        fit_prior(torch.zeros(4, 7, 7, dtype=torch.long), None, PriorConfig(8, 7, 7), overrides)
    with pytest.raises(ValueError, match="unknown key"):
        PriorFitConfig.from_dict({"patiense": 3})
    assert PriorFitConfig.from_dict({}) == PriorFitConfig()    # the plateau stop by default
    assert PriorFitConfig(eval_every=300, max_steps=200, steps=100).validate()   # fixed count: no cap check


# --------------------------------------------------------------------------- the fast path
_U = 2.0 ** -24      # fp32 unit roundoff


def _rounding_bound(cfg: PriorConfig, batch: int) -> float:
    """Relative bound of fp32 rounding between two orderings of the same computation: each of the
    ~2 L + 2 products on a path sums n = (k2+1) * kernel * hidden terms (the vertical conv, the
    longest) forward, n + batch*H*W for a weight gradient; each path can err by n*u relative
    (the classic dot-product bound), both paths do (x2), and tanh/sigmoid approximations add a
    few ulps per layer (+4 L). Independent of the CPU: IEEE fp32 and any summation order."""
    n = (cfg.kernel // 2 + 1) * cfg.kernel * cfg.hidden + batch * cfg.height * cfg.width
    return 2 * ((2 * cfg.layers + 2) * n + 4 * cfg.layers) * _U


def _assert_close(a, b, bound, what):
    scale = max(float(b.abs().max()), 1e-30)
    assert float((a - b).abs().max()) <= bound * scale, (what, float((a - b).abs().max()) / scale, bound)


@pytest.mark.parametrize("nc", [None, 3])
@pytest.mark.parametrize("hw, kernel", [((7, 7), 3), ((1, 5), 3), ((4, 6), 3), ((6, 7), 5)])
def test_fast_forward_equals_reference(nc, hw, kernel):
    """The fit's forwards (dead row, fused skip/out; as convolutions and as channels-last matrix
    products) against the literal architecture: logits and every gradient, within the rounding
    bound (equal in exact arithmetic). Kernel 5 too: the windows' offsets follow k2."""
    m = _model(K=16, H=hw[0], W=hw[1], hidden=8, layers=3, num_classes=nc, kernel=kernel).train()
    codes = torch.randint(0, 16, (6, *hw), generator=torch.Generator().manual_seed(1))
    cond = None if nc is None else m._cond_index(_labels(nc, 6), 6, torch.device("cpu"))
    embedded = (lambda fwd: lambda: fwd(m.embed(codes).permute(0, 3, 1, 2), cond))
    forms = {"conv": embedded(m._forward_embedded), "ref": embedded(lambda x, c: _reference_forward(m, x, c)),
             "matmul": lambda: m._logits_matmul(codes, cond).permute(0, 3, 1, 2)}
    out = {}
    for name, logits_of in forms.items():
        m.zero_grad()
        logits = logits_of()
        F.cross_entropy(logits, codes).backward()
        # a parameter no output reads has no gradient (None) or a zero one
        out[name] = (logits.detach(), {k: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                                       for k, p in m.named_parameters()})
    bound = _rounding_bound(m.config, 6)
    for name in ("conv", "matmul"):
        _assert_close(out[name][0], out["ref"][0], bound, (name, "logits"))
        for k, g in out["ref"][1].items():
            _assert_close(out[name][1][k], g, bound, (name, k))


def test_compiled_fit_equals_eager():
    """Along an eager fit, the compiled step's loss and gradients equal the eager step's on the
    same weights within the rounding bound (inductor only reorders and fuses fp32 arithmetic);
    end to end, 20 compiled steps of Adam land on the eager fit's validation NLL within the
    plateau rule's own resolution (min_improvement, relative)."""
    from sqvae_core.device import compile_unavailable
    if compile_unavailable(torch.device("cpu")):
        pytest.skip(compile_unavailable(torch.device("cpu")))
    cfg = PriorConfig(16, 7, 7, hidden=8, layers=2, num_classes=3)
    train = _structured_codes(64, 16, seed=9)
    labels = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(2))
    m = GatedPixelCNN(cfg)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    eager = prior_mod._make_step(m, opt, PriorFitConfig(compile=False), "fp32", torch.device("cpu"))
    compiled_losses = {   # both forms a fit can run (step_form picks one by CPU), compiled
        "conv": torch.compile(lambda x, c: F.cross_entropy(m._logits(x, c), x)),
        "matmul": torch.compile(lambda x, c: F.cross_entropy(m._logits_matmul(x, c).flatten(0, 2), x.flatten())),
    }
    bound = _rounding_bound(cfg, 8)
    for step in range(5):
        x, c = train[step * 8:(step + 1) * 8], labels[step * 8:(step + 1) * 8]
        got = {}
        for form, compiled_loss in compiled_losses.items():
            m.zero_grad()
            loss = compiled_loss(x, c)
            loss.backward()
            got[form] = (loss.detach(), {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None})
        want = eager(x, c)       # eager loss and gradients on the same weights, then Adam steps
        for form, (loss, grads) in got.items():
            assert abs(float(loss) - float(want)) <= bound * float(want), form
            assert grads.keys() == {k for k, p in m.named_parameters() if p.grad is not None}, form
            for k, p in m.named_parameters():
                if p.grad is not None:
                    _assert_close(grads[k], p.grad, bound, (form, k))
    runs = [fit_prior(train, train[:32], cfg, PriorFitConfig(steps=20, eval_every=10, batch_size=8, lr=3e-3,
                                                             compile=flag), train_labels=labels, val_labels=labels[:32])
            for flag in (False, True)]
    assert runs[1].config.compile and not runs[0].config.compile
    assert runs[0].precision == runs[1].precision       # bf16 where native, else fp32: the form follows
    assert (runs[0].form, runs[1].form) == ("conv", prior_mod.step_form(torch.device("cpu"), runs[1].precision, True))
    assert runs[1].summary()["step_form"] == runs[1].form
    a, b = (r.history[-1]["val_nll_bits"] for r in runs)
    assert abs(a - b) <= PriorFitConfig().min_improvement * a, (a, b)


def test_step_form_is_matmuls_only_where_they_measured_faster(monkeypatch):
    """A compiled step on a CPU: fp32 on AVX2, bf16 on AVX512-BF16 without AMX (benchmarks/RESULTS.md).
    Every other case keeps the convolutions, and an unknown form is refused by name."""
    cpu = torch.device("cpu")
    for isa, units, fp32_form, bf16_form in (("AVX2", [], "matmul", "conv"),
                                              ("AVX512", ["AVX512-BF16"], "conv", "matmul"),
                                              ("AVX512", ["AVX512-BF16", "AMX"], "conv", "conv"),
                                              ("AVX512", [], "conv", "conv"),
                                              ("DEFAULT", [], "conv", "conv")):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda isa=isa: isa)
        monkeypatch.setattr(prior_mod, "x86_bf16_units", lambda units=units: list(units))
        case = (isa, units)
        assert prior_mod.step_form(cpu, "fp32", True) == fp32_form, case
        assert prior_mod.step_form(cpu, "fp32 (bf16 asked: no native bf16)", True) == fp32_form, case
        assert prior_mod.step_form(cpu, "bf16 autocast", True) == bf16_form, case
        assert prior_mod.step_form(cpu, "fp32", False) == prior_mod.step_form(cpu, "bf16 autocast", False) == "conv"
    assert prior_mod.step_form(torch.device("meta"), "fp32", True) == "conv"
    assert prior_mod.step_form(torch.device("meta"), "bf16 autocast", True) == "conv"
    m = _model(K=16, hidden=8, layers=2)
    opt = torch.optim.Adam(m.parameters())
    with pytest.raises(ValueError, match=r"form must be one of \('conv', 'matmul'\), got 'nhwc'"):
        prior_mod._make_step(m, opt, PriorFitConfig(compile=False), "fp32", torch.device("cpu"), "nhwc")


def test_nll_and_unigram_helpers():
    m = _model(K=16, hidden=8, layers=2)
    codes = torch.randint(0, 16, (10, 7, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = F.cross_entropy(m(codes), codes).item() / math.log(2)
    assert nll_bits_per_code(m, codes, batch_size=3) == pytest.approx(ref, rel=1e-5)
    assert unigram_entropy_bits(torch.tensor([0, 1, 2, 3] * 5), 4) == pytest.approx(2.0)
    assert unigram_entropy_bits(np.zeros((3, 7, 7), dtype=np.int64), 16) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        unigram_entropy_bits(torch.tensor([0, 4]), 4)


# --------------------------------------------------------------------------- checkpoints
def _state_and_meta(m):
    sd = {k: v.contiguous().clone() for k, v in m.state_dict().items()}
    meta = {"format": "sqvae_core.prior.GatedPixelCNN", "format_version": "1",
            "config": json.dumps(m.config.to_dict())}
    return sd, meta


def test_save_load_roundtrip(tmp_path):
    m = _model(K=20, H=8, W=8, hidden=12, layers=3, kernel=5, num_classes=3, dropout=0.1)
    path = tmp_path / "prior.safetensors"
    save_prior(m, path)
    save_prior(m, path)  # overwrite works
    assert os.listdir(tmp_path) == ["prior.safetensors"]  # no temp files left behind
    loaded = load_prior(path)
    assert loaded.config == m.config and not loaded.training
    codes = torch.randint(0, 20, (4, 8, 8), generator=torch.Generator().manual_seed(0))
    lab = torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        assert torch.equal(m(codes, lab), loaded(codes, lab))
    assert torch.equal(m.sample(3, generator=torch.Generator().manual_seed(0)),
                       loaded.sample(3, generator=torch.Generator().manual_seed(0)))
    assert all(p.requires_grad for p in loaded.parameters())
    assert load_prior(str(path), device=torch.device("cpu"), num_codes=20).config.num_codes == 20
    with pytest.raises(ValueError, match="num_codes=20, expected 32"):
        load_prior(path, num_codes=32)


def test_load_truncated_and_garbage(tmp_path):
    m = _model(K=16, hidden=8, layers=2)
    path = tmp_path / "p.safetensors"
    save_prior(m, path)
    data = path.read_bytes()
    for name, blob in [("half", data[: len(data) // 2]), ("tail", data[:-16]), ("tiny", data[:5]),
                       ("empty", b""), ("garbage", os.urandom(4096)),
                       ("json", b'{"num_codes": 16}')]:
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(blob)
        with pytest.raises(ValueError, match="safetensors|truncated"):
            load_prior(bad)
    with pytest.raises(FileNotFoundError):
        load_prior(tmp_path / "nope.safetensors")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_load_refuses_pickles(tmp_path):
    marker = tmp_path / "PWNED"
    p1 = tmp_path / "evil.safetensors"
    p1.write_bytes(pickle.dumps(_Evil(str(marker))))
    with pytest.raises(ValueError, match="pickle"):
        load_prior(p1)
    p2 = tmp_path / "torchsave.pt"
    torch.save({"state_dict": _model(K=16, hidden=8, layers=2).state_dict(), "x": _Evil(str(marker))}, p2)
    with pytest.raises(ValueError, match="pickle"):
        load_prior(p2)
    assert not marker.exists()


def test_load_rejects_bad_contents(tmp_path):
    m = _model(K=16, hidden=8, layers=2)
    sd, meta = _state_and_meta(m)

    def write(name, tensors, metadata):
        p = tmp_path / name
        save_file(tensors, str(p), metadata=metadata)
        return p

    bad = dict(sd, **{"embed.weight": torch.zeros(17, 8)})
    with pytest.raises(ValueError, match=r"'embed.weight' has shape \(17, 8\), expected \(16, 8\)"):
        load_prior(write("shape.safetensors", bad, meta))
    # K mismatch: config says 32 codes but tensors were trained for 16
    meta_k = dict(meta, config=json.dumps(dict(m.config.to_dict(), num_codes=32)))
    with pytest.raises(ValueError, match="expected \\(32, 8\\)"):
        load_prior(write("k.safetensors", sd, meta_k))
    missing = {k: v for k, v in sd.items() if k != "head_out.bias"}
    with pytest.raises(ValueError, match="missing tensor.*head_out.bias"):
        load_prior(write("missing.safetensors", missing, meta))
    with pytest.raises(ValueError, match="unexpected tensor"):
        load_prior(write("extra.safetensors", dict(sd, extra=torch.zeros(1)), meta))
    absurd = dict(meta, config=json.dumps(dict(m.config.to_dict(), hidden=10**9, layers=10**6)))
    with pytest.raises(ValueError, match="invalid config.*hidden"):
        load_prior(write("absurd.safetensors", sd, absurd))
    with pytest.raises(ValueError, match="not valid JSON"):
        load_prior(write("json.safetensors", sd, dict(meta, config="{nope")))
    with pytest.raises(ValueError, match="invalid config"):
        load_prior(write("list.safetensors", sd, dict(meta, config="[1, 2]")))
    with pytest.raises(ValueError, match="missing required"):
        load_prior(write("req.safetensors", sd, dict(meta, config='{"num_codes": 16}')))
    with pytest.raises(ValueError, match="no metadata"):
        load_prior(write("nometa.safetensors", sd, None))
    with pytest.raises(ValueError, match="format"):
        load_prior(write("fmt.safetensors", sd, dict(meta, format="something.else")))
    with pytest.raises(ValueError, match="'config'"):
        load_prior(write("nocfg.safetensors", sd, {"format": meta["format"]}))
    nan = dict(sd, **{"embed.weight": torch.full((16, 8), float("nan"))})
    with pytest.raises(ValueError, match="NaN"):
        load_prior(write("nan.safetensors", nan, meta))
    ints = dict(sd, **{"embed.weight": torch.zeros(16, 8, dtype=torch.int32)})
    with pytest.raises(ValueError, match="dtype"):
        load_prior(write("int.safetensors", ints, meta))
    # a valid file written by hand with float64 tensors loads fine
    m2 = load_prior(write("f64.safetensors", {k: v.double() for k, v in sd.items()}, meta))
    codes = torch.randint(0, 16, (2, 7, 7))
    with torch.no_grad():
        assert torch.allclose(m(codes), m2(codes))
