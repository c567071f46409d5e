"""3x3 convolutions that output a 2x2 map, trained as per-tap matrix products (CPU).

At the TIRG paper's 64 px, ResNet's last stage runs on 2x2 maps: its 3x3 convolutions
map 2x2 to 2x2 (stride 1) or 4x4 to 2x2 (stride 2, the stage's first). With padding 1, 5
of a kernel's 9 taps read only padding at every output pixel of a 2x2 map (11 of 36
reads at stride 2), and oneDNN's convolution kernels compute them anyway; in bf16 their
weight gradient also takes twice the forward's time, which made these convolutions the
largest single cost of a CPU training step. On so small a map each tap joins a short,
fixed list of (output pixel, input pixel) pairs (at 2x2 stride 1: the centre tap 4, an
edge tap 2, a corner tap 1), so per tap the convolution is one matrix product over its
pairs' pixels; the forward, the input gradient and the weight gradient are 9 products
each, with only the real pairs' arithmetic. Products that meet at one pixel are summed
in float32 and rounded once, as a convolution kernel accumulates; each tap's weight
gradient comes out of one product. A 512-channel conv trains ~2.4x faster
(``python -m bench.small_map_conv``; figures in docs/training.md).

The parameters, their names and the maths stay ``nn.Conv2d``'s; only CPU training takes
this path (evaluation, export, CUDA and larger maps run ``nn.Conv2d``'s own kernel).
``create_model`` swaps every fitting convolution of a model: the trunk's, and the
composers' on the last map (``tirg_lastconv``'s gate and residual, 1024 channels in at
D = 512, and ``film``'s residual block, which have biases).
"""

from __future__ import annotations

from functools import cache

import torch
from torch import nn

_NHWC = torch.channels_last
# Where per-tap products pay (bench.small_map_conv, one Zen 4 core, bf16, batch 32):
# output maps of at most 2x2 (onto 4x4 a 256-channel conv is 0.85x) from at least 256
# input channels (128 -> 256 at 4x4 stride 2 is 0.95x; 256 at 2x2 1.2x, 512 2.4x)
MAX_OUT_SIDE = 2
MIN_IN_CHANNELS = 256


def out_side(in_side: int, stride: int) -> int:
    """Side of a 3x3, padding 1 convolution's output map."""
    return (in_side - 1) // stride + 1


@cache
def tap_pairs(in_side: int, stride: int) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """Per tap (ky * 3 + kx), the (output pixels, input pixels) it joins in a 3x3,
    padding 1 convolution of a square ``in_side`` map; pixels numbered row-major. A tap
    that joins none (it only ever reads padding) has two empty index tensors."""
    side = out_side(in_side, stride)
    outs: list[list[int]] = [[] for _ in range(9)]
    ins: list[list[int]] = [[] for _ in range(9)]
    for oy in range(side):
        for ox in range(side):
            for ky in range(3):
                for kx in range(3):
                    iy, ix = oy * stride - 1 + ky, ox * stride - 1 + kx
                    if 0 <= iy < in_side and 0 <= ix < in_side:
                        outs[ky * 3 + kx].append(oy * side + ox)
                        ins[ky * 3 + kx].append(iy * in_side + ix)
    return tuple(
        (torch.tensor(o, dtype=torch.long), torch.tensor(i, dtype=torch.long))
        for o, i in zip(outs, ins)
    )


class _PerTapConv(torch.autograd.Function):
    """conv2d(x, weight, bias, stride=stride, padding=1) for x (N, C_in, S, S), weight
    (C_out, C_in, 3, 3), bias (C_out,) or None, computed in ``dtype``; returns
    (N, C_out, s, s) channels_last in ``dtype`` and the gradients in the inputs' own
    dtypes. Pixels are kept as (S * S, N, C): a tap's pairs are then the rows of one
    matrix."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride: int, dtype: torch.dtype) -> torch.Tensor:
        n, c_in, in_side = x.shape[0], x.shape[1], x.shape[-1]
        c_out, side = weight.shape[0], out_side(in_side, stride)
        pairs = tap_pairs(in_side, stride)
        # (C_out, 9, C_in): a free view of a channels_last weight
        taps = weight.to(dtype).permute(0, 2, 3, 1).reshape(c_out, 9, c_in)
        pixels = x.to(dtype).permute(2, 3, 0, 1).reshape(in_side * in_side, n, c_in)
        # products meeting at a pixel summed in float32 (or finer) and rounded once, as a
        # conv kernel accumulates
        sums = torch.promote_types(dtype, torch.float32)
        out = pixels.new_zeros(side * side, n, c_out, dtype=sums)
        if bias is not None:  # in the float32 sums too: one rounding, as the kernel's
            out += bias.to(dtype).to(sums)
        for tap, (outs, ins) in enumerate(pairs):
            if len(outs):
                rows = pixels[ins].reshape(-1, c_in)  # (pairs * N, C_in)
                product = (rows @ taps[:, tap].t()).view(-1, n, c_out)
                out.index_add_(0, outs, product.to(sums))
        ctx.save_for_backward(pixels, taps)
        ctx.stride = stride
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        out = out.view(side, side, n, c_out).permute(2, 3, 0, 1)
        return out.to(dtype, memory_format=_NHWC)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        pixels, taps = ctx.saved_tensors
        x_dtype, weight_dtype, bias_dtype = ctx.dtypes
        n, c_out, side = grad_out.shape[0], grad_out.shape[1], grad_out.shape[-1]
        in_pixels, c_in = pixels.shape[0], pixels.shape[-1]
        in_side = round(in_pixels**0.5)
        sums = torch.promote_types(pixels.dtype, torch.float32)
        grads = grad_out.to(pixels.dtype).permute(2, 3, 0, 1).reshape(side * side, n, c_out)
        want_x, want_weight, want_bias = ctx.needs_input_grad[:3]
        grad_pixels = pixels.new_zeros(in_pixels, n, c_in, dtype=sums) if want_x else None
        grad_taps = pixels.new_zeros(c_out, 9, c_in) if want_weight else None
        for tap, (outs, ins) in enumerate(tap_pairs(in_side, ctx.stride)):
            if not len(outs):
                continue
            grad_rows = grads[outs].reshape(-1, c_out)  # (pairs * N, C_out)
            if want_x:
                product = (grad_rows @ taps[:, tap]).view(-1, n, c_in)
                grad_pixels.index_add_(0, ins, product.to(sums))
            if want_weight:
                grad_taps[:, tap] = grad_rows.t() @ pixels[ins].reshape(-1, c_in)
        grad_x = grad_weight = grad_bias = None
        if want_x:
            grad_x = grad_pixels.view(in_side, in_side, n, c_in).permute(2, 3, 0, 1)
            grad_x = grad_x.to(x_dtype, memory_format=_NHWC)
        if want_weight:
            grad_weight = grad_taps.view(c_out, 3, 3, c_in).permute(0, 3, 1, 2).to(weight_dtype)
        if want_bias:
            grad_bias = grads.to(sums).sum((0, 1)).to(bias_dtype)
        return grad_x, grad_weight, grad_bias, None, None


def per_tap_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: int = 1,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride=stride, padding=1)`` as per-tap matrix
    products, in CPU autocast's dtype when it is on (as ``F.conv2d`` would be), else in
    x's. x (N, C_in, S, S), weight (C_out, C_in, 3, 3), bias (C_out,) or None ->
    (N, C_out, s, s) with s = (S - 1) // stride + 1, in x's memory format (channels_last
    or contiguous)."""
    if x.dim() != 4 or x.shape[-1] != x.shape[-2] or weight.shape[-2:] != (3, 3):
        raise ValueError(
            f"per_tap_conv takes a square (N, C, S, S) map and a 3x3 kernel, got "
            f"{tuple(x.shape)} and {tuple(weight.shape)}"
        )
    if x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"per_tap_conv: x has {x.shape[1]} channels, the weight takes {weight.shape[1]}"
        )
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(
            f"per_tap_conv: bias {tuple(bias.shape)} does not fit {weight.shape[0]} output channels"
        )
    autocast = torch.is_autocast_enabled("cpu")
    dtype = torch.get_autocast_dtype("cpu") if autocast else x.dtype
    with torch.autocast("cpu", enabled=False):
        out = _PerTapConv.apply(x, weight, bias, stride, dtype)
    return out if x.is_contiguous(memory_format=_NHWC) else out.contiguous()


def fits_small_map(conv: nn.Conv2d) -> bool:
    """Whether ``conv`` is a 3x3, padding 1, stride 1 or 2, ungrouped convolution (one
    that ``SmallMapConv2d`` can replace), with or without a bias."""
    return (
        type(conv) is nn.Conv2d
        and conv.kernel_size == (3, 3)
        and conv.stride in ((1, 1), (2, 2))
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


class SmallMapConv2d(nn.Conv2d):
    """``nn.Conv2d`` (3x3, padding 1, stride 1 or 2) that trains on the CPU
    through ``per_tap_conv`` where its output map is at most ``MAX_OUT_SIDE`` square and
    its input has at least ``MIN_IN_CHANNELS``; the same parameters and state dict keys."""

    @classmethod
    def replacing(cls, conv: nn.Conv2d) -> SmallMapConv2d:
        """A SmallMapConv2d that shares ``conv``'s weight and bias (``fits_small_map(conv)``)."""
        if not fits_small_map(conv):
            raise ValueError(f"SmallMapConv2d replaces a 3x3 padding-1 conv, got {conv}")
        return sharing_weight(cls, conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stride = self.stride[0]
        if (
            self.training
            and torch.is_grad_enabled()
            and x.device.type == "cpu"
            and x.dim() == 4
            and x.shape[1] >= MIN_IN_CHANNELS
            and x.shape[-1] == x.shape[-2]
            and out_side(x.shape[-1], stride) <= MAX_OUT_SIDE
            and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling()
        ):
            return per_tap_conv(x, self.weight, stride, self.bias)
        return super().forward(x)


def sharing_weight(conv_class: type[nn.Conv2d], conv: nn.Conv2d) -> nn.Conv2d:
    """A ``conv_class`` 3x3, padding 1 conv with ``conv``'s stride, weight and bias.
    skip_init: no weight is drawn, so the random stream (and every parameter a seeded
    model initialises after this one) is what it is without the swap."""
    new = nn.utils.skip_init(
        conv_class,
        conv.in_channels,
        conv.out_channels,
        3,
        stride=conv.stride,
        padding=1,
        bias=conv.bias is not None,
    )
    new.weight, new.bias = conv.weight, conv.bias
    return new


def swap_convs(module: nn.Module, wanted, conv_class: type[nn.Conv2d]) -> int:
    """Replace every child conv under ``module`` for which ``wanted(conv)`` holds with a
    ``conv_class`` sharing its weight; returns how many were replaced."""
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if wanted(child):
                setattr(parent, name, sharing_weight(conv_class, child))
                replaced += 1
    return replaced


def use_small_map_convs(module: nn.Module) -> int:
    """Replace every ``fits_small_map`` convolution under ``module`` with a
    ``SmallMapConv2d`` sharing its weight; returns how many were replaced."""
    return swap_convs(module, fits_small_map, SmallMapConv2d)


def use_plain_convs(module: nn.Module) -> int:
    """Undo ``use_small_map_convs``: every ``SmallMapConv2d`` under ``module`` becomes an
    ``nn.Conv2d`` sharing its weight (for A/B timings); returns how many."""
    return swap_convs(module, lambda conv: isinstance(conv, SmallMapConv2d), nn.Conv2d)
