"""The upsample-fused CPS loss: every backend against the float64 reference.

Fresh random inputs every run, odd sizes and scale factors 4 and 8 (and downsampling),
1-pixel edge cases, both memory formats, fp32/fp16/bf16, both align_corners conventions,
ignored pixels, given pseudo labels, gradients w.r.t. the low-resolution logits, and
outputs poisoned with NaN before each kernel runs. Triton runs in its interpreter here,
so shapes are small.
"""
import os
import time

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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(SHAPES)))
@pytest.mark.parametrize("align_corners", [True, False])
def test_matches_reference_fp32(backend, case, align_corners):
    need(backend)
    (N, C, h, w), size = SHAPES[case]
    layout = ("nchw", "channels_last")[(case + align_corners) % 2]
    a, b = (make_low(N, C, h, w, layout=layout, size=size, align_corners=align_corners) for _ in range(2))
    target = make_labels((N, *size), C, 0.2)
    kw = dict(size=size, cps_weight=1.5, align_corners=align_corners)
    got = run(cps_loss_upsampled, a, b, target, backend=backend, **kw)
    assert_close_to_reference(got, a, b, target, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_low_precision_with_reference_pseudo_labels(backend, dtype, layout):
    """fp16/bf16 logits; pseudo labels from the float64 reference are passed to every side so a
    near-tie of the argmax cannot make the comparison flaky (argmax mode is checked in fp32)."""
    need(backend)
    (N, C, h, w), size = SHAPES[0] if layout == "nchw" else SHAPES[1]
    ac = layout == "nchw"
    a, b = make_low(N, C, h, w, dtype, layout), make_low(N, C, h, w, dtype, layout)
    target = make_labels((N, *size), C, 0.2, dtype=torch.uint8)
    pa, pb = reference_pseudo_labels(a, b, size, ac)
    kw = dict(size=size, pseudo_a=pa, pseudo_b=pb, cps_weight=1.5, align_corners=ac)
    got = run(cps_loss_upsampled, a, b, target, backend=backend, **kw)
    assert_close_to_reference(got, a, b, target, backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ignore_frac", [0.0, 0.3, 1.0])
def test_ignore_fractions(backend, ignore_frac):
    need(backend)
    a, b = make_low(2, 21, 6, 7, size=(23, 27)), make_low(2, 21, 6, 7, layout="channels_last", size=(23, 27))
    b = b.contiguous()  # a and b in different memory formats is allowed too
    target = make_labels((2, 23, 27), 21, ignore_frac)
    kw = dict(size=(23, 27), cps_weight=6.0)
    got = run(cps_loss_upsampled, a, b, target, backend=backend, **kw)
    assert_close_to_reference(got, a, b, target, **kw)
    if ignore_frac == 1.0:
        assert got[1].item() == 0.0  # supervised term of an all-ignored batch is 0, not NaN


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int32, torch.int64])
def test_given_pseudo_labels_with_ignores(backend, label_dtype):
    need(backend)
    C, N, h, w, size = 19, 2, 5, 7, (19, 27)
    a, b = make_low(N, C, h, w, torch.bfloat16, "channels_last"), make_low(N, C, h, w, torch.bfloat16, "channels_last")
    target = make_labels((N, *size), C, 0.5, dtype=label_dtype)
    pa = make_labels((N, *size), C, 0.3, dtype=label_dtype)
    pb = make_labels((N, *size), C, 0.6, dtype=label_dtype)
    kw = dict(size=size, pseudo_a=pa, pseudo_b=pb, cps_weight=1.5, align_corners=False)
    got = run(cps_loss_upsampled, a, b, target, backend=backend, **kw)
    assert_close_to_reference(got, a, b, target, backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad_scale", [3.0, 0.0, -0.5])
def test_grad_output_scaling(backend, grad_scale):
    need(backend)
    a, b = (make_low(2, 21, 5, 6, layout="channels_last", size=(17, 21)) for _ in range(2))
    target = make_labels((2, 17, 21), 21, 0.2)
    kw = dict(size=(17, 21), cps_weight=1.5)
    got = run(cps_loss_upsampled, a, b, target, backend=backend, grad_scale=grad_scale, **kw)
    assert_close_to_reference(got, a, b, target, grad_scale=grad_scale, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("C", [2, 64, 150])
def test_class_axis_widths(backend, C):
    """C = 2 (padded to the dot's minimum width 16) and the wider register-tile configurations."""
    need(backend)
    a = make_low(1, C, 5, 4, size=(18, 13), align_corners=C != 64)
    b = make_low(1, C, 5, 4, layout="channels_last", size=(18, 13), align_corners=C != 64)
    target = make_labels((1, 18, 13), C, 0.2)
    kw = dict(size=(18, 13), cps_weight=1.5, align_corners=C != 64)
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

    a = make_low(1, C, 9, 10, layout="channels_last", size=(33, 37))
    b = make_low(1, C, 9, 10, size=(33, 37))
    target = make_labels((1, 33, 37), C, 0.2)
    kw = dict(size=(33, 37), cps_weight=1.5)
    if config is None:  # the heuristic's GPU configuration (without the interpreter's larger step)
        bh, bw, block_f, _, num_warps, ax = cps_upsample.block_config(C, interpret=False, dtype=a.dtype)
        config = (bh, bw, block_f, num_warps, ax)
    got = run(cps_loss_upsampled, a, b, target, backend=backend, kernel_config=cps_upsample.UpsampleConfig(*config),
              **kw)
    assert_close_to_reference(got, a, b, target, **kw)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_class_axis_beyond_the_triton_tile(backend):
    need(backend)
    C = 300
    a, b = make_low(1, C, 3, 4, size=(9, 13)), make_low(1, C, 3, 4, size=(9, 13))
    target = make_labels((1, 9, 13), C, 0.2, ignore_index=-1)
    kw = dict(size=(9, 13), cps_weight=1.5, ignore_index=-1)
    got = run(cps_loss_upsampled, a, b, target, backend=backend, **kw)
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
def test_no_target_partial_grad_and_forward_only(backend):
    need(backend)
    a = make_low(2, 21, 5, 6, size=(19, 23)).requires_grad_()
    b = make_low(2, 21, 5, 6, size=(19, 23))  # no gradient wanted for b
    loss, sup, cps = cps_loss_upsampled(a, b, None, size=(19, 23), cps_weight=2.0, backend=backend, return_parts=True)
    assert sup.item() == 0.0
    loss.backward()
    a64 = a.detach().double().requires_grad_()
    ref = cps_loss_upsampled_reference(a64, b.double(), None, size=(19, 23), cps_weight=2.0)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(a.grad.double(), a64.grad, rtol=1e-4, atol=1e-6)
    assert b.grad is None
    with torch.no_grad():
        loss2 = cps_loss_upsampled(a, b, None, size=(19, 23), cps_weight=2.0, backend=backend)
    assert not loss2.requires_grad
    torch.testing.assert_close(loss2.double(), ref.detach(), rtol=2e-5, atol=2e-5)


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


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_dense_input(backend):
    need(backend)
    full = make_low(2, 24, 6, 14)
    a, b = full[:, :21, :, ::2], make_low(2, 21, 6, 7, size=(22, 25))
    break_upsampled_near_ties_(a, (22, 25))  # through the view, which stays non-dense
    target = make_labels((2, 22, 25), 21, 0.2)
    got = run(cps_loss_upsampled, a, b, target, size=(22, 25), backend=backend)
    assert_close_to_reference(got, a, b, target, size=(22, 25))


def test_module_and_return_parts():
    a, b = (make_low(2, 5, 3, 4, size=(9, 13), align_corners=False) for _ in range(2))
    t = make_labels((2, 9, 13), 5, 0.1)
    mod = CPSLossUpsampled(cps_weight=1.5, align_corners=False)
    assert "cps_weight=1.5" in repr(mod) and "align_corners=False" in repr(mod)
    loss = mod(a, b, t)  # size taken from the labels
    ref = cps_loss_upsampled_reference(a.double(), b.double(), t, size=(9, 13), cps_weight=1.5, align_corners=False)
    torch.testing.assert_close(loss.double(), ref, rtol=2e-5, atol=2e-5)
    loss2, sup, cps = CPSLossUpsampled(size=(9, 13), cps_weight=1.5, align_corners=False, return_parts=True)(a, b, t)
    torch.testing.assert_close(loss2, sup + 1.5 * cps)
    assert not sup.requires_grad and not cps.requires_grad
    with pytest.raises(ValueError, match="no output size"):
        CPSLossUpsampled()(a, b)


def test_backward_twice_is_refused():
    a = make_low(1, 3, 2, 2).requires_grad_()
    loss = cps_loss_upsampled(a, a.detach(), size=(5, 5))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_torch_compile_fullgraph_torch_backend():
    """The op is a custom op with a fake implementation: fullgraph compilation traces it."""
    f = torch.compile(lambda a, b, t: cps_loss_upsampled(a, b, t, size=(11, 13), cps_weight=1.5, backend="torch"),
                      fullgraph=True)
    a, b = (make_low(2, 5, 4, 5, layout="channels_last", size=(11, 13)) for _ in range(2))
    t = make_labels((2, 11, 13), 5, 0.2)
    a_leaf, b_leaf = a.clone().requires_grad_(), b.clone().requires_grad_()
    t0 = time.perf_counter()
    try:
        loss = f(a_leaf, b_leaf, t)
    except Exception as exc:  # no C compiler for inductor, etc.
        pytest.skip(f"torch.compile unavailable here: {type(exc).__name__}: {exc}")
    if time.perf_counter() - t0 > 60:
        pytest.skip("torch.compile took over a minute on this machine")
    (2 * loss).backward()
    ref = run(cps_loss_upsampled_reference, a.double(), b.double(), t, grad_scale=2.0, size=(11, 13), cps_weight=1.5)
    torch.testing.assert_close(loss.detach().double(), ref[0], rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(a_leaf.grad.double(), ref[3], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(b_leaf.grad.double(), ref[4], rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- backends and bad input


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


def test_bad_inputs_are_named():
    a = make_low(2, 5, 3, 4)
    t = make_labels((2, 9, 13), 5, 0.0)
    _bad(r"size must be \(H, W\)", a, a, t, size=(9, 13, 1))
    _bad(r"size must be \(H, W\)", a, a, t, size=(9.0, 13))
    _bad(r"size must be \(H, W\) with H >= 1 and W >= 1, got \(0, 13\)", a, a, size=(0, 13))
    _bad(r"target has shape \(2, 3, 4\); expected full-resolution labels \(N, H, W\) = \(2, 9, 13\)", a, a,
         make_labels((2, 3, 4), 5, 0.0), size=(9, 13))
    _bad(r"pseudo_a has shape \(9, 13\)", a, a, t, pseudo_a=t[0], size=(9, 13))
    _bad(r"target has dtype torch.float32; expected integer labels", a, a, t.float(), size=(9, 13))
    _bad(r"low_a has shape \(2, 5, 3, 4\) but low_b has shape \(2, 5, 3, 5\)", a, make_low(2, 5, 3, 5), size=(9, 13))
    _bad(r"low_a is torch.float32 but low_b is torch.float16", a, a.half(), size=(9, 13))
    _bad(r"low_a has dtype torch.int64; expected float32, float16 or bfloat16", a.long(), a, size=(9, 13))
    _bad(r"low_a has shape \(60, 5\); expected \(N, C, h, w\)", torch.randn(60, 5), torch.randn(60, 5), size=(9, 13))
    _bad(r"C = 1 classes", make_low(2, 1, 3, 4), make_low(2, 1, 3, 4), size=(9, 13))
    _bad(r"ignore_index=3 is also a class of the C = 5 logits", a, a, t, size=(9, 13), ignore_index=3)
    bad = t.clone()
    bad[1, 2, 3] = 37
    _bad(r"cps_loss_upsampled: target has value 37 at index \(1, 2, 3\), outside \[0, 5\)", a, a, bad, size=(9, 13))
    # with validation off, an out-of-range label is ignored rather than read out of bounds
    assert torch.isfinite(cps_loss_upsampled(a, a, bad, size=(9, 13), validate=False))


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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cuda_graph_capture_and_replay(layout):
    """Forward + backward capture into a CUDA graph (a host synchronisation would make the capture
    fail) and every replay on new inputs gives the reference's loss, parts and gradients, written
    into the same ``.grad`` tensors."""
    C, N, h, w, size = 21, 2, 32, 24, (128, 96)
    a = make_low(N, C, h, w, torch.bfloat16, layout, "cuda", size=size).requires_grad_()
    b = make_low(N, C, h, w, torch.bfloat16, layout, "cuda", size=size).requires_grad_()
    t = make_labels((N, *size), C, 0.3, "cuda", dtype=torch.uint8)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            a.grad = b.grad = None
            cps_loss_upsampled(a, b, t, size=size, backend="triton").backward()
    torch.cuda.current_stream().wait_stream(s)
    a.grad = b.grad = None
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        loss, sup, cps = cps_loss_upsampled(a, b, t, size=size, backend="triton", cps_weight=1.5,
                                            return_parts=True)
        loss.backward()
    for _ in range(3):
        with torch.no_grad():
            a.copy_(make_low(N, C, h, w, torch.bfloat16, layout, "cuda", size=size))
            b.copy_(make_low(N, C, h, w, torch.bfloat16, layout, "cuda", size=size))
            t.copy_(make_labels((N, *size), C, 0.3, "cuda", dtype=torch.uint8))
        g.replay()
        got = (loss.detach(), sup, cps, a.grad, b.grad)
        assert_close_to_reference(got, a.detach(), b.detach(), t, backend="triton", size=size, cps_weight=1.5)
