"""The fused n-branch CPS loss: every backend against the float64 reference.

Fresh random inputs every run (no fixed seed), K = 2, 3, 4, both label modes,
odd shapes, both memory formats and (P, C) rows, fp32/fp16/bf16, ignored
pixels, given pseudo labels, gradients, and outputs poisoned with NaN before
each kernel runs. Ensemble labels are an argmax of float sums, so inputs whose
top two ensemble scores are closer than 1e-4 are redrawn (there the float32
kernels and the float64 reference may honestly disagree); argmax ties of the
logits themselves are exact in every precision and kept.
"""
import itertools

import pytest
import torch

import cps_fast
from cps_fast import backends
from cps_fast.ncps_loss import NCPSLoss, ncps_loss
from cps_fast.reference import ncps_loss_reference
from helpers import assert_grads_close, assert_scalars_close, make_labels, make_logits, mean_ce

pytestmark = pytest.mark.poison_outputs  # NaN-filled kernel outputs (tests/conftest.py)

# the module, not the function cps_fast re-exports under the same name

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["nchw", "channels_last", "rows"]


def _backends(device):
    return [b for b in backends.available_backends(device) if b != "cuda"]  # no CUDA C++ kernel of this op


CASES = [(d, b) for d in DEVICES for b in _backends(d)]


def _ensemble_gap(xs):
    """Per pixel, the smallest gap between the top two other-branch softmax sums over k (float64)."""
    probs = [torch.softmax(x.double(), dim=1) for x in xs]
    total = sum(probs)
    gap = None
    for p in probs:
        top2 = (total - p).topk(2, dim=1).values
        g = top2[:, 0] - top2[:, 1]
        gap = g if gap is None else torch.minimum(gap, g)
    return gap


def make_branches(K, layout, N, C, H, W, dtype, device, ensemble=False):
    """K logits; for ensemble mode, pixels with near-tied ensemble labels are redrawn."""
    xs = [make_logits(layout, N, C, H, W, dtype, device) for _ in range(K)]
    if ensemble and K > 2:
        for _ in range(50):
            close = _ensemble_gap(xs) < 1e-4  # (N, H, W) or (P,)
            if not bool(close.any()):
                break
            for x in xs:
                fresh = make_logits(layout, N, C, H, W, dtype, device)
                sel = close.unsqueeze(1).expand_as(x)
                x.copy_(torch.where(sel, fresh, x))
        else:
            raise AssertionError("could not draw inputs without ensemble near-ties")
    return xs


def run(fn, xs, *args, grad_scale=1.0, **kw):
    """(loss, sup, cps, [grads]) of ``fn`` on leaf copies of the logits."""
    leaves = [x.detach().clone().requires_grad_() for x in xs]
    loss, sup, cps = fn(leaves, *args, return_parts=True, **kw)
    (grad_scale * loss).backward()
    return loss.detach(), sup, cps, [v.grad for v in leaves]


def lowp_reference(xs, target, *, pseudo=None, ensemble=False, cps_weight=1.0, ignore_index=255, return_parts=True):
    """The loss computed in the logits' own dtype (labels from the float64 reference rules)."""
    K = len(xs)

    def ce(x, y):
        return mean_ce(x, y, ignore_index)

    sup = sum(ce(x, target) for x in xs) if target is not None else xs[0].new_zeros(())
    if ensemble:
        probs = [torch.softmax(x.detach().double(), 1) for x in xs]
        labels = [sum(probs[j] for j in range(K) if j != k).argmax(1) for k in range(K)]
        cps = sum(ce(xs[k], labels[k]) for k in range(K))
    else:
        pseudo = pseudo or [None] * K
        labels = [x.detach().argmax(1) if y is None else y for x, y in zip(xs, pseudo)]
        cps = sum(sum(ce(xs[k], labels[j]) for j in range(K) if j != k) / (K - 1) for k in range(K))
    return sup + cps_weight * cps, sup.detach(), cps.detach()


def assert_close_to_reference(got, xs, target, grad_scale=1.0, **kw):
    """Compare (loss, sup, cps, grads) with the float64 reference on the same input values.

    Tolerance (as tests/test_loss.py): float32 rounding for the scalars; for the
    gradients, twice the error PyTorch makes computing the same thing in the logits'
    dtype, plus a floor.
    """
    ref = run(ncps_loss_reference, [x.double() for x in xs], target, grad_scale=grad_scale, **kw)
    assert_scalars_close(got, ref)
    if xs[0].dtype == torch.float32:
        lowp, floor = ref, 1e-6
    else:
        lowp = run(lowp_reference, xs, target, grad_scale=grad_scale, **kw)
        floor = 1e-3 * max(float(g.abs().max()) for g in ref[3])
    assert_grads_close(((f"grad[{k}]", *v) for k, v in enumerate(zip(got[3], ref[3], lowp[3], xs))), floor)


def _shape_for(C):
    return (2, 9, 13) if C <= 32 else (1, 5, 7)


# every (K, mode, C) once per backend; layouts and dtypes rotate through the cases
GRID = [(K, ens, C, LAYOUTS[i % 3], DTYPES[(i // 3) % 3])
        for i, (K, ens, C) in enumerate(itertools.product([2, 3, 4], [False, True], [2, 19, 21, 150]))]


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("K,ensemble,C,layout,dtype", GRID)
def test_matches_reference(device, backend, K, ensemble, C, layout, dtype):
    N, H, W = _shape_for(C)
    xs = make_branches(K, layout, N, C, H, W, dtype, device, ensemble=ensemble)
    shape = (N * H * W,) if layout == "rows" else (N, H, W)
    target = make_labels(shape, C, 0.2, device, dtype=torch.uint8)
    kw = dict(cps_weight=1.5, ensemble=ensemble)
    got = run(ncps_loss, xs, target, backend=backend, **kw)
    assert_close_to_reference(got, xs, target, **kw)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("ignore_frac", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("ensemble", [False, True])
def test_ignore_fractions(device, backend, ignore_frac, ensemble):
    xs = make_branches(3, "channels_last", 2, 21, 7, 9, torch.float32, device, ensemble=ensemble)
    target = make_labels((2, 7, 9), 21, ignore_frac, device)
    kw = dict(cps_weight=6.0, ensemble=ensemble)
    if not ensemble:  # given pseudo labels with the same ignore fraction, and one argmax branch
        kw["pseudo"] = [make_labels((2, 7, 9), 21, ignore_frac, device), None,
                        make_labels((2, 7, 9), 21, ignore_frac, device)]
    got = run(ncps_loss, xs, target, backend=backend, **kw)
    assert_close_to_reference(got, xs, target, **kw)
    if ignore_frac == 1.0:
        assert got[1].item() == 0.0  # supervised term of an all-ignored batch is 0, not NaN


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int32, torch.int64])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_given_pseudo_labels(device, backend, label_dtype, layout):
    K, C, N, H, W = 4, 19, 2, 5, 7
    xs = make_branches(K, layout, N, C, H, W, torch.bfloat16, device)
    shape = (N * H * W,) if layout == "rows" else (N, H, W)
    target = make_labels(shape, C, 0.5, device, dtype=label_dtype)
    pseudo = [make_labels(shape, C, 0.3, device, dtype=label_dtype), None,
              make_labels(shape, C, 0.6, device, dtype=label_dtype), None]
    kw = dict(pseudo=pseudo, cps_weight=1.5)
    got = run(ncps_loss, xs, target, backend=backend, **kw)
    assert_close_to_reference(got, xs, target, **kw)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("ensemble", [False, True])
def test_wide_class_axis(device, backend, ensemble):
    """C above the Triton register tile takes the online-softmax path."""
    C = 300
    xs = make_branches(3, "nchw", 1, C, 3, 5, torch.float32, device, ensemble=ensemble)
    target = make_labels((1, 3, 5), C, 0.2, device, ignore_index=-1)
    kw = dict(cps_weight=1.5, ignore_index=-1, ensemble=ensemble)
    got = run(ncps_loss, xs, target, backend=backend, **kw)
    assert_close_to_reference(got, xs, target, **kw)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("grad_scale", [3.0, 0.0, -0.5])
def test_grad_output_scaling(device, backend, grad_scale):
    xs = make_branches(3, "nchw", 2, 21, 5, 7, torch.float16, device)
    target = make_labels((2, 5, 7), 21, 0.2, device)
    got = run(ncps_loss, xs, target, backend=backend, grad_scale=grad_scale)
    assert_close_to_reference(got, xs, target, grad_scale=grad_scale)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("ensemble", [False, True])
@pytest.mark.parametrize("given", [False, True])
def test_two_branches_equal_cps_loss(device, backend, ensemble, given):
    if ensemble and given:
        pytest.skip("ensemble mode takes no given pseudo labels")
    a, b = (make_logits("channels_last", 2, 21, 7, 9, torch.float32, device) for _ in range(2))
    target = make_labels((2, 7, 9), 21, 0.3, device)
    pa = make_labels((2, 7, 9), 21, 0.2, device) if given else None
    pb = make_labels((2, 7, 9), 21, 0.4, device) if given else None
    got = run(ncps_loss, [a, b], target, backend=backend, cps_weight=1.5, ensemble=ensemble,
              pseudo=[pa, pb] if given else None)
    ref = run(lambda xs, *args, **kw: cps_fast.cps_loss(xs[0], xs[1], *args, **kw), [a, b], target,
              backend=backend, cps_weight=1.5, pseudo_a=pa, pseudo_b=pb)
    for x, r in zip(got[:3], ref[:3]):
        torch.testing.assert_close(x, r, rtol=1e-6, atol=1e-6)
    for g, r in zip(got[3], ref[3]):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("device,backend", CASES)
def test_argmax_ties_go_to_lowest_class(device, backend):
    xs = [torch.randint(0, 3, (2, 7, 5, 6), device=device).float() for _ in range(3)]
    got = run(ncps_loss, xs, None, backend=backend)
    assert_close_to_reference(got, xs, None)


@pytest.mark.parametrize("device,backend", CASES)
def test_partial_grad_and_forward_only(device, backend):
    xs = make_branches(3, "nchw", 2, 21, 5, 7, torch.float32, device)
    target = make_labels((2, 5, 7), 21, 0.2, device)
    leaf = xs[1].clone().requires_grad_()
    loss = ncps_loss([xs[0], leaf, xs[2]], target, backend=backend, cps_weight=2.0)
    loss.backward()
    x64 = [x.double().requires_grad_(k == 1) for k, x in enumerate(xs)]
    ref = ncps_loss_reference(x64, target, cps_weight=2.0)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(leaf.grad.double(), x64[1].grad, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        loss = ncps_loss(xs, target, backend=backend, cps_weight=2.0)
    assert not loss.requires_grad
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-5, atol=2e-5)


def test_module_and_return_parts():
    xs = [torch.randn(2, 5, 3, 4) for _ in range(3)]
    t = torch.randint(0, 5, (2, 3, 4))
    mod = NCPSLoss(cps_weight=1.5, ensemble=True)
    assert "cps_weight=1.5" in repr(mod) and "ensemble=True" in repr(mod)
    loss = mod(xs, t)
    ref = ncps_loss_reference([x.double() for x in xs], t, cps_weight=1.5, ensemble=True)
    torch.testing.assert_close(loss.double(), ref, rtol=2e-5, atol=2e-5)
    loss2, sup, cps = NCPSLoss(cps_weight=1.5, return_parts=True)(xs, t)
    torch.testing.assert_close(loss2, sup + 1.5 * cps)
    assert not sup.requires_grad and not cps.requires_grad


def test_backward_twice_is_refused():
    xs = [torch.randn(1, 3, 2, 2, requires_grad=True) for _ in range(3)]
    loss = ncps_loss(xs)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_torch_compile_traces_the_fused_loss_without_graph_breaks():
    f = torch.compile(lambda xs, t: ncps_loss(xs, t, cps_weight=1.5), fullgraph=True)
    xs = [make_logits("channels_last", 2, 5, 6, 7, torch.float32, "cpu") for _ in range(3)]
    t = make_labels((2, 6, 7), 5, 0.2, "cpu")
    leaves = [x.clone().requires_grad_() for x in xs]
    loss = f(leaves, t)
    (2 * loss).backward()
    ref = run(ncps_loss_reference, [x.double() for x in xs], t, grad_scale=2.0, cps_weight=1.5)
    torch.testing.assert_close(loss.double(), ref[0], rtol=2e-5, atol=2e-5)
    for g, r in zip(leaves, ref[3]):
        torch.testing.assert_close(g.grad.double(), r, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- bad input


def _bad(match, *args, exc=(ValueError, TypeError), **kw):
    with pytest.raises(exc, match=match):
        ncps_loss(*args, **kw)


def test_bad_inputs_are_named():
    a = torch.randn(2, 5, 3, 4)
    t = torch.randint(0, 5, (2, 3, 4))
    _bad(r"got K = 1 branch logits; expected K >= 2", [a])
    _bad(r"logits must be a list or tuple of K >= 2 tensors .* got a Tensor of shape \(2, 5, 3, 4\)", a)
    _bad(r"logits\[0\] has shape \(2, 5, 3, 4\) but logits\[2\] has shape \(2, 5, 3, 5\)",
         [a, a, torch.randn(2, 5, 3, 5)])
    _bad(r"logits\[0\] is torch.float32 but logits\[1\] is torch.float16", [a, a.half()])
    _bad(r"logits\[0\] is on cpu but logits\[1\] is on meta", [a, a.to("meta")])
    _bad(r"logits\[1\] has dtype torch.int64; expected float32, float16 or bfloat16", [a, a.long()])
    _bad(r"C = 1 classes", [torch.randn(2, 1, 3, 4)] * 2)
    _bad(r"target has shape \(2, 4, 3\); expected \(2, 3, 4\)", [a, a], t.transpose(1, 2))
    _bad(r"target has dtype torch.float32; expected integer labels", [a, a], t.float())
    _bad(r"pseudo has 2 entries for K = 3 branches", [a, a, a], pseudo=[t, t])
    _bad(r"pseudo\[1\] has shape \(2, 3\); expected \(2, 3, 4\)", [a, a], pseudo=[None, t[:, :, 0]])
    _bad(r"ensemble=True with given pseudo labels is ambiguous", [a, a, a], pseudo=[t, None, None], ensemble=True)
    _bad(r"ignore_index=3 is also a class of the C = 5 logits", [a, a], t, ignore_index=3)


def test_out_of_range_labels_are_reported():
    a = torch.randn(2, 5, 3, 4)
    t = torch.randint(0, 5, (2, 3, 4))
    t[1, 2, 3] = 37
    _bad(r"^ncps_loss: target has value 37 at index \(1, 2, 3\), outside \[0, 5\) and not ignore_index \(255\)",
         [a, a, a], t)
    p = torch.zeros(2, 3, 4, dtype=torch.long)
    p[0, 0, 1] = -2
    _bad(r"pseudo\[2\] has value -2 at index \(0, 0, 1\)", [a, a, a], pseudo=[None, None, p])
    assert torch.isfinite(ncps_loss([a, a, a], t, validate=False))  # ignored, never read out of bounds


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only machine's messages")
def test_forced_backend_that_cannot_run_says_why(monkeypatch):
    xs = [torch.randn(1, 3, 2, 2)] * 2
    with pytest.raises(backends.BackendUnavailable, match="'cuda' cannot run on cpu tensors"):
        ncps_loss(xs, backend="cuda")
    monkeypatch.setenv("CPS_FAST_BACKEND", "torch")
    ncps_loss(xs)


def test_cuda_backend_is_refused_with_the_reason(monkeypatch):
    """There is no CUDA C++ kernel of the n-branch op: an explicit 'cuda' says so, an automatic choice
    passes over it; the Triton kernel's branch slots bound K. K = 2 runs the two-branch kernels,
    which have one."""
    from cps_fast import fused

    monkeypatch.setattr(backends, "why_unavailable", lambda name, device: None)  # as if all were installed
    monkeypatch.delenv("CPS_FAST_BACKEND", raising=False)
    n_branch = fused.KERNELS["ncps_loss"]
    assert fused.why_unavailable(n_branch, "cuda", "cuda", 21, 3).startswith("ncps_loss has no CUDA C++ kernel")
    assert fused.why_unavailable(fused.KERNELS["cps_loss"], "cuda", "cuda", 21, 2) is None
    with pytest.raises(backends.BackendUnavailable, match=r"ncps_loss: backend='cuda' cannot run on cuda tensors: "
                                                          r"ncps_loss has no CUDA C\+\+ kernel"):
        fused.select_backend("ncps_loss", "cuda", "cuda", 21, 3, "ncps_loss")
    assert fused.select_backend("ncps_loss", "cuda", None, 21, 3, "ncps_loss") == "triton"
    assert fused.select_backend("ncps_loss", "cuda", None, 21, 9, "ncps_loss") == "torch"  # 8 slots
    with pytest.raises(backends.BackendUnavailable, match="slots for 2 to 8 branches, got K = 9"):
        fused.select_backend("ncps_loss", "cuda", "triton", 21, 9, "ncps_loss")


def test_extension_kernel_guards_its_arguments():
    """The C++ TORCH_CHECKs guard what only the extension sees (the op's entry checks the user's arguments)."""
    ext = backends.extension()
    assert ext is not None and hasattr(ext, "ncps_loss_forward"), "rebuild the extension: ncps_loss_forward missing"
    xs = [torch.randn(1, 4, 6) for _ in range(3)]
    counts = torch.ones(4)
    for args in ((xs, None, [None] * 3, torch.ones(3), None),
                 (xs, None, [None] * 2, counts, None),
                 (xs, None, [None] * 3, counts, [torch.empty(1, 4, 6), xs[1], torch.empty(1, 4, 6)])):
        with pytest.raises(RuntimeError, match=r"cps_fast\._C\.ncps_loss_forward: "):
            ext.ncps_loss_forward(*args, 1.0, 255, False)
    with pytest.raises(RuntimeError, match=r"cps_fast\._C\.ncps_loss_forward: "):
        ext.ncps_loss_forward(xs, None, [torch.zeros(1, 6, dtype=torch.long), None, None], counts, None, 1.0, 255, True)


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("K", [2, 3, 4])
@pytest.mark.parametrize("ensemble", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_triton_on_cuda_matches_reference(K, ensemble, layout):
    xs = make_branches(K, layout, 2, 21, 65, 97, torch.bfloat16, "cuda", ensemble=ensemble)
    target = make_labels((2, 65, 97), 21, 0.3, "cuda", dtype=torch.uint8)
    got = run(ncps_loss, xs, target, backend="triton", cps_weight=1.5, ensemble=ensemble)
    assert_close_to_reference(got, xs, target, cps_weight=1.5, ensemble=ensemble)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("ensemble", [False, True])
def test_cuda_graph_capture_and_replay(ensemble):
    """The loss (forward + backward) captures into a CUDA graph, which a host synchronisation
    would make fail, and every replay on new inputs gives the reference's loss, parts and
    gradients (written into the same ``.grad`` tensors)."""
    K, (N, C, H, W) = 3, (2, 21, 64, 96)
    xs = [x.requires_grad_() for x in make_branches(K, "channels_last", N, C, H, W, torch.bfloat16, "cuda",
                                                    ensemble=ensemble)]
    t = make_labels((N, H, W), C, 0.3, "cuda", dtype=torch.uint8)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm-up: compile kernels, settle the allocator
            for x in xs:
                x.grad = None
            ncps_loss(xs, t, backend="triton", ensemble=ensemble).backward()
    torch.cuda.current_stream().wait_stream(s)
    for x in xs:
        x.grad = None
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        loss, sup, cps = ncps_loss(xs, t, backend="triton", cps_weight=1.5, ensemble=ensemble, return_parts=True)
        loss.backward()
    for _ in range(2):
        fresh = make_branches(K, "channels_last", N, C, H, W, torch.bfloat16, "cuda", ensemble=ensemble)
        with torch.no_grad():
            for x, f in zip(xs, fresh):
                x.copy_(f)
            t.copy_(make_labels((N, H, W), C, 0.3, "cuda", dtype=torch.uint8))
        g.replay()
        got = (loss.detach(), sup, cps, [x.grad for x in xs])
        assert_close_to_reference(got, [x.detach() for x in xs], t, cps_weight=1.5, ensemble=ensemble)
