"""DeepLabv3+ / ResNet / CPSModel / pretrained-weight loading (issue 3).

Fast: forward passes use ResNet-18 and small odd inputs; ResNet-50/101 are
only built (parameter counts, depth checks), never run.
"""
import logging
import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from cps_fast.models import (
    CPSModel,
    DeepLabV3Plus,
    PretrainedWeightsError,
    ResNet,
    convert_reference_checkpoint,
    convert_sync_batchnorm,
    deeplabv3plus,
    detect_layout,
    load_backbone_weights,
    param_groups,
)

CL = torch.channels_last


def _randomized(module: nn.Module, seed: int) -> nn.Module:
    """Every tensor of the state dict (weights, BN statistics) set to distinct random values
    that keep activations finite."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            else:
                t.fill_(int(torch.randint(1, 100, (1,), generator=g)))
    return module


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- architecture


@pytest.mark.parametrize("output_stride", [16, 8])
@pytest.mark.parametrize("train", [True, False])
def test_output_matches_input_size_odd(output_stride, train):
    torch.manual_seed(0)
    model = deeplabv3plus("resnet18", num_classes=19, output_stride=output_stride).train(train)
    x = torch.randn(2, 3, 65, 97)
    with torch.no_grad():
        y = model(x)
        low = model(x, return_low=True)
    assert y.shape == (2, 19, 65, 97)
    # layer1 size: two ceil-halvings (stem conv stride 2, max-pool stride 2)
    assert low.shape == (2, 19, 17, 25)
    assert torch.isfinite(y).all()


def test_return_low_is_logits_before_upsampling():
    torch.manual_seed(0)
    model = deeplabv3plus("resnet18", num_classes=5).eval()
    x = torch.randn(2, 3, 33, 47)
    with torch.no_grad():
        full = model(x)
        low = model(x, return_low=True)
        ref = nn.functional.interpolate(low, size=(33, 47), mode="bilinear", align_corners=True)
    torch.testing.assert_close(full, ref)
    no_up = deeplabv3plus("resnet18", num_classes=5, upsample=False, seed=3).eval()
    with torch.no_grad():
        assert no_up(x).shape == (2, 5, 9, 12)
        assert no_up(x, return_low=False).shape == (2, 5, 33, 47)


@pytest.mark.parametrize("output_stride,strides", [(16, (4, 8, 16, 16)), (8, (4, 8, 8, 8))])
def test_feature_sizes_and_dilations(output_stride, strides):
    model = deeplabv3plus("resnet18", output_stride=output_stride).eval()
    h, w = 64, 96
    with torch.no_grad():
        feats = model.backbone(torch.randn(2, 3, h, w))
    for f, s in zip(feats, strides):
        assert tuple(f.shape[-2:]) == (h // s, w // s)
    l4 = [blk.conv1.dilation[0] for blk in model.backbone.layer4]
    if output_stride == 16:
        assert l4 == [2, 4]  # reference _nostride_dilate: 2, 4, 8 over the blocks (R18 has two)
        assert model.head.aspp.rates == (6, 12, 18)
        assert all(blk.conv1.dilation == (1, 1) for blk in model.backbone.layer3)
    else:
        assert l4 == [4, 8]
        assert model.head.aspp.rates == (12, 24, 36)
        assert all(blk.conv1.dilation == (2, 2) for blk in model.backbone.layer3)
    assert model.backbone.layer4[0].conv1.stride == (1, 1)
    assert model.backbone.layer4[0].downsample[0].stride == (1, 1)


def test_r50_dilation_follows_reference_multigrid():
    body = ResNet(50, output_stride=16)
    assert [blk.conv2.dilation[0] for blk in body.layer4] == [2, 4, 8]
    assert [blk.conv2.stride[0] for blk in body.layer4] == [1, 1, 1]
    # the reference v1c stem with stem_width=64: 3->64 (s2), 64->64, 64->128, then bn1(128)
    stem = [m for m in body.conv1 if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in stem] == [(3, 64, 2), (64, 64, 1), (64, 128, 1)]
    assert body.bn1.num_features == 128 and body.layer1[0].conv1.in_channels == 128


@pytest.mark.parametrize("backbone,expected", [("resnet50", 40e6), ("resnet101", 59e6)])
def test_parameter_counts_match_reference(backbone, expected):
    model = deeplabv3plus(backbone, num_classes=21)
    n = _n_params(model)
    assert abs(n - expected) / expected < 0.05, f"{backbone}: {n} parameters, expected about {expected}"


def test_head_structure_and_init():
    model = deeplabv3plus("resnet50", num_classes=21)
    aspp = model.head.aspp
    assert [c.kernel_size for c in aspp.map_convs] == [(1, 1), (3, 3), (3, 3), (3, 3)]
    assert [c.dilation[0] for c in aspp.map_convs[1:]] == [6, 12, 18]
    assert aspp.map_convs[0].in_channels == 2048 and aspp.map_bn.num_features == 1024
    assert aspp.red_conv.out_channels == 256 and aspp.pool_red_conv.out_channels == 256
    assert isinstance(aspp.leak_relu, nn.LeakyReLU)
    assert model.head.reduce[0].in_channels == 256 and model.head.reduce[0].out_channels == 48
    assert model.head.last_conv[0].in_channels == 304
    assert model.classifier.out_channels == 21 and model.classifier.bias is not None
    for m in list(model.head.modules()):
        if isinstance(m, nn.BatchNorm2d):
            assert m.eps == 1e-5 and m.momentum == 0.1
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    # kaiming_normal_ fan_in: std = sqrt(2 / fan_in)
    w = model.head.last_conv[0].weight
    assert abs(w.std().item() - math.sqrt(2.0 / (304 * 9))) / math.sqrt(2.0 / (304 * 9)) < 0.05
    # reference module names, so a reference branch state dict maps 1:1
    keys = set(model.state_dict())
    for k in ["backbone.conv1.0.weight", "backbone.conv1.6.weight", "backbone.bn1.running_mean",
              "head.aspp.map_convs.3.weight", "head.aspp.global_pooling_bn.weight", "head.aspp.red_bn.bias",
              "head.reduce.1.weight", "head.last_conv.4.weight", "classifier.bias"]:
        assert k in keys, k


def test_seed_is_deterministic_and_leaves_global_rng():
    state = torch.random.get_rng_state()
    a = deeplabv3plus("resnet18", seed=7)
    b = deeplabv3plus("resnet18", seed=7)
    c = deeplabv3plus("resnet18", seed=8)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.head.last_conv[0].weight, b.head.last_conv[0].weight)
    assert not torch.equal(a.head.last_conv[0].weight, c.head.last_conv[0].weight)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="backbone='vgg16'"):
        deeplabv3plus("vgg16")
    with pytest.raises(ValueError, match="output_stride=32"):
        deeplabv3plus("resnet18", output_stride=32)
    with pytest.raises(ValueError, match=r"expected \(N, 3, H, W\)"):
        deeplabv3plus("resnet18")(torch.randn(1, 1, 32, 32))


# ----------------------------------------------------------------------------- channels_last and AMP


class _LayoutSpy(TorchDispatchMode):
    """Records every op that returns a 4-D tensor contiguous only in NCHW."""

    def __init__(self):
        super().__init__()
        self.nchw = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dim() == 4 and t.is_contiguous() \
                    and not t.is_contiguous(memory_format=CL):
                self.nchw.append(f"{func} -> {tuple(t.shape)}")
        return out


@pytest.mark.parametrize("amp", [False, True])
def test_channels_last_propagates_without_nchw_copies(amp):
    torch.manual_seed(0)
    model = deeplabv3plus("resnet18", num_classes=21).to(memory_format=CL)
    x = torch.randn(2, 3, 65, 97).contiguous(memory_format=CL)
    spy = _LayoutSpy()
    with spy:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            y = model(x)
            low = model(x, return_low=True)
        y.backward(torch.randn_like(y))
    assert y.is_contiguous(memory_format=CL) and not y.is_contiguous()
    assert low.is_contiguous(memory_format=CL)
    assert spy.nchw == [], f"ops produced NCHW tensors: {spy.nchw[:5]}"
    assert model.head.last_conv[0].weight.grad.is_contiguous(memory_format=CL)


def test_bf16_autocast_forward_backward_finite():
    torch.manual_seed(0)
    model = deeplabv3plus("resnet18", num_classes=21).to(memory_format=CL)
    x = torch.randn(2, 3, 49, 63).contiguous(memory_format=CL)
    target = torch.randint(0, 21, (2, 49, 63))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
        loss = nn.functional.cross_entropy(y.float(), target)
    assert y.dtype == torch.bfloat16
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


# ----------------------------------------------------------------------------- pretrained weights


def _assert_backbone_equals(backbone, source):
    got, want = backbone.state_dict(), source.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def _layout_case(kind):
    """(source backbone, file object, model kwargs) for one published layout."""
    if kind == "torchvision":
        src = _randomized(ResNet(18, deep_stem=False), 1)
        obj = dict(src.state_dict())
        obj["fc.weight"], obj["fc.bias"] = torch.randn(1000, 512), torch.randn(1000)
        return src, obj, dict(deep_stem=False)
    if kind == "timm-resnet18d":  # deep stem of width 32 + average-pool shortcuts, timm names
        src = _randomized(ResNet(18, stem_width=32, avg_down=True), 2)
        obj = dict(src.state_dict())
        obj["fc.weight"], obj["fc.bias"] = torch.randn(1000, 512), torch.randn(1000)
        return src, obj, dict(stem_width=32, avg_down=True)
    if kind == "v1c-reference":  # the reference's resnet*_v1c.pth saved from a DDP module
        src = _randomized(ResNet(18, stem_width=64), 3)
        obj = {"state_dict": {"module." + k: v for k, v in src.state_dict().items()}, "epoch": 120}
        return src, obj, dict()
    if kind == "mmcv-v1c":  # mmseg checkpoint: backbone.stem.N, decode_head.* unexpected
        src = _randomized(ResNet(18, stem_width=32), 4)
        sd = {}
        for k, v in src.state_dict().items():
            for old, new in [("conv1.0.", "stem.0."), ("conv1.1.", "stem.1."), ("conv1.3.", "stem.3."),
                             ("conv1.4.", "stem.4."), ("conv1.6.", "stem.6."), ("bn1.", "stem.7.")]:
                if k.startswith(old):
                    k = new + k[len(old):]
                    break
            sd["backbone." + k] = v
        sd["decode_head.conv_seg.weight"] = torch.randn(21, 512, 1, 1)
        return src, {"meta": {"epoch": 1}, "state_dict": sd}, dict(stem_width=32)
    if kind == "model-wrapped":  # a whole DeepLabV3Plus checkpoint under "model"
        src = _randomized(ResNet(18), 5)
        obj = {"model": {"module.backbone." + k: v for k, v in src.state_dict().items()}}
        return src, obj, dict()
    raise AssertionError(kind)


@pytest.mark.parametrize("kind,layout,unexpected", [
    ("torchvision", "torchvision", []),
    ("timm-resnet18d", "deep-stem-avg-down", []),
    ("v1c-reference", "deep-stem", []),
    ("mmcv-v1c", "mmcv-v1c", ["decode_head.conv_seg.weight"]),
    ("model-wrapped", "deep-stem", []),
])
def test_weight_layouts_land_in_place(tmp_path, kind, layout, unexpected):
    src, obj, kwargs = _layout_case(kind)
    path = tmp_path / f"{kind}.pth"
    torch.save(obj, path)
    model = deeplabv3plus("resnet18", pretrained=str(path), **kwargs)
    _assert_backbone_equals(model.backbone, src)
    result = load_backbone_weights(model.backbone, path)
    assert result.layout == layout
    assert result.missing_keys == [] and result.unexpected_keys == unexpected
    assert result.loaded == len(src.state_dict())


def test_missing_and_unexpected_keys_reported_once(tmp_path, caplog):
    src = _randomized(ResNet(18), 6)
    sd = dict(src.state_dict())
    del sd["layer2.1.bn2.weight"]
    del sd["layer1.0.bn1.num_batches_tracked"]  # old files lack it: not reported
    sd["layer9.extra"] = torch.zeros(3)
    path = tmp_path / "partial.pth"
    torch.save(sd, path)
    target = ResNet(18)
    with caplog.at_level(logging.WARNING, logger="cps_fast.models.weights"):
        result = load_backbone_weights(target, path)
    assert result.missing_keys == ["layer2.1.bn2.weight"]
    assert result.unexpected_keys == ["layer9.extra"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert str(path) in msg and "layer2.1.bn2.weight" in msg and "layer9.extra" in msg
    assert torch.equal(target.layer3[0].conv1.weight, src.layer3[0].conv1.weight)


class _Payload:
    def __reduce__(self):
        return (print, ("this would run on load",))


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "hook": _Payload()}, path)
    with pytest.raises(PretrainedWeightsError, match="evil.pth") as err:
        deeplabv3plus("resnet18", pretrained=str(path))
    assert "weights_only" in str(err.value)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(PretrainedWeightsError, match="does not exist"):
        deeplabv3plus("resnet18", pretrained=str(tmp_path / "nope.pth"))
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(PretrainedWeightsError, match="garbage.pth"):
        load_backbone_weights(ResNet(18), bad)


def test_depth_mismatch_refused(tmp_path):
    path = tmp_path / "r101.pth"
    torch.save(ResNet(101).state_dict(), path)
    with pytest.raises(PretrainedWeightsError, match=r"r101\.pth.*ResNet-101.*layer3 has 23.*ResNet-50"):
        load_backbone_weights(ResNet(50), path)
    path18 = tmp_path / "r18.pth"
    torch.save(ResNet(18).state_dict(), path18)
    with pytest.raises(PretrainedWeightsError, match="ResNet-18"):
        load_backbone_weights(ResNet(50), path18)


def test_stem_mismatches_refused(tmp_path):
    plain = tmp_path / "r18-7x7.pth"
    torch.save(ResNet(18, deep_stem=False).state_dict(), plain)
    with pytest.raises(PretrainedWeightsError, match=r"r18-7x7\.pth.*7x7 stem.*deep_stem=False"):
        load_backbone_weights(ResNet(18, deep_stem=True), plain)
    deep = tmp_path / "r18-deep.pth"
    torch.save(ResNet(18, stem_width=32).state_dict(), deep)
    with pytest.raises(PretrainedWeightsError, match=r"r18-deep\.pth.*deep_stem=True"):
        load_backbone_weights(ResNet(18, deep_stem=False), deep)
    with pytest.raises(PretrainedWeightsError, match=r"width 32.*stem_width=32"):
        load_backbone_weights(ResNet(18, stem_width=64), deep)
    with pytest.raises(PretrainedWeightsError, match="avg_down=False"):
        load_backbone_weights(ResNet(18, stem_width=32, avg_down=True), deep)


def test_detect_layout():
    assert detect_layout(ResNet(18, deep_stem=False).state_dict()) == "torchvision"
    assert detect_layout(ResNet(18).state_dict()) == "deep-stem"
    assert detect_layout(ResNet(18, avg_down=True).state_dict()) == "deep-stem-avg-down"
    assert detect_layout({"stem.0.weight": torch.zeros(1)}) == "mmcv-v1c"


# ----------------------------------------------------------------------------- CPSModel, groups, SyncBN


def test_cps_model_branches_share_pretrained_backbone(tmp_path):
    src = _randomized(ResNet(18), 9)
    path = tmp_path / "r18_v1c.pth"
    torch.save(src.state_dict(), path)
    model = CPSModel("resnet18", num_classes=7, pretrained=str(path), seeds=(11, 12))
    assert model.pretrained_result.layout == "deep-stem"
    _assert_backbone_equals(model.branch_a.backbone, src)
    _assert_backbone_equals(model.branch_b.backbone, src)
    assert not torch.equal(model.branch_a.head.last_conv[0].weight, model.branch_b.head.last_conv[0].weight)
    assert not torch.equal(model.branch_a.classifier.weight, model.branch_b.classifier.weight)
    keys = list(model.state_dict())
    assert all(k.startswith(("branch_a.", "branch_b.")) for k in keys)
    assert "branch_b.head.aspp.map_convs.0.weight" in keys

    x = torch.randn(2, 3, 33, 41)
    model.eval()
    with torch.no_grad():
        ya, yb = model(x, "a"), model(x, branch=1)
        assert torch.equal(model(x), ya)
        assert torch.equal(model(x, 0), ya) and torch.equal(model(x, "b"), yb)
        assert not torch.allclose(ya, yb)
        assert model(x, "b", return_low=True).shape == (2, 7, 9, 11)
    with pytest.raises(ValueError, match="branch='c'"):
        model(x, "c")


def test_cps_model_from_branches_and_reference_checkpoint():
    a, b = deeplabv3plus("resnet18", num_classes=3, seed=1), deeplabv3plus("resnet18", num_classes=3, seed=2)
    model = CPSModel.from_branches(a, b)
    assert model.branch_a is a and model.branch_b is b
    reference = {"module.branch1." + k: v for k, v in a.state_dict().items()}
    reference.update({"module.branch2." + k: v for k, v in b.state_dict().items()})
    fresh = CPSModel("resnet18", num_classes=3, seeds=(5, 6))
    fresh.load_state_dict(convert_reference_checkpoint(reference), strict=True)
    assert torch.equal(fresh.branch_b.classifier.weight, b.classifier.weight)
    with pytest.raises(ValueError, match="seeds"):
        CPSModel("resnet18", seeds=(1, 1))


@pytest.mark.parametrize("which", ["single", "cps"])
def test_param_groups_cover_every_parameter_once(which):
    model = deeplabv3plus("resnet18") if which == "single" else CPSModel("resnet18")
    groups = param_groups(model, weight_decay=1e-4)
    names = {g["name"] for g in groups}
    assert names == {"backbone.decay", "backbone.no_decay", "head.decay", "head.no_decay"}
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert set(ids) == {id(p) for p in model.parameters()}
    by_id = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        for p in g["params"]:
            name = by_id[id(p)]
            assert ("backbone." in name) == g["name"].startswith("backbone"), name
            if g["weight_decay"] > 0:
                assert p.dim() == 4 and name.endswith("weight"), name
            else:
                assert p.dim() == 1, name
    no_decay = {by_id[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert any(n.endswith("classifier.bias") for n in no_decay)
    assert any(n.endswith("head.aspp.map_bn.weight") for n in no_decay)
    torch.optim.SGD(groups, lr=0.01, momentum=0.9)  # usable as given


def test_convert_sync_batchnorm():
    model = _randomized(deeplabv3plus("resnet18", num_classes=4), 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    model = convert_sync_batchnorm(model)
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules()) == n_bn
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert isinstance(model, DeepLabV3Plus)
