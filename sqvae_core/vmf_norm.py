"""Numerically stable von Mises-Fisher log-normaliser on the sphere S^{F-1}.

    log C_F(k) = (F/2 - 1) log k - (F/2) log(2 pi) - log I_{F/2-1}(k)
    d/dk log C_F(k) = -A_F(k),   A_F(k) = I_{F/2}(k) / I_{F/2-1}(k)

Everything is computed in float64 with numpy/scipy on the CPU (kappa is a
scalar or a small tensor) and moved back to the input's device.

log I_nu(k) is evaluated in the *scaled* form  log I_nu(k) - k  by one of three
branches (the switch points keep every branch at ~1e-12 relative accuracy):

  1. power series            if k^2/4 <= 2 (nu + 1)           (small k)
  2. Debye uniform expansion if nu >= 30 (and not 1.)          (large order)
  3. scipy.special.ive       otherwise                        (nu < 30, k not small)

The Bessel ratio A is exp(difference of two scaled logs), so it is accurate
everywhere and the gradient of log_cf has no visible kink at a switch point.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import torch

__all__ = ["log_bessel_iv", "bessel_ratio", "log_cf"]

_SERIES_TERMS = 40     # k^2/4 <= 2(nu+1) => term ratio <= 2/(m+1): tail < 1e-30
_DEBYE_MIN_NU = 30.0   # u_9/nu^9 truncation error < 1e-13 for nu >= 30
_DEBYE_ORDER = 8       # use u_0 .. u_8


def _debye_polys(order: int) -> list[np.ndarray]:
    """Coefficients (ascending powers of t) of Debye's u_k(t), k = 0..order.

    Exact rational recurrence (DLMF 10.41.9):
        u_{k+1}(t) = t^2 (1 - t^2) u_k'(t) / 2 + (1/8) int_0^t (1 - 5 s^2) u_k(s) ds
    """
    polys = [[Fraction(1)]]
    for _ in range(order):
        u = polys[-1]
        new = [Fraction(0)] * (len(u) + 3)
        for p, c in enumerate(u):
            if p:  # t^2 (1 - t^2) / 2 * p c t^(p-1)
                new[p + 1] += c * p / 2
                new[p + 3] -= c * p / 2
            new[p + 1] += c / (8 * (p + 1))       # (1/8) int s^p
            new[p + 3] -= 5 * c / (8 * (p + 3))   # -(5/8) int s^(p+2)
        polys.append(new)
    return [np.array([float(c) for c in u]) for u in polys]


_U = _debye_polys(_DEBYE_ORDER)


def _log_ive_np(nu: float, k: np.ndarray) -> np.ndarray:
    """log I_nu(k) - k for float nu >= 0 and a float64 array k > 0."""
    from scipy.special import gammaln, ive   # here, not at import: scipy.special costs ~0.5 s to load
    k = np.asarray(k, dtype=np.float64)
    out = np.empty_like(k)
    x = 0.25 * k * k
    series = x <= 2.0 * (nu + 1.0)
    debye = ~series & (nu >= _DEBYE_MIN_NU)
    rest = ~series & ~debye

    # 1. log I = nu log(k/2) - lgamma(nu+1) + log sum_m (k^2/4)^m / (m! (nu+1)_m)
    if series.any():
        xs, ks = x[series], k[series]
        term = np.ones_like(xs)
        total = np.ones_like(xs)
        for m in range(1, _SERIES_TERMS):
            term = term * xs / (m * (nu + m))
            total = total + term
        out[series] = (nu * np.log(0.5 * ks) - gammaln(nu + 1.0) + np.log(total)) - ks

    # 2. Debye (DLMF 10.41.3) with z = k/nu, s = sqrt(1+z^2), t = 1/s:
    #    I_nu(nu z) ~ e^{nu eta} / (sqrt(2 pi nu) (1+z^2)^{1/4}) sum_j u_j(t)/nu^j,
    #    eta = s + log(z / (1 + s));  nu*eta - k is written cancellation-free as
    #    nu^2/(r + k) + nu log(k/(nu + r)) with r = sqrt(nu^2 + k^2).
    if debye.any():
        kd = k[debye]
        r = np.hypot(nu, kd)
        t = nu / r
        corr = sum(np.polynomial.polynomial.polyval(t, u) / nu ** j for j, u in enumerate(_U))
        out[debye] = (nu * nu / (r + kd) + nu * np.log(kd / (nu + r))
                      - 0.5 * np.log(2.0 * np.pi * r) + np.log(corr))  # sqrt(nu)(1+z^2)^{1/4} = sqrt(r)

    # 3. log I - k = log(ive(nu, k)); ive is a normal positive float here (nu < 30, k^2/4 > 2(nu+1)).
    if rest.any():
        out[rest] = np.log(ive(nu, k[rest]))
    return out


def _to_numpy(kappa: torch.Tensor) -> np.ndarray:
    return kappa.detach().to("cpu", torch.float64).numpy()


def _to_torch(val, like: torch.Tensor) -> torch.Tensor:
    # numpy turns 0-d arrays into numpy scalars: restore an array of the input's shape
    return torch.from_numpy(np.asarray(val, dtype=np.float64).reshape(like.shape)).to(like.device)


def log_bessel_iv(nu: float, kappa: torch.Tensor) -> torch.Tensor:
    """Elementwise log I_nu(kappa) in float64 (nu >= 0, kappa > 0). No autograd."""
    kappa = torch.as_tensor(kappa)
    k = _to_numpy(kappa)
    val = _log_ive_np(float(nu), k) + k
    return _to_torch(val, kappa)


def bessel_ratio(nu: float, kappa: torch.Tensor) -> torch.Tensor:
    """Elementwise I_{nu+1}(kappa) / I_nu(kappa) in float64 (nu >= 0, kappa > 0). No autograd."""
    kappa = torch.as_tensor(kappa)
    k = _to_numpy(kappa)
    nu = float(nu)
    val = np.exp(_log_ive_np(nu + 1.0, k) - _log_ive_np(nu, k))
    return _to_torch(val, kappa)


class _LogCF(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kappa: torch.Tensor, dim: int) -> torch.Tensor:
        nu = dim / 2.0 - 1.0
        k = _to_numpy(kappa)
        val = nu * np.log(k) - (dim / 2.0) * math.log(2.0 * math.pi) - (_log_ive_np(nu, k) + k)
        ctx.save_for_backward(kappa)
        ctx.dim = dim
        return _to_torch(val, kappa)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (kappa,) = ctx.saved_tensors
        return -bessel_ratio(ctx.dim / 2.0 - 1.0, kappa) * grad, None


def log_cf(kappa: torch.Tensor, dim: int) -> torch.Tensor:
    """log C_dim(kappa) of the vMF density on S^{dim-1}, float64, d/dkappa = -A_dim(kappa)."""
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 2:
        raise ValueError(f"log_cf: dim must be an integer >= 2, got {dim!r}")
    kappa = torch.as_tensor(kappa).to(torch.float64)
    if not bool(torch.all(kappa > 0)):
        bad = kappa[~(kappa > 0)].flatten()[0].item()
        raise ValueError(f"log_cf: kappa must be > 0 (and not NaN), got {bad}")
    return _LogCF.apply(kappa, int(dim))
