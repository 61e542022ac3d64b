"""The CPU fast path for the decoder's output layer (nets.MatmulConvTranspose2d) and for every other
conv (nets.BiasApartConv2d, BiasApartConvTranspose2d) is the same layer as the plain one: same results
and gradients to float rounding, same parameters and state-dict keys, under autocast and torch.compile
too. The residual blocks' ReLUInAutocastDtype is nn.ReLU bit for bit."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sqvae_core.config import ModelConfig
from sqvae_core.models import build_model
from sqvae_core.nets import (BiasApartConv2d, BiasApartConvTranspose2d, MatmulConvTranspose2d, ReLUInAutocastDtype,
                             ResBlock, bias_apart_convs_, matmul_output_head_)
from sqvae_core.train import TrainConfig, apply_preset, make_model


def layer_pair(c_in: int, c_out: int, bias: bool = True):
    torch.manual_seed(0)
    ref = nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=bias).double()
    fast = copy.deepcopy(ref)
    fast.__class__ = MatmulConvTranspose2d
    return ref, fast


def forward_backward(layer: nn.Module, x: torch.Tensor):
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    g = torch.linspace(-1, 2, y.numel(), dtype=y.dtype).view_as(y)      # fixed, non-uniform, not summing to 0
    (y * g).sum().backward()
    return y.detach(), x.grad, [p.grad.clone() for p in layer.parameters()]


@pytest.mark.parametrize("c_out", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_matmul_transposed_conv_is_the_transposed_conv(c_out, bias, channels_last):
    """y = fold(x_nhwc @ w) is the 4x4 stride-2 transposed conv, with its gradients (aten's transposed-conv
    backward, called on the saved inputs). In float64 the two agree to 1e-12: any mistake in the patch order,
    the padding or the arguments of the backward would be O(1)."""
    ref, fast = layer_pair(32, c_out, bias)
    x = torch.randn(5, 32, 7, 6, dtype=torch.float64)      # odd sizes and h != w catch a transposed index
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y0, dx0, dp0 = forward_backward(ref, x)
    y1, dx1, dp1 = forward_backward(fast, x)
    assert y1.shape == (5, c_out, 14, 12)
    torch.testing.assert_close(y1, y0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx1, dx0, rtol=1e-12, atol=1e-12)
    for a, b in zip(dp1, dp0):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_matmul_transposed_conv_under_autocast_and_compile():
    """bf16 autocast gives a bf16 output (as the conv does) within bf16 rounding, and float32 weight
    gradients; torch.compile calls the custom ops and gets the eager figures."""
    ref, fast = layer_pair(32, 1)
    ref, fast = ref.float(), fast.float()
    x = torch.randn(4, 32, 14, 14)
    y0, dx0, dp0 = forward_backward(ref, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = fast(x)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y0, rtol=2e-2, atol=3e-2)
    y16.float().sum().backward()
    assert fast.weight.grad.dtype == torch.float32
    fast.zero_grad()
    y1, dx1, dp1 = forward_backward(torch.compile(fast), x)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx1, dx0, rtol=1e-5, atol=1e-5)
    for a, b in zip(dp1, dp0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("kernel, stride, bias", [(4, 2, True), (3, 1, True), (1, 1, True), (4, 2, False)])
def test_bias_apart_conv_is_the_conv(transposed, kernel, stride, bias):
    """conv(x, w) + b, the bias added apart, is the layer: outputs and the gradients of x, w and b
    agree with the plain nn.Conv2d's / nn.ConvTranspose2d's to 1e-12 in float64 (a wrongly shaped
    bias would be O(1)); a layer without a bias is left alone."""
    torch.manual_seed(0)
    plain = nn.ConvTranspose2d if transposed else nn.Conv2d
    ref = plain(16, 8, kernel, stride, kernel // 2 if kernel < 4 else 1, bias=bias).double()
    new = copy.deepcopy(ref)
    assert bias_apart_convs_(new) == int(bias)
    twin = BiasApartConvTranspose2d if transposed else BiasApartConv2d
    assert type(new) is (twin if bias else plain)
    x = torch.randn(3, 16, 9, 10, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    y0, dx0, dp0 = forward_backward(ref, x)
    y1, dx1, dp1 = forward_backward(new, x)
    torch.testing.assert_close(y1, y0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx1, dx0, rtol=1e-12, atol=1e-12)
    for a, b in zip(dp1, dp0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    if bias:    # under autocast the output is bf16, as the conv's; the bias gradient stays fp32
        new = new.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y16 = new(x.float())
        assert y16.dtype == torch.bfloat16
        torch.testing.assert_close(y16.float(), y0.float(), rtol=2e-2, atol=3e-2)
        y16.float().sum().backward()
        assert new.bias.grad.dtype == torch.float32


@pytest.mark.parametrize("dataset, swapped, apart", [("fashion-mnist", 1, 1), ("cifar10", 1, 2)])
def test_cpu_models_get_the_fast_output_layer_and_keep_their_weights(dataset, swapped, apart):
    """make_model on a CPU swaps exactly the output layer (to 1 or 3 channels) to a matmul and every
    other conv to its bias-apart twin, nothing else; checkpoints keep their keys, so a model trained
    this way loads into the plain nets and decodes the same."""
    cfg = apply_preset(TrainConfig(model=ModelConfig(kind="gaussian_1"), dataset=dataset), "paper")
    torch.manual_seed(0)
    model = make_model(cfg, torch.device("cpu")).eval()
    fast = [m for m in model.modules() if isinstance(m, MatmulConvTranspose2d)]
    assert len(fast) == swapped and fast[0].out_channels in (1, 3)
    assert sum(isinstance(m, BiasApartConvTranspose2d) for m in model.modules()) == apart
    assert not any(type(m) in (nn.Conv2d, nn.ConvTranspose2d) for m in model.modules())
    plain = build_model(cfg.model).eval()
    n_conv = sum(type(m) is nn.Conv2d for m in plain.modules())
    assert n_conv > 0 and sum(type(m) is BiasApartConv2d for m in model.modules()) == n_conv
    assert not any(isinstance(m, (MatmulConvTranspose2d, BiasApartConv2d, BiasApartConvTranspose2d))
                   for m in plain.modules())
    assert list(plain.state_dict()) == list(model.state_dict())
    plain.load_state_dict(model.state_dict())
    size = 28 if dataset == "fashion-mnist" else 32
    x = torch.rand(2, 1 if dataset == "fashion-mnist" else 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(model.decoder(model.encoder(x)[0]), plain.decoder(plain.encoder(x)[0]),
                                   rtol=1e-4, atol=1e-4)
    assert matmul_output_head_(plain.decoder, max_channels=0) == 0        # 32 -> 1 is not <= 0 outputs


@pytest.mark.parametrize("autocast", [False, True])
def test_relu_in_autocast_dtype_is_relu_then_conv_bit_for_bit(autocast):
    """Casting before the ReLU instead of at the convolution changes no bit: relu(round(x)) = round(relu(x))
    (rounding is monotone and keeps 0), and the gradient it passes back is masked the same way. A
    residual block with it and one with nn.ReLU give identical outputs and gradients, fp32 or bf16."""
    torch.manual_seed(0)
    new = ResBlock(16).train()
    old = copy.deepcopy(new)
    old.block[0] = nn.ReLU()
    assert isinstance(new.block[0], ReLUInAutocastDtype)
    x = torch.randn(4, 16, 7, 7)
    x[0, 0] = 0.0                                          # exact zeros: the mask's edge
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y_new, dx_new, dp_new = forward_backward(new, x)
        y_old, dx_old, dp_old = forward_backward(old, x)
    assert y_new.dtype == y_old.dtype == torch.float32     # the residual stream stays fp32 either way
    assert torch.equal(y_new, y_old) and torch.equal(dx_new, dx_old)
    assert all(torch.equal(a, b) for a, b in zip(dp_new, dp_old))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        r = new.block[0](x)
    assert r.dtype == (torch.bfloat16 if autocast else torch.float32)
    assert torch.equal(r.float(), F.relu(x).to(r.dtype).float())
