"""Gated PixelCNN prior over grids of discrete latent codes.

Implements the gated PixelCNN of van den Oord et al. (2016), "Conditional Image
Generation with PixelCNN Decoders", for K-ary code grids such as the 7x7 / 8x8
index maps produced by a VQ-VAE / SQ-VAE encoder.

Architecture (``hidden`` = p channels, ``kernel`` = n, ``k2 = n // 2``)::

    codes (B,H,W) --embedding--> x (B,p,H,W)
    for each layer l = 0..L-1
        vertical   v_pre = conv_{(k2+1) x n}(v)   (rows r-k2..r, cols c-k2..c+k2) [+ class]
                   v     = tanh(v_pre[:p]) * sigmoid(v_pre[p:])
        horizontal h_pre = conv_{1 x w}(h)       (l=0, mask A: cols c-k2..c-1;
                                                   l>0, mask B: cols c-k2..c)
                         + shift_down(conv_1x1(v_pre))   (rows strictly above)
                         [+ class]
                   g     = tanh(h_pre[:p]) * sigmoid(h_pre[p:])
                   skip += conv_1x1(g)
                   h     = conv_1x1(g) (+ h residual for l > 0)
    logits = conv_1x1(ReLU(dropout(conv_1x1(ReLU(skip)))))    -> (B,K,H,W)

The vertical stack only ever reaches the horizontal stack through a one-row
down shift, so position (i, j) sees every row above it over the full receptive
field width (no blind spot) and the positions to its left in its own row.  The
masks are realised by cropped kernels + asymmetric padding instead of
multiplicative weight masks, which is cheaper and makes masked weights
impossible to "unmask" by training.

Sampling (:meth:`GatedPixelCNN.sample`) runs the same network incrementally:
the vertical stack is advanced one row at a time with a (k2+1)-row cache, the
horizontal stack one column at a time with a (k2+1)-column cache, so each of
the H*W positions costs O(layers) small batched matrix products for the whole
batch instead of a full-grid forward pass.  The incremental path is tested to
reproduce :meth:`GatedPixelCNN.forward` logits.

Checkpoints are safetensors files (no pickle anywhere) holding the weights and
the :class:`PriorConfig` as JSON metadata; see :func:`save_prior` /
:func:`load_prior`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import rundir as rd
from .checks import as_tensor, check_int, check_positive, config_from_dict
from .device import (COMPILE_OPTIONS, amp_unavailable, as_device, compile_unavailable, keep_freed_host_memory,
                     x86_bf16_units)

__all__ = [
    "PriorConfig",
    "GatedPixelCNN",
    "PriorFitConfig",
    "PriorFit",
    "fit_prior",
    "nll_bits_per_code",
    "unigram_entropy_bits",
    "save_prior",
    "load_prior",
]

PRIOR_FORMAT = "sqvae_core.prior.GatedPixelCNN"

_LN2 = math.log(2.0)

# Hard limits for configs coming from (possibly untrusted) files.
_MAX_CODES = 65536
_MAX_SIDE = 256
_MAX_POSITIONS = 65536
_MAX_HIDDEN = 4096
_MAX_LAYERS = 64
_MAX_KERNEL = 15
_MAX_CLASSES = 65536


# --------------------------------------------------------------------------- #
# configuration
# --------------------------------------------------------------------------- #
@dataclass
class PriorConfig:
    """Hyper-parameters of :class:`GatedPixelCNN`.

    Defaults (hidden=64, layers=8, kernel=3) train and sample comfortably on a
    CPU for 7x7 / 8x8 grids.  ``num_classes=None`` gives an unconditional prior.
    """

    num_codes: int
    height: int
    width: int
    hidden: int = 64
    layers: int = 8
    kernel: int = 3
    num_classes: int | None = None
    dropout: float = 0.0

    def validate(self) -> "PriorConfig":
        """Raise ``ValueError`` if any field is invalid or absurdly large. Returns self."""
        check_int("num_codes", self.num_codes, 2, _MAX_CODES)
        check_int("height", self.height, 1, _MAX_SIDE)
        check_int("width", self.width, 1, _MAX_SIDE)
        if self.height * self.width > _MAX_POSITIONS:
            raise ValueError(f"height*width must be <= {_MAX_POSITIONS}, got {self.height * self.width}")
        check_int("hidden", self.hidden, 1, _MAX_HIDDEN)
        check_int("layers", self.layers, 1, _MAX_LAYERS)
        check_int("kernel", self.kernel, 3, _MAX_KERNEL)
        if self.kernel % 2 != 1:
            raise ValueError(f"kernel must be odd, got {self.kernel}")
        if self.num_classes is not None:
            check_int("num_classes", self.num_classes, 1, _MAX_CLASSES)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            raise ValueError(f"dropout must be a float, got {type(self.dropout).__name__}")
        if not (math.isfinite(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        return self

    def to_dict(self) -> dict:
        """JSON-safe dict (numpy scalars converted to Python numbers)."""
        return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PriorConfig":
        """Validated construction from a dict (e.g. parsed JSON). Raises ValueError."""
        return config_from_dict(cls, data, ("num_codes", "height", "width"))


def _as_config(config: PriorConfig | Mapping[str, Any]) -> PriorConfig:
    if isinstance(config, PriorConfig):
        return config.validate()
    return PriorConfig.from_dict(config)


# --------------------------------------------------------------------------- #
# model
# --------------------------------------------------------------------------- #
def _gate(t: Tensor, dim: int = 1) -> Tensor:
    a, b = t.chunk(2, dim=dim)
    return torch.tanh(a) * torch.sigmoid(b)


def _windows(t: Tensor, rows: int, cols: int, out_h: int, out_w: int) -> Tensor:
    """im2col of a padded channels-last ``t (B, H', W', C)``: the rows x cols shifted windows
    concatenated on channels, ``(B, out_h, out_w, rows*cols*C)`` in (r, s, C) order."""
    return torch.cat([t[:, r:r + out_h, s:s + out_w] for r in range(rows) for s in range(cols)], -1)


def _as_matrix(weight: Tensor) -> Tensor:
    """A conv weight ``(out, in, kh, kw)`` as the ``(out, kh*kw*in)`` matrix :func:`_windows` multiplies."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


@contextlib.contextmanager
def _num_threads(n: int | None):
    """Temporarily set torch's intra-op thread count (no-op for None)."""
    if n is None or torch.get_num_threads() == n:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class _GatedLayer(nn.Module):
    """One gated layer with a vertical and a horizontal stack.

    ``first=True`` is the mask-A layer (horizontal kernel excludes the current
    column, no residual); otherwise mask B (current column included, residual).
    """

    def __init__(self, hidden: int, kernel: int, first: bool, num_cond: int | None):
        super().__init__()
        k2 = kernel // 2
        self.first = first
        self.v_conv = nn.Conv2d(hidden, 2 * hidden, (k2 + 1, kernel))
        self.v_to_h = nn.Conv2d(2 * hidden, 2 * hidden, 1)
        self.h_conv = nn.Conv2d(hidden, 2 * hidden, (1, k2 if first else k2 + 1))
        self.h_out = nn.Conv2d(hidden, hidden, 1)
        self.h_skip = nn.Conv2d(hidden, hidden, 1)
        # Learned class embedding added to the gate inputs (index num_classes = "unconditional").
        self.cond = nn.Embedding(num_cond, 2 * hidden) if num_cond else None


def _reference_forward(model: "GatedPixelCNN", x: Tensor, cond: Tensor | None) -> Tensor:
    """The network exactly as the module docstring writes it, every row and layer, unfused.

    Slower than :meth:`GatedPixelCNN._forward_embedded` (the fits' path), which skips work no
    output reads; kept as the specification the tests and benchmarks/prior_train_speed.py hold
    the fast path to (its forward before the skips, as fitted priors up to then trained)."""
    k2 = model.k2
    v = h = x
    skip = None
    for layer in model.layers:
        c = layer.cond(cond)[:, :, None, None] if layer.cond is not None else None
        v_pre = layer.v_conv(F.pad(v, (k2, k2, k2, 0)))  # vertical: rows r-k2..r, cols c-k2..c+k2
        if c is not None:
            v_pre = v_pre + c
        v2h = F.pad(layer.v_to_h(v_pre), (0, 0, 1, 0))[:, :, :-1, :]  # down-shift: rows < i
        h_in = F.pad(h, (k2, 0))[..., :-1] if layer.first else F.pad(h, (k2, 0))
        h_pre = layer.h_conv(h_in) + v2h
        if c is not None:
            h_pre = h_pre + c
        g = _gate(h_pre)
        s = layer.h_skip(g)
        skip = s if skip is None else skip + s
        out = layer.h_out(g)
        h = out if layer.first else h + out
        v = _gate(v_pre)
    y = F.relu(model.head_hidden(F.relu(skip)))
    return model.head_out(model.head_dropout(y))


class GatedPixelCNN(nn.Module):
    """Gated PixelCNN over (H, W) grids of codes in ``[0, num_codes)``.

    ``forward(codes, labels=None) -> logits (B, K, H, W)`` where the logits at
    (i, j) depend only on codes at raster positions strictly before (i, j).
    """

    def __init__(self, config: PriorConfig | Mapping[str, Any]):
        super().__init__()
        cfg = _as_config(config)
        self.config = dataclasses.replace(cfg)
        p, K = cfg.hidden, cfg.num_codes
        self.k2 = cfg.kernel // 2
        num_cond = None if cfg.num_classes is None else cfg.num_classes + 1
        self.embed = nn.Embedding(K, p)
        self.layers = nn.ModuleList(
            _GatedLayer(p, cfg.kernel, first=(l == 0), num_cond=num_cond) for l in range(cfg.layers)
        )
        self.head_hidden = nn.Conv2d(p, p, 1)
        self.head_dropout = nn.Dropout(cfg.dropout)
        self.head_out = nn.Conv2d(p, K, 1)

    # ------------------------------------------------------------------ utils
    @property
    def num_codes(self) -> int:
        return self.config.num_codes

    def _device(self) -> torch.device:
        return self.embed.weight.device

    def _check_codes(self, codes: Any, name: str = "codes") -> Tensor:
        cfg = self.config
        if not isinstance(codes, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of integer codes, got {type(codes).__name__}")
        if codes.dtype == torch.bool or codes.is_floating_point() or codes.is_complex():
            raise ValueError(f"{name} must have an integer dtype (expected torch.int64), got {codes.dtype}")
        if codes.ndim != 3:
            raise ValueError(
                f"{name} must have shape (B, {cfg.height}, {cfg.width}) (3 dims), got shape {tuple(codes.shape)}"
            )
        if tuple(codes.shape[1:]) != (cfg.height, cfg.width):
            raise ValueError(
                f"{name} grid shape mismatch: expected (B, {cfg.height}, {cfg.width}), got {tuple(codes.shape)}"
            )
        if codes.numel() > 0:
            lo, hi = int(codes.min()), int(codes.max())
            if lo < 0 or hi >= cfg.num_codes:
                raise ValueError(
                    f"{name} values must be in [0, {cfg.num_codes}) (num_codes={cfg.num_codes}), "
                    f"got min={lo}, max={hi}"
                )
        return codes.long()

    def _cond_index(self, labels: Any, batch: int, device: torch.device) -> Tensor | None:
        """Validated class indices (B,), or None for an unconditional model."""
        nc = self.config.num_classes
        if nc is None:
            if labels is not None:
                raise ValueError("labels were given but this prior is unconditional (num_classes=None)")
            return None
        if labels is None:
            return torch.full((batch,), nc, dtype=torch.long, device=device)
        if isinstance(labels, (int, np.integer)) and not isinstance(labels, bool):
            labels = torch.full((batch,), int(labels), dtype=torch.long)
        elif not isinstance(labels, Tensor):
            try:
                labels = torch.as_tensor(np.asarray(labels))
            except Exception as exc:  # noqa: BLE001
                raise ValueError(f"labels must be an int or a 1-D integer tensor: {exc}") from None
        if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"labels must have an integer dtype, got {labels.dtype}")
        if labels.ndim != 1 or labels.shape[0] != batch:
            raise ValueError(f"labels must have shape ({batch},), got {tuple(labels.shape)}")
        if labels.numel() > 0:
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= nc:
                raise ValueError(f"labels must be in [0, {nc}) (num_classes={nc}), got min={lo}, max={hi}")
        return labels.to(device=device, dtype=torch.long)

    # ---------------------------------------------------------------- forward
    def forward(self, codes: Tensor, labels: Tensor | None = None) -> Tensor:
        """Logits ``(B, K, H, W)`` for code grids ``(B, H, W)`` (integer dtype).

        ``labels``: optional ``(B,)`` class indices for a conditional model
        (``None`` uses the extra "unconditional" embedding).  Raises ValueError
        for wrong dtype / shape / out-of-range values.
        """
        codes = self._check_codes(codes)
        cond = self._cond_index(labels, codes.shape[0], self._device())
        return self._logits(codes.to(self._device()), cond)

    def _logits(self, codes: Tensor, cond: Tensor | None) -> Tensor:
        x = self.embed(codes).permute(0, 3, 1, 2)  # (B, p, H, W)
        return self._forward_embedded(x, cond)

    def _forward_embedded(self, x: Tensor, cond: Tensor | None) -> Tensor:
        """Network body on embedded input ``x (B, p, H, W)`` (exposed for Jacobian tests).

        The architecture of the module docstring (:func:`_reference_forward` writes it out
        literally; the tests hold the two equal) minus work whose result is never read, which
        training pays for three times (forward, input and weight gradients):

        - the vertical stack reaches the horizontal one shifted one row down, so its last row only
          feeds positions below the grid: it runs on rows 0..H-2 (1/H of the vertical convs, which
          are 16 of a layer's 22 p^2 multiply-adds per position: -10% of the step at 7x7);
        - the last layer's vertical gate and horizontal output (``h_out``) feed no further layer:
          not computed;
        - ``h_out`` and ``h_skip`` read the same gate output: one 1x1 conv of 2p outputs
          (one matrix product instead of two; the sampler does the same).
        """
        k2 = self.k2
        H = x.shape[2]
        v, h, skip = x[:, :, : H - 1], x, None
        last = len(self.layers) - 1
        for l, layer in enumerate(self.layers):
            c = layer.cond(cond)[:, :, None, None] if layer.cond is not None else None
            h_in = F.pad(h, (k2, 0))  # mask B: columns c-k2..c; mask A drops column c
            h_pre = layer.h_conv(h_in[..., :-1] if layer.first else h_in)
            if H > 1:  # vertical stack on rows 0..H-2, then shifted down one row: rows < i only
                v_pre = layer.v_conv(F.pad(v, (k2, k2, k2, 0)))
                if c is not None:
                    v_pre = v_pre + c
                h_pre = h_pre + F.pad(layer.v_to_h(v_pre), (0, 0, 1, 0))
                if l < last:
                    v = _gate(v_pre)
            if c is not None:
                h_pre = h_pre + c
            g = _gate(h_pre)
            if l == last:  # the last layer's horizontal output feeds nothing: its skip only
                s = layer.h_skip(g)
            else:
                w = torch.cat([layer.h_out.weight, layer.h_skip.weight], 0)
                b = torch.cat([layer.h_out.bias, layer.h_skip.bias], 0)
                out, s = F.conv2d(g, w, b).chunk(2, dim=1)
                h = out if layer.first else h + out
            skip = s if skip is None else skip + s
        y = F.relu(self.head_hidden(F.relu(skip)))
        return self.head_out(self.head_dropout(y))

    def _logits_matmul(self, codes: Tensor, cond: Tensor | None) -> Tensor:
        """The network of :meth:`_forward_embedded` on channels-last activations, every convolution
        written as one matrix product: logits ``(B, H, W, K)``, equal to it in exact arithmetic.

        A kh x kw convolution over a padded input is im2col and a GEMM:
        ``out[b,i,j] = W' . concat_{r<kh, s<kw} x_pad[b, i+r, j+s]`` with ``W'`` the weight laid out
        (out, r, s, in). On a CPU whose widest vector unit is AVX2, oneDNN runs these 7x7-grid
        convolutions at 46-75 GFLOP/s and torch.mm the same products at ~84, and inductor fuses the
        window copies into the gate kernels around them: there the compiled fp32 step ran 1.18-1.28x
        faster in 7 of 9 A/Bs and a converged fit 1.22x (benchmarks/RESULTS.md). :func:`step_form`
        says where the fits use it."""
        k2, kk = self.k2, 2 * self.k2 + 1
        x = self.embed(codes)                                        # (B, H, W, p)
        B, H, W, p = x.shape
        v, h, skip = x[:, : H - 1], x, None
        last = len(self.layers) - 1
        for l, layer in enumerate(self.layers):
            c = layer.cond(cond)[:, None, None, :] if layer.cond is not None else None
            kh = layer.h_conv.kernel_size[1]                         # mask A: k2 columns, mask B: k2 + 1
            h_win = _windows(F.pad(h, (0, 0, k2, 0)), 1, kh, H, W)   # columns c-k2 .. c-k2+kh-1
            h_pre = F.linear(h_win, _as_matrix(layer.h_conv.weight), layer.h_conv.bias)
            if H > 1:   # as in _forward_embedded: rows 0..H-2, then one row down
                v_win = _windows(F.pad(v, (0, 0, k2, k2, k2, 0)), k2 + 1, kk, H - 1, W)
                v_pre = F.linear(v_win, _as_matrix(layer.v_conv.weight), layer.v_conv.bias)
                if c is not None:
                    v_pre = v_pre + c
                v2h = F.linear(v_pre, _as_matrix(layer.v_to_h.weight), layer.v_to_h.bias)
                h_pre = h_pre + F.pad(v2h, (0, 0, 0, 0, 1, 0))
                if l < last:
                    v = _gate(v_pre, dim=-1)
            if c is not None:
                h_pre = h_pre + c
            g = _gate(h_pre, dim=-1)
            if l == last:
                s = F.linear(g, _as_matrix(layer.h_skip.weight), layer.h_skip.bias)
            else:
                w = _as_matrix(torch.cat([layer.h_out.weight, layer.h_skip.weight], 0))
                out, s = F.linear(g, w, torch.cat([layer.h_out.bias, layer.h_skip.bias], 0)).chunk(2, dim=-1)
                h = out if layer.first else h + out
            skip = s if skip is None else skip + s
        y = F.relu(F.linear(F.relu(skip), _as_matrix(self.head_hidden.weight), self.head_hidden.bias))
        return F.linear(self.head_dropout(y), _as_matrix(self.head_out.weight), self.head_out.bias)

    # --------------------------------------------------------------- sampling
    def _autoregress(self, n: int, cond: Tensor | None, choose: Callable[[Tensor, int, int], Tensor]) -> Tensor:
        """Incremental raster-order pass; ``choose(logits (n,K), i, j) -> codes (n,)``.

        Numerically equivalent to ``forward`` (tested), but each position costs
        O(layers) tiny matmuls: vertical stack advanced row by row with a
        (k2+1)-row cache, horizontal stack column by column with a
        (k2+1)-column cache.  Must be called under no_grad/inference_mode.
        """
        cfg = self.config
        H, W, p, k2 = cfg.height, cfg.width, cfg.hidden, self.k2
        dev = self._device()
        dtype = self.embed.weight.dtype
        L = len(self.layers)
        codes = torch.zeros(n, H, W, dtype=torch.long, device=dev)

        # Pre-arranged weights for the per-column horizontal step.
        h_w, h_b, o_w, o_b, conds = [], [], [], [], []
        for layer in self.layers:
            w = layer.h_conv.weight  # (2p, p, 1, width)
            h_w.append(w.permute(0, 3, 1, 2).reshape(2 * p, -1).t().contiguous())  # (width*p, 2p)
            h_b.append(layer.h_conv.bias)
            o_w.append(torch.cat([layer.h_out.weight, layer.h_skip.weight], 0).flatten(1).t().contiguous())
            o_b.append(torch.cat([layer.h_out.bias, layer.h_skip.bias], 0))
            conds.append(layer.cond(cond) if layer.cond is not None else None)  # (n, 2p) | None
        w1 = self.head_hidden.weight.flatten(1).t().contiguous()
        b1 = self.head_hidden.bias
        w2 = self.head_out.weight.flatten(1).t().contiguous()
        b2 = self.head_out.bias

        # vertical caches: previous k2 rows of each layer's input (zeros = top padding)
        v_cache = [torch.zeros(n, p, k2, W, device=dev, dtype=dtype) for _ in range(L)]
        # per-layer horizontal bias for the current row: (W, n, 2p) = h bias + class + v2h of row above
        row_bias = []
        for l in range(L):
            b = h_b[l].expand(n, 2 * p)
            if conds[l] is not None:
                b = b + conds[l]
            row_bias.append(b.unsqueeze(0).expand(W, n, 2 * p).contiguous())

        for i in range(H):
            # horizontal caches: previous k2 columns of each layer's input (zeros = left padding)
            h_cache = [torch.zeros(n, k2, p, device=dev, dtype=dtype) for _ in range(L)]
            for j in range(W):
                x = None
                skip = None
                for l in range(L):
                    if l == 0:
                        win = h_cache[0]  # embeddings of columns j-k2..j-1 (mask A)
                    else:
                        win = torch.cat([h_cache[l], x.unsqueeze(1)], 1)  # columns j-k2..j
                        h_cache[l] = win[:, 1:]
                    pre = torch.addmm(row_bias[l][j], win.reshape(n, -1), h_w[l])
                    g = _gate(pre)
                    os_ = torch.addmm(o_b[l], g, o_w[l])
                    out, s = os_[:, :p], os_[:, p:]
                    skip = s if skip is None else skip + s
                    x = out if l == 0 else x + out
                y = torch.relu(torch.addmm(b1, torch.relu(skip), w1))
                logits = torch.addmm(b2, y, w2)
                c = choose(logits, i, j)
                codes[:, i, j] = c
                if k2 > 0:
                    h_cache[0] = torch.cat([h_cache[0][:, 1:], self.embed(c).unsqueeze(1)], 1)
            if i + 1 < H:
                # advance the vertical stack by row i -> horizontal biases for row i+1
                x = self.embed(codes[:, i]).permute(0, 2, 1).unsqueeze(2)  # (n, p, 1, W)
                for l, layer in enumerate(self.layers):
                    full = torch.cat([v_cache[l], x], 2)  # rows i-k2..i
                    v_cache[l] = full[:, :, 1:]
                    v_pre = layer.v_conv(F.pad(full, (k2, k2, 0, 0)))  # (n, 2p, 1, W)
                    if conds[l] is not None:
                        v_pre = v_pre + conds[l][:, :, None, None]
                    v2h = layer.v_to_h(v_pre)[:, :, 0, :].permute(2, 0, 1)  # (W, n, 2p)
                    b = h_b[l].expand(n, 2 * p)
                    if conds[l] is not None:
                        b = b + conds[l]
                    row_bias[l] = (v2h + b).contiguous()
                    x = _gate(v_pre)
        return codes

    @contextlib.contextmanager
    def _eval_mode(self):
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        *,
        temperature: float = 1.0,
        labels: Any = None,
        generator: torch.Generator | None = None,
        threads: int | None = 1,
    ) -> Tensor:
        """Draw ``n`` code grids ``(n, H, W)`` (int64, on the model's device).

        All ``n`` grids are generated together (one incremental network step
        per position, H*W steps in total).  ``temperature`` (> 0) divides the
        logits; small values (e.g. 1e-3) approach greedy argmax decoding.
        ``labels``: None, an int, or an ``(n,)`` integer tensor (conditional
        models only).  A conditional prior given None draws each grid's class
        uniformly at random (with ``generator``): it was fitted on labelled
        grids, so its extra "unconditional" embedding is untrained and samples
        through it are not samples of the data's codes.  ``generator`` must
        live on the model's device.

        ``threads``: intra-op CPU threads used while sampling (default 1; the
        per-position ops are tiny, and with more threads OpenMP synchronisation
        dominates -- badly so when the cores are busy).  The previous
        ``torch.get_num_threads()`` value is restored afterwards; ``None``
        leaves the global setting untouched.
        """
        check_int("n", n, 1, 1 << 24)
        check_positive("temperature", temperature)
        temperature = float(temperature)
        dev = self._device()
        if labels is None and self.config.num_classes is not None:
            labels = torch.randint(self.config.num_classes, (n,), generator=generator, device=dev)
        cond = self._cond_index(labels, n, dev)

        def choose(logits: Tensor, i: int, j: int) -> Tensor:
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            return torch.multinomial(probs, 1, generator=generator).squeeze(1)

        if threads is not None:
            check_int("threads", threads, 1, 1024)
        with self._eval_mode(), _num_threads(threads), torch.inference_mode():
            codes = self._autoregress(n, cond, choose)
        return codes.clone()  # plain tensor (not an inference tensor)

    @torch.no_grad()
    def _incremental_logits(self, codes: Tensor, labels: Any = None) -> Tensor:
        """Teacher-forced logits via the sampling path (for testing equivalence with forward)."""
        codes = self._check_codes(codes).to(self._device())
        cond = self._cond_index(labels, codes.shape[0], self._device())
        out = torch.empty(codes.shape[0], self.num_codes, *codes.shape[1:], device=codes.device)

        def choose(logits: Tensor, i: int, j: int) -> Tensor:
            out[:, :, i, j] = logits
            return codes[:, i, j]

        with self._eval_mode(), torch.inference_mode():
            self._autoregress(codes.shape[0], cond, choose)
        return out.clone()


# --------------------------------------------------------------------------- #
# training / evaluation helpers
# --------------------------------------------------------------------------- #
def nll_bits_per_code(model: GatedPixelCNN, codes: Any, labels: Any = None, batch_size: int = 256) -> float:
    """Mean negative log-likelihood of ``codes (N,H,W)`` in bits per code (model in eval mode)."""
    check_int("batch_size", batch_size, 1, 1 << 20)
    codes = model._check_codes(as_tensor(codes, "codes"))
    N = codes.shape[0]
    if N == 0:
        raise ValueError("codes is empty")
    dev = model._device()
    if labels is not None:
        labels = as_tensor(labels, "labels")
    cond = model._cond_index(labels, N, dev)
    total = 0.0
    with model._eval_mode(), torch.no_grad():
        for s in range(0, N, batch_size):
            x = codes[s : s + batch_size].to(dev)
            c = None if cond is None else cond[s : s + batch_size]
            logits = model._logits(x, c)
            total += float(F.cross_entropy(logits.float(), x, reduction="sum"))
    return total / (codes.numel() * _LN2)


def unigram_entropy_bits(codes: Any, K: int) -> float:
    """Entropy (bits) of the empirical histogram of ``codes`` over ``K`` symbols."""
    check_int("K", K, 1, 1 << 31)
    c = as_tensor(codes, "codes")
    if c.dtype == torch.bool or c.is_floating_point() or c.is_complex():
        raise ValueError(f"codes must have an integer dtype, got {c.dtype}")
    c = c.reshape(-1).long()
    if c.numel() == 0:
        raise ValueError("codes is empty")
    lo, hi = int(c.min()), int(c.max())
    if lo < 0 or hi >= K:
        raise ValueError(f"codes must be in [0, {K}), got min={lo}, max={hi}")
    counts = torch.bincount(c.cpu(), minlength=K).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * torch.log2(p)).sum())


# How a fit stops (PriorFit.stop_reason).
STOP_REASONS = ("plateau", "max_steps", "steps", "callback")
# Compiling the training step costs ~10-20 s of CPU (forward and backward graphs) and saves ~25% of
# each fp32 step, ~45% of a bf16 one (benchmarks/prior_train_speed.py): it pays after a few hundred
# steps. A plateau fit's budget is its max_steps.
COMPILE_AUTO_STEPS = 1000


@dataclass
class PriorFitConfig:
    """How :func:`fit_prior` trains: Adam on cross-entropy, stopped on a validation plateau.

    Plateau stop (``steps=None``, the default): every ``eval_every`` steps the NLL of a fixed
    validation subset (at most ``val_grids`` of the validation grids; without any, that many but
    at most ``val_fraction`` of the training grids, held out) is measured; the fit stops when
    ``patience`` evaluations in a row have not lowered it by ``min_improvement`` (relative) below
    the last value that did, or at ``max_steps``, and keeps the weights of its lowest value.
    ``steps=N`` trains exactly N steps and keeps the last weights (validation is still logged).
    ``compile``: torch.compile the step (None: when the step budget is >= COMPILE_AUTO_STEPS and
    the device can compile). ``bf16``: bf16 autocast of the network (the loss stays fp32); None (the
    default) turns it on where bf16 is native (a CPU with AVX512-BF16 or AMX, a bf16 GPU): about twice
    the compiled fp32 step's speed there, at the same converged NLL (benchmarks/RESULTS.md). Asked for
    (True) where bf16 is not native, the fit says so and runs in fp32. ``ema``: the decay β of an
    exponential moving average of the weights (Polyak averaging, as PixelCNN++ trains); when > 0,
    validation scores the averaged weights and the fit keeps them ("the weights" above are then the
    averaged ones). 0 turns it off. The default 0.999 (a horizon of about 1,000 steps) lowered the
    converged test NLL by 0.08-0.11 bits and the generation FD's spread between fits from 16-18% to
    2-4% (benchmarks/RESULTS.md).
    """

    steps: int | None = None
    max_steps: int = 20_000
    eval_every: int = 250
    patience: int = 4
    min_improvement: float = 0.002
    val_grids: int = 2000
    val_fraction: float = 0.1
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    compile: bool | None = None
    bf16: bool | None = None
    ema: float = 0.999

    @property
    def plateau(self) -> bool:
        return self.steps is None

    @property
    def budget(self) -> int:
        """The most steps this fit can take."""
        return self.max_steps if self.steps is None else self.steps

    def validate(self) -> "PriorFitConfig":
        """Raise ``ValueError`` naming the field, its bound and its value. Returns self."""
        if self.steps is not None:
            check_int("steps", self.steps, 1, 10**9)
        check_int("max_steps", self.max_steps, 1, 10**9)
        check_int("eval_every", self.eval_every, 1, 10**9)
        if self.plateau and self.eval_every > self.max_steps:
            raise ValueError(f"eval_every must be <= max_steps ({self.max_steps}) for a plateau stop, "
                             f"got {self.eval_every}")
        check_int("patience", self.patience, 1, 10_000)
        _check_unit("min_improvement", self.min_improvement, 0.0, 1.0, "[0, 1)")
        check_int("val_grids", self.val_grids, 1, 10**8)
        _check_unit("val_fraction", self.val_fraction, 0.0, 0.5, "(0, 0.5]", open_low=True, closed_high=True)
        check_int("batch_size", self.batch_size, 1, 1 << 20)
        check_positive("lr", self.lr)
        if self.lr > 1.0:
            raise ValueError(f"lr must be <= 1, got {self.lr}")
        check_int("seed", self.seed, 0, 2**63 - 1)
        if self.compile is not None and not isinstance(self.compile, bool):
            raise ValueError(f"compile must be true, false or null (automatic), got {self.compile!r}")
        if self.bf16 is not None and not isinstance(self.bf16, bool):
            raise ValueError(f"bf16 must be true, false or null (automatic), got {self.bf16!r}")
        _check_unit("ema", self.ema, 0.0, 1.0, "[0, 1)")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PriorFitConfig":
        """Validated construction from a dict (e.g. prior.json's ``fit``). Raises ValueError."""
        return config_from_dict(cls, data, ())


def _check_unit(name: str, value: Any, lo: float, hi: float, shown: str, *, open_low: bool = False,
                closed_high: bool = False) -> None:
    """`value` a finite float in the interval `shown` (its ends lo, hi; [lo, hi) unless told)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a float in {shown}, got {value!r}")
    if (value <= lo if open_low else value < lo) or (value > hi if closed_high else value >= hi):
        raise ValueError(f"{name} must be in {shown}, got {value}")


@dataclass
class PriorFit:
    """What :func:`fit_prior` did: the model (eval mode; the best-validation weights after a
    plateau fit, the last ones after a fixed count), one history row per evaluation, why it
    stopped (one of STOP_REASONS) and where."""

    model: GatedPixelCNN
    history: list[dict]
    stop_reason: str
    steps: int                        # optimizer steps taken
    best_step: int | None             # step of the lowest validation NLL (None: no validation)
    best_val_nll_bits: float | None
    config: PriorFitConfig            # as run: `compile` resolved
    precision: str                    # "fp32", "bf16 autocast" or "fp32 (bf16 asked: ...)"
    seconds: float
    n_val_grids: int = 0
    form: str = "conv"                # STEP_FORMS: how the step computed the network (step_form)

    def message(self) -> str:
        """One line: where the fit stopped and why, and which weights it kept."""
        cfg = self.config
        why = {
            "plateau": f"validation NLL had not improved by {cfg.min_improvement:.1%} for {cfg.patience} "
                       f"evaluations ({cfg.patience * cfg.eval_every} steps)",
            "max_steps": f"hard cap max_steps={cfg.max_steps} reached before a plateau",
            "steps": f"fixed step count {cfg.steps}",
            "callback": "stopped by the caller",
        }[self.stop_reason]
        line = f"prior fit stopped at step {self.steps} ({self.stop_reason}: {why})"
        if self.best_step is not None:
            kept = "kept" if cfg.plateau else "last weights kept; best was"
            line += f"; {kept} step {self.best_step}, val NLL {self.best_val_nll_bits:.4f} bits/code"
        avg = f", weights averaged (EMA {cfg.ema:g})" if cfg.ema > 0 else ""
        how = f"{', compiled' if cfg.compile else ''}{', as matmuls' if self.form == 'matmul' else ''}"
        return line + f"; {self.seconds:.0f} s, {self.precision}{how}{avg}"

    def summary(self) -> dict:
        """The JSON-safe record prior.json keeps beside the history."""
        return {"steps": self.steps, "best_step": self.best_step, "best_val_nll_bits": self.best_val_nll_bits,
                "stop_reason": self.stop_reason, "n_val_grids": self.n_val_grids, "precision": self.precision,
                "step_form": self.form,
                "fit": self.config.to_dict(), "fit_seconds": round(self.seconds, 1)}


def _resolve_fit(fit: PriorFitConfig | Mapping[str, Any] | None, overrides: dict, dev: torch.device) -> tuple:
    """A validated copy of `fit` with the keyword overrides, `compile` and `bf16` decided -> (fit, precision)."""
    if fit is None:
        fit = PriorFitConfig()
    elif not isinstance(fit, PriorFitConfig):
        fit = PriorFitConfig.from_dict(fit)
    fit = dataclasses.replace(fit, **{k: v for k, v in overrides.items() if v is not None}).validate()
    why_not = compile_unavailable(dev)
    if fit.compile is None:
        fit.compile = fit.budget >= COMPILE_AUTO_STEPS and why_not is None
    elif fit.compile and why_not:
        raise ValueError(f"{why_not}, or fit without --compile")
    no_bf16 = amp_unavailable(dev)
    if fit.bf16 is None:        # automatic: bf16 where it is native, quietly fp32 elsewhere
        fit.bf16 = no_bf16 is None
    precision = "fp32"
    if fit.bf16:
        precision = f"fp32 (bf16 asked: {no_bf16})" if no_bf16 else "bf16 autocast"
    return fit, precision


def _split_validation(train: Tensor, tr_cond: Tensor | None, val: Tensor | None, val_cond: Tensor | None,
                      fit: PriorFitConfig) -> tuple:
    """The fixed validation subset a fit evaluates (a seeded draw of at most val_grids grids), held
    out of the training grids when no validation grids are given and the fit needs them."""
    g = torch.Generator().manual_seed(int(fit.seed) + 7919)
    if val is None:
        if not fit.plateau:
            return train, tr_cond, None, None
        n_hold = min(fit.val_grids, int(fit.val_fraction * train.shape[0]))
        if n_hold < 1:
            raise ValueError(f"a plateau stop needs validation grids: pass val_codes, or at least "
                             f"{math.ceil(1 / fit.val_fraction)} training grids, got {train.shape[0]}")
        perm = torch.randperm(train.shape[0], generator=g)
        hold, keep = perm[:n_hold].sort().values, perm[n_hold:].sort().values
        pick = (lambda t, i: None if t is None else t[i.to(t.device)])
        return pick(train, keep), pick(tr_cond, keep), pick(train, hold), pick(tr_cond, hold)
    if val.shape[0] > fit.val_grids:
        idx = torch.randperm(val.shape[0], generator=g)[: fit.val_grids].sort().values
        val = val[idx]
        val_cond = None if val_cond is None else val_cond[idx.to(val_cond.device)]
    return train, tr_cond, val, val_cond


def _mean_nll_bits(model: GatedPixelCNN, codes: Tensor, cond: Tensor | None, batch_size: int = 500) -> float:
    """nll_bits_per_code on already-checked codes (on the model's device), fp32, eval mode."""
    total = 0.0
    with model._eval_mode(), torch.no_grad():
        for s in range(0, codes.shape[0], batch_size):
            x = codes[s : s + batch_size]
            logits = model._logits(x, None if cond is None else cond[s : s + batch_size])
            total += float(F.cross_entropy(logits.float(), x, reduction="sum"))
    return total / (codes.numel() * _LN2)


class _WeightAverage:
    """Exponential moving average of a model's parameters: avg ← avg + (1 − β_t)·(θ − avg) after each
    step, β_t = min(β, (1 + t)/(10 + t)) so that the first steps do not pin it to the initial
    weights. One foreach lerp a step (well under 1% of a prior step)."""

    def __init__(self, model: nn.Module, decay: float):
        self.params = [p for p in model.parameters()]
        self.avg = [p.detach().clone() for p in self.params]
        self.decay, self.t = decay, 0

    @torch.no_grad()
    def update(self) -> None:
        self.t += 1
        beta = min(self.decay, (1 + self.t) / (10 + self.t))
        torch._foreach_lerp_(self.avg, [p.detach() for p in self.params], 1.0 - beta)

    @torch.no_grad()
    def load(self, tensors: list[Tensor] | None = None) -> None:
        """Copy `tensors` (default: the average) into the model's parameters."""
        torch._foreach_copy_([p.detach() for p in self.params], self.avg if tensors is None else tensors)

    @contextlib.contextmanager
    def swapped_in(self):
        """The model holds the averaged weights inside the block, its own ones again after it."""
        own = [p.detach().clone() for p in self.params]
        self.load()
        try:
            yield
        finally:
            self.load(own)


STEP_FORMS = ("conv", "matmul")


def step_form(dev: torch.device, precision: str, compiled: bool) -> str:
    """How a fit's step computes the network: "matmul" (:meth:`GatedPixelCNN._logits_matmul`) where
    oneDNN's convolutions on 7x7 grids lag its GEMMs, for a compiled step on a CPU:
    - fp32 where the widest vector unit is AVX2: 1.18-1.28x the convolutions (7 of 9 A/Bs; 1.01-1.08x
      in the other two), a converged fit 1.22x faster at a test NLL 0.004 bits apart;
    - bf16 on AVX512-BF16 without AMX: 1.03x, 1.10x and 1.10x (three A/Bs on an AMD EPYC), a converged
      fit 1.16x faster at a test NLL 0.004 bits apart.
    "conv" everywhere else: eager, the window copies cost more than the products gain (0.97x); bf16 on
    AMX lost (2.32-2.52x against 2.60-2.87x the old step); fp32 on AVX-512 lost (1.16x and 1.19x against
    1.21x and 1.24x). benchmarks/RESULTS.md has the runs."""
    if dev.type != "cpu" or not compiled:
        return "conv"
    if precision.startswith("fp32"):
        return "matmul" if torch.backends.cpu.get_cpu_capability() == "AVX2" else "conv"
    return "matmul" if x86_bf16_units() == ["AVX512-BF16"] else "conv"


def _make_step(model: GatedPixelCNN, opt: torch.optim.Optimizer, fit: PriorFitConfig, precision: str,
               dev: torch.device, form: str = "conv") -> Callable[[Tensor, Tensor | None], Tensor]:
    """One optimizer step -> the detached loss (nats). The loss (forward and cross-entropy) is
    what torch.compile sees: its backward is compiled with it; Adam runs eagerly. ``form``: one of
    STEP_FORMS, the network as convolutions or as channels-last matrix products (same function)."""
    bf16 = precision == "bf16 autocast"
    if form not in STEP_FORMS:
        raise ValueError(f"form must be one of {STEP_FORMS}, got {form!r}")

    def loss_of(x: Tensor, c: Tensor | None) -> Tensor:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            if form == "matmul":                  # (B, H, W, K): one row of K logits per code
                logits, target = model._logits_matmul(x, c).flatten(0, 2), x.flatten()
            else:
                logits, target = model._logits(x, c), x
        return F.cross_entropy(logits.float(), target)

    if fit.compile:
        loss_of = torch.compile(loss_of, options=COMPILE_OPTIONS)

    def step(x: Tensor, c: Tensor | None) -> Tensor:
        loss = loss_of(x, c)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def fit_prior(
    train_codes: Any,
    val_codes: Any,
    config: PriorConfig | Mapping[str, Any],
    fit: PriorFitConfig | Mapping[str, Any] | None = None,
    *,
    steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    seed: int | None = None,
    eval_every: int | None = None,
    train_labels: Any = None,
    val_labels: Any = None,
    device: Any = None,
    callback: Callable[[dict], Any] | None = None,
) -> PriorFit:
    """Fit a :class:`GatedPixelCNN` with Adam on cross-entropy, as ``fit`` says (a
    :class:`PriorFitConfig`; default: the plateau stop). ``steps``, ``batch_size``, ``lr``,
    ``seed``, ``eval_every``, when given, override its fields.

    ``train_codes`` / ``val_codes``: integer ``(N, H, W)`` tensors or arrays (``val_codes`` may be
    None). Every ``eval_every`` steps (and at the last step) a history row ``{"step",
    "train_nll_bits", "val_nll_bits"}`` is appended (train = mean minibatch NLL since the previous
    row, bits/code; val = NLL of the validation subset or None) and passed to ``callback(row)``;
    if the callback returns ``True`` training stops. Deterministic given the seed in eager mode
    (global RNG state is restored afterwards). Returns a :class:`PriorFit`.
    """
    cfg = _as_config(config)
    dev = as_device(device)
    fit, precision = _resolve_fit(
        fit, dict(steps=steps, batch_size=batch_size, lr=lr, seed=seed, eval_every=eval_every), dev
    )
    t0 = time.perf_counter()
    keep_freed_host_memory()     # each step's buffers stay mapped for the next (device.py)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(fit.seed)
        model = GatedPixelCNN(cfg).to(dev)
        train = model._check_codes(as_tensor(train_codes, "train_codes"), "train_codes")
        if train.shape[0] == 0:
            raise ValueError("train_codes is empty")
        tr_cond = model._cond_index(
            None if train_labels is None else as_tensor(train_labels, "train_labels"), train.shape[0], dev
        )
        val = va_cond = None
        if val_codes is not None:
            val = model._check_codes(as_tensor(val_codes, "val_codes"), "val_codes")
            va_cond = model._cond_index(
                None if val_labels is None else as_tensor(val_labels, "val_labels"), val.shape[0], dev
            )
        elif val_labels is not None:
            raise ValueError("val_labels given without val_codes")
        train, tr_cond, val, va_cond = _split_validation(train.to(dev), tr_cond, val, va_cond, fit)
        if val is not None:
            val = val.to(dev)

        gen = torch.Generator().manual_seed(int(fit.seed))
        # fused Adam: one kernel over all parameters instead of ~10 small ops per tensor (-4% of a step)
        opt = torch.optim.Adam(model.parameters(), lr=float(fit.lr), fused=dev.type in ("cpu", "cuda"))
        form = step_form(dev, precision, bool(fit.compile))
        step_fn = _make_step(model, opt, fit, precision, dev, form)
        average = _WeightAverage(model, fit.ema) if fit.ema > 0 else None
        scored = average.swapped_in if average is not None else contextlib.nullcontext   # the weights validated and kept
        history: list[dict] = []
        acc, acc_n = torch.zeros((), device=dev), 0
        best_val, best_step, best_state = math.inf, None, None
        ref_val, stale, reason, step = math.inf, 0, "steps" if not fit.plateau else "max_steps", 0
        model.train()
        for step in range(1, fit.budget + 1):
            idx = torch.randint(train.shape[0], (fit.batch_size,), generator=gen).to(dev)
            acc += step_fn(train[idx], None if tr_cond is None else tr_cond[idx])
            acc_n += 1
            if average is not None:
                average.update()
            if step % fit.eval_every and step != fit.budget:
                continue
            with scored():
                v = None if val is None else _mean_nll_bits(model, val, va_cond)
                improved = v is not None and v < best_val
                if improved and fit.plateau:
                    best_state = {k: t.detach().clone() for k, t in model.state_dict().items()}
            model.train()
            row = {"step": step, "train_nll_bits": float(acc) / acc_n / _LN2, "val_nll_bits": v}
            history.append(row)
            acc, acc_n = torch.zeros((), device=dev), 0
            if improved:
                best_val, best_step = v, step
            if fit.plateau and v is not None:
                if v < ref_val * (1.0 - fit.min_improvement):
                    ref_val, stale = v, 0
                else:
                    stale += 1
            if callback is not None and callback(row) is True:
                reason = "callback"
                break
            if fit.plateau and stale >= fit.patience:
                reason = "plateau"
                break
        if best_state is not None:
            model.load_state_dict(best_state)
        elif average is not None:                  # a fixed step count keeps the last averaged weights
            average.load()
    model.eval()
    return PriorFit(model=model, history=history, stop_reason=reason, steps=step, best_step=best_step,
                    best_val_nll_bits=None if best_step is None else best_val, config=fit,
                    precision=precision, seconds=time.perf_counter() - t0,
                    n_val_grids=0 if val is None else int(val.shape[0]), form=form)


# --------------------------------------------------------------------------- #
# checkpoints: safetensors with the config in the metadata (rundir.save_tagged)
# --------------------------------------------------------------------------- #
def save_prior(model: GatedPixelCNN, path: Any) -> None:
    """Save weights + config (JSON metadata) to a safetensors file, atomically."""
    if not isinstance(model, GatedPixelCNN):
        raise ValueError(f"model must be a GatedPixelCNN, got {type(model).__name__}")
    rd.save_tagged(model, PRIOR_FORMAT, path)


def load_prior(path: Any, device: Any = None, *, num_codes: int | None = None) -> GatedPixelCNN:
    """Load a prior saved by :func:`save_prior` (eval mode, on ``device`` or CPU).

    Validates the config and every tensor's name/shape/dtype before building;
    raises ``rundir.BundleError`` (a ValueError; a FileNotFoundError too for a
    missing file) for corrupt/truncated/pickle files, bad configs or shapes.
    If ``num_codes`` is given the stored codebook size must match it.
    """
    model = rd.load_tagged(path, PRIOR_FORMAT, PriorConfig.from_dict, GatedPixelCNN, device)
    if num_codes is not None and model.num_codes != num_codes:
        raise rd.BundleError(f"{os.fspath(path)!r}: prior has num_codes={model.num_codes}, expected {num_codes}")
    return model
