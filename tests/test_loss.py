"""The fused CPS loss: what only it has, and its comparison with the float64 reference.

The contracts every fused loss keeps (every backend against the reference across shapes, memory
formats, dtypes, ignored pixels, given pseudo labels and gradients; the module; bad input) are
tests/test_fused_ops.py's, which compares cps_loss through :func:`assert_close_to_reference` here.
Here: the flat channels_last Triton kernel, the reference code's CPS step as one call, backend
selection and kernel_config checks. Outputs are poisoned with NaN before each kernel runs.
"""
import os

import pytest
import torch

import cps_fast
from cps_fast import backends
from cps_fast.reference import cps_loss_reference, cps_step_reference
from helpers import assert_grads_close, assert_scalars_close, make_labels, make_logits, mean_ce, pairwise, run

pytestmark = pytest.mark.poison_outputs  # NaN-filled kernel outputs (tests/conftest.py)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


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


TRITON_DEVICES = [d for d in DEVICES if "triton" in backends.available_backends(d)]


FLAT_SHAPES = [(2, (2, 9, 31)), (19, (2, 11, 15)), (21, (3, 37, 41)), (150, (2, 7, 13)), (256, (1, 5, 3))]


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("C,shape,dtype,given_pseudo",
                         [pytest.param(C, shape, dtype, given, id=f"{C}-{str(dtype)[6:]}-{'given' if given else 'argmax'}")
                          for (C, shape), dtype, given in pairwise(FLAT_SHAPES, DTYPES, [False, True])])
def test_channels_last_flat_kernel(device, C, shape, dtype, given_pseudo, monkeypatch):
    """The flat channels_last kernel (CPSLossConfig(flat=True): 128-bit accesses and a gather) against the reference;
    with 3 x 37 x 41 = 4551 pixels of 21 classes, tiles of 128 pixels end mid-image and mid-row. Every pair of
    (class count, dtype, given pseudo label) meets in some case (helpers.pairwise), not the full product."""
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


def test_the_fused_loss_suites_run_with_poisoned_outputs():
    """The conftest fixture is on in every module marked poison_outputs (and off elsewhere)."""
    import test_fused_ops
    import test_ncps_loss
    import test_swept_configs
    import test_upsample_loss

    from cps_fast import fused

    assert fused.POISON_OUTPUTS
    for mod in (test_fused_ops, test_ncps_loss, test_swept_configs, test_upsample_loss):
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

