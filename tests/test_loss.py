"""The fused CPS loss: every backend against the float64 reference.

Fresh random inputs every run (no fixed seed), odd shapes, both memory formats
and (P, C) rows, fp32/fp16/bf16, ignored pixels, given pseudo labels, gradients,
and outputs poisoned with NaN before each kernel runs.
"""
import os

import pytest
import torch

import cps_fast
from cps_fast import backends
from cps_fast.reference import cps_loss_reference, cps_step_reference
from helpers import assert_grads_close, assert_scalars_close, make_labels, make_logits, mean_ce, run

pytestmark = pytest.mark.poison_outputs  # NaN-filled kernel outputs (tests/conftest.py)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["nchw", "channels_last", "rows"]


def _backends(device):
    names = backends.available_backends(device)
    return [b for b in names if b != "torch"] + ["torch"]


CASES = [(d, b) for d in DEVICES for b in _backends(d)]


def lowp_reference(a, b, target, **kw):
    """The reference computed in the logits' own dtype (no upcast): PyTorch's error at that precision."""
    def ce(x, y):
        return mean_ce(x, y, kw.get("ignore_index", 255))

    pa = kw.get("pseudo_a")
    pb = kw.get("pseudo_b")
    pa = a.detach().argmax(1) if pa is None else pa
    pb = b.detach().argmax(1) if pb is None else pb
    sup = ce(a, target) + ce(b, target) if target is not None else a.new_zeros(())
    cps = ce(a, pb) + ce(b, pa)
    return sup + kw.get("cps_weight", 1.0) * cps, sup.detach(), cps.detach()


def assert_close_to_reference(got, a, b, target, grad_scale=1.0, **kw):
    """Compare (loss, sup, cps, ga, gb) with the float64 reference on the same input values.

    Tolerance: float32 rounding for the scalars; for the gradients, twice the error
    PyTorch itself makes computing the same thing in the logits' dtype, plus a floor.
    """
    ref = run(cps_loss_reference, a.double(), b.double(), target, grad_scale=grad_scale, **kw)
    assert_scalars_close(got, ref)
    if a.dtype == torch.float32:
        lowp = ref  # fp32 kernels are compared at fp32 rounding
        floor = 1e-6
    else:
        lowp = run(lowp_reference, a, b, target, grad_scale=grad_scale, **kw)
        floor = 1e-3 * float(ref[3].abs().max())
    assert_grads_close((("grad_a", got[3], ref[3], lowp[3], a), ("grad_b", got[4], ref[4], lowp[4], b)), floor)


def _shape_for(C):
    return (2, 33, 47) if C <= 32 else (2, 7, 13)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("C", [2, 19, 21, 150, 256])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(device, backend, C, layout, dtype):
    N, H, W = _shape_for(C)
    a = make_logits(layout, N, C, H, W, dtype, device)
    b = make_logits(layout, N, C, H, W, dtype, device)
    label_shape = (N * H * W,) if layout == "rows" else (N, H, W)
    # 255 is a class when C = 256: such users pick an ignore_index outside the classes
    ii, label_dtype = (255, torch.uint8) if C <= 255 else (-1, torch.int64)
    target = make_labels(label_shape, C, 0.2, device, dtype=label_dtype, ignore_index=ii)
    got = run(cps_fast.cps_loss, a, b, target, cps_weight=1.5, ignore_index=ii, backend=backend)
    assert_close_to_reference(got, a, b, target, cps_weight=1.5, ignore_index=ii)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("ignore_frac", [0.0, 0.2, 1.0])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_ignore_fractions(device, backend, ignore_frac, layout):
    a = make_logits(layout, 3, 21, 17, 9, torch.float32, device)
    b = make_logits(layout, 3, 21, 17, 9, torch.float32, device)
    target = make_labels((3, 17, 9), 21, ignore_frac, device)
    got = run(cps_fast.cps_loss, a, b, target, cps_weight=6.0, backend=backend)
    assert_close_to_reference(got, a, b, target, cps_weight=6.0)
    if ignore_frac == 1.0:
        assert got[1].item() == 0.0  # supervised term of an all-ignored batch is 0, not NaN


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int32, torch.int64])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_given_pseudo_labels_with_ignores(device, backend, label_dtype, layout):
    C, N, H, W = 19, 2, 11, 15
    a = make_logits(layout, N, C, H, W, torch.bfloat16, device)
    b = make_logits(layout, N, C, H, W, torch.bfloat16, device)
    shape = (N * H * W,) if layout == "rows" else (N, H, W)
    target = make_labels(shape, C, 0.5, device, dtype=label_dtype)
    pa = make_labels(shape, C, 0.3, device, dtype=label_dtype)
    pb = make_labels(shape, C, 0.6, device, dtype=label_dtype)
    kw = dict(pseudo_a=pa, pseudo_b=pb, cps_weight=1.5)
    got = run(cps_fast.cps_loss, a, b, target, backend=backend, **kw)
    assert_close_to_reference(got, a, b, target, **kw)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_wide_class_axis(device, backend, layout):
    """C above the register tile takes the online-softmax path."""
    C = 300
    a = make_logits(layout, 1, C, 5, 7, torch.float32, device)
    b = make_logits(layout, 1, C, 5, 7, torch.float32, device)
    target = make_labels((1, 5, 7), C, 0.2, device, ignore_index=-1)
    pb = make_labels((1, 5, 7), C, 0.2, device, ignore_index=-1)
    kw = dict(pseudo_b=pb, cps_weight=1.5, ignore_index=-1)
    got = run(cps_fast.cps_loss, a, b, target, backend=backend, **kw)
    assert_close_to_reference(got, a, b, target, **kw)


TRITON_DEVICES = [d for d in DEVICES if "triton" in backends.available_backends(d)]


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("C,shape", [(2, (2, 9, 31)), (19, (2, 11, 15)), (21, (3, 37, 41)), (150, (2, 7, 13)),
                                     (256, (1, 5, 3))])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("given_pseudo", [False, True])
def test_channels_last_flat_kernel(device, C, shape, dtype, given_pseudo, monkeypatch):
    """The flat channels_last kernel (CPSLossConfig(flat=True): 128-bit accesses and a gather) against the reference;
    with 3 x 37 x 41 = 4551 pixels of 21 classes, tiles of 128 pixels end mid-image and mid-row."""
    from cps_fast.kernels import cps_loss as triton_ops

    launched = []
    flat = triton_ops._cps_loss_flat_kernel

    class Spy:
        def __getitem__(self, grid):
            launched.append(grid)
            return flat[grid]

    monkeypatch.setattr(triton_ops, "_cps_loss_flat_kernel", Spy())
    N, H, W = shape
    a = make_logits("channels_last", N, C, H, W, dtype, device)
    b = make_logits("channels_last", N, C, H, W, dtype, device)
    ii, label_dtype = (255, torch.uint8) if C <= 255 else (-1, torch.int64)
    target = make_labels((N, H, W), C, 0.3, device, dtype=label_dtype, ignore_index=ii)
    kw = dict(cps_weight=1.5, ignore_index=ii)
    if given_pseudo:
        kw["pseudo_b"] = make_labels((N, H, W), C, 0.4, device, dtype=label_dtype, ignore_index=ii)
    got = run(cps_fast.cps_loss, a, b, target, backend="triton", kernel_config=triton_ops.CPSLossConfig(flat=True), **kw)
    assert launched, "the flat kernel did not run"
    assert_close_to_reference(got, a, b, target, **kw)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("grad_scale", [3.0, 1.0, 0.0, -0.5])
def test_grad_output_scaling(device, backend, grad_scale):
    a = make_logits("channels_last", 2, 21, 9, 11, torch.float16, device)
    b = make_logits("channels_last", 2, 21, 9, 11, torch.float16, device)
    target = make_labels((2, 9, 11), 21, 0.2, device)
    got = run(cps_fast.cps_loss, a, b, target, backend=backend, grad_scale=grad_scale)
    assert_close_to_reference(got, a, b, target, grad_scale=grad_scale)


@pytest.mark.parametrize("device,backend", CASES)
def test_no_target_and_partial_grad(device, backend):
    a = make_logits("nchw", 2, 21, 9, 11, torch.float32, device).requires_grad_()
    b = make_logits("nchw", 2, 21, 9, 11, torch.float32, device)  # no grad wanted for b
    loss, sup, cps = cps_fast.cps_loss(a, b, None, cps_weight=2.0, backend=backend, return_parts=True)
    assert sup.item() == 0.0
    loss.backward()
    a64 = a.detach().double().requires_grad_()
    ref = cps_loss_reference(a64, b.double(), None, cps_weight=2.0)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(a.grad.double(), a64.grad, rtol=1e-4, atol=1e-6)
    assert b.grad is None


@pytest.mark.parametrize("device,backend", CASES)
def test_forward_only(device, backend):
    a = make_logits("channels_last", 2, 21, 9, 11, torch.bfloat16, device)
    b = make_logits("channels_last", 2, 21, 9, 11, torch.bfloat16, device)
    target = make_labels((2, 9, 11), 21, 0.2, device)
    with torch.no_grad():
        loss = cps_fast.cps_loss(a, b, target, backend=backend)
    ref = cps_loss_reference(a.double(), b.double(), target)
    assert not loss.requires_grad
    torch.testing.assert_close(loss.double(), ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("device,backend", CASES)
def test_argmax_ties_go_to_lowest_class(device, backend):
    # integer-valued logits produce many ties; torch.argmax picks the lowest index
    a = torch.randint(0, 3, (2, 7, 5, 6), device=device).float()
    b = torch.randint(0, 3, (2, 7, 5, 6), device=device).float()
    got = run(cps_fast.cps_loss, a, b, None, backend=backend)
    assert_close_to_reference(got, a, b, None)


@pytest.mark.parametrize("device,backend", CASES)
def test_non_dense_input(device, backend):
    """A sliced view (not dense in memory) still gives the right value and gradients."""
    full_a = make_logits("nchw", 2, 24, 9, 14, torch.float32, device)
    full_b = make_logits("nchw", 2, 24, 9, 14, torch.float32, device)
    a, b = full_a[:, :21, :, ::2], full_b[:, :21, :, ::2]
    target = make_labels((2, 9, 7), 21, 0.2, device)
    a_leaf = a.detach().clone().requires_grad_()
    loss = cps_fast.cps_loss(a_leaf[:, :, :, :], b, target, backend=backend)
    loss.backward()
    a64 = a.detach().double().requires_grad_()
    cps_loss_reference(a64, b.double(), target).backward()
    torch.testing.assert_close(a_leaf.grad.double(), a64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device,backend", CASES)
def test_reference_plain_cps_step_is_one_call(device, backend):
    """The reference code's plain CPS loss equals one cps_loss call on the concatenation."""
    C, w = 21, 1.5
    sup_l, sup_r = (make_logits("nchw", 2, C, 13, 9, torch.float32, device) for _ in range(2))
    uns_l, uns_r = (make_logits("nchw", 3, C, 13, 9, torch.float32, device) for _ in range(2))
    gt = make_labels((2, 13, 9), C, 0.1, device)
    ref = cps_step_reference(sup_l.double(), sup_r.double(), uns_l.double(), uns_r.double(), gt, w)
    target = torch.cat([gt, torch.full((3, 13, 9), 255, device=device, dtype=gt.dtype)])
    loss = cps_fast.cps_loss(torch.cat([sup_l, uns_l]), torch.cat([sup_r, uns_r]), target, cps_weight=w,
                             backend=backend)
    torch.testing.assert_close(loss.double(), ref, rtol=2e-5, atol=2e-5)


def test_module_and_return_parts():
    a = torch.randn(2, 5, 3, 4)
    b = torch.randn(2, 5, 3, 4)
    t = torch.randint(0, 5, (2, 3, 4))
    mod = cps_fast.CPSLoss(cps_weight=1.5)
    assert "cps_weight=1.5" in repr(mod)
    loss = mod(a, b, t)
    ref = cps_loss_reference(a.double(), b.double(), t, cps_weight=1.5)
    torch.testing.assert_close(loss.double(), ref, rtol=2e-5, atol=2e-5)
    loss2, sup, cps = cps_fast.CPSLoss(cps_weight=1.5, return_parts=True)(a, b, t)
    torch.testing.assert_close(loss2, sup + 1.5 * cps)
    assert not sup.requires_grad and not cps.requires_grad


def test_backward_twice_is_refused():
    a = torch.randn(1, 3, 2, 2, requires_grad=True)
    b = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = cps_fast.cps_loss(a, b)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


# ----------------------------------------------------------------------------- bad input


def _bad(match, *args, **kw):
    with pytest.raises((ValueError, TypeError), match=match):
        cps_fast.cps_loss(*args, **kw)


def test_bad_inputs_are_named():
    a = torch.randn(2, 5, 3, 4)
    t = torch.randint(0, 5, (2, 3, 4))
    _bad(r"logits_a has shape \(2, 5, 3, 4\) but logits_b has shape \(2, 5, 3, 5\)", a, torch.randn(2, 5, 3, 5))
    _bad(r"logits_a is torch.float32 but logits_b is torch.float16", a, a.half())
    _bad(r"logits_a has dtype torch.int64; expected float32, float16 or bfloat16", a.long(), a)
    _bad(r"C = 1 classes", torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4))
    _bad(r"expected \(N, C, H, W\) or \(P, C\)", torch.randn(5), torch.randn(5))
    _bad(r"target has shape \(2, 4, 3\); expected \(2, 3, 4\)", a, a, t.transpose(1, 2))
    _bad(r"target has dtype torch.float32; expected integer labels", a, a, t.float())
    _bad(r"pseudo_a has shape \(2, 3\); expected \(2, 3, 4\)", a, a, pseudo_a=t[:, :, 0])
    _bad(r"ignore_index=3 is also a class of the C = 5 logits", a, a, t, ignore_index=3)


def test_out_of_range_labels_are_reported():
    a = torch.randn(2, 5, 3, 4)
    t = torch.randint(0, 5, (2, 3, 4))
    t[1, 2, 3] = 37
    _bad(r"target has value 37 at index \(1, 2, 3\), outside \[0, 5\) and not ignore_index \(255\)", a, a, t)
    p = torch.zeros(2, 3, 4, dtype=torch.long)
    p[0, 0, 1] = -2
    _bad(r"pseudo_b has value -2 at index \(0, 0, 1\)", a, a, pseudo_b=p)
    # with validation off, an out-of-range label is ignored rather than read out of bounds
    loss = cps_fast.cps_loss(a, a, t, validate=False)
    assert torch.isfinite(loss)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine's messages")
def test_forced_backend_that_cannot_run_says_why(monkeypatch):
    a = torch.randn(1, 3, 2, 2)
    with pytest.raises(backends.BackendUnavailable, match="'cuda' cannot run on cpu tensors: the cuda backend needs CUDA tensors"):
        cps_fast.cps_loss(a, a, backend="cuda")
    with pytest.raises(backends.BackendUnavailable, match="unknown backend 'fast'"):
        cps_fast.cps_loss(a, a, backend="fast")
    monkeypatch.setenv("CPS_FAST_BACKEND", "cuda")
    with pytest.raises(backends.BackendUnavailable, match=r"\$CPS_FAST_BACKEND"):
        cps_fast.cps_loss(a, a)
    monkeypatch.setenv("CPS_FAST_BACKEND", "torch")
    cps_fast.cps_loss(a, a)


def test_auto_selection_logs_once(caplog, monkeypatch):
    monkeypatch.delenv("CPS_FAST_BACKEND", raising=False)
    monkeypatch.setattr(backends, "_logged", set())
    a = torch.randn(1, 3, 2, 2)
    with caplog.at_level("INFO", logger="cps_fast"):
        cps_fast.cps_loss(a, a)
        cps_fast.cps_loss(a, a)
    lines = [r.message for r in caplog.records if "backend" in r.message]
    assert len(lines) == 1 and "for cpu tensors" in lines[0]


def test_extension_is_built():
    """CI builds the C++ extension; the cpu backend must be there, not silently skipped."""
    assert backends.extension_import_error() is None, backends.extension_import_error()
    assert "cpu" in backends.available_backends("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter check for CPU-only machines")
def test_triton_runs_under_the_interpreter():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert "triton" in backends.available_backends("cpu")


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cuda_graph_capture_and_replay(backend, layout):
    """The loss (forward + backward) captures into a CUDA graph, which a host synchronisation
    would make fail, and every replay on new inputs gives the reference's loss, parts and
    gradients (written into the same ``.grad`` tensors)."""
    if backend not in backends.available_backends("cuda"):
        pytest.skip(f"{backend} not available: {backends.why_unavailable(backend, 'cuda')}")
    C = 21
    a = make_logits(layout, 4, C, 64, 96, torch.bfloat16, "cuda").requires_grad_()
    b = make_logits(layout, 4, C, 64, 96, torch.bfloat16, "cuda").requires_grad_()
    t = make_labels((4, 64, 96), C, 0.3, "cuda", dtype=torch.uint8)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm-up: compile kernels, settle the allocator
            a.grad = b.grad = None
            cps_fast.cps_loss(a, b, t, backend=backend).backward()
    torch.cuda.current_stream().wait_stream(s)
    a.grad = b.grad = None
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        loss, sup, cps = cps_fast.cps_loss(a, b, t, backend=backend, cps_weight=1.5, return_parts=True)
        loss.backward()
    for _ in range(3):
        with torch.no_grad():
            a.copy_(make_logits(layout, 4, C, 64, 96, torch.bfloat16, "cuda"))
            b.copy_(make_logits(layout, 4, C, 64, 96, torch.bfloat16, "cuda"))
            t.copy_(make_labels((4, 64, 96), C, 0.3, "cuda", dtype=torch.uint8))
        g.replay()
        got = (loss.detach(), sup, cps, a.grad, b.grad)
        assert_close_to_reference(got, a.detach(), b.detach(), t, cps_weight=1.5)


@pytest.mark.gpu
def test_no_host_sync_in_eager_loss():
    a = make_logits("channels_last", 2, 21, 33, 47, torch.bfloat16, "cuda").requires_grad_()
    b = make_logits("channels_last", 2, 21, 33, 47, torch.bfloat16, "cuda").requires_grad_()
    t = make_labels((2, 33, 47), 21, 0.3, "cuda", dtype=torch.uint8)
    cps_fast.cps_loss(a, b, t).backward()  # warm-up compiles
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = cps_fast.cps_loss(a, b, t)
        (2 * loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_torch_compile_traces_the_fused_loss_without_graph_breaks():
    """cps_loss is a custom op with a fake implementation: fullgraph compilation works."""
    f = torch.compile(lambda a, b, t: cps_fast.cps_loss(a, b, t, cps_weight=1.5), fullgraph=True)
    a = make_logits("channels_last", 2, 5, 8, 9, torch.float32, "cpu")
    b = make_logits("channels_last", 2, 5, 8, 9, torch.float32, "cpu")
    t = make_labels((2, 8, 9), 5, 0.2, "cpu")
    a_leaf, b_leaf = a.clone().requires_grad_(), b.clone().requires_grad_()
    loss = f(a_leaf, b_leaf, t)
    (2 * loss).backward()
    ref = run(cps_loss_reference, a.double(), b.double(), t, grad_scale=2.0, cps_weight=1.5)
    torch.testing.assert_close(loss.detach().double(), ref[0], rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(a_leaf.grad.double(), ref[3], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(b_leaf.grad.double(), ref[4], rtol=1e-4, atol=1e-6)


def test_the_fused_loss_suites_run_with_poisoned_outputs():
    """The conftest fixture is on in every module marked poison_outputs (and off elsewhere)."""
    import test_ncps_loss
    import test_swept_configs
    import test_upsample_loss

    from cps_fast import fused

    assert fused.POISON_OUTPUTS
    for mod in (test_ncps_loss, test_swept_configs, test_upsample_loss):
        assert mod.pytestmark.name == "poison_outputs", mod.__name__


def test_kernel_config_is_checked():
    """A forced launch configuration applies to the Triton kernel only, and must be the kernel's own."""
    a = torch.randn(1, 3, 2, 2)
    with pytest.raises(ValueError, match="cps_loss: kernel_config applies to the triton backend, but the torch "
                                         "backend runs"):
        cps_fast.cps_loss(a, a, backend="torch", kernel_config=(16, 1, False))
    if backends.triton_kernels_import_error() is None and backends.why_unavailable("triton", "cpu") is None:
        from cps_fast.kernels.ncps_loss import NCPSLossConfig

        with pytest.raises(TypeError, match=r"cps_loss: kernel_config must be a cps_fast\.kernels\.cps_loss\."
                                            r"CPSLossConfig for these inputs, got NCPSLossConfig"):
            cps_fast.cps_loss(a, a, backend="triton", kernel_config=NCPSLossConfig(16, 1))
        with pytest.raises(TypeError, match=r"ncps_loss: kernel_config must be a .*CPSLossConfig"):
            cps_fast.ncps_loss([a, a], backend="triton", kernel_config=NCPSLossConfig(16, 1))  # K = 2: two-branch

