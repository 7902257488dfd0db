"""OHEM cross-entropy (the Cityscapes presets' supervised loss), per image, against the reference."""
import functools
import math

import pytest
import torch
import torch.nn.functional as F

import cps_fast.train.step as step_mod
from cps_fast.train import ohem_cross_entropy
from cps_fast.train.step import kth_smallest

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _ohem_reference(pred, target, thresh, min_kept, ignore=255):
    """The reference's ProbOhemCrossEntropy2d, with its host-side branches (pooled over its batch)."""
    b, c, h, w = pred.shape
    target = target.reshape(-1).long().clone()
    valid = target != ignore
    target = target * valid
    num_valid = int(valid.sum())
    prob = F.softmax(pred, dim=1).transpose(0, 1).reshape(c, -1)
    if min_kept > num_valid:
        pass
    elif num_valid > 0:
        prob = prob.masked_fill(~valid, 1)
        mask_prob = prob[target, torch.arange(len(target))]
        threshold = thresh
        if min_kept > 0:
            index = mask_prob.argsort()
            threshold_index = index[min(len(index), min_kept) - 1]
            if mask_prob[threshold_index] > thresh:
                threshold = mask_prob[threshold_index]
        kept = mask_prob.le(threshold)
        target = target * kept
        valid = valid & kept
    target = target.masked_fill(~valid, ignore)
    return F.cross_entropy(pred, target.view(b, h, w), ignore_index=ignore)


def _ohem_per_image_reference(pred, target, thresh, min_kept):
    """The reference as it ran (one labeled image per GPU, DDP averaging): the reference on each image
    alone, then the mean; an image that keeps no pixel (the reference's NaN) is left out, none gives 0."""
    losses = [_ohem_reference(pred[n:n + 1], target[n:n + 1], thresh, min_kept) for n in range(pred.shape[0])]
    kept = [x for x in losses if not torch.isnan(x)]
    return sum(kept) / len(kept) if kept else pred.sum() * 0


def _true_class_prob(pred, target):
    return torch.softmax(pred.double(), 1).gather(1, torch.where(target == 255, 0, target).unsqueeze(1))[:, 0]


def _logits(kind, n, g, C=19, H=17, W=23):
    """(n, C, H, W) float64 logits and labels with 20 % ignored. "random": scale 3 (thresh decides);
    "confident": the true class ahead by 2..8 on 90 % of the pixels (the k-th value decides);
    "soft": scale 0.3 (every probability under thresh); "ignored": every label 255."""
    pred = torch.randn(n, C, H, W, dtype=torch.float64, generator=g) * {"random": 3.0, "soft": 0.3}.get(kind, 1.0)
    target = torch.randint(0, C, (n, H, W), generator=g)
    if kind == "confident":
        boost = (2 + 6 * torch.rand(target.shape, generator=g, dtype=torch.float64))
        boost = boost * (torch.rand(target.shape, generator=g) < 0.9)
        pred.scatter_add_(1, target.unsqueeze(1), boost.unsqueeze(1))
    target[torch.rand(target.shape, generator=g) < 0.2] = 255
    if kind == "ignored":
        target.fill_(255)
    return pred, target


BATCHES = {"random": ["random", "random"], "confident": ["confident", "confident"],
           "mixed": ["confident", "ignored", "soft"]}  # an image per kind, one of them all ignored


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["kthvalue", "topk"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("min_kept", [10, 300, 5000])
@pytest.mark.parametrize("batch", list(BATCHES))
def test_ohem_matches_per_image_reference(min_kept, batch, dtype, layout, method, device, monkeypatch):
    """Value and gradient against the reference run on each image alone, then averaged (its host-side
    branches: min_kept 5000 > an image's valid pixels keeps them all), both k-th value methods, both
    memory formats; bf16 logits against the reference on their float32 copies. On "confident" images
    with min_kept 300 the per-image min_kept-th probability is above thresh and sets the threshold
    (kept: exactly the pixels at or below it)."""
    monkeypatch.setattr(step_mod, "kth_smallest", functools.partial(kth_smallest, method=method))
    g = torch.Generator().manual_seed(1000 * min_kept + list(BATCHES).index(batch))
    parts = [_logits(kind, 1, g) for kind in BATCHES[batch]]
    pred, target = torch.cat([p for p, _ in parts]), torch.cat([t for _, t in parts])
    pred, target = pred.to(device, dtype), target.to(device)
    if layout == "channels_last":
        pred = pred.contiguous(memory_format=torch.channels_last)
    pred.requires_grad_()
    got = ohem_cross_entropy(pred, target, thresh=0.7, min_kept=min_kept)
    got.backward()
    ref_in = pred.detach().to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_()
    want = _ohem_per_image_reference(ref_in, target, 0.7, min_kept)
    want.backward()
    if min_kept == 300:  # the case the k-th value decides, on every confident image
        for n, kind in enumerate(BATCHES[batch]):
            if kind == "confident":
                p = _true_class_prob(ref_in[n:n + 1].detach(), target[n:n + 1])[target[n:n + 1] != 255]
                assert p.numel() >= min_kept and float(torch.sort(p).values[min_kept - 1]) > 0.7
    assert torch.isfinite(got)
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-6)
    assert pred.grad.dtype == dtype and pred.grad.stride() == pred.stride()
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float64 else dict(rtol=1.6e-2, atol=1e-5)
    torch.testing.assert_close(pred.grad, ref_in.grad.to(dtype), **tol)


def test_ohem_per_image_is_not_pooled():
    """The issue's late-training batch: six 48x64 images, three of them 99 % confident. Pooling
    ``min_kept * 6`` over the batch fills the floor from the hard images, so the easy ones lose
    theirs; per image each keeps at least min_kept pixels, and the batch loss is the mean of the
    images' losses, each of which is the reference on that image alone (the old pooled rule on a
    batch of one)."""
    g = torch.Generator().manual_seed(6)
    C, min_kept = 19, 240  # 7.8 % of 3072 pixels, as 50000 of an 800x800 crop
    pred = torch.randn(6, C, 48, 64, dtype=torch.float64, generator=g) * 2
    target = torch.randint(0, C, (6, 48, 64), generator=g)
    sure = torch.rand(3, 48, 64, generator=g) < 0.99
    pred[:3].scatter_add_(1, target[:3].unsqueeze(1), 12.0 * sure.unsqueeze(1).double())
    target[torch.rand(target.shape, generator=g) < 0.1] = 255
    pred.requires_grad_()
    got = ohem_cross_entropy(pred, target, thresh=0.7, min_kept=min_kept)
    got.backward()
    per_image = _ohem_per_image_reference(pred.detach(), target, 0.7, min_kept)
    pooled = _ohem_reference(pred.detach(), target, 0.7, min_kept * 6)
    torch.testing.assert_close(got.detach().double(), per_image, rtol=1e-5, atol=1e-6)
    got = got.detach()
    assert float(pooled) > 1.5 * float(got), (float(pooled), float(got))
    kept = (pred.grad != 0).any(1).sum((1, 2))  # pixels that carry a gradient, per image
    assert (kept >= min_kept).all(), kept
    ones = [ohem_cross_entropy(pred[n:n + 1].detach(), target[n:n + 1], thresh=0.7, min_kept=min_kept)
            for n in range(6)]
    for n, one in enumerate(ones):  # a batch of one: the pooled reference (what the old rule computed)
        want = _ohem_reference(pred[n:n + 1].detach(), target[n:n + 1], 0.7, min_kept)
        torch.testing.assert_close(one.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, sum(ones) / 6)


@pytest.mark.parametrize("method", ["kthvalue", "topk"])
def test_ohem_images_without_kept_pixels(method, monkeypatch):
    """An image that keeps no pixel contributes nothing: all labels ignored, or min_kept 0 (no floor)
    on an image whose every probability is above thresh. The mean is over the other images; a batch
    with none gives 0 and zero gradients, never NaN."""
    monkeypatch.setattr(step_mod, "kth_smallest", functools.partial(kth_smallest, method=method))
    g = torch.Generator().manual_seed(7)
    pred, target = _logits("random", 3, g)
    target[1] = 255
    pred.requires_grad_()
    got = ohem_cross_entropy(pred, target, min_kept=50)
    got.backward()
    want = sum(ohem_cross_entropy(pred[n:n + 1].detach(), target[n:n + 1], min_kept=50) for n in (0, 2)) / 2
    torch.testing.assert_close(got.detach(), want)
    assert pred.grad[1].abs().max() == 0 and pred.grad[0].abs().max() > 0

    sure = torch.zeros(2, 5, 8, 9, dtype=torch.float64)
    label = torch.randint(0, 5, (2, 8, 9), generator=g)
    sure.scatter_(1, label.unsqueeze(1), 10.0)  # p(true) > 0.99 everywhere
    sure[1] = torch.randn(5, 8, 9, dtype=torch.float64, generator=g) * 0.1  # every p(true) about 0.2
    loss0 = ohem_cross_entropy(sure, label, min_kept=0)
    torch.testing.assert_close(loss0.double(), _ohem_reference(sure[1:], label[1:], 0.7, 0), rtol=1e-5, atol=1e-6)
    assert torch.isnan(_ohem_reference(sure[:1], label[:1], 0.7, 0))  # the reference's NaN, left out

    for x, t, k in ((pred.detach(), torch.full_like(target, 255), 50), (sure[:1], label[:1], 0)):  # nothing kept
        x = x.clone().requires_grad_()
        none = ohem_cross_entropy(x, t, min_kept=k)
        none.backward()
        assert none.item() == 0.0 and not math.isnan(none.item()) and x.grad.abs().max() == 0


def test_ohem_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"ohem_cross_entropy: logits \(4, 19\).*\(N, C, H, W\)"):
        ohem_cross_entropy(torch.randn(4, 19), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"target \(2, 8, 8\)"):
        ohem_cross_entropy(torch.randn(2, 19, 8, 9), torch.zeros(2, 8, 8, dtype=torch.long))


@pytest.mark.parametrize("device", DEVICES)
def test_kth_smallest_methods_agree(device):
    """Along the last dimension, with ties: 1-D (a 0-dim result) and batched rows (one per image)."""
    g = torch.Generator().manual_seed(8)
    x = torch.rand(100_003, generator=g).to(device)
    x[::7] = 0.5  # ties
    rows = torch.rand(3, 20_001, generator=g).to(device)
    rows[1, ::3] = 0.25
    rows[2] = 1.0  # a row of invalid pixels only
    for k in (1, 2, 500, 14_286, 50_000, 100_003):
        want = torch.sort(x.cpu()).values[k - 1]
        for method in ("auto", "kthvalue", "topk"):
            got = kth_smallest(x, k, method=method)
            assert got.dim() == 0 and got.item() == want.item(), (k, method)
            if k <= rows.shape[1]:
                got = kth_smallest(rows, k, method=method)
                assert torch.equal(got.cpu(), torch.sort(rows.cpu(), dim=1).values[:, k - 1]), (k, method)
    with pytest.raises(ValueError, match="method='sort'"):
        kth_smallest(x, 1, method="sort")
