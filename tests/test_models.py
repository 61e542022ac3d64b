"""Properties of the SQ-VAE math and of every model kind."""
import math

import pytest
import torch
import torch.nn.functional as F

from sqvae_core.config import MODEL_KINDS, ModelConfig
from sqvae_core.kinds import KINDS
from sqvae_core.models import MODELS, GaussianLikelihood, build_model
from sqvae_core.quantizers import (GaussianSQ, VectorQuantizer, VmfSQ, _entropy_rows, counter_uniform, gumbel_softmax,
                                   to_rows)


def small_cfg(kind, **kw):
    base = dict(kind=kind, codebook_size=16, code_dim=16, num_rb=1)
    base.update(kw)
    return ModelConfig(**base)


def set_var(q: GaussianSQ, var: float):
    with torch.no_grad():
        q.log_var_q.fill_(math.log(var))


# ---------------------------------------------------------------- limits of σ²_φ, κ_φ
@pytest.mark.parametrize("variant", [1, 2, 3, 4])
def test_small_variance_gives_nearest_neighbour(variant):
    torch.manual_seed(0)
    q = GaussianSQ(32, 8, variant=variant)
    z = torch.randn(4, 8, 5, 5)
    log_var = torch.full_like(z, -40.0)            # encoder variance ≈ 0 too
    set_var(q, 1e-6)
    nearest = torch.cdist(to_rows(z), q.codebook).argmin(1).reshape(4, 5, 5)
    for mode in ("argmax", "sample", "gumbel"):
        out = q(z, log_var, mode=mode, temperature=0.5)
        assert torch.equal(out.indices, nearest)
        assert torch.allclose(out.z_q, q.lookup(nearest), atol=1e-5), mode
    assert out.stats["entropy"] < 1e-3


def test_large_variance_gives_uniform_assignment():
    torch.manual_seed(0)
    q = GaussianSQ(32, 8, variant=1)
    set_var(q, 1e8)
    out = q(torch.randn(2, 8, 3, 3), mode="argmax")
    assert torch.allclose(out.probs, torch.full_like(out.probs, 1 / 32), atol=1e-5)
    assert abs(float(out.stats["entropy"]) - math.log(32)) < 1e-4


@pytest.mark.parametrize("variant", [1, 4])
def test_probs_are_eq7_softmax_of_exact_distances(variant):
    """The quantizers drop the per-row ‖z‖² from the logits (softmax ignores it): P̂ must still
    equal softmax_k(−Σ_j (z_j − b_kj)² / (2σ²_φ,j)) computed the long way, far from the origin too."""
    torch.manual_seed(0)
    q = GaussianSQ(16, 6, variant=variant, var_init=0.7)
    z = torch.randn(2, 6, 3, 3) * 3 + 5
    log_var = torch.randn_like(z) * 0.3
    out = q(z, log_var, mode="argmax")
    var = q.effective_variance(z, log_var)                       # (1, 1) or (N, d)
    diff2 = (to_rows(z)[:, None, :] - q.codebook[None]) ** 2      # (N, K, d)
    exact = torch.softmax(-0.5 * (diff2 / var[:, None, :]).sum(-1), -1)
    assert torch.allclose(out.probs.reshape(-1, 16), exact, atol=1e-5)
    assert torch.equal(out.indices.reshape(-1), exact.argmax(-1))


def test_vmf_large_kappa_gives_max_cosine_and_small_kappa_uniform():
    torch.manual_seed(0)
    q = VmfSQ(32, 8, kappa_init=1e6)
    z = torch.randn(3, 8, 4, 4)
    best = (F.normalize(to_rows(z), dim=1) @ q.codebook_vectors().t()).argmax(1).reshape(3, 4, 4)
    out = q(z, mode="gumbel", temperature=1.0)
    assert torch.equal(out.indices, best)
    assert torch.allclose(out.z_q, q.lookup(best), atol=1e-5)
    q_flat = VmfSQ(32, 8, kappa_init=1e-7)
    out = q_flat(z, mode="argmax")
    assert abs(float(out.stats["entropy"]) - math.log(32)) < 1e-4


def test_variance_floor_is_an_explicit_option_and_reported():
    q = GaussianSQ(8, 4, variant=1, var_init=10.0, var_floor=1.0)
    assert math.isclose(float(q.log_var_q.detach().exp()), 9.0, rel_tol=1e-6)   # 1 + exp(s) = 10
    out = q(torch.randn(1, 4, 2, 2), mode="argmax")
    assert math.isclose(float(out.stats["sigma2_q"]), 10.0, rel_tol=1e-5)
    set_var(q, 1e-9)
    assert float(q(torch.randn(1, 4, 2, 2)).stats["sigma2_q"]) >= 1.0   # cannot fall below the floor


def test_variant_iv_uses_per_dimension_precision():
    q = GaussianSQ(2, 2, variant=4, var_init=1e-30)
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[1.0, 0.0], [0.0, 3.0]]))
    z = torch.tensor([[0.0, 0.0]]).reshape(1, 2, 1, 1)
    # tiny variance on dim 0, huge on dim 1: only dim 0 matters -> code 1 (b_10 = 0) wins,
    # although code 0 is nearer in Euclidean distance.
    log_var = torch.tensor([math.log(1e-2), math.log(1e4)]).reshape(1, 2, 1, 1)
    assert q(z, log_var, mode="argmax").indices.item() == 1
    log_var = torch.zeros(1, 2, 1, 1)
    assert q(z, log_var, mode="argmax").indices.item() == 0


def test_entropy_rows_and_their_closed_form_gradient():
    """H(P̂) per row and its hand-written backward, ∂H/∂L_k = −p_k (log p_k + H), against autograd
    through log_softmax and against finite differences; P̂ itself carries no gradient."""
    torch.manual_seed(0)
    logits = (torch.randn(40, 12, dtype=torch.float64) * 4 + 30).requires_grad_()
    p, h = _entropy_rows(logits)
    log_p = F.log_softmax(logits, -1)
    reference = -(log_p.exp() * log_p).sum(-1)
    assert not p.requires_grad
    assert torch.allclose(p, log_p.exp(), rtol=0, atol=1e-14)
    assert torch.allclose(h, reference, rtol=0, atol=1e-12)
    weights = torch.randn(40, dtype=torch.float64)
    grad, = torch.autograd.grad((h * weights).sum(), logits)
    grad_ref, = torch.autograd.grad((reference * weights).sum(), logits)
    assert torch.allclose(grad, grad_ref, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: _entropy_rows(x)[1], (logits[:5].detach().requires_grad_(),))


# ---------------------------------------------------------------------- Gumbel-softmax
def test_gumbel_softmax_rows_sum_to_one():
    logits = torch.randn(100, 7) * 3
    for tau in (0.1, 1.0, 5.0):
        y = gumbel_softmax(logits, tau)
        assert torch.allclose(y.sum(-1), torch.ones(100), atol=1e-5)
        assert (y >= 0).all()
    with pytest.raises(ValueError, match="temperature"):
        gumbel_softmax(logits, 0.0)


def test_hard_gumbel_samples_follow_the_softmax_chi_square():
    torch.manual_seed(0)
    p = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
    n = 40000
    y = gumbel_softmax(p.log().expand(n, 5).contiguous(), 1.0)
    counts = torch.bincount(y.argmax(-1), minlength=5).double()
    expected = n * p.double()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 18.47, f"χ²={chi2:.2f} over 4 dof exceeds the 0.1% critical value"
    # and a wrong distribution is rejected by the same test
    wrong = n * torch.tensor([0.2] * 5, dtype=torch.double)
    assert float(((counts - wrong) ** 2 / wrong).sum()) > 18.47


def _splitmix64_uniform(counter: int) -> float:
    """SplitMix64's output at a counter (Steele, Lea & Flood 2014), written out on Python's
    unbounded ints, to torch.rand's 24-bit grid."""
    mask = (1 << 64) - 1
    z = (counter * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return ((z ^ (z >> 31)) >> 40) / 2 ** 24


def test_counter_uniforms_are_splitmix64_and_uniform():
    """counter_uniform in int64 torch ops equals SplitMix64 by hand, across the wrap of the
    64-bit counter too; its numbers are uniform (χ² over 256 bins) and neighbours uncorrelated,
    and a key differing only in its top bit gives an unrelated stream."""
    mask = (1 << 64) - 1
    for key in (0, 12345, -2 ** 63, 2 ** 63 - 5):
        got = counter_uniform(torch.empty(2, 5), torch.tensor(key)).flatten().tolist()
        assert got == [_splitmix64_uniform((key + i) & mask) for i in range(10)], key
    n = 1 << 20
    u = counter_uniform(torch.empty(n), torch.tensor(987654321)).double()
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    counts = torch.bincount((u * 256).long(), minlength=256).double()
    chi2 = float(((counts - n / 256) ** 2 / (n / 256)).sum())
    assert chi2 < 330.5, f"χ²={chi2:.1f} over 255 dof exceeds the 0.1% critical value"
    lag1 = float(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1])
    assert abs(lag1) < 4 / math.sqrt(n), lag1
    other = counter_uniform(torch.empty(n), torch.tensor(987654321 - 2 ** 63)).double()
    assert abs(float(torch.corrcoef(torch.stack([u, other]))[0, 1])) < 4 / math.sqrt(n)


@pytest.mark.slow
def test_compiled_gumbel_softmax_on_a_cpu_hashes_a_key_from_torchs_generator():
    """Compiled, on a CPU, gumbel_softmax takes one 64-bit key from torch's generator and hashes
    counters: from the same seed it returns exactly softmax((logits + g) / τ) with g from
    counter_uniform at that key, so a seeded compiled run draws the same noise every time (and
    --resume restores it with the generator's state); and hard samples follow the softmax."""
    pytest.importorskip("torch._inductor")
    from sqvae_core.device import COMPILE_OPTIONS, compile_unavailable
    if compile_unavailable(torch.device("cpu")):
        pytest.skip(compile_unavailable(torch.device("cpu")))
    torch._dynamo.reset()
    compiled = torch.compile(gumbel_softmax, options=COMPILE_OPTIONS)
    p = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
    logits, tau = p.log().expand(40000, 5).contiguous(), torch.tensor(0.5)
    torch.manual_seed(3)
    y = compiled(logits, tau)
    torch.manual_seed(3)
    u = counter_uniform(logits, torch.randint(-2 ** 63, 2 ** 63 - 1, (), dtype=torch.int64))
    by_hand = torch.softmax((logits - torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))) / tau, -1)
    torch.testing.assert_close(y, by_hand, rtol=1e-5, atol=1e-6)
    assert not torch.equal(y, compiled(logits, tau))          # the next call, the next key
    counts = torch.bincount(y.argmax(-1), minlength=5).double()
    expected = 40000 * p.double()
    assert float(((counts - expected) ** 2 / expected).sum()) < 18.47
    torch._dynamo.reset()

# --------------------------------------------------------------- loss by hand
def test_gaussian_sq_latent_loss_matches_hand_computation():
    q = GaussianSQ(2, 1, variant=1, var_init=0.5)
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[0.0], [1.0]]))
    z = torch.tensor([0.2, 0.9]).reshape(1, 1, 1, 2)   # two positions, d = 1
    out = q(z, mode="argmax")
    # logits −(z−b)²/(2·0.5) = −(z−b)²
    p1 = torch.softmax(torch.tensor([-0.04, -0.64]), 0)
    p2 = torch.softmax(torch.tensor([-0.81, -0.01]), 0)
    h = float(-(p1 * p1.log()).sum() - (p2 * p2.log()).sum())
    rate = (0.2 ** 2 + 0.1 ** 2) / (2 * 0.5)              # nearest codes 0 and 1
    assert out.indices.flatten().tolist() == [0, 1]
    assert math.isclose(float(out.terms["latent_distortion"]), rate, rel_tol=1e-5)
    assert math.isclose(float(out.terms["neg_entropy"]), -h, rel_tol=1e-5)
    assert math.isclose(float(out.loss), rate - h, rel_tol=1e-5)


def test_gaussian_likelihood_matches_hand_computation():
    cfg = ModelConfig(image_size=8, arelbo=False, log_var_x_init=math.log(0.1))
    lik = GaussianLikelihood(cfg)
    x = torch.zeros(2, 1, 8, 8)
    x[1] = 1.0
    loss, var_x, x_rec = lik(torch.zeros(2, 1, 8, 8), x)      # x̂ = sigmoid(0) = 0.5
    d = 64
    mse = d * 0.25                                           # per image Σ(x − 0.5)²
    assert math.isclose(float(loss), mse / (2 * 0.1) + d / 2 * math.log(0.1), rel_tol=1e-5)
    lik_ar = GaussianLikelihood(ModelConfig(image_size=8, arelbo=True))
    loss, var_x, _ = lik_ar(torch.zeros(2, 1, 8, 8), x)
    assert math.isclose(float(var_x), mse / d, rel_tol=1e-6)
    # the official form: (D/2)·log MSE, the σ² = MSE/D optimum without its constant (D/2)(1 − log D)
    assert math.isclose(float(loss), d / 2 * math.log(mse), rel_tol=1e-6)


def test_full_gaussian_sq_vae_loss_is_the_sum_of_its_equations():
    torch.manual_seed(0)
    model = build_model(small_cfg("gaussian_1", arelbo=False, log_var_x_init=-1.0, var_q_init=2.0)).eval()
    x = torch.rand(3, 1, 28, 28)
    out = model(x, mode="argmax")
    z, _ = model.encoder(x)
    zr = to_rows(z)
    b = model.quantizer.codebook
    d2 = torch.cdist(zr, b) ** 2
    logits = -d2 / (2 * 2.0)
    p = torch.softmax(logits, 1)
    h = -(p * torch.log_softmax(logits, 1)).sum()
    zq = b[d2.argmin(1)]
    x_rec = torch.sigmoid(model.decoder(zq.reshape(3, 7, 7, 16).permute(0, 3, 1, 2)))
    sq = ((x - x_rec) ** 2).sum() / 3
    sigma2 = math.exp(-1.0)
    expected = sq / (2 * sigma2) + 784 / 2 * -1.0 + (((zr - zq) ** 2).sum() / (2 * 2.0) - h) / 3
    assert torch.allclose(out.loss, expected, rtol=1e-4)
    assert torch.allclose(out.stats["mse"], sq, rtol=1e-5)


# ----------------------------------------------------------------- VQ baselines
def test_vq_codebook_init_and_straight_through():
    q = VectorQuantizer(64, 4)
    assert q.codebook.abs().max() <= 1 / 64
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = q(z)
    out.z_q.sum().backward()
    assert torch.allclose(z.grad, torch.ones_like(z))   # straight-through: identity gradient
    assert set(out.terms) == {"commitment", "codebook"}


def test_vq_ema_moves_codes_to_cluster_means_and_reset_revives_dead_codes():
    torch.manual_seed(0)
    q = VectorQuantizer(4, 2, ema=True, decay=0.5).train()
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[1.0, 0], [-1, 0], [0, 50], [0, 60]]))
        q.ema_sum.copy_(q.codebook)
    z = torch.tensor([[2.0, 0], [-2, 0]]).t().reshape(1, 2, 1, 2)
    for _ in range(30):
        q(z)
    assert torch.allclose(q.codebook[:2], torch.tensor([[2.0, 0], [-2, 0]]), atol=1e-3)
    assert q.codebook.requires_grad is False
    r = VectorQuantizer(4, 2, ema=True, reset_after=5).train()
    with torch.no_grad():
        r.codebook.copy_(torch.tensor([[1.0, 0], [-1, 0], [0, 50], [0, 60]]))
    for _ in range(6):
        r(z)
    # the two far codes were never used: re-seeded onto encoder outputs
    assert all(any(torch.allclose(r.codebook[k], z_row) for z_row in z.reshape(2, 2).t()) for k in (2, 3))


# ------------------------------------------------------------ every kind overfits
def blob_images(n, size=28, seed=0):
    """n images of one bright rectangle each on a dark background (learnable structure)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, size, size)
    for i in range(n):
        r0, c0 = torch.randint(0, size // 2, (2,), generator=g).tolist()
        h, w = torch.randint(6, size // 2, (2,), generator=g).tolist()
        x[i, 0, r0:r0 + h, c0:c0 + w] = 0.4 + 0.6 * torch.rand((), generator=g)
    return x


@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.slow
def test_each_kind_overfits_one_batch(kind):
    torch.manual_seed(0)
    cfg = small_cfg(kind)
    model = build_model(cfg).train()
    x = blob_images(8)
    if kind in ("vmf", "nc"):
        x = torch.round(x * 7) / 7
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for step in range(200):
        out = model(x, temperature=1.0)
        assert torch.isfinite(out.loss), f"{kind}: loss not finite at step {step}"
        assert all(torch.isfinite(v) for v in out.stats.values())
        if first is None:
            first, first_mse = float(out.loss), float(out.stats["mse"])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        last = model(x, mode="argmax" if model.discrete else None)
    # the loss carries constants (dropped normalisers) that make a relative drop meaningless: it
    # must fall, and the reconstruction error by half
    drop = first - float(last.loss)
    mse_drop = 1 - float(last.stats["mse"]) / first_mse
    print(f"OVERFIT {kind}: loss {first:.2f} -> {float(last.loss):.2f}, mse {first_mse:.2f} -> "
          f"{float(last.stats['mse']):.2f}")
    assert drop > 0, f"{kind}: loss rose by {-drop:.3g}"
    assert mse_drop >= 0.5, f"{kind}: mse fell only {mse_drop:.0%}"


def test_every_forward_reports_what_the_app_plots():
    """What the catalogue says a kind logs (train.Window reads it) is in every training forward's stats,
    and the hand-written expectations below agree with the catalogue."""
    x = torch.rand(2, 1, 28, 28)
    for kind in MODEL_KINDS:
        out = build_model(small_cfg(kind)).train()(x)
        keys = set(out.stats)
        assert set(KINDS[kind].stats) <= keys, (kind, set(KINDS[kind].stats) - keys)
        assert "mse" in keys
        if kind != "vae":
            assert {"perplexity"} <= keys and out.indices.shape == (2, 7, 7)
        if kind.startswith("gaussian") or kind == "fixed_var":
            assert {"entropy", "sigma2_q", "sigma2_x"} <= keys
        if kind in ("vmf", "nc"):
            assert {"entropy", "kappa_q"} <= keys
        if kind == "vmf":
            assert "kappa_x" in keys
        assert torch.isclose(out.loss, sum(out.terms.values()))


def test_only_the_loss_carries_gradients_in_every_forward():
    """x_rec and P̂ are outputs to look at: were they attached to the graph, every backward would
    allocate and zero a gradient for them (for P̂, (B, H, W, K) floats) that no loss uses."""
    x = torch.rand(2, 1, 28, 28)
    for kind in MODEL_KINDS:
        out = build_model(small_cfg(kind)).train()(x)
        assert out.loss.requires_grad and all(t.requires_grad for t in out.terms.values()), kind
        assert not out.x_rec.requires_grad, kind
        assert out.probs is None or not out.probs.requires_grad, kind
        assert not any(v.requires_grad for v in out.stats.values()), kind


def test_fixed_var_does_not_learn_its_variance():
    model = build_model(small_cfg("fixed_var", var_q_init=3.0))
    names = [n for n, _ in model.named_parameters()]
    assert not any("log_var_q" in n for n in names)
    assert math.isclose(float(model(torch.rand(2, 1, 28, 28)).stats["sigma2_q"]), 3.0, rel_tol=1e-5)


def test_rgb_32_models_have_8x8_grids():
    model = build_model(small_cfg("gaussian_4", image_channels=3, image_size=32)).eval()
    x = torch.rand(2, 3, 32, 32)
    assert model.codes(x).shape == (2, 8, 8)
    assert model.reconstruct(x).shape == x.shape
    idx = model.codes(x)
    assert torch.allclose(model.decode_indices(idx), model.reconstruct(x), atol=1e-6)


# -------------------------------------------------------------------- bad input
def test_bad_input_raises_clear_value_errors():
    model = build_model(small_cfg("gaussian_1"))
    with pytest.raises(ValueError, match=r"\(B, 1, 28, 28\).*got \(2, 1, 32, 32\)"):
        model(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 1, 28, 28\).*got \(2, 3, 28, 28\)"):
        model(torch.rand(2, 3, 28, 28))
    with pytest.raises(ValueError, match="float"):
        model(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"codebook size K must be in \[2"):
        build_model(small_cfg("vq", codebook_size=1))
    with pytest.raises(ValueError, match="code dim d must be"):
        build_model(small_cfg("vq", code_dim=0))
    with pytest.raises(ValueError, match="kind must be one of"):
        build_model(small_cfg("gaussian_9"))
    with pytest.raises(ValueError, match="code indices must be in"):
        model.decode_indices(torch.full((1, 7, 7), 16))


def test_config_from_untrusted_dict_is_validated():
    ok = ModelConfig(kind="vq").to_dict()
    assert ModelConfig.from_dict(ok) == ModelConfig(kind="vq")
    for bad, msg in [({**ok, "codebook_size": 10 ** 9}, "codebook size"),
                     ({**ok, "code_dim": "64"}, "code_dim must be int"),
                     ({**ok, "evil": 1}, "unknown keys"),
                     ({**ok, "kind": "__import__('os')"}, "kind must be one of")]:
        with pytest.raises(ValueError, match=msg):
            ModelConfig.from_dict(bad)
    assert set(MODELS) == set(MODEL_KINDS)
