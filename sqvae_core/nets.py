"""Encoder and decoder of the SQ-VAE paper's vision experiments (ResNet-style, width d).

`net="official"` builds the nets of the official SQ-VAE code (github sony/sqvae, vision/
networks/), one design per input, chosen by `ModelConfig.design`:

    design    input                         grid   encoder stem                      decoder (after its res blocks)
    "28"      28x28 (MNIST, Fashion-MNIST)  S/4    c4/2 BN R, c4/2                   t4/2 BN R, t4/2
    "32"      32x32 (CIFAR-10), other S     S/4    c4/2 BN R, c4/2 BN R, c3 BN R      t3 BN R, t4/2 BN R, t4/2
    "64"      64x64 images (CelebA)         S/4    c4/2 BN R, c4/2 BN R, c3           t3 BN R, t4/2 BN R, t4/2
    "64label" 64x64 label maps (vMF)        S/8    c4/2 BN R, c4/2 BN R, c4/2         t4/2 BN R, t4/2 BN R, t4/2

(c = conv, t = transposed conv, k/s = kernel/stride, BN = batch-norm, R = ReLU; the first
stem conv and the last decoder conv have width d/2.) The encoder then has num_rb - 1 residual
blocks and a mean head (one more block), plus a log-variance head for Gaussian SQ-VAE II-IV
and the VAE; the decoder has num_rb residual blocks ("28", "32") or num_rb - 1 ("64",
"64label"). Weights start as in the official code: conv and transposed-conv weights
~ N(0, 0.02), batch-norm scales ~ N(1, 0.02) and shifts 0 (conv biases keep PyTorch's default).

`net="legacy"` is the design of bundles saved before the official nets: the "64" stem at
every size, num_rb decoder blocks, PyTorch's default init. It exists so those bundles load.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

def _norm(ch: int, batch_norm: bool) -> nn.Module:
    """Batch-norm, or an Identity in its place (so parameter names do not shift without it)."""
    return nn.BatchNorm2d(ch) if batch_norm else nn.Identity()


def _bn_relu(ch: int, batch_norm: bool) -> list[nn.Module]:
    return [_norm(ch, batch_norm), nn.ReLU()]


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast gives x's device's convolutions now (bf16 under --amp), or None when it is
    off; devices without autocast (the meta device of the no-host-sync test) have none."""
    dev = x.device.type
    if torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


class ReLUInAutocastDtype(nn.ReLU):
    """ReLU that, under autocast, first casts an fp32 input to the autocast dtype (bf16), as the
    convolution after it would: relu(round(x)) = round(relu(x)) bit for bit (rounding is monotone
    and keeps 0), and so is its gradient. What changes is what torch.compile saves for the backward:
    the bf16 output, which the convolution saves anyway, instead of a bool mask of relu(x) <= 0.
    Inductor's kernels store and load such masks slowly (VecMask <-> bool, ~1 ms per 100k elements):
    the decoder's two masks took about 4 ms of a 32 ms compiled bf16 step on an AMD EPYC; without
    them (and with train._autocast's fp32 quantizer backward, which costs ~0.5 ms) the step ran 1.06x
    (gaussian_1) and 1.12x (vq) faster, interleaved A/B. Without autocast it is nn.ReLU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = autocast_dtype(x)
        if dtype is not None and x.dtype == torch.float32:
            x = x.to(dtype)
        return F.relu(x)


class ResBlock(nn.Module):
    """x + BN(Conv1x1(ReLU(BN(Conv3x3(ReLU(x)))))), batch-norm optional. Under --amp the decoder's
    stream x (from the fp32 quantizer) stays fp32; the first ReLU feeds its conv in bf16."""

    def __init__(self, dim: int, batch_norm: bool = True):
        super().__init__()
        self.block = nn.Sequential(
            ReLUInAutocastDtype(), nn.Conv2d(dim, dim, 3, 1, 1), _norm(dim, batch_norm),
            nn.ReLU(), nn.Conv2d(dim, dim, 1), _norm(dim, batch_norm),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


def encoder_stem(design: str, c_in: int, d: int, bn: bool) -> nn.Sequential:
    h = d // 2
    layers = [nn.Conv2d(c_in, h, 4, 2, 1), *_bn_relu(h, bn), nn.Conv2d(h, d, 4, 2, 1)]
    if design == "32":
        layers += [*_bn_relu(d, bn), nn.Conv2d(d, d, 3, 1, 1), *_bn_relu(d, bn)]
    elif design in ("64", "legacy"):
        layers += [*_bn_relu(d, bn), nn.Conv2d(d, d, 3, 1, 1)]
    elif design == "64label":
        layers += [*_bn_relu(d, bn), nn.Conv2d(d, d, 4, 2, 1)]
    return nn.Sequential(*layers)


def decoder_head(design: str, d: int, c_out: int, bn: bool) -> nn.Sequential:
    h = d // 2
    if design == "28":
        layers = [nn.ConvTranspose2d(d, h, 4, 2, 1)]
    else:
        first = nn.ConvTranspose2d(d, d, 4, 2, 1) if design == "64label" else nn.ConvTranspose2d(d, d, 3, 1, 1)
        layers = [first, *_bn_relu(d, bn), nn.ConvTranspose2d(d, h, 4, 2, 1)]
    return nn.Sequential(*layers, *_bn_relu(h, bn), nn.ConvTranspose2d(h, c_out, 4, 2, 1))


def official_init(module: nn.Module) -> None:
    """The official code's init: conv weights ~ N(0, 0.02); BN scale ~ N(1, 0.02), shift 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def plus_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y (B, C, H, W) + a conv's bias (C,), added after the convolution, in y's dtype (bf16 under
    autocast, as the conv's own output: the bias is rounded to it). Its gradient is dy summed over
    (B, H, W), which compiled code fuses into the next kernel."""
    return y if bias is None else y + bias.view(1, -1, 1, 1).to(y.dtype)


# A transposed conv with k=4, s=2, p=1 as a matmul and a fold, the fold being the col2im of its
# 4x4 stride-2 patches: y = fold(x_nhwc @ w.view(C_in, C_out*16)). A custom op, so that torch.compile
# calls it as it is (inductor's own code for the patch sums was slower than oneDNN's).
# Why: oneDNN runs the decoder's last transposed conv (32 -> 1 or 3 channels) forward at a few GFLOP/s.
# Its backward (dx = the strided conv of dy, dw = x against the patches of dy) oneDNN does well: faster
# than unfold(dy) @ wᵀ and xᵀ @ unfold(dy), whose matmuls have 16 columns (Fashion-MNIST, batch 32,
# 1 thread, AMD EPYC: 0.29 against 0.45 ms fp32, 0.26 against 0.40 ms bf16), so the backward is aten's.
# Note: torch.compile's on-disk cache keys on the op's name but not on its fake impl or its backward; after
# changing either, rename the op (as sqvae::convt4s2 became convt4s2_fold when its backward became aten's),
# or a user's stale cached graph asserts on strides or calls an op that is gone.


@torch.library.custom_op("sqvae::convt4s2_fold", mutates_args=())
def _convt4s2(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    n, c, h, wd = x.shape
    cols = x.permute(0, 2, 3, 1).reshape(-1, c) @ w.reshape(c, -1)                 # (n*h*w, C_out*16)
    y = F.fold(cols.view(n, h * wd, -1).transpose(1, 2), (2 * h, 2 * wd), 4, padding=1, stride=2)
    return y.contiguous(memory_format=torch.channels_last)


@_convt4s2.register_fake
def _(x, w):
    n, _, h, wd = x.shape
    return x.new_empty(n, w.shape[1], 2 * h, 2 * wd).contiguous(memory_format=torch.channels_last)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy):
    x, w = ctx.saved_tensors
    dx, dw, _ = torch.ops.aten.convolution_backward(dy, x, w, None, (2, 2), (1, 1), (1, 1), True, (0, 0), 1,
                                                    [True, True, False])
    return dx, dw


_convt4s2.register_autograd(_backward, setup_context=_setup)


class MatmulConvTranspose2d(nn.ConvTranspose2d):
    """The same layer (weights, state-dict keys, results to float rounding), computed as _convt4s2:
    for a k=4, s=2, p=1 transposed conv with few output channels on a CPU (oneDNN's 1.29 + 0.29 ms forward
    and backward -> 0.30 + 0.29 ms at batch 32, 14x14x32 -> 28x28x1, fp32, AMD EPYC, 1 thread). bf16 under
    autocast, as a conv."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        dtype = autocast_dtype(x)
        if dtype is not None:
            x, w = x.to(dtype), w.to(dtype)
        y = _convt4s2(x, w)
        return plus_bias(y, self.bias)


# The CPU training path adds each conv's bias after the convolution instead of inside it, because
# oneDNN is slow to compute the bias gradient: for the transposed convs in bf16 (an AMD EPYC with
# AVX512-BF16, 1 thread, batch 32, channels last: Fashion-MNIST's 64 -> 32 layer's backward took 2.11 ms
# with it and 1.29 ms without; CelebA's, 9.09 and 5.45), and less so for the others (fp32 32 -> 64,
# 4x4 stride 2: 2.29 against 2.03 ms). As a broadcast add (plus_bias), that gradient is dy summed
# over (B, H, W): 12-50 µs, fused into the next kernel when compiled.
# Compiled --amp steps: +3.2% (gaussian_1) and +2.4% (vq) images/s for the transposed convs; then
# +1.0% (both, fp32; 21 and 11 rounds) and +1.3% (--amp) for the others. Same parameters and keys,
# results to float rounding; under autocast the output is bf16, as the conv's: the bias is rounded to it.


class BiasApartConv2d(nn.Conv2d):
    """nn.Conv2d with its bias added apart (see above)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x, self.weight, None, self.stride, self.padding, self.dilation, self.groups)
        return plus_bias(y, self.bias)


class BiasApartConvTranspose2d(nn.ConvTranspose2d):
    """nn.ConvTranspose2d with its bias added apart (see above)."""

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if output_size is not None:
            return super().forward(x, output_size)
        y = F.conv_transpose2d(x, self.weight, None, self.stride, self.padding, self.output_padding,
                               self.groups, self.dilation)
        return plus_bias(y, self.bias)


def bias_apart_convs_(module: nn.Module) -> int:
    """Turn, in place, every plain nn.Conv2d / nn.ConvTranspose2d with a bias (and zero padding) into
    its bias-apart twin (same parameters); returns how many. The CPU training path calls this after
    matmul_output_head_, whose layers add their bias apart already."""
    twins = {nn.Conv2d: BiasApartConv2d, nn.ConvTranspose2d: BiasApartConvTranspose2d}
    n = 0
    for m in module.modules():
        if type(m) in twins and m.bias is not None and m.padding_mode == "zeros":
            m.__class__ = twins[type(m)]
            n += 1
    return n


def matmul_output_head_(decoder: nn.Module, max_channels: int = 4) -> int:
    """Turn, in place, the decoder's k=4, s=2, p=1 transposed convs with <= max_channels outputs into
    MatmulConvTranspose2d (same parameters); returns how many. The CPU training path calls this."""
    n = 0
    for m in decoder.modules():
        if (type(m) is nn.ConvTranspose2d and m.kernel_size == (4, 4) and m.stride == (2, 2)
                and m.padding == (1, 1) and m.output_padding == (0, 0) and m.groups == 1
                and m.dilation == (1, 1) and m.out_channels <= max_channels):
            m.__class__ = MatmulConvTranspose2d
            n += 1
    return n


class Encoder(nn.Module):
    def __init__(self, in_channels: int, dim: int, num_rb: int, batch_norm: bool = True,
                 with_log_var: bool = False, design: str = "32"):
        super().__init__()
        self.conv = encoder_stem(design, in_channels, dim, batch_norm)
        self.res = nn.Sequential(*[ResBlock(dim, batch_norm) for _ in range(num_rb - 1)])
        self.res_mean = ResBlock(dim, batch_norm)
        self.res_log_var = ResBlock(dim, batch_norm) if with_log_var else None
        if design != "legacy":
            official_init(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (z, log_var) each (B, d, H, W); log_var is None without the head."""
        h = self.res(self.conv(x))
        log_var = self.res_log_var(h) if self.res_log_var is not None else None
        return self.res_mean(h), log_var


class Decoder(nn.Module):
    """Returns pre-activation outputs (B, out_channels, S, S); the likelihood decides the link."""

    def __init__(self, out_channels: int, dim: int, num_rb: int, batch_norm: bool = True, design: str = "32"):
        super().__init__()
        n_res = num_rb - 1 if design in ("64", "64label") else num_rb
        self.res = nn.Sequential(*[ResBlock(dim, batch_norm) for _ in range(n_res)])
        self.convt = decoder_head(design, dim, out_channels, batch_norm)
        if design != "legacy":
            official_init(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.convt(self.res(z))
