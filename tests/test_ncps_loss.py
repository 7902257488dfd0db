"""The fused n-branch CPS loss: what only it has, and its comparison with the float64 reference.

The contracts every fused loss keeps are tests/test_fused_ops.py's, for K = 3 (the n-branch
kernels) and K = 2 (cps_loss's kernels), through :func:`make_branches` and
:func:`assert_close_to_reference` here. Here: ensemble mode and K = 4 against the reference
(every backend, both memory formats and (P, C) rows, fp32/fp16/bf16, ignored pixels, given
pseudo labels, gradients, fresh random inputs, outputs poisoned with NaN), K = 2 equal to
cps_loss, the branch-list arguments, the backends' limits (no CUDA C++ kernel, 8 Triton slots).
Ensemble labels are an argmax of float sums, so inputs whose top two ensemble scores are closer
than 1e-4 are redrawn (there the float32 kernels and the float64 reference may honestly
disagree); argmax ties of the logits themselves are exact in every precision and kept.
"""
import pytest
import torch

import cps_fast
from cps_fast import backends
from cps_fast.ncps_loss import ncps_loss
from cps_fast.reference import ncps_loss_reference
from helpers import assert_grads_close, assert_scalars_close, make_labels, make_logits, mean_ce, pairwise

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


# the (K, mode) pairs test_fused_ops.py leaves out (K = 2 and 3 in default mode are its), with every
# pair of (K and mode, C, layout, dtype) values in some case; and the online-softmax path of ensemble mode
GRID = [(K, ens, C, layout, dtype) for (K, ens), C, layout, dtype in
        pairwise([(2, True), (3, True), (4, False), (4, True)], [2, 21, 150], LAYOUTS, DTYPES)]
GRID.append((3, True, 300, "nchw", torch.float32))
GRID = [pytest.param(*row, id=f"K{row[0]}-{'ensemble' if row[1] else 'default'}-{row[2]}-{row[3]}-{str(row[4])[6:]}")
        for row in GRID]


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("K,ensemble,C,layout,dtype", GRID)
def test_more_branches_and_ensemble_match_reference(device, backend, K, ensemble, C, layout, dtype):
    """Ensemble mode for K = 2, 3, 4 and K = 4 in default mode (with given pseudo labels for two
    branches, the argmax for the others) against the reference."""
    N, H, W = _shape_for(C)
    xs = make_branches(K, layout, N, C, H, W, dtype, device, ensemble=ensemble)
    shape = (N * H * W,) if layout == "rows" else (N, H, W)
    ii, label_dtype = (255, torch.uint8) if C <= 255 else (-1, torch.int64)
    target = make_labels(shape, C, 0.2, device, dtype=label_dtype, ignore_index=ii)
    kw = dict(cps_weight=1.5, ensemble=ensemble, ignore_index=ii)
    if not ensemble:
        kw["pseudo"] = [make_labels(shape, C, 0.3, device, dtype=torch.int32), None,
                        make_labels(shape, C, 0.6, device, dtype=torch.int64), None]
    got = run(ncps_loss, xs, target, backend=backend, **kw)
    assert_close_to_reference(got, xs, target, **kw)


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


def _bad(match, *args, exc=(ValueError, TypeError), **kw):
    with pytest.raises(exc, match=match):
        ncps_loss(*args, **kw)


def test_bad_branch_lists_are_named():
    """What only ncps_loss takes: lists of K branches and of K pseudo labels, and ensemble mode (the
    checks every op shares are tests/test_fused_ops.py's)."""
    a = torch.randn(2, 5, 3, 4)
    t = torch.randint(0, 5, (2, 3, 4))
    _bad(r"got K = 1 branch logits; expected K >= 2", [a])
    _bad(r"logits must be a list or tuple of K >= 2 tensors .* got a Tensor of shape \(2, 5, 3, 4\)", a)
    _bad(r"pseudo has 2 entries for K = 3 branches", [a, a, a], pseudo=[t, t])
    _bad(r"pseudo must be None or a list of K = 3 label tensors", [a, a, a], pseudo=t)
    _bad(r"ensemble=True with given pseudo labels is ambiguous", [a, a, a], pseudo=[t, None, None], ensemble=True)


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


