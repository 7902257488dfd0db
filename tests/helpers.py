"""Helpers shared by the tests: the fused-loss suites, the one-line-error checks, the GPU tests.

Import with ``from helpers import ...`` (pytest puts tests/ on sys.path). A module marked
``pytestmark = pytest.mark.poison_outputs`` gets NaN-filled kernel outputs (tests/conftest.py).
"""
import contextlib
import itertools

import pytest
import torch
import torch.nn.functional as F


def make_logits(layout, N, C, H, W, dtype, device, scale=3.0):
    """Random logits: ``(N, C, H, W)`` NCHW or channels_last, or ``(N*H*W, C)`` rows for ``layout="rows"``."""
    if layout == "rows":
        x = torch.randn(N * H * W, C, device=device) * scale
    else:
        x = torch.randn(N, C, H, W, device=device) * scale
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last)
    return x.to(dtype)


def break_upsampled_near_ties_(x, size, align_corners=True, gap=5e-4, bump=0.125, tries=20):
    """Make the argmax of ``x``'s bilinear upsampling to ``size`` clear at every pixel, in place.

    A kernel interpolates in float32 and the reference in float64. Where a full-resolution
    pixel's top two classes lie within rounding of each other, the two can take different argmax
    pseudo labels, and that pixel's cross term and gradient jump by O(1 / pixels). With tens of
    thousands of random pixels this happens in a few percent of runs. The fix: where the float64
    top-2 gap is below ``gap``, raise the top class by 0.5 to 1.5 ``bump`` at the low-resolution
    pixels it is interpolated from, and again should a raise make another near-tie. The default
    gap leaves margin for align_corners=False, whose float32 source coordinates move a gap by up
    to 7.5e-5 at the GPU test's size. Works on views: a non-dense slice keeps its strides and
    writes through to its base. Returns ``x``.
    """
    for _ in range(tries):
        x64 = x.detach().double().requires_grad_()
        up = F.interpolate(x64, size=size, mode="bilinear", align_corners=align_corners)
        top2 = up.detach().topk(2, dim=1)
        near = (top2.values[:, 0] - top2.values[:, 1]) < gap
        if not bool(near.any()):
            return x
        sel = torch.zeros_like(up).scatter_(1, top2.indices[:, :1], 1.0) * near.unsqueeze(1)
        (weights,) = torch.autograd.grad((up * sel).sum(), x64)
        with torch.no_grad():  # random sizes: equal raises can cycle between two near-ties (5 draws in 3000)
            x.add_((weights > 0).to(x.dtype) * (bump * (0.5 + torch.rand(x.shape, device=x.device))).to(x.dtype))
    raise AssertionError(f"argmax near-ties remain after {tries} rounds in the upsampling of {tuple(x.shape)}")


def pairwise(*columns):
    """Cases (one value of each column) in which every pair of values of any two columns meets,
    without the full product: greedily, the case of the product that meets the most pairs not met
    yet, until none is left (15 cases for 5 x 3 x 3 values, the least possible)."""
    pairs = list(itertools.combinations(range(len(columns)), 2))
    todo = {(i, j, a, b) for i, j in pairs for a in columns[i] for b in columns[j]}
    cases = []
    while todo:
        best = max(itertools.product(*columns),
                   key=lambda c: sum((i, j, c[i], c[j]) in todo for i, j in pairs))
        todo -= {(i, j, best[i], best[j]) for i, j in pairs}
        cases.append(best)
    return cases


def make_labels(shape, C, ignore_frac, device="cpu", dtype=torch.int64, ignore_index=255):
    """Random labels in ``[0, C)`` with about ``ignore_frac`` of them set to ``ignore_index``."""
    y = torch.randint(0, C, shape, device=device)
    y[torch.rand(shape, device=device) < ignore_frac] = ignore_index
    return y.to(dtype)


def run(fn, a, b, *args, grad_scale=1.0, **kw):
    """(loss, sup, cps, grad_a, grad_b) of a two-branch loss ``fn`` on leaf copies of a and b."""
    a = a.detach().clone().requires_grad_()
    b = b.detach().clone().requires_grad_()
    loss, sup, cps = fn(a, b, *args, return_parts=True, **kw)
    (grad_scale * loss).backward()
    return loss.detach(), sup, cps, a.grad, b.grad


def assert_grads_close(named, floor):
    """Gradients against the float64 reference: ``named`` holds ``(name, grad, ref, lowp, logits)``;
    each grad has the logits' dtype, shape and strides, is finite, and is within twice the error
    PyTorch makes in the logits' dtype (``lowp``) plus ``floor``."""
    for name, g, r, lp, x in named:
        assert g.dtype == x.dtype and g.shape == x.shape, f"{name}: {g.dtype} {tuple(g.shape)}"
        assert g.stride() == x.stride(), f"{name} strides {g.stride()} != logits strides {x.stride()}"
        assert torch.isfinite(g).all(), f"{name} has non-finite values (an unwritten, poisoned element?)"
        err = (g.double() - r).abs().max().item()
        bound = 2 * (lp.double() - r).abs().max().item() + floor
        assert err <= bound, f"{name}: max error {err:.3g} > bound {bound:.3g} ({x.dtype})"


def mean_ce(x, y, ignore_index):
    """Cross entropy of ``(N, C, H, W)`` or ``(P, C)`` logits in their own dtype, mean over valid labels."""
    rows = x.movedim(1, -1).reshape(-1, x.shape[1]) if x.dim() == 4 else x
    y = y.reshape(-1).long()
    return F.cross_entropy(rows, y, ignore_index=ignore_index, reduction="sum") / (y != ignore_index).sum().clamp_min(1)


def assert_scalars_close(got, ref):
    """``(loss, sup, cps)`` are finite float32 scalars equal to the float64 reference's to float32 rounding
    (``sup`` and ``cps`` may be None where the code under test returns the loss only)."""
    for name, x, r in zip(("loss", "sup", "cps"), got[:3], ref[:3]):
        if x is None and name != "loss":
            continue
        assert x.dtype == torch.float32, f"{name} has dtype {x.dtype}"
        assert torch.isfinite(x), f"{name} is {x}"
        torch.testing.assert_close(x.double(), r, rtol=2e-5, atol=2e-5, msg=lambda m: f"{name}: {m}")


def user_error(capsys, argv, *culprits) -> str:
    """``cps-fast ARGV`` (``cps_fast.cli.main`` in process) exits with status 2 and one stderr line
    ``cps-fast: error: ...`` naming every culprit, without a traceback; returns that line."""
    from cps_fast.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert stopped.value.code == 2, (stopped.value.code, err)
    assert err.startswith("cps-fast: error: ") and "\n" not in err and "Traceback" not in err, err
    for c in culprits:
        assert str(c) in err, (c, err)
    return err


@contextlib.contextmanager
def host_syncs_raise(sync_first: bool = False):
    """Any host synchronisation through torch inside raises (torch's sync debug mode), restored
    however it ends. ``sync_first``: wait for the GPU on entry (a test of one phase); without it
    the host may stay ahead of the GPU, as the training loop's must."""
    if sync_first:
        torch.cuda.synchronize()
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(old)
