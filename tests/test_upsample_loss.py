"""The upsample-fused CPS loss: what only it has, and its comparison with the float64 reference.

The contracts every fused loss keeps (every backend against the reference across class counts,
memory formats, fp32/fp16/bf16, ignored pixels, given pseudo labels and gradients; the module;
bad input) are tests/test_fused_ops.py's, through :func:`make_low` and
:func:`assert_close_to_reference` here. Here, against the reference with fresh random inputs and
outputs poisoned with NaN: odd sizes and scale factors 4 and 8 (and downsampling), 1-pixel edge
cases, both align_corners conventions, the Triton kernel's GPU block sizes, huge logits, and the
equality with F.interpolate + cps_loss; the output size arguments; backend selection. Triton runs
in its interpreter here, so shapes are small.
"""
import os

import pytest
import torch
import torch.nn.functional as F

import cps_fast
from cps_fast import backends, fused
from cps_fast import upsample_loss as up_mod
from cps_fast.reference import cps_loss_upsampled_reference
from cps_fast.upsample_loss import CPSLossUpsampled, cps_loss_upsampled
from helpers import assert_scalars_close, break_upsampled_near_ties_, make_labels, make_logits, mean_ce, run

pytestmark = pytest.mark.poison_outputs  # NaN-filled kernel outputs (tests/conftest.py)

DEVICE = "cpu"
BACKENDS = ["triton", "cpu", "torch"]


def need(backend, device=DEVICE, C=21):
    """Skip (saying why) when ``backend`` cannot run this op on ``device``."""
    reason = up_mod.why_unavailable(backend, device)
    if reason:
        pytest.skip(f"{backend} backend unavailable: {reason}")


def make_low(N, C, h, w, dtype=torch.float32, layout="nchw", device=DEVICE, scale=3.0, size=None, align_corners=True):
    """Random ``(N, C, h, w)`` low-resolution logits, NCHW or channels_last. With ``size``, their
    upsampling to it has no argmax near-tie (for comparisons of in-kernel pseudo labels with the
    float64 reference's; helpers.break_upsampled_near_ties_)."""
    x = make_logits(layout, N, C, h, w, dtype, device, scale)
    return x if size is None else break_upsampled_near_ties_(x, size, align_corners)


def lowp_reference(a, b, target, *, size, align_corners=True, **kw):
    """Interpolate + CPS loss in the logits' own dtype (no upcast): PyTorch's error at that precision."""
    up_a = F.interpolate(a, size=size, mode="bilinear", align_corners=align_corners)
    up_b = F.interpolate(b, size=size, mode="bilinear", align_corners=align_corners)
    ii = kw.get("ignore_index", 255)

    def ce(x, y):
        return mean_ce(x, y, ii)

    pa, pb = kw.get("pseudo_a"), kw.get("pseudo_b")
    pa = up_a.detach().argmax(1) if pa is None else pa
    pb = up_b.detach().argmax(1) if pb is None else pb
    sup = ce(up_a, target) + ce(up_b, target) if target is not None else up_a.new_zeros(())
    cps = ce(up_a, pb) + ce(up_b, pa)
    return sup + kw.get("cps_weight", 1.0) * cps, sup.detach(), cps.detach()


def assert_close_to_reference(got, a, b, target, grad_scale=1.0, backend=None, **kw):
    """Compare (loss, sup, cps, ga, gb) with the float64 reference on the same low-res values.

    Scalars: float32 rounding. Gradients: float32 inputs at float32 rounding (relative to the
    largest gradient); fp16/bf16 inputs within twice the error PyTorch makes doing interpolate +
    CE in that dtype, plus a floor of 1e-3 of the largest gradient (STYLE.md). Triton's
    interpreter casts float32 to bfloat16 by truncation where the GPU rounds to nearest, so
    for ``backend="triton"`` under the interpreter each bf16 element may be one more ulp off.
    """
    interp_trunc = (a.dtype == torch.bfloat16 and backend == "triton"
                    and os.environ.get("TRITON_INTERPRET") == "1")
    ref = run(cps_loss_upsampled_reference, a.double(), b.double(), target, grad_scale=grad_scale, **kw)
    assert_scalars_close(got, ref)
    gmax = max(float(ref[3].abs().max()), float(ref[4].abs().max()), 1e-12)
    if a.dtype == torch.float32:
        lowp, floor = ref, 1e-5 * gmax
    else:
        lowp, floor = run(lowp_reference, a, b, target, grad_scale=grad_scale, **kw), 1e-3 * gmax
    for name, g, r, lp, x in (("grad_a", got[3], ref[3], lowp[3], a), ("grad_b", got[4], ref[4], lowp[4], b)):
        assert g.dtype == x.dtype and g.shape == x.shape, f"{name}: {g.dtype} {tuple(g.shape)}"
        assert g.stride() == x.stride() or not fused.dense(x), f"{name} strides {g.stride()} != logits strides {x.stride()}"
        assert torch.isfinite(g).all(), f"{name} has non-finite values (an unwritten, poisoned element?)"
        extra = g.double().abs() * 2.0**-7 if interp_trunc else 0.0  # one bf16 ulp of the value
        err = ((g.double() - r).abs() - extra).max().item()
        bound = 2 * (lp.double() - r).abs().max().item() + floor
        assert err <= bound, f"{name}: max error {err:.3g} > bound {bound:.3g} ({x.dtype})"
    return ref


def reference_pseudo_labels(a, b, size, align_corners):
    """Argmax labels of the float64 interpolated logits (pseudo_a from a, pseudo_b from b)."""
    up = [F.interpolate(x.double(), size=size, mode="bilinear", align_corners=align_corners) for x in (a, b)]
    return up[0].argmax(1), up[1].argmax(1)


# (N, C, h, w) -> (H, W): odd sizes, scale ~4 and ~8, exact 4x/8x, edges, downsampling
SHAPES = [
    ((2, 21, 7, 9), (25, 35)),
    ((1, 19, 5, 6), (37, 41)),   # scale ~8
    ((2, 21, 8, 10), (32, 40)),  # exactly 4x (align_corners=False)
    ((1, 5, 4, 5), (25, 33)),    # exactly 8x with align_corners=True
    ((1, 3, 1, 6), (4, 17)),     # one low-res row
    ((2, 4, 6, 5), (1, 1)),      # output size 1
    ((1, 19, 9, 8), (4, 3)),     # downsampling
]


# the Triton interpreter's cases (seconds each): each shape once, every align_corners x layout pair met
TRITON_ALIGN_CORNERS = [True, False, False, True, True, False, False]


@pytest.mark.parametrize("backend,case,align_corners",
                         [(b, case, ac) for b in BACKENDS for case in range(len(SHAPES)) for ac in (True, False)
                          if b != "triton" or ac == TRITON_ALIGN_CORNERS[case]])
def test_sizes_and_align_corners(backend, case, align_corners):
    """fp32 logits at every size of SHAPES, both align_corners conventions (the layout alternates)."""
    need(backend)
    (N, C, h, w), size = SHAPES[case]
    layout = ("nchw", "channels_last")[(case + align_corners) % 2]
    a, b = (make_low(N, C, h, w, layout=layout, size=size, align_corners=align_corners) for _ in range(2))
    target = make_labels((N, *size), C, 0.2)
    kw = dict(size=size, cps_weight=1.5, align_corners=align_corners)
    got = run(cps_loss_upsampled, a, b, target, backend=backend, **kw)
    assert_close_to_reference(got, a, b, target, **kw)


@pytest.mark.parametrize("backend", ["triton"])
@pytest.mark.parametrize("config", [None, (8, 8, 32, 8, 1), (4, 8, 64, 2, 0), (8, 4, 32, 1, 1)],
                         ids=["heuristic", "8x8:32:8:1", "4x8:64:2:0", "8x4:32:1:1"])
@pytest.mark.parametrize("C", [21, 64])
def test_triton_with_the_gpu_block_sizes(backend, config, C, monkeypatch):
    """The interpreter normally walks 256 full-res pixels per step; the GPU sizes (forced through
    ``kernel_config``, which the interpreter's larger step does not override) run here too, in
    both class-axis orientations (AX = 0: a pixel per thread; AX = 1: lanes across classes) and
    with non-square owned blocks."""
    need(backend)
    from cps_fast.kernels import cps_upsample

    size = (19, 23)  # 9 x 10 low-res pixels: 2 x 2 blocks of 8 x 8 (or more, smaller), cut at both edges
    a = make_low(1, C, 9, 10, layout="channels_last", size=size)
    b = make_low(1, C, 9, 10, size=size)
    target = make_labels((1, *size), C, 0.2)
    kw = dict(size=size, cps_weight=1.5)
    if config is None:  # the heuristic's GPU configuration (without the interpreter's larger step)
        bh, bw, block_f, _, num_warps, ax = cps_upsample.block_config(C, interpret=False, dtype=a.dtype)
        config = (bh, bw, block_f, num_warps, ax)
    got = run(cps_loss_upsampled, a, b, target, backend=backend, kernel_config=cps_upsample.UpsampleConfig(*config),
              **kw)
    assert_close_to_reference(got, a, b, target, **kw)


def test_triton_refuses_wide_class_axis_clearly():
    need("triton")
    a = make_low(1, 300, 3, 4)
    with pytest.raises(backends.BackendUnavailable, match=r"'triton'.*C <= 256 classes, got C = 300"):
        cps_loss_upsampled(a, a, size=(9, 13), backend="triton", ignore_index=-1)
    from cps_fast.kernels import cps_upsample

    z = torch.zeros(3)
    with pytest.raises(ValueError, match="C = 300 classes exceeds"):
        cps_upsample.cps_upsample_fwd(a, a, None, None, None, z, None, None, 9, 13, 1.0, -1, True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_large_logits(backend, layout):
    """Logits far beyond exp's float32 range (|x| up to ~1000): finite, exact losses and gradients.
    The Triton kernel's steps end mid-block here, and its padding pixels gather real logits."""
    need(backend)
    a = make_low(2, 21, 5, 7, layout=layout, scale=300.0, size=(19, 26))
    b = make_low(2, 21, 5, 7, layout=layout, scale=300.0, size=(19, 26))
    target = make_labels((2, 19, 26), 21, 0.2)
    kw = dict(size=(19, 26), cps_weight=1.5)
    got = run(cps_loss_upsampled, a, b, target, backend=backend, **kw)
    assert_close_to_reference(got, a, b, target, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_equals_interpolate_then_cps_loss(backend):
    """The fused op equals F.interpolate + cps_fast.cps_loss (value and low-res gradients)."""
    need(backend)
    a, b = make_low(2, 21, 6, 7, size=(21, 25)), make_low(2, 21, 6, 7, size=(21, 25))
    target = make_labels((2, 21, 25), 21, 0.2)
    fused = run(cps_loss_upsampled, a, b, target, size=(21, 25), cps_weight=1.5, backend=backend)

    def unfused(x, y, t, return_parts):
        ux = F.interpolate(x, size=(21, 25), mode="bilinear", align_corners=True)
        uy = F.interpolate(y, size=(21, 25), mode="bilinear", align_corners=True)
        return cps_fast.cps_loss(ux, uy, t, cps_weight=1.5, return_parts=return_parts)

    plain = run(unfused, a, b, target)
    for name, x, y in zip(("loss", "sup", "cps", "grad_a", "grad_b"), fused, plain):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_module_takes_its_size_from_the_labels():
    """The module's output size: forward's size, else its own, else the labels' (the module's other
    options are tests/test_fused_ops.py's)."""
    a, b = (make_low(2, 5, 3, 4, size=(9, 13), align_corners=False) for _ in range(2))
    t = make_labels((2, 9, 13), 5, 0.1)
    mod = CPSLossUpsampled(cps_weight=1.5, align_corners=False)
    loss = mod(a, b, t)  # size taken from the labels
    ref = cps_loss_upsampled_reference(a.double(), b.double(), t, size=(9, 13), cps_weight=1.5, align_corners=False)
    torch.testing.assert_close(loss.double(), ref, rtol=2e-5, atol=2e-5)
    # the pseudo labels' size where no target is given; forward's size over the module's
    p = make_labels((2, 9, 13), 5, 0.1)
    torch.testing.assert_close(mod(a, b, pseudo_a=p).double(),
                               cps_loss_upsampled_reference(a.double(), b.double(), pseudo_a=p, size=(9, 13),
                                                            cps_weight=1.5, align_corners=False),
                               rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match=r"target has shape \(2, 9, 13\); expected full-resolution labels "
                                         r"\(N, H, W\) = \(2, 11, 13\)"):
        CPSLossUpsampled(size=(9, 13))(a, b, t, size=(11, 13))
    with pytest.raises(ValueError, match="no output size"):
        CPSLossUpsampled()(a, b)


def _select(device_type, C):
    return fused.select_backend("cps_loss_upsampled", device_type, None, C, 2, "cps_loss_upsampled")


def test_backend_selection(monkeypatch, caplog):
    monkeypatch.delenv("CPS_FAST_BACKEND", raising=False)
    monkeypatch.setattr(backends, "_logged", set())
    has_cpu = backends.extension() is not None and hasattr(backends.extension(), "cps_upsample_forward")
    with caplog.at_level("INFO", logger="cps_fast"):
        assert _select("cpu", 21) == ("cpu" if has_cpu else "torch")
    if has_cpu and hasattr(backends.extension(), "upsample_simd"):  # the log names the column paths in use
        simd = backends.extension().upsample_simd()
        assert f"the cpu ({simd} column paths) backend" in caplog.text, caplog.text
    a = make_low(1, 3, 2, 2)
    with pytest.raises(backends.BackendUnavailable, match="cps_loss_upsampled has no CUDA C\\+\\+ kernel"):
        cps_loss_upsampled(a, a, size=(4, 4), backend="cuda")
    if not has_cpu:
        with pytest.raises(backends.BackendUnavailable, match="no cps_upsample_forward"):
            cps_loss_upsampled(a, a, size=(4, 4), backend="cpu")
    monkeypatch.setenv("CPS_FAST_BACKEND", "cuda")
    with pytest.raises(backends.BackendUnavailable, match=r"\$CPS_FAST_BACKEND"):
        cps_loss_upsampled(a, a, size=(4, 4))
    if backends.triton_kernels_import_error() is None:
        monkeypatch.delenv("CPS_FAST_BACKEND")
        # on CUDA tensors the automatic choice is triton, and torch beyond the kernel's class tile
        assert _select("cuda", 21) == "triton"
        assert _select("cuda", 300) == "torch"


def _bad(match, *args, exc=(ValueError, TypeError), **kw):
    with pytest.raises(exc, match=match):
        cps_loss_upsampled(*args, **kw)


def test_bad_sizes_are_named():
    """What only the upsample takes: an output size, and low-resolution logits of some spatial size (the
    checks every op shares are tests/test_fused_ops.py's)."""
    a = make_low(2, 5, 3, 4)
    t = make_labels((2, 9, 13), 5, 0.0)
    _bad(r"size must be \(H, W\)", a, a, t, size=(9, 13, 1))
    _bad(r"size must be \(H, W\)", a, a, t, size=(9.0, 13))
    _bad(r"size must be \(H, W\) with H >= 1 and W >= 1, got \(0, 13\)", a, a, size=(0, 13))
    empty = torch.randn(2, 5, 0, 4)
    _bad(r"the logits have spatial size 0x4 \(shape \(2, 5, 0, 4\)\); expected h, w >= 1", empty, empty, size=(9, 13))


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("align_corners", [True, False])
def test_triton_cuda_matches_reference(dtype, layout, align_corners):
    """The compiled kernel (tensor-core tf32 reduction for fp16/bf16) at a DeepLab-like 4x scale."""
    N, C, h, w, size = 2, 21, 33, 47, (129, 185)
    a = make_low(N, C, h, w, dtype, layout, device="cuda", size=size, align_corners=align_corners)
    b = make_low(N, C, h, w, dtype, layout, device="cuda", size=size, align_corners=align_corners)
    target = make_labels((N, *size), C, 0.2, device="cuda", dtype=torch.uint8)
    kw = dict(size=size, cps_weight=1.5, align_corners=align_corners)
    if dtype != torch.float32:
        pa, pb = reference_pseudo_labels(a, b, size, align_corners)
        kw.update(pseudo_a=pa, pseudo_b=pb)
    got = run(cps_loss_upsampled, a, b, target, backend="triton", **kw)
    assert_close_to_reference(got, a, b, target, **kw)


