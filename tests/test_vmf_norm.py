"""Tests for sqvae_core.vmf_norm (vMF log-normaliser log C_F(kappa) and its gradient)."""
import math

import mpmath
import numpy as np
import pytest
import torch

from sqvae_core.vmf_norm import bessel_ratio, log_bessel_iv, log_cf

F_GRID = [2, 3, 4, 8, 16, 33, 64, 128, 200, 256]
K_GRID = np.logspace(-3, 5, 15)


def _series_switch(F):
    """kappa where log I_nu switches away from the power series: k^2/4 = 2(nu+1) to the Debye
    expansion for nu >= 30, k = 100 to the Hankel expansion below."""
    return math.sqrt(8.0 * (F / 2.0)) if F / 2.0 - 1.0 >= 30 else 100.0


def _mp_reference(F, k):
    """(log C_F(k), -A_F(k)) with mpmath at 30 digits."""
    with mpmath.workdps(30):
        nu = mpmath.mpf(F) / 2 - 1
        k = mpmath.mpf(float(k))
        log_i = mpmath.log(mpmath.besseli(nu, k))
        val = nu * mpmath.log(k) - mpmath.mpf(F) / 2 * mpmath.log(2 * mpmath.pi) - log_i
        grad = -mpmath.exp(mpmath.log(mpmath.besseli(nu + 1, k)) - log_i)
        return float(val), float(grad)


@pytest.fixture(scope="module")
def reference():
    return {F: np.array([_mp_reference(F, k) for k in K_GRID]) for F in F_GRID}


def _value_and_grad(F, kappas):
    kap = torch.tensor(np.asarray(kappas, dtype=np.float64), requires_grad=True)
    val = log_cf(kap, F)
    val.sum().backward()
    return val.detach().numpy(), kap.grad.numpy()


@pytest.mark.parametrize("F", F_GRID)
def test_value_matches_mpmath(F, reference):
    val, _ = _value_and_grad(F, K_GRID)
    ref = reference[F][:, 0]
    # relative 1e-6; tiny absolute floor only for a reference that happens to be ~0
    np.testing.assert_allclose(val, ref, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("F", F_GRID)
def test_grad_matches_mpmath(F, reference):
    _, grad = _value_and_grad(F, K_GRID)
    np.testing.assert_allclose(grad, reference[F][:, 1], rtol=1e-6, atol=0)


def test_bessel_helpers_match_mpmath():
    k = torch.tensor([1e-3, 0.7, 5.0, 40.0, 900.0, 3e4])
    for nu in [0.0, 0.5, 2.0, 29.5, 30.0, 99.0]:
        ref_log = [float(mpmath.log(mpmath.besseli(nu, float(x)))) for x in k]
        ref_ratio = [float(mpmath.besseli(nu + 1, float(x)) / mpmath.besseli(nu, float(x))) for x in k]
        np.testing.assert_allclose(log_bessel_iv(nu, k).numpy(), ref_log, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(bessel_ratio(nu, k).numpy(), ref_ratio, rtol=1e-9)


@pytest.mark.parametrize("F", [2, 3, 8, 61, 62, 63, 256])
def test_gradcheck(F):
    s = _series_switch(F)
    # kappa straddling the series switch point of nu and of nu + 1 (used by the gradient)
    points = [0.01, s * (1 - 1e-4), s * (1 + 1e-4), _series_switch(F + 2) * (1 + 1e-4), 50.0, 700.0]
    kap = torch.tensor(points, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: log_cf(x, F), (kap,))
    scalar = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: log_cf(x, F), (scalar,))


@pytest.mark.parametrize("F", [2, 3, 5, 16, 59, 60, 61, 62, 64, 128, 255, 256])
def test_gradient_monotone_no_kink(F):
    # A_F is strictly increasing in kappa, so d/dk log C_F = -A_F must be strictly decreasing.
    kappas = np.unique(np.concatenate([np.logspace(-3, 5, 4001),
                                       _series_switch(F) * (1 + np.linspace(-1e-3, 1e-3, 41))]))
    val, grad = _value_and_grad(F, kappas)
    assert np.all(np.isfinite(val)) and np.all(np.isfinite(grad))
    assert np.all(np.diff(grad) < 0)
    assert np.all((grad < 0) & (grad > -1))
    # across the switch point the gradient jumps by no more than rounding noise
    s = _series_switch(F)
    _, g = _value_and_grad(F, [s * (1 - 1e-12), s * (1 + 1e-12)])
    assert abs(g[1] - g[0]) <= 1e-10 * abs(g[0])


def test_second_difference_smooth_across_switch():
    # centred finite difference of the value agrees with the autograd gradient at switch points
    for F in [2, 4, 33, 61, 62, 200]:
        s = _series_switch(F)
        h = 1e-5 * s
        val, grad = _value_and_grad(F, [s - h, s, s + h])
        fd = (val[2] - val[0]) / (2 * h)
        assert abs(fd - grad[1]) <= 1e-7 * abs(grad[1])
        second = (val[2] - 2 * val[1] + val[0]) / h**2  # = -dA_F/dk < 0
        assert second < 0 and np.isfinite(second)


def test_f3_closed_form():
    k = torch.logspace(-3, 5, 200, dtype=torch.float64)
    # log C_3 = log k - log(4 pi) - log sinh k,  log sinh k = k - log 2 + log(-expm1(-2k))
    expected = torch.log(k) - math.log(4 * math.pi) - (k - math.log(2.0) + torch.log(-torch.expm1(-2 * k)))
    torch.testing.assert_close(log_cf(k, 3), expected, rtol=1e-10, atol=1e-10)


def test_all_dims_finite_at_range_ends():
    k = torch.tensor([1e-3, 1.0, 1e5], dtype=torch.float64, requires_grad=True)
    for F in range(2, 257):
        k.grad = None
        val = log_cf(k, F)
        val.sum().backward()
        assert torch.isfinite(val).all() and torch.isfinite(k.grad).all(), F


def test_shapes_dtype_and_scalar():
    scalar = log_cf(torch.tensor(2.0), 3)
    assert scalar.shape == () and scalar.dtype == torch.float64
    batch = torch.rand(4, 3, dtype=torch.float32) + 0.1
    batch.requires_grad_(True)
    out = log_cf(batch, 16)
    assert out.shape == (4, 3) and out.dtype == torch.float64
    out.sum().backward()
    assert batch.grad.dtype == torch.float32
    expected = -bessel_ratio(7.0, batch.detach().double()).float()
    torch.testing.assert_close(batch.grad, expected)


@pytest.mark.parametrize("dim", [1, 0, -3, 2.5, True])
def test_bad_dim_raises(dim):
    with pytest.raises(ValueError, match="dim must be an integer >= 2"):
        log_cf(torch.tensor(1.0), dim)


@pytest.mark.parametrize("kappa", [0.0, -1.0, float("nan")])
def test_bad_kappa_raises(kappa):
    with pytest.raises(ValueError, match="kappa must be > 0"):
        log_cf(torch.tensor(kappa), 8)
    with pytest.raises(ValueError, match="kappa must be > 0"):
        log_cf(torch.tensor([1.0, kappa, 2.0]), 8)


def test_every_branch_matches_mpmath_to_1e_12_across_orders():
    """log I_nu(k) - k from each branch (series, Hankel for nu < 30, Debye for nu >= 30) against
    40-digit mpmath, for half-integer and integer orders 0 .. 69.5, at k around every switch."""
    ks = np.unique(np.concatenate([np.logspace(-3, 5, 25), [15.0, 99.999, 100.0, 100.001]]))
    for nu in np.arange(0.0, 70.0, 2.5):
        s = _series_switch(2 * nu + 2)
        k = np.unique(np.concatenate([ks, [s * (1 - 1e-6), s, s * (1 + 1e-6)]]))
        got = log_bessel_iv(nu, torch.tensor(k)).numpy() - k
        with mpmath.workdps(40):
            ref = np.array([float(mpmath.log(mpmath.besseli(nu, mpmath.mpf(float(x)))) - mpmath.mpf(float(x)))
                            for x in k])
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12, err_msg=f"nu={nu}")


def test_log_cf_runs_on_the_device_without_reading_it():
    """No copy to the host and no value read (meta tensors have no data, any read raises), and
    it compiles into one graph: a GPU training step does not wait for log C_F."""
    meta = torch.tensor(5.0, device="meta", requires_grad=True)
    val = log_cf(meta, 20)
    val.backward()
    assert val.device.type == "meta" and meta.grad.device.type == "meta"
    compiled = torch.compile(lambda k: log_cf(k, 8), fullgraph=True, backend="eager")
    k = torch.tensor([0.5, 30.0, 3e3], dtype=torch.float64)
    torch.testing.assert_close(compiled(k), log_cf(k, 8), rtol=1e-12, atol=1e-12)
