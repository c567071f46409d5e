"""Per-tap products for 3x3 convolutions onto 2x2 maps (pipeline.models.small_map_conv):
the same outputs and gradients as F.conv2d, used only where it applies, and a ResNet
trunk that trains to the same weights."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from pipeline.models import create_model
from pipeline.models.image_encoder import ImageEncoder
from pipeline.models.small_map_conv import (
    SmallMapConv2d,
    per_tap_conv,
    tap_pairs,
    use_plain_convs,
    use_small_map_convs,
)

# (input side, stride): every shape per_tap_conv takes in a ResNet at 64 px and the edges
CASES = [(2, 1), (4, 2), (3, 2), (1, 1), (2, 2), (5, 1)]


GRADS = ("output", "input grad", "weight grad", "bias grad")


def conv_and_grads(conv, x, weight, grad_out, bias=None):
    """(output, x's grad, weight's grad, bias's grad or None) of conv(x, weight, bias)."""
    x = x.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    if bias is not None:
        bias = bias.detach().clone().requires_grad_()
    out = conv(x, weight, bias)
    out.backward(grad_out)
    return out.detach(), x.grad, weight.grad, None if bias is None else bias.grad


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("in_side,stride", CASES)
def test_per_tap_conv_matches_conv2d_in_float32(in_side, stride, channels_last, with_bias):
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(3, 6, in_side, in_side).to(memory_format=fmt)
    weight = torch.randn(5, 6, 3, 3).to(memory_format=fmt)
    bias = torch.randn(5) if with_bias else None
    side = (in_side - 1) // stride + 1
    grad_out = torch.randn(3, 5, side, side)
    want = conv_and_grads(
        lambda a, w, b: F.conv2d(a, w, b, stride=stride, padding=1), x, weight, grad_out, bias
    )
    got = conv_and_grads(lambda a, w, b: per_tap_conv(a, w, stride, b), x, weight, grad_out, bias)
    assert (got[3] is None) == (not with_bias)
    for name, w, g in zip(GRADS, want, got):
        if w is None:
            continue
        assert g.shape == w.shape and g.dtype == w.dtype, name
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=name)
    assert got[0].is_contiguous(memory_format=fmt)
    assert got[1].is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("in_side,stride,with_bias", [(2, 1, False), (4, 2, False), (2, 1, True)])
def test_per_tap_conv_under_cpu_autocast_rounds_like_conv2d(in_side, stride, with_bias):
    """bf16 outputs and float32 gradients, as far from float32 as the conv kernel's."""
    torch.manual_seed(0)
    x = torch.randn(32, 512, in_side, in_side).to(memory_format=torch.channels_last)
    weight = (torch.randn(512, 512, 3, 3) * 0.02).to(memory_format=torch.channels_last)
    bias = torch.randn(512) if with_bias else None
    grad_out = torch.randn(32, 512, 2, 2)

    def conv2d(a, w, b):
        return F.conv2d(a, w, b, stride=stride, padding=1)

    def under_autocast(conv):
        def run(a, w, b):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = conv(a, w, b)
            assert out.dtype == torch.bfloat16
            return out.float()

        return run

    exact = conv_and_grads(conv2d, x, weight, grad_out, bias)
    kernel = conv_and_grads(under_autocast(conv2d), x, weight, grad_out, bias)
    per_tap = conv_and_grads(
        under_autocast(lambda a, w, b: per_tap_conv(a, w, stride, b)), x, weight, grad_out, bias
    )
    assert per_tap[1].dtype == torch.float32 and per_tap[2].dtype == torch.float32
    # the bias grad: float32 sums of bf16 output grads, where the kernel's is bf16
    for name, e, k, p in zip(GRADS, exact, kernel, per_tap):
        if e is None:
            continue
        kernel_error = ((k - e).norm() / e.norm()).item()
        per_tap_error = ((p - e).norm() / e.norm()).item()
        # products meeting at a pixel are summed in float32 (bf16 partial sums: 1.37x)
        assert per_tap_error < 1.25 * kernel_error, (name, per_tap_error, kernel_error)


def test_tap_pairs_join_each_output_pixel_to_its_real_input_pixels():
    pairs = tap_pairs(2, 1)
    assert [len(outs) for outs, _ in pairs] == [1, 2, 1, 2, 4, 2, 1, 2, 1]
    # every (output, input) pixel pair of a 2x2 map once: the dense map has no padding
    joined = {(int(o), int(i)) for outs, ins in pairs for o, i in zip(outs, ins)}
    assert joined == {(o, i) for o in range(4) for i in range(4)}
    # 4x4 -> 2x2 at stride 2: 25 of the 36 (output pixel, tap) reads are real pixels
    assert sum(len(outs) for outs, _ in tap_pairs(4, 2)) == 25
    assert [int(i) for i in tap_pairs(4, 2)[4][1]] == [0, 2, 8, 10]  # centre tap


def test_per_tap_conv_rejects_what_it_cannot_compute():
    with pytest.raises(ValueError, match="square"):
        per_tap_conv(torch.zeros(1, 2, 2, 3), torch.zeros(2, 2, 3, 3))
    with pytest.raises(ValueError, match="3x3"):
        per_tap_conv(torch.zeros(1, 2, 2, 2), torch.zeros(2, 2, 1, 1))
    with pytest.raises(ValueError, match="channels"):
        per_tap_conv(torch.zeros(1, 3, 2, 2), torch.zeros(2, 2, 3, 3))
    with pytest.raises(ValueError, match="bias"):
        per_tap_conv(torch.zeros(1, 2, 2, 2), torch.zeros(3, 2, 3, 3), bias=torch.zeros(2))
    with pytest.raises(ValueError, match="replaces"):
        SmallMapConv2d.replacing(nn.Conv2d(2, 2, 3, padding=0))


def grad_fn_name(module: nn.Module, x: torch.Tensor) -> str:
    out = module(x)
    return type(out.grad_fn).__name__ if out.grad_fn is not None else "none"


def test_small_map_conv_takes_the_per_tap_path_only_when_training_small_cpu_maps():
    conv = SmallMapConv2d.replacing(nn.Conv2d(256, 4, 3, padding=1, bias=False))
    small = torch.randn(2, 256, 2, 2).to(memory_format=torch.channels_last)
    large = torch.randn(2, 256, 4, 4).to(memory_format=torch.channels_last)
    assert grad_fn_name(conv.train(), small) == "_PerTapConvBackward"
    assert grad_fn_name(conv.train(), large) == "ConvolutionBackward0"
    narrow = SmallMapConv2d.replacing(nn.Conv2d(128, 4, 3, padding=1, bias=False))
    assert grad_fn_name(narrow.train(), small[:, :128]) == "ConvolutionBackward0"
    assert grad_fn_name(conv.eval(), small) == "ConvolutionBackward0"
    with torch.no_grad():
        torch.testing.assert_close(conv.train()(small), F.conv2d(small, conv.weight, padding=1))


def per_tap_encoder() -> ImageEncoder:
    """A ResNet-18 ImageEncoder with its fitting convs swapped, as create_model does."""
    encoder = ImageEncoder(embed_dim=16, backbone="resnet18")
    use_small_map_convs(encoder)
    return encoder


def test_resnet_last_stage_uses_it_with_the_state_dict_of_torchvision():
    encoder = create_model("image_only", vocab_size=12, embed_dim=16).image_encoder
    # every 3x3 conv of the trunk: the last stage's at 64 px, the one before at 32 px
    head = [m for m in encoder.backbone.head.modules() if isinstance(m, SmallMapConv2d)]
    assert len(head) == 4  # layer4: the stride-2 conv and the three that follow
    assert sum(isinstance(m, SmallMapConv2d) for m in encoder.modules()) == 16
    plain = as_plain_convs(encoder)
    assert list(encoder.state_dict()) == list(plain.state_dict())
    encoder.load_state_dict(plain.state_dict())  # strict: same keys, same shapes
    assert use_small_map_convs(encoder) == 0  # already replaced: nothing fits twice


def as_plain_convs(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose SmallMapConv2d layers are plain nn.Conv2d again."""
    module = copy.deepcopy(module)
    assert use_plain_convs(module) > 0
    return module


def test_a_64px_resnet_trains_to_the_weights_plain_convolutions_reach():
    # float64: through batch norm a loss's float32 gradients cancel to ~1 % noise in
    # any two summation orders, so only float64 tells an exact rewrite from a wrong one
    torch.manual_seed(0)
    per_tap = per_tap_encoder().double()
    per_tap = per_tap.to(memory_format=torch.channels_last)
    plain = as_plain_convs(per_tap)
    images = torch.randn(3, 8, 3, 64, 64, dtype=torch.float64)
    for model in (per_tap, plain):
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        for batch in images:
            feature, feature_map = model(batch.to(memory_format=torch.channels_last))
            assert feature_map.shape[-2:] == (2, 2)
            optimizer.zero_grad()
            feature.square().mean().backward()
            optimizer.step()
    per_tap_grad = per_tap.backbone.head[1].conv2.weight.grad
    assert per_tap_grad is not None and per_tap_grad.abs().sum() > 0
    for (name, a), (_, b) in zip(per_tap.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)


def test_the_swap_draws_no_random_numbers():
    """A seeded model initialises every parameter as it did before the swap existed."""
    torch.manual_seed(0)
    per_tap_encoder()
    after_encoder = torch.rand(3)
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    nn.Linear(net.fc.in_features, 16)
    torch.testing.assert_close(torch.rand(3), after_encoder)


def ops(out: torch.Tensor) -> set[str]:
    """Names of the autograd ops that made ``out`` and of those one step before it (a
    contiguous input's per-tap output is copied out of channels_last)."""
    fn = out.grad_fn
    return {type(fn).__name__} | {type(f).__name__ for f, _ in fn.next_functions if f}


@pytest.mark.parametrize("name,composer_convs", [("tirg_lastconv", 4), ("film", 1)])
def test_composer_convs_on_the_last_map_train_as_plain_convolutions_do(name, composer_convs):
    """create_model swaps the composers' biased 3x3 convs on the 2x2 map too; in float64
    one training step moves every parameter as nn.Conv2d's would."""
    torch.manual_seed(0)
    model = create_model(name, vocab_size=12, embed_dim=16, word_dim=8, text_hidden_dim=8)
    in_trunk = sum(isinstance(m, SmallMapConv2d) for m in model.image_encoder.modules())
    swapped = [m for m in model.modules() if isinstance(m, SmallMapConv2d)]
    assert len(swapped) - in_trunk == composer_convs
    assert all(m.bias is not None for m in swapped[in_trunk:])
    per_tap = model.double().to(memory_format=torch.channels_last).train()
    plain = as_plain_convs(per_tap)
    gen = torch.Generator().manual_seed(1)
    refs, targets = torch.randn(2, 6, 3, 64, 64, dtype=torch.float64, generator=gen)
    tokens = torch.randint(2, 12, (6, 4), generator=gen)
    lengths = torch.tensor([4, 3, 2, 4, 1, 4])
    paths: list[set[str]] = []
    swapped[in_trunk].register_forward_hook(lambda module, args, out: paths.append(ops(out)))
    for net in (per_tap, plain):
        torch.manual_seed(2)  # the same dropout masks
        out = net(refs, tokens, lengths, targets)
        (out["query"] @ out["target"].t()).diagonal().sum().backward()
    assert len(paths) == 1 and "_PerTapConvBackward" in paths[0]  # the composer's conv did
    gated = [p.grad for m in swapped[in_trunk:] for p in m.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in gated)
    for (key, a), (_, b) in zip(per_tap.named_parameters(), plain.named_parameters()):
        if a.grad is not None or b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12, msg=key)
