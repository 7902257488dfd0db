"""The CPU kernel of the upsample-fused CPS loss, cps_fast._C.cps_upsample_forward, called directly.

Ground truth is built here in float64: F.interpolate (bilinear) of the low-resolution
logits, log_softmax, the CPS sums of the launcher contract, and the gradients by
autograd of ``loss = s0/max(c0,1) + w*(s1/max(c2,1) + s2/max(c1,1))`` w.r.t. the
low-resolution logits. Fresh random inputs each run, odd sizes, scale ~4 and ~8,
downsampling, tiny sizes, both memory formats, fp32/fp16/bf16, ignored and
out-of-range labels, and gradient outputs poisoned with NaN before each call.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

_C = pytest.importorskip("cps_fast._C", reason="the extension cps_fast._C is not built")
if not hasattr(_C, "cps_upsample_forward"):
    pytest.skip("cps_fast._C was built without cps_upsample_forward (rebuild the extension)",
                allow_module_level=True)

IGNORE = 255


def _simd_paths():
    """The column paths this CPU can run (the kernel carries scalar, AVX2 and AVX-512 ones on x86-64)."""
    if not hasattr(_C, "set_upsample_simd"):
        return ["default"]
    paths, old = [], _C.upsample_simd()
    for name in ("scalar", "avx2", "avx512"):
        try:
            _C.set_upsample_simd(name)
            paths.append(name)
        except RuntimeError:
            pass
    _C.set_upsample_simd(old)
    return paths


@pytest.fixture(autouse=True, params=_simd_paths())
def simd(request):
    """Every test of this file runs once per column path: groups of 8 and 16 lanes and the scalar loops
    take different branches (window fits, tails, the last window past w)."""
    if request.param == "default":
        yield request.param
        return
    old = _C.set_upsample_simd(request.param)
    assert _C.upsample_simd() == request.param
    try:
        yield request.param
    finally:
        _C.set_upsample_simd(old)


# ----------------------------------------------------------------------------- helpers


def make_low(N, C, h, w, dtype=torch.float32, layout="nchw", scale=3.0):
    x = (torch.randn(N, C, h, w, dtype=torch.float64) * scale).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def make_labels(N, H, W, C, ignore_frac, dtype=torch.int64, ignore_index=IGNORE, out_of_range=0.0):
    y = torch.randint(0, C, (N, H, W))
    r = torch.rand(N, H, W)
    y[r < ignore_frac] = ignore_index
    # labels outside [0, C) that are not ignore_index: the kernel must ignore them
    bad = C + 3 if dtype != torch.uint8 or C + 3 != ignore_index else C + 4
    y[(r >= ignore_frac) & (r < ignore_frac + out_of_range)] = bad
    if dtype != torch.uint8:
        y[(r >= ignore_frac + out_of_range) & (r < ignore_frac + 2 * out_of_range)] = -1
    return y.to(dtype)


def upsample64(x, size, align_corners):
    return F.interpolate(x.double(), size=size, mode="bilinear", align_corners=align_corners)


def valid_mask(y, C, ignore_index):
    y = y.long()
    return (y != ignore_index) & (y >= 0) & (y < C)


def counts_for(t, pa, pb, C, N, H, W, ignore_index=IGNORE):
    """counts as the Python API computes them: valid target, pseudo_a, pseudo_b pixels."""
    def count(y, default):
        return default if y is None else float(valid_mask(y, C, ignore_index).sum())

    return torch.tensor([count(t, 0.0), count(pa, float(N * H * W)), count(pb, float(N * H * W))],
                        dtype=torch.float32)


def truth(a, b, t, pa, pb, size, cps_weight, ignore_index=IGNORE, align_corners=True, dtype=torch.float64):
    """(sums[3], grad_a, grad_b, counts) of the contract, computed in ``dtype`` from a's and b's values.

    dtype float64 is the ground truth; the logits' own low precision measures PyTorch's error there.
    Pseudo labels default to the argmax of the float64 upsampled logits.
    """
    N, C = a.shape[:2]
    H, W = size
    a_ = a.detach().to(dtype).requires_grad_()
    b_ = b.detach().to(dtype).requires_grad_()
    ua = F.interpolate(a_, size=size, mode="bilinear", align_corners=align_corners)
    ub = F.interpolate(b_, size=size, mode="bilinear", align_corners=align_corners)
    if pa is None:
        pa_used = upsample64(a, size, align_corners).argmax(1)
    else:
        pa_used = pa
    if pb is None:
        pb_used = upsample64(b, size, align_corners).argmax(1)
    else:
        pb_used = pb
    la, lb = ua.log_softmax(1), ub.log_softmax(1)

    def ce_sum(logp, y):
        v = valid_mask(y, C, ignore_index)
        picked = logp.gather(1, torch.where(v, y.long(), 0).unsqueeze(1)).squeeze(1)
        return -(picked * v).sum()

    zero = la.sum() * 0
    s0 = ce_sum(la, t) + ce_sum(lb, t) if t is not None else zero
    s1 = ce_sum(la, pb_used)
    s2 = ce_sum(lb, pa_used)
    counts = counts_for(t, pa, pb, C, N, H, W, ignore_index)
    c = counts.clamp_min(1.0).to(dtype)
    loss = s0 / c[0] + cps_weight * (s1 / c[2] + s2 / c[1])
    loss.backward()
    return torch.stack([s0, s1, s2]).detach(), a_.grad, b_.grad, counts


def run_kernel(a, b, t, pa, pb, counts, size, cps_weight, ignore_index=IGNORE, align_corners=True, grads=(True, True)):
    """Call the kernel with NaN-poisoned gradient outputs; labels as (N, H*W) views."""
    N = a.shape[0]
    H, W = size
    t2, pa2, pb2 = (None if y is None else y.reshape(N, H * W) for y in (t, pa, pb))
    ga = torch.full_like(a, float("nan")) if grads[0] else None
    gb = torch.full_like(b, float("nan")) if grads[1] else None
    sums = _C.cps_upsample_forward(a, b, t2, pa2, pb2, counts, ga, gb, H, W, float(cps_weight), ignore_index,
                                   align_corners)
    return sums, ga, gb


def clear_argmax_inputs(N, C, h, w, size, align_corners, layout, tries=50):
    """fp32 logits whose float64 upsampled top-2 gap is above 1e-4 everywhere (no argmax near-ties,
    so the kernel's float32 argmax must equal the float64 one)."""
    for _ in range(tries):
        a = make_low(N, C, h, w, torch.float32, layout)
        b = make_low(N, C, h, w, torch.float32, layout)
        ok = True
        for x in (a, b):
            top2 = upsample64(x, size, align_corners).topk(2, dim=1).values
            ok &= bool(((top2[:, 0] - top2[:, 1]) > 1e-4).all())
        if ok:
            return a, b
    raise RuntimeError("could not draw logits without argmax near-ties; use fewer pixels")


def check_grad(name, g, ref, x, bound):
    assert g.dtype == x.dtype and g.shape == x.shape, f"{name}: {g.dtype} {tuple(g.shape)}"
    assert g.stride() == x.stride(), f"{name}: strides {g.stride()} != logits strides {x.stride()}"
    assert torch.isfinite(g).all(), f"{name} has non-finite values (an element the kernel did not write?)"
    err = (g.double() - ref).abs().max().item()
    assert err <= bound, f"{name}: max error {err:.3g} > bound {bound:.3g} ({x.dtype})"


def check_fp32(got, ref, a, b):
    sums, ga, gb = got
    rs, rga, rgb, _ = ref
    assert sums.dtype == torch.float32 and sums.shape == (3,)
    torch.testing.assert_close(sums.double(), rs, rtol=2e-5, atol=1e-4)
    for name, g, r, x in (("grad_a", ga, rga, a), ("grad_b", gb, rgb, b)):
        if g is not None:
            check_grad(name, g, r, x, 2e-5 * r.abs().max().item() + 1e-9)


# ----------------------------------------------------------------------------- fp32, in-kernel argmax

# (N, C, h, w, H, W): scale ~4 and ~8 with odd sizes, C = 150 (several pixel blocks per row),
# a scale near 1 (groups that do not fit one vector window), equal sizes, 1-pixel inputs and outputs.
SHAPES = [
    (2, 19, 9, 7, 35, 27),
    (2, 21, 5, 6, 37, 45),
    (1, 150, 3, 9, 5, 71),
    (2, 5, 20, 20, 21, 23),
    (1, 3, 4, 37, 13, 150),  # many vector groups per row, a tail of 6 columns, windows past w
    (2, 7, 6, 5, 6, 5),
    (1, 6, 1, 1, 9, 13),
    (2, 4, 1, 7, 5, 30),
    (2, 4, 6, 1, 19, 3),
    (3, 4, 5, 6, 1, 1),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_fp32_in_kernel_argmax(shape, align_corners, layout):
    N, C, h, w, H, W = shape
    a, b = clear_argmax_inputs(N, C, h, w, (H, W), align_corners, layout)
    t = make_labels(N, H, W, C, 0.3, torch.uint8)
    ref = truth(a, b, t, None, None, (H, W), 1.5, align_corners=align_corners)
    got = run_kernel(a, b, t, None, None, ref[3], (H, W), 1.5, align_corners=align_corners)
    check_fp32(got, ref, a, b)


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_downsampling(align_corners, layout):
    """H < h and W < w (and a mixed case): rows and columns no output pixel touches get zero gradient."""
    for N, C, h, w, H, W in ((2, 5, 13, 11, 6, 5), (1, 6, 17, 4, 3, 9)):
        a, b = clear_argmax_inputs(N, C, h, w, (H, W), align_corners, layout)
        t = make_labels(N, H, W, C, 0.2)
        ref = truth(a, b, t, None, None, (H, W), 2.0, align_corners=align_corners)
        got = run_kernel(a, b, t, None, None, ref[3], (H, W), 2.0, align_corners=align_corners)
        check_fp32(got, ref, a, b)


@pytest.mark.parametrize("ignore_frac", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_ignore_fractions(ignore_frac, layout):
    N, C, h, w, H, W = 2, 21, 7, 6, 25, 23
    a, b = clear_argmax_inputs(N, C, h, w, (H, W), True, layout)
    t = make_labels(N, H, W, C, ignore_frac)
    ref = truth(a, b, t, None, None, (H, W), 6.0)
    got = run_kernel(a, b, t, None, None, ref[3], (H, W), 6.0)
    check_fp32(got, ref, a, b)
    if ignore_frac == 1.0:
        assert got[0][0].item() == 0.0


def test_no_target_and_partial_grads():
    N, C, h, w, H, W = 2, 19, 6, 5, 23, 19
    a, b = clear_argmax_inputs(N, C, h, w, (H, W), True, "channels_last")
    ref = truth(a, b, None, None, None, (H, W), 1.0)
    for grads in ((True, False), (False, True), (False, False)):
        got = run_kernel(a, b, None, None, None, ref[3], (H, W), 1.0, grads=grads)
        assert got[0][0].item() == 0.0
        check_fp32(got, ref, a, b)
        assert (got[1] is None) == (not grads[0]) and (got[2] is None) == (not grads[1])


def test_independent_of_thread_count():
    """Segments cut images at different rows for different thread counts; results are bitwise equal."""
    N, C, h, w, H, W = 2, 21, 11, 9, 41, 37
    a = make_low(N, C, h, w, torch.bfloat16, "channels_last")
    b = make_low(N, C, h, w, torch.bfloat16, "channels_last")
    t = make_labels(N, H, W, C, 0.3)
    counts = counts_for(t, None, None, C, N, H, W)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3, 5):
            torch.set_num_threads(threads)
            results.append(run_kernel(a, b, t, None, None, counts, (H, W), 1.5))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for x, y in zip(results[0], other):
            assert torch.equal(x, y)


# ----------------------------------------------------------------------------- low precision, given labels


def lowp_bound(a, b, t, pa, pb, size, cps_weight, align_corners, ref):
    """Twice PyTorch's own gradient error in the logits' dtype, plus 1e-3 of the largest gradient."""
    lowp = truth(a, b, t, pa, pb, size, cps_weight, align_corners=align_corners, dtype=a.dtype)
    bounds = []
    for lg, rg in ((lowp[1], ref[1]), (lowp[2], ref[2])):
        bounds.append(2 * (lg.double() - rg).abs().max().item() + 1e-3 * rg.abs().max().item())
    return bounds


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("shape", [(2, 19, 9, 7, 35, 27), (2, 21, 5, 6, 37, 45), (2, 5, 13, 11, 6, 5)],
                         ids=["x4", "x8", "down"])
def test_low_precision(dtype, layout, align_corners, shape):
    """Pseudo labels passed explicitly (the float64 argmax) so that low-precision near-ties cannot flip."""
    N, C, h, w, H, W = shape
    a = make_low(N, C, h, w, dtype, layout)
    b = make_low(N, C, h, w, dtype, layout)
    t = make_labels(N, H, W, C, 0.3)
    pa = upsample64(a, (H, W), align_corners).argmax(1)
    pb = upsample64(b, (H, W), align_corners).argmax(1)
    ref = truth(a, b, t, pa, pb, (H, W), 1.5, align_corners=align_corners)
    sums, ga, gb = run_kernel(a, b, t, pa, pb, ref[3], (H, W), 1.5, align_corners=align_corners)
    # the kernel interpolates in float32 from the same low-precision values: sums at float32 rounding
    torch.testing.assert_close(sums.double(), ref[0], rtol=2e-5, atol=1e-4)
    bound_a, bound_b = lowp_bound(a, b, t, pa, pb, (H, W), 1.5, align_corners, ref)
    check_grad("grad_a", ga, ref[1], a, bound_a)
    check_grad("grad_b", gb, ref[2], b, bound_b)


@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int32, torch.int64])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_given_pseudo_labels_with_ignores_and_out_of_range(label_dtype, layout):
    N, C, h, w, H, W = 2, 19, 6, 7, 22, 29
    a = make_low(N, C, h, w, torch.float32, layout)
    b = make_low(N, C, h, w, torch.float32, layout)
    t = make_labels(N, H, W, C, 0.4, label_dtype, out_of_range=0.1)
    pa = make_labels(N, H, W, C, 0.3, label_dtype, out_of_range=0.1)
    pb = make_labels(N, H, W, C, 0.6, label_dtype, out_of_range=0.05)
    ref = truth(a, b, t, pa, pb, (H, W), 1.5)
    got = run_kernel(a, b, t, pa, pb, ref[3], (H, W), 1.5)
    check_fp32(got, ref, a, b)


def test_strided_labels_and_other_ignore_index():
    """(N, H*W) label views with non-unit strides; ignore_index -1 with C = 256 (255 is a class)."""
    N, C, h, w, H, W = 2, 256, 3, 4, 9, 11
    a = make_low(N, C, h, w, torch.float32, "nchw")
    b = make_low(N, C, h, w, torch.float32, "channels_last")
    big = make_labels(N, H, 2 * W, C, 0.3, torch.int64, ignore_index=-1)
    t = big[:, :, ::2]  # strides (2*H*W, 2*W, 2): reshape to (N, H*W) gives a strided view
    pb = make_labels(N, H, W, C, 0.2, torch.int32, ignore_index=-1).transpose(1, 2).contiguous().transpose(1, 2)
    ref = truth(a, b, t, None, pb, (H, W), 1.5, ignore_index=-1)
    t2 = t.reshape(N, H * W)
    assert t2.stride(1) != 1
    ga, gb = torch.full_like(a, float("nan")), torch.full_like(b, float("nan"))
    pb2 = pb.reshape(N, H * W)
    sums = _C.cps_upsample_forward(a, b, t2, None, pb2, ref[3], ga, gb, H, W, 1.5, -1, True)
    # argmax near-ties are possible here (C = 256), so compare the loss terms that do not use pa
    torch.testing.assert_close(sums[:2].double(), ref[0][:2], rtol=2e-5, atol=1e-4)
    assert torch.isfinite(ga).all() and torch.isfinite(gb).all()


def test_matches_python_reference_when_available():
    """The loss assembled from the kernel's sums equals cps_loss_upsampled_reference (if present)."""
    reference = pytest.importorskip("cps_fast.reference")
    fn = getattr(reference, "cps_loss_upsampled_reference", None)
    if fn is None:
        pytest.skip("cps_fast.reference has no cps_loss_upsampled_reference yet")
    N, C, h, w, H, W = 2, 21, 6, 7, 23, 27
    for align_corners in (True, False):
        a, b = clear_argmax_inputs(N, C, h, w, (H, W), align_corners, "channels_last")
        t = make_labels(N, H, W, C, 0.3)
        counts = counts_for(t, None, None, C, N, H, W)
        sums, _, _ = run_kernel(a, b, t, None, None, counts, (H, W), 1.5, align_corners=align_corners)
        c = counts.clamp_min(1.0)
        loss = sums[0] / c[0] + 1.5 * (sums[1] / c[2] + sums[2] / c[1])
        ref = fn(a.double(), b.double(), t, size=(H, W), cps_weight=1.5, align_corners=align_corners)
        torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-5, atol=2e-5)


# ----------------------------------------------------------------------------- argument checks


def test_the_extension_guards_its_arguments():
    N, C, h, w, H, W = 2, 5, 4, 3, 8, 6
    a = make_low(N, C, h, w)
    b = make_low(N, C, h, w)
    t2 = make_labels(N, H, W, C, 0.2).reshape(N, -1)
    counts = torch.tensor([1.0, 1.0, 1.0])

    def call(**kw):
        args = dict(a4=a, b4=b, t2=t2, pa2=None, pb2=None, counts=counts, grad_a4=None, grad_b4=None, H=H, W=W,
                    cps_weight=1.0, ignore_index=IGNORE, align_corners=True)
        args.update(kw)
        return _C.cps_upsample_forward(**args)

    call()  # the baseline is accepted
    # what only the extension sees (the op's entry checks the user's arguments, tests/test_fused_ops.py):
    # the buffers the Python layer makes, and memory the kernel must not write through
    shared = torch.empty_like(a)
    for kw in (dict(counts=torch.ones(3, dtype=torch.float64)), dict(counts=torch.ones(2)),
               dict(grad_a4=torch.empty_like(a).half()), dict(grad_b4=torch.empty(N, C, h, w + 1)), dict(grad_a4=a),
               dict(grad_a4=torch.empty(1).expand(N, C, h, w)), dict(grad_a4=shared, grad_b4=shared),
               dict(a4=a.flatten(2)), dict(H=0), dict(cps_weight=float("inf"))):
        with pytest.raises(RuntimeError, match=r"cps_fast\._C\.cps_upsample_forward: "):
            call(**kw)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_are_refused():
    a = make_low(1, 3, 2, 2).cuda()
    with pytest.raises(RuntimeError, match="no CUDA kernel; use backend='triton'"):
        _C.cps_upsample_forward(a, a.clone(), None, None, None, torch.ones(3, device="cuda"), None, None, 4, 4,
                                1.0, IGNORE, True)


def test_simd_choice_is_checked(simd):
    if not hasattr(_C, "set_upsample_simd"):
        pytest.skip("cps_fast._C predates set_upsample_simd (rebuild the extension)")
    with pytest.raises(RuntimeError, match=r"unknown name 'sse9'; expected 'auto', 'avx512', 'avx2' or 'scalar'"):
        _C.set_upsample_simd("sse9")
    assert _C.upsample_simd() == simd  # a refused choice changes nothing
    old = _C.set_upsample_simd("auto")
    assert old == simd and _C.upsample_simd() == _simd_paths()[-1]  # auto: the widest this CPU has
