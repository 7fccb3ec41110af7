"""Tests of sparsam.models: registry, published parameter counts, shapes, width, init, vmap."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from sparsam.models import create_model, list_models


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_model(name: str, **kw) -> nn.Module:
    # Full-width models are built on the meta device: no memory, no init cost, exact counts.
    with torch.device("meta"):
        return create_model(name, **kw)


# ---------------------------------------------------------------- registry


def test_list_models_names():
    assert list_models() == ["resnet18", "resnet34", "resnet50", "smallcnn", "vgg16_bn", "wrn16-4", "wrn28-10"]


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError) as e:
        create_model("resnet19")
    msg = str(e.value)
    assert "'resnet19'" in msg
    for name in list_models():
        assert name in msg


@pytest.mark.parametrize("name", ["wrn27-10", "wrn4-1", "wrn-28-10", "wrn28_10"])
def test_bad_wrn_names_rejected(name):
    with pytest.raises(ValueError, match=repr(name)):
        create_model(name)


def test_wrn_depth_error_names_depth():
    with pytest.raises(ValueError, match="depth 27"):
        create_model("wrn27-2")
    with pytest.raises(ValueError, match="k 0"):
        create_model("wrn28-0")


def test_generic_wrn_name_and_case():
    m = meta_model("WRN10-2")
    # depth 10 = one block per stage, widths 16, 32, 64, 128.
    assert [len(m.block1), len(m.block2), len(m.block3)] == [1, 1, 1]
    assert m.fc.in_features == 128


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "8"])
@pytest.mark.parametrize("arg", ["width", "num_classes", "in_channels"])
def test_bad_sizes_rejected_with_value(arg, bad):
    with pytest.raises((TypeError, ValueError), match=arg):
        create_model("resnet18", **{arg: bad})


def test_unknown_keyword_is_type_error():
    with pytest.raises(TypeError):
        create_model("resnet18", dropout=0.3)
    m = create_model("wrn10-1", width=2, dropout=0.3)
    assert all(b.dropout == 0.3 for b in m.block1)


# ---------------------------------------------------------------- parameter counts (published figures)


@pytest.mark.parametrize(
    "name, kw, expected",
    [
        ("resnet18", {}, 11_173_962),  # CIFAR ResNet-18, "11.17M"
        ("resnet34", {}, 21_282_122),  # CIFAR ResNet-34, "21.3M"
        ("wrn28-10", {}, 36_479_194),  # WRN-28-10, "36.5M"
        ("wrn16-4", {}, 2_748_890),  # WRN-16-4, "2.7M"
        ("vgg16_bn", {}, 14_724_042),  # VGG-16-BN CIFAR, "~15M" (no redundant conv biases)
        ("resnet50", {"num_classes": 1000}, 25_557_032),  # ImageNet ResNet-50
        ("resnet18", {"num_classes": 100}, 11_220_132),  # CIFAR-100 head: +46,170
        ("smallcnn", {"in_channels": 1}, 6_138),
    ],
)
def test_parameter_counts(name, kw, expected):
    assert n_params(meta_model(name, **kw)) == expected


def test_wrn28_10_matches_closed_form():
    # Count WRN-d-k by hand: stem conv, per stage n blocks of two 3x3 convs and two BNs, one 1x1
    # projection per stage whose width changes, final BN and linear layer.
    d, k, base, classes = 28, 10, 16, 10
    n = (d - 4) // 6
    widths = [base, base * k, 2 * base * k, 4 * base * k]
    total = 3 * 9 * base
    for s in range(3):
        cin, cout = widths[s], widths[s + 1]
        for j in range(n):
            i = cin if j == 0 else cout
            total += 2 * i + 9 * i * cout + 2 * cout + 9 * cout * cout
        total += cin * cout  # projection shortcut (every stage changes width here)
    total += 2 * widths[-1] + widths[-1] * classes + classes
    assert n_params(meta_model("wrn28-10")) == total


# ---------------------------------------------------------------- width


def test_width_scales_channels():
    r = meta_model("resnet18", width=16)
    assert r.conv1.out_channels == 16 and r.fc.in_features == 128
    # Every conv scales by width^2 except the stem (in_channels * width): ~1/16 of the parameters.
    assert abs(n_params(r) / n_params(meta_model("resnet18")) - 1 / 16) < 0.002
    w = meta_model("wrn28-10", width=4)
    assert w.conv1.out_channels == 4 and w.fc.in_features == 4 * 4 * 10
    v = meta_model("vgg16_bn", width=8)
    assert v.features[0].out_channels == 8 and v.classifier.in_features == 64
    r50 = meta_model("resnet50", width=16)
    assert r50.conv1.out_channels == 16 and r50.fc.in_features == 16 * 8 * 4
    s = meta_model("smallcnn", width=4)
    assert s.conv1.out_channels == 4 and s.conv2.out_channels == 8


# ---------------------------------------------------------------- forward shapes


SMALL = {"resnet18": 4, "resnet34": 4, "resnet50": 4, "vgg16_bn": 4, "smallcnn": 4, "wrn16-4": 2, "wrn28-10": 1}


@pytest.mark.parametrize("name", list_models())
def test_output_shapes(name):
    torch.manual_seed(0)
    m = create_model(name, width=SMALL[name], num_classes=7).eval()
    sizes = {"smallcnn": [8, 28], "resnet50": [64, 8]}.get(name, [32, 8])
    with torch.no_grad():
        for s in sizes:
            assert m(torch.randn(2, 3, s, s)).shape == (2, 7)
        gray = create_model(name, width=SMALL[name], in_channels=1, num_classes=3).eval()
        assert gray(torch.randn(2, 1, sizes[0], sizes[0])).shape == (2, 3)
        assert m(torch.randn(1, 3, 11, 13)).shape == (1, 7)  # odd, non-square sizes


@pytest.mark.parametrize("name", ["resnet18", "wrn16-4", "vgg16_bn", "resnet50"])
def test_channels_last_matches(name):
    torch.manual_seed(0)
    m = create_model(name, width=2).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = m(x)
        m_cl = m.to(memory_format=torch.channels_last)
        out = m_cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_train_mode_backward():
    torch.manual_seed(0)
    m = create_model("resnet18", width=4)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    F.cross_entropy(m(x), y).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


# ---------------------------------------------------------------- init and vmap


def test_init_conventions():
    torch.manual_seed(0)
    m = create_model("resnet18", width=32)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            assert torch.equal(mod.weight, torch.ones_like(mod.weight))
            assert torch.equal(mod.bias, torch.zeros_like(mod.bias))
        if isinstance(mod, nn.Linear):
            assert torch.equal(mod.bias, torch.zeros_like(mod.bias))
        if isinstance(mod, nn.ReLU):
            assert not mod.inplace
    w = m.layer4[1].conv2.weight  # 256 x 256 x 3 x 3: std sqrt(2 / fan_out) = sqrt(2 / (256 * 9))
    assert abs(w.std().item() / math.sqrt(2 / (256 * 9)) - 1) < 0.02
    assert abs(w.mean().item()) < 0.002


def test_vgg_has_no_inplace_relu():
    assert all(not mod.inplace for mod in meta_model("vgg16_bn").modules() if isinstance(mod, nn.ReLU))


def test_vmap_per_sample_grads_match_loop():
    # Per-sample gradients (used by the Fisher mask) through functional_call + vmap(grad(...)),
    # BatchNorm in eval mode; compared with one autograd call per sample.
    torch.manual_seed(0)
    model = create_model("resnet18", width=8).eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    x, y = torch.randn(3, 3, 16, 16), torch.tensor([1, 4, 9])

    def loss(p, xi, yi):
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(3):
        ref = torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), list(model.parameters()))
        for (name, _), g in zip(model.named_parameters(), ref):
            torch.testing.assert_close(per_sample[name][i], g, rtol=1e-4, atol=1e-6)
