"""Tests of the C++/CUDA extension cps_fast._C (csrc/).

The CPU kernel is compared with ``_torch_fwd`` of cps_fast.loss (the kernel
contract in plain PyTorch) on sums and both gradients; the argument checks are
exercised; every csrc/*.cu file is compiled with nvcc for sm_90a; on a GPU the
CUDA kernel is compared with the reference and the contract.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

from cps_fast.loss import _as_ncl, _torch_fwd

_C = pytest.importorskip("cps_fast._C", reason="the extension cps_fast._C is not built")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IGNORE = 255


# ----------------------------------------------------------------------------- helpers


def _logits(shape, dtype, layout, device="cpu", gen=None):
    x = torch.randn(shape, generator=gen) * 3.0
    x = x.to(device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _labels(shape, C, ignore_frac, dtype, device="cpu", gen=None):
    y = torch.randint(0, C, shape, generator=gen)
    if ignore_frac > 0:
        y[torch.rand(shape, generator=gen) < ignore_frac] = IGNORE
    return y.to(device=device, dtype=dtype)


def _counts(t2, pa2, pb2, C, numel, device):
    def count(y):
        if y is None:
            return float(numel)
        y = y.long()
        return float(((y != IGNORE) & (y >= 0) & (y < C)).sum())

    return torch.tensor([count(t2) if t2 is not None else 0.0, count(pa2), count(pb2)], dtype=torch.float32,
                        device=device)


def _run_both(a, b, t, pa, pb, cps_weight=1.5, grads=True, device_ref=None):
    """Run the extension and _torch_fwd on the same (N, C, L) views; return both results."""
    a3, b3 = _as_ncl(a), _as_ncl(b)
    n = a3.shape[0]
    t2, pa2, pb2 = (None if y is None else y.reshape(n, -1) for y in (t, pa, pb))
    C, numel = a3.shape[1], a3.shape[0] * a3.shape[2]
    counts = _counts(t2, pa2, pb2, C, numel, a.device)
    out = {}
    for name, fn in (("ext", _C.cps_loss_forward), ("ref", _torch_fwd)):
        ga = gb = None
        if grads:
            ga, gb = torch.empty_like(a), torch.empty_like(b)
            ga.fill_(float("nan"))
            gb.fill_(float("nan"))
        ga3 = _as_ncl(ga) if grads else None
        gb3 = _as_ncl(gb) if grads else None
        if grads:
            assert ga3.stride() == a3.stride() and gb3.stride() == b3.stride()
        sums = fn(a3, b3, t2, pa2, pb2, counts, ga3, gb3, cps_weight, IGNORE)
        out[name] = (sums, ga, gb)
    return out


def _check(out, dtype):
    sums, ga, gb = out["ext"]
    rsums, rga, rgb = out["ref"]
    assert sums.dtype == torch.float32 and sums.shape == (3,)
    assert sums.device == rsums.device
    assert torch.isfinite(sums).all(), sums
    torch.testing.assert_close(sums, rsums.float(), rtol=2e-5, atol=1e-3)
    if ga is None:
        return
    for g, r in ((ga, rga), (gb, rgb)):
        assert g.dtype == r.dtype and g.stride() == r.stride()
        assert not torch.isnan(g).any(), "the kernel left gradient elements unwritten"
        scale = float(r.float().abs().max())
        if dtype == torch.float32:
            # the CUDA build uses --use_fast_math (__expf, __logf): p - 1 at p ~ 1 cancels about
            # 1e-6 of relative error, which a 1e-6 floor would meet head-on
            floor = 4e-6 if g.is_cuda else 1e-6
            torch.testing.assert_close(g, r, rtol=1e-4, atol=floor * scale)
        else:
            # both round a float32 gradient to the logits' dtype: at most one ulp apart
            eps = torch.finfo(dtype).eps
            torch.testing.assert_close(g.float(), r.float(), rtol=2 * eps, atol=1e-3 * scale)


# ----------------------------------------------------------------------------- CPU kernel vs contract


@pytest.mark.parametrize("C", [2, 19, 21, 150, 256])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_matches_contract(C, layout, dtype):
    gen = torch.Generator().manual_seed(1000 * C + (layout == "nchw") + 7 * int(dtype.itemsize))
    shape = (2, C, 33, 47) if C <= 21 else (2, C, 9, 13)
    a = _logits(shape, dtype, layout, gen=gen)
    b = _logits(shape, dtype, layout, gen=gen)
    t = _labels((shape[0],) + shape[2:], C, 0.2, torch.uint8 if C <= 255 else torch.int64, gen=gen)
    _check(_run_both(a, b, t, None, None), dtype)


@pytest.mark.parametrize("ignore_frac", [0.0, 0.2, 1.0])
@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int32, torch.int64])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cpu_given_pseudo_labels(ignore_frac, label_dtype, layout):
    gen = torch.Generator().manual_seed(int(ignore_frac * 10) + 31 * label_dtype.itemsize)
    C, shape = 21, (3, 21, 17, 29)
    a = _logits(shape, torch.float32, layout, gen=gen)
    b = _logits(shape, torch.float32, layout, gen=gen)
    lshape = (shape[0],) + shape[2:]
    t = _labels(lshape, C, ignore_frac, label_dtype, gen=gen)
    pa = _labels(lshape, C, ignore_frac, label_dtype, gen=gen)
    pb = _labels(lshape, C, ignore_frac, torch.int64, gen=gen)
    out = _run_both(a, b, t, pa, pb, cps_weight=0.7)
    _check(out, torch.float32)
    if ignore_frac == 1.0:
        sums, ga, gb = out["ext"]
        assert torch.equal(sums, torch.zeros(3)), "every pixel ignored: every sum must be 0"
        assert torch.equal(ga, torch.zeros_like(ga)) and torch.equal(gb, torch.zeros_like(gb))


def test_cpu_pc_inputs_and_no_target():
    gen = torch.Generator().manual_seed(5)
    P, C = 1001, 19
    a = torch.randn(P, C, generator=gen)
    b = torch.randn(P, C, generator=gen)
    t = _labels((P,), C, 0.3, torch.int64, gen=gen)
    _check(_run_both(a, b, t, None, None), torch.float32)
    out = _run_both(a, b, None, None, None)  # cross term only
    _check(out, torch.float32)
    assert float(out["ext"][0][0]) == 0.0


def test_cpu_mixed_layouts_and_strided_labels():
    """a NCHW, b channels_last, labels as non-contiguous views: strides are honoured."""
    gen = torch.Generator().manual_seed(9)
    shape, C = (2, 21, 15, 22), 21
    a = _logits(shape, torch.float32, "nchw", gen=gen)
    b = _logits(shape, torch.float32, "channels_last", gen=gen)
    big = _labels((2, 15, 44), C, 0.2, torch.int64, gen=gen)
    t = big[:, :, ::2]  # not contiguous
    pa = _labels((2, 22, 15), C, 0.1, torch.uint8, gen=gen).transpose(1, 2)
    _check(_run_both(a, b, t, pa, None), torch.float32)


def test_cpu_no_gradients_and_out_of_range_labels():
    gen = torch.Generator().manual_seed(11)
    shape, C = (2, 19, 13, 17), 19
    a = _logits(shape, torch.float32, "nchw", gen=gen)
    b = _logits(shape, torch.float32, "nchw", gen=gen)
    t = _labels((2, 13, 17), C, 0.1, torch.int64, gen=gen)
    t[0, 0, :5] = torch.tensor([19, 200, -1, -7, 254])  # outside [0, C): treated as ignored
    out = _run_both(a, b, t, None, None, grads=False)
    _check(out, torch.float32)
    out = _run_both(a, b, t, None, None, grads=True)
    _check(out, torch.float32)


def test_cpu_argmax_ties_go_to_lowest_class():
    """Integer-valued logits make many ties; in-kernel argmax must match torch.argmax."""
    gen = torch.Generator().manual_seed(13)
    shape = (2, 21, 11, 23)
    for layout in ("nchw", "channels_last"):
        a = torch.randint(-2, 3, shape, generator=gen).float()
        b = torch.randint(-2, 3, shape, generator=gen).float()
        if layout == "channels_last":
            a, b = (x.contiguous(memory_format=torch.channels_last) for x in (a, b))
        out = _run_both(a, b, None, None, None)
        _check(out, torch.float32)
        # the same sums with the pseudo labels made by torch.argmax and given explicitly
        given = _run_both(a, b, None, a.argmax(1), b.argmax(1))
        torch.testing.assert_close(out["ext"][0], given["ext"][0], rtol=0, atol=0)


def test_cpu_ignore_index_other_than_255():
    gen = torch.Generator().manual_seed(17)
    shape, C = (1, 5, 8, 9), 5
    a = _logits(shape, torch.float32, "nchw", gen=gen)
    b = _logits(shape, torch.float32, "nchw", gen=gen)
    t = torch.randint(0, C, (1, 72), generator=gen)
    t[0, ::3] = -1
    a3, b3 = _as_ncl(a), _as_ncl(b)
    valid = float((t != -1).sum())
    counts = torch.tensor([valid, 72.0, 72.0])
    res = []
    for fn in (_C.cps_loss_forward, _torch_fwd):
        ga, gb = torch.empty_like(a3), torch.empty_like(b3)
        res.append((fn(a3, b3, t, None, None, counts, ga, gb, 1.0, -1), ga, gb))
    for x, y in zip(res[0], res[1]):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def test_cpu_deterministic_across_thread_counts():
    gen = torch.Generator().manual_seed(19)
    shape, C = (2, 21, 40, 50), 21
    a = _logits(shape, torch.float32, "channels_last", gen=gen)
    b = _logits(shape, torch.float32, "channels_last", gen=gen)
    t = _labels((2, 40, 50), C, 0.2, torch.uint8, gen=gen).reshape(2, -1)
    counts = _counts(t, None, None, C, 4000, "cpu")
    prev = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            ga, gb = torch.empty_like(a), torch.empty_like(b)
            s = _C.cps_loss_forward(_as_ncl(a), _as_ncl(b), t, None, None, counts, _as_ncl(ga), _as_ncl(gb), 1.0,
                                    IGNORE)
            results.append((s, ga, gb))
    finally:
        torch.set_num_threads(prev)
    for x, y in zip(*results):
        assert torch.equal(x, y)


def test_cpu_empty_input():
    a = torch.empty(0, 21, 0)
    counts = torch.zeros(3)
    ga = torch.empty_like(a)
    s = _C.cps_loss_forward(a, a.clone(), None, None, None, counts, ga, torch.empty_like(a), 1.0, IGNORE)
    assert torch.equal(s, torch.zeros(3))


def test_cpu_through_public_api():
    import cps_fast.loss as loss_mod
    from cps_fast.reference import cps_loss_reference

    gen = torch.Generator().manual_seed(23)
    a = _logits((2, 21, 17, 19), torch.float32, "channels_last", gen=gen).requires_grad_()
    b = _logits((2, 21, 17, 19), torch.float32, "channels_last", gen=gen).requires_grad_()
    t = _labels((2, 17, 19), 21, 0.2, torch.uint8, gen=gen)
    loss = loss_mod.cps_loss(a, b, t, cps_weight=1.5, backend="cpu")
    loss.backward()
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    ref = cps_loss_reference(a2, b2, t, cps_weight=1.5)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.grad, a2.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(b.grad, b2.grad, rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------- argument checks


def _good_args(C=5, dtype=torch.float32):
    a3 = torch.randn(2, C, 7, dtype=dtype)
    b3 = torch.randn(2, C, 7, dtype=dtype)
    t2 = torch.randint(0, C, (2, 7))
    return dict(a3=a3, b3=b3, t2=t2, pa2=None, pb2=None, counts=torch.tensor([14.0, 14.0, 14.0]),
                grad_a3=torch.empty_like(a3), grad_b3=torch.empty_like(b3), cps_weight=1.0, ignore_index=IGNORE)


def _call(**kw):
    order = ("a3", "b3", "t2", "pa2", "pb2", "counts", "grad_a3", "grad_b3", "cps_weight", "ignore_index")
    return _C.cps_loss_forward(*(kw[k] for k in order))


def test_good_args_run():
    assert _call(**_good_args()).shape == (3,)


def test_has_cuda_says_whether_the_cuda_kernels_are_in_the_binary():
    blob = Path(_C.__file__).read_bytes()
    assert type(_C.has_cuda()) is bool
    assert (b"cps_loss_reduce_kernel" in blob) == _C.has_cuda(), _C.__file__


# what only the extension sees (the op's entry checks the user's arguments, tests/test_fused_ops.py):
# the buffers the Python layer makes, and memory the kernel must not write through
GUARDED = [
    lambda k: k.update(counts=torch.ones(2)),
    lambda k: k.update(counts=torch.ones(3, dtype=torch.float64)),
    lambda k: k.update(grad_a3=torch.empty(2, 5, 6)),
    lambda k: k.update(grad_b3=k["grad_b3"].half()),
    lambda k: k.update(grad_a3=torch.empty(1, 1, 1).expand(2, 5, 7)),
    lambda k: k.update(grad_a3=k["a3"]),
    lambda k: k.update(a3=k["a3"][0]),
    lambda k: k.update(cps_weight=float("nan")),
]


def test_the_extension_guards_its_arguments():
    """The C++ TORCH_CHECKs are the extension's own guard when it is called directly: each bad call
    raises, naming the function (the messages are the op's entry's to test, not repeated here)."""
    for change in GUARDED:
        kw = _good_args()
        change(kw)
        with pytest.raises(RuntimeError, match=r"cps_fast\._C\.cps_loss_forward: "):
            _call(**kw)
    with pytest.raises(RuntimeError, match=r"cps_fast\._C\.cps_loss_forward: .*C = 1 classes"):
        _call(**_good_args(C=1))


# ----------------------------------------------------------------------------- CUDA: compile check


def _nvcc():
    path = shutil.which("nvcc")
    if path is None and os.path.exists("/usr/local/cuda/bin/nvcc"):
        path = "/usr/local/cuda/bin/nvcc"
    return path


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found: the CUDA sources cannot be compile-checked")
@pytest.mark.parametrize("source", sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cu"))) or ["<none>"])
def test_cuda_sources_compile_for_sm90a(source, tmp_path):
    """Every csrc/*.cu compiles for sm_90a with nvcc against the installed torch headers."""
    if source == "<none>":
        pytest.fail("no csrc/*.cu file found")
    from torch.utils.cpp_extension import include_paths

    cmd = [
        _nvcc(), "-std=c++17", "-c", "-O3", "--use_fast_math",
        "-gencode=arch=compute_90a,code=sm_90a",
        "-DCPS_FAST_WITH_CUDA=1",
        # A CPU torch wheel ships the c10/cuda headers but not the cmake-generated
        # c10/cuda/impl/cuda_cmake_macros.h; nothing here needs what it defines.
        "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        "-diag-suppress", "3306",  # torch's headers use a C++20 bit-field initialiser
        "-Xcompiler", "-fPIC",
        f"-I{os.path.join(ROOT, 'csrc')}",
        f"-I{sysconfig.get_paths()['include']}",
    ]
    cmd += [f"-I{p}" for p in include_paths()]
    cmd += [source, "-o", str(tmp_path / (os.path.basename(source) + ".o"))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"nvcc failed on {source}:\n{' '.join(cmd)}\n{proc.stderr[-6000:]}"
    assert (tmp_path / (os.path.basename(source) + ".o")).stat().st_size > 0


# ----------------------------------------------------------------------------- CUDA kernel on a GPU

_needs_cuda_ext = pytest.mark.skipif(
    not torch.cuda.is_available() or not _C.has_cuda(),
    reason="needs a CUDA device and cps_fast._C built with CUDA",
)


@pytest.mark.gpu
@_needs_cuda_ext
@pytest.mark.parametrize("C", [2, 19, 21, 150, 256])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_matches_contract(C, layout, dtype):
    gen = torch.Generator().manual_seed(77 + C)
    shape = (2, C, 33, 47) if C <= 21 else (2, C, 13, 17)
    a = _logits(shape, dtype, layout, device="cuda", gen=gen)
    b = _logits(shape, dtype, layout, device="cuda", gen=gen)
    lshape = (shape[0],) + shape[2:]
    t = _labels(lshape, C, 0.2, torch.uint8 if C <= 255 else torch.int64, device="cuda", gen=gen)
    _check(_run_both(a, b, t, None, None), dtype)
    pa = _labels(lshape, C, 0.3, torch.int64, device="cuda", gen=gen)
    pb = _labels(lshape, C, 0.3, torch.int32, device="cuda", gen=gen)
    _check(_run_both(a, b, t, pa, pb, cps_weight=0.5), dtype)


@pytest.mark.gpu
@_needs_cuda_ext
@pytest.mark.parametrize("C", [2, 19, 21, 150, 256])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_backend_matches_reference(C, layout, dtype):
    """The public API with backend="cuda" against cps_loss_reference (loss and gradients)."""
    import cps_fast.loss as loss_mod
    from cps_fast.reference import cps_loss_reference

    gen = torch.Generator().manual_seed(91 + C)
    shape = (2, C, 21, 26)
    a = _logits(shape, dtype, layout, device="cuda", gen=gen).requires_grad_()
    b = _logits(shape, dtype, layout, device="cuda", gen=gen).requires_grad_()
    t = _labels((2, 21, 26), C, 0.2, torch.int64, device="cuda", gen=gen)
    ii = 255 if C <= 255 else -1  # 255 is a class of 256 logits: the API refuses it as ignore_index
    t[t == IGNORE] = ii
    loss = loss_mod.cps_loss(a, b, t, cps_weight=1.5, ignore_index=ii, backend="cuda")
    loss.backward()
    a2 = a.detach().float().requires_grad_()
    b2 = b.detach().float().requires_grad_()
    ref = cps_loss_reference(a2, b2, t, cps_weight=1.5, ignore_index=ii)
    ref.backward()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(loss.float(), ref.float(), rtol=tol, atol=tol)
    for g, r in ((a.grad, a2.grad), (b.grad, b2.grad)):
        scale = float(r.abs().max())
        torch.testing.assert_close(g.float(), r, rtol=tol, atol=tol * scale)


@pytest.mark.gpu
@_needs_cuda_ext
def test_cuda_matches_cpu_kernel_and_is_deterministic():
    gen = torch.Generator().manual_seed(3)
    shape, C = (2, 21, 40, 37), 21
    a = _logits(shape, torch.float32, "channels_last", gen=gen)
    b = _logits(shape, torch.float32, "channels_last", gen=gen)
    t = _labels((2, 40, 37), C, 0.2, torch.uint8, gen=gen)
    cpu = _run_both(a, b, t, None, None)["ext"]
    runs = [_run_both(a.cuda(), b.cuda(), t.cuda(), None, None)["ext"] for _ in range(2)]
    for x, y in zip(runs[0], runs[1]):
        assert torch.equal(x, y)
    torch.testing.assert_close(runs[0][0].cpu(), cpu[0], rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(runs[0][1].cpu(), cpu[1], rtol=1e-4, atol=1e-8)


def test_outputs_are_not_poisoned_outside_the_marked_suites():
    from cps_fast import fused

    assert not fused.POISON_OUTPUTS
