"""The contracts every fused loss keeps, tested once, parametrised over the ops.

The ops: ``cps_loss``; ``ncps_loss`` with K = 3 (its n-branch kernels) and, where it is cheap, K = 2
(which runs cps_loss's kernels); ``cps_loss_upsampled``. Each supplies an adapter below: how to make
its inputs for a class count, dtype, layout and device, how to call it and its module, its float64
reference (cps_fast/reference.py) and the comparison with it that its own test file defines
(``assert_close_to_reference`` there: float32 rounding for the scalars; for the gradients of fp16/bf16
logits, twice the error PyTorch makes computing the same thing in that precision, plus a floor).

Every backend is compared with the reference on fresh random inputs (no fixed seed), shapes that are
not powers of two, NCHW, channels_last and (P, C) rows, fp32/fp16/bf16, ignored pixels, given pseudo
labels and gradients, with kernel outputs filled with NaN before each launch (the ``poison_outputs``
mark, tests/conftest.py). The Triton interpreter costs about a second a case, so the class count x
layout x dtype matrix is a pairwise design (helpers.pairwise: every pair of values meets in some case,
for every backend) rather than the full product. The ``cuda`` device's cases are marked gpu by the
conftest and run on a GPU machine. What only one op has (ensemble mode, K = 4, the upsample's sizes
and align_corners, the flat channels_last kernel, the Triton block sizes) is tested in its own file.
"""
import itertools
import re

import pytest
import torch

import cps_fast
import test_loss
import test_ncps_loss
import test_upsample_loss
from cps_fast import backends, fused
from cps_fast.ncps_loss import NCPSLoss, ncps_loss
from cps_fast.reference import cps_loss_reference, cps_loss_upsampled_reference, ncps_loss_reference
from cps_fast.upsample_loss import CPSLossUpsampled, cps_loss_upsampled
from helpers import break_upsampled_near_ties_, make_labels, make_logits, pairwise

pytestmark = pytest.mark.poison_outputs  # NaN-filled kernel outputs (tests/conftest.py)

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", "cuda"]  # the cuda cases are marked gpu (conftest) and skipped without a GPU
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["nchw", "channels_last", "rows"]


def ignore_for(C):
    """(ignore_index, label dtype): 255 in uint8 labels, or -1 in int64 ones when 255 is a class."""
    return (255, torch.uint8) if C <= 255 else (-1, torch.int64)


# ----------------------------------------------------------------------------- the ops


class Op:
    """What the contracts need of one fused op. ``make`` returns the K logits and the op's own call
    options (the upsample's ``size`` and ``align_corners``, n-CPS's ``ensemble``), which every call,
    reference and comparison below also receives."""

    id = name = kernel = ""
    K = 2
    layouts = LAYOUTS
    design = ()  # test_matches_reference's (C, layout, dtype) cases
    tiny = (2, 3, 4)  # (N, H, W) of the argument checks' logits (C = 5)
    module_kw = {}  # options of the module test
    cuda_on_cpu = ""  # why backend="cuda" cannot run on CPU tensors

    def __repr__(self):
        return self.id

    def backends(self, device, C=21):
        """The op's backends on ``device`` (the extension's kernel for the other device left out), less
        those whose kernel cannot take C classes (the upsample's Triton tile; its own file checks the
        refusal)."""
        kernel = fused.KERNELS[self.kernel]
        other = "cpu" if device == "cuda" else "cuda"
        names = [b for b in backends.BACKENDS if b in kernel.launchers and b != other]
        return [b for b in names if not _limited(kernel, b, C, self.K)]

    def shape(self, C):
        raise NotImplementedError

    def label_shape(self, xs, kw):
        x = xs[0]
        return (x.shape[0],) if x.dim() == 2 else (x.shape[0], *x.shape[2:])

    def labels(self, xs, kw, C, frac, dtype=torch.int64, ignore_index=255):
        return make_labels(self.label_shape(xs, kw), C, frac, xs[0].device, dtype=dtype, ignore_index=ignore_index)

    def prepare(self, xs, kw, pseudo):
        """The pseudo labels a comparison passes (``pseudo`` unless the op needs given ones)."""
        return pseudo

    def fill(self, xs, kw, given, C, frac, dtype=torch.int64, ignore_index=255):
        """Pseudo labels: given ones (``frac`` of them ignored) where ``given`` is true, else None (argmax)."""
        return [self.labels(xs, kw, C, frac, dtype, ignore_index) if g else None for g in given]


def _limited(kernel, backend, C, K):
    try:
        return kernel.limit(backend, C, K) is not None
    except ImportError:  # the Triton kernels cannot import: need() skips saying why
        return False


class CPS(Op):
    id = name = kernel = "cps_loss"
    design = pairwise([2, 19, 21, 150, 256], LAYOUTS, DTYPES)  # 15 of 45
    names, pseudo_names = ("logits_a", "logits_b"), ("pseudo_a", "pseudo_b")
    cuda_on_cpu = "the cuda backend needs CUDA tensors"

    def shape(self, C):
        return (2, 13, 17) if C <= 32 else (2, 7, 13)

    def make(self, C, dtype, layout, device, shape=None, **opts):
        N, H, W = shape or self.shape(C)
        return [make_logits(layout, N, C, H, W, dtype, device) for _ in range(2)], {}

    def call(self, xs, target=None, pseudo=None, **kw):
        pa, pb = pseudo or (None, None)
        return cps_fast.cps_loss(xs[0], xs[1], target, pseudo_a=pa, pseudo_b=pb, **kw)

    def reference(self, xs, target=None, pseudo=None, **kw):
        pa, pb = pseudo or (None, None)
        return cps_loss_reference(xs[0], xs[1], target, pseudo_a=pa, pseudo_b=pb, **kw)

    def check(self, got, xs, target, grad_scale=1.0, backend=None, pseudo=None, **kw):
        pa, pb = pseudo or (None, None)
        test_loss.assert_close_to_reference((*got[:3], *got[3]), xs[0], xs[1], target, grad_scale=grad_scale,
                                            pseudo_a=pa, pseudo_b=pb, **kw)

    def module(self, **kw):
        return cps_fast.CPSLoss(**kw)

    def call_module(self, mod, xs, target):
        return mod(xs[0], xs[1], target)


class NCPS(Op):
    name = "ncps_loss"
    module_kw = {"ensemble": True}

    def __init__(self, K, ensemble=False):
        self.K, self.ensemble = K, ensemble
        self.id = f"ncps_loss[K={K}{',ensemble' if ensemble else ''}]"
        self.kernel = "cps_loss" if K == 2 else "ncps_loss"  # K = 2 runs the two-branch kernels
        self.names = tuple(f"logits[{k}]" for k in range(K))
        self.pseudo_names = tuple(f"pseudo[{k}]" for k in range(K))
        self.cuda_on_cpu = ("the cuda backend needs CUDA tensors" if K == 2
                            else r"ncps_loss has no CUDA C\+\+ kernel")
        if K == 2:  # cps_loss's kernels, compared pairwise in its cases: here the routing, each value once
            self.design = list(zip([2, 21, 150], LAYOUTS, DTYPES))
        else:
            self.design = pairwise([2, 19, 21, 150], LAYOUTS, DTYPES)  # 12 of 36

    def shape(self, C):
        return (2, 9, 13) if C <= 32 else (1, 5, 7)

    def make(self, C, dtype, layout, device, shape=None, ensemble=None, **opts):
        ensemble = self.ensemble if ensemble is None else ensemble
        N, H, W = shape or self.shape(C)
        xs = test_ncps_loss.make_branches(self.K, layout, N, C, H, W, dtype, device, ensemble=ensemble)
        return xs, ({"ensemble": True} if ensemble else {})

    def call(self, xs, target=None, pseudo=None, **kw):
        return ncps_loss(xs, target, pseudo=pseudo, **kw)

    def reference(self, xs, target=None, pseudo=None, **kw):
        return ncps_loss_reference(xs, target, pseudo=pseudo, **kw)

    def check(self, got, xs, target, grad_scale=1.0, backend=None, pseudo=None, **kw):
        if pseudo is not None:
            kw["pseudo"] = pseudo
        test_ncps_loss.assert_close_to_reference(got, xs, target, grad_scale=grad_scale, **kw)

    def module(self, **kw):
        return NCPSLoss(**kw)

    def call_module(self, mod, xs, target):
        return mod(xs, target)


class Upsampled(Op):
    id = name = kernel = "cps_loss_upsampled"
    layouts = ["nchw", "channels_last"]  # (N, C, h, w) logits only
    design = pairwise([2, 21, 64, 150], layouts, DTYPES)  # 12 of 24
    names, pseudo_names = ("low_a", "low_b"), ("pseudo_a", "pseudo_b")
    tiny = ((2, 3, 4), (9, 13))
    module_kw = {"align_corners": False}
    cuda_on_cpu = r"cps_loss_upsampled has no CUDA C\+\+ kernel"

    def shape(self, C):
        """((N, h, w), (H, W)): odd sizes at scales of about 3.5."""
        return ((2, 5, 6), (17, 21)) if C <= 32 else ((1, 5, 4), (18, 13))

    def make(self, C, dtype, layout, device, shape=None, align_corners=None, **opts):
        """Low-resolution logits whose upsampling has no argmax near-tie (helpers.break_upsampled_near_ties_).
        ``align_corners`` defaults to True for NCHW and False for channels_last logits, so that both
        conventions meet every dtype and class count of the pairwise design."""
        (N, h, w), size = shape or self.shape(C)
        ac = layout != "channels_last" if align_corners is None else align_corners
        xs = [test_upsample_loss.make_low(N, C, h, w, dtype, layout, device, size=size, align_corners=ac)
              for _ in range(2)]
        return xs, {"size": size, "align_corners": ac}

    def label_shape(self, xs, kw):
        return (xs[0].shape[0], *kw["size"])

    def prepare(self, xs, kw, pseudo):
        """fp16/bf16: the float64 reference's argmax labels where none are given (a kernel interpolates in
        float32, or tf32 on a GPU, so its argmax may honestly differ near a tie; argmax mode is compared
        on fp32 logits), as test_upsample_loss.py does."""
        if xs[0].dtype == torch.float32:
            return pseudo
        ref = test_upsample_loss.reference_pseudo_labels(xs[0], xs[1], kw["size"], kw["align_corners"])
        return [r if p is None else p for p, r in zip(pseudo or (None, None), ref)]

    def call(self, xs, target=None, pseudo=None, **kw):
        pa, pb = pseudo or (None, None)
        return cps_loss_upsampled(xs[0], xs[1], target, pseudo_a=pa, pseudo_b=pb, **kw)

    def reference(self, xs, target=None, pseudo=None, **kw):
        pa, pb = pseudo or (None, None)
        return cps_loss_upsampled_reference(xs[0], xs[1], target, pseudo_a=pa, pseudo_b=pb, **kw)

    def check(self, got, xs, target, grad_scale=1.0, backend=None, pseudo=None, **kw):
        pa, pb = pseudo or (None, None)
        test_upsample_loss.assert_close_to_reference((*got[:3], *got[3]), xs[0], xs[1], target, grad_scale=grad_scale,
                                                     backend=backend, pseudo_a=pa, pseudo_b=pb, **kw)

    def module(self, **kw):
        return CPSLossUpsampled(**kw)

    def call_module(self, mod, xs, target):
        return mod(xs[0], xs[1], target)


CPS_OP, NCPS3, NCPS2, UPSAMPLED = CPS(), NCPS(3), NCPS(2), Upsampled()
OPS = [CPS_OP, NCPS3, UPSAMPLED]  # the full contracts
ALL_OPS = [CPS_OP, NCPS3, NCPS2, UPSAMPLED]  # K = 2 too, where a case is cheap


def _id(v):
    return str(v).replace("torch.", "") if isinstance(v, torch.dtype) else str(v)


def params(rows):
    return [pytest.param(*r, id="-".join(_id(v) for v in r)) for r in rows]


def with_backends(ops, rows=((),), C=21):
    """(op, device, backend, *row) for every op, device, backend of the op there, and row."""
    return params([(op, d, b, *r) for op in ops for d in DEVICES for b in op.backends(d, C) for r in rows])


def need(op, backend, device, C=21):
    """Skip, saying why, when ``backend`` cannot run ``op`` here (Triton or the extension missing)."""
    reason = fused.why_unavailable(fused.KERNELS[op.kernel], backend, device, C, op.K)
    if reason:
        pytest.skip(f"{backend} cannot run {op.id} on {device}: {reason}")


def run(op, xs, target, grad_scale=1.0, **kw):
    """(loss, sup, cps, [grads]) of ``op`` on leaf copies of the logits xs."""
    leaves = [x.detach().clone().requires_grad_() for x in xs]
    loss, sup, cps = op.call(leaves, target, return_parts=True, **kw)
    (grad_scale * loss).backward()
    return loss.detach(), sup, cps, [v.grad for v in leaves]


# ----------------------------------------------------------------------------- against the reference


@pytest.mark.parametrize("op,device,backend,C,layout,dtype",
                         params([(op, d, b, *case) for op in ALL_OPS for d in DEVICES for case in op.design
                                 for b in op.backends(d, case[0])]))
def test_matches_reference(op, device, backend, C, layout, dtype):
    need(op, backend, device, C)
    ii, label_dtype = ignore_for(C)  # 255 is a class when C = 256: such users pick one outside the classes
    xs, kw = op.make(C, dtype, layout, device)
    target = op.labels(xs, kw, C, 0.2, label_dtype, ii)
    kw.update(cps_weight=1.5, ignore_index=ii)
    pseudo = op.prepare(xs, kw, None)
    got = run(op, xs, target, backend=backend, pseudo=pseudo, **kw)
    op.check(got, xs, target, backend=backend, pseudo=pseudo, **kw)


@pytest.mark.parametrize("op,device,backend,ignore_frac,layout",
                         with_backends(OPS, [(0.0, "channels_last"), (0.3, "nchw"), (1.0, "channels_last")]))
def test_ignore_fractions(op, device, backend, ignore_frac, layout):
    """Target and the first branch's given pseudo label ignored at that fraction (the others argmax);
    the last branch in the other memory format (allowed: each tensor is read with its strides)."""
    need(op, backend, device)
    xs, kw = op.make(21, torch.float32, layout, device)
    xs[-1] = xs[-1].contiguous() if layout == "channels_last" else xs[-1].to(memory_format=torch.channels_last)
    target = op.labels(xs, kw, 21, ignore_frac)
    pseudo = op.fill(xs, kw, [True] + [False] * (op.K - 1), 21, ignore_frac)
    kw.update(cps_weight=6.0)
    got = run(op, xs, target, backend=backend, pseudo=pseudo, **kw)
    op.check(got, xs, target, backend=backend, pseudo=pseudo, **kw)
    if ignore_frac == 1.0:
        assert got[1].item() == 0.0  # supervised term of an all-ignored batch is 0, not NaN


@pytest.mark.parametrize("op,device,backend,label_dtype",
                         with_backends(OPS, [(torch.uint8,), (torch.int32,), (torch.int64,)]))
def test_given_pseudo_labels_with_ignores(op, device, backend, label_dtype):
    """bf16 logits, given labels of every integer dtype (K = 3: the middle branch's argmax between two
    given ones); the layouts rotate with the label dtype."""
    need(op, backend, device)
    layout = op.layouts[[torch.uint8, torch.int32, torch.int64].index(label_dtype) % len(op.layouts)]
    xs, kw = op.make(19, torch.bfloat16, layout, device)
    target = op.labels(xs, kw, 19, 0.5, label_dtype)
    pseudo = [op.labels(xs, kw, 19, 0.3 if j == 0 else 0.6, label_dtype) if j in (0, op.K - 1) else None
              for j in range(op.K)]
    kw.update(cps_weight=1.5)
    got = run(op, xs, target, backend=backend, pseudo=pseudo, **kw)
    op.check(got, xs, target, backend=backend, pseudo=pseudo, **kw)


@pytest.mark.parametrize("op,device,backend,layout", with_backends(OPS, [("nchw",), ("channels_last",)], C=300))
def test_wide_class_axis(op, device, backend, layout):
    """C above the Triton register tile: the online-softmax path (the upsample's Triton kernel refuses
    it, tests/test_upsample_loss.py)."""
    need(op, backend, device, 300)
    shape = {"cps_loss": (1, 5, 7), "ncps_loss": (1, 3, 5), "cps_loss_upsampled": ((1, 3, 4), (9, 13))}[op.name]
    xs, kw = op.make(300, torch.float32, layout, device, shape=shape)
    target = op.labels(xs, kw, 300, 0.2, ignore_index=-1)
    pseudo = op.fill(xs, kw, [False] * (op.K - 1) + [True], 300, 0.2, ignore_index=-1)
    kw.update(cps_weight=1.5, ignore_index=-1)
    got = run(op, xs, target, backend=backend, pseudo=pseudo, **kw)
    op.check(got, xs, target, backend=backend, pseudo=pseudo, **kw)


def round_robin(ops, values):
    """(op, device, backend, value): each value once per op and device, the backends in turn (each at
    least once when there are as many values)."""
    rows = []
    for op, d in itertools.product(ops, DEVICES):
        names = op.backends(d)
        rows += [(op, d, names[i % len(names)], v) for i, v in enumerate(values)]
    return params(rows)


@pytest.mark.parametrize("op,device,backend,grad_scale", round_robin(OPS, [3.0, 1.0, 0.0, -0.5]))
def test_grad_output_scaling(op, device, backend, grad_scale):
    """fp16 logits; backward scales the stored gradients by grad_output (1 exits early on the device).
    The scaling follows the kernel, in code every backend shares (cps_fast/fused.py), and every other
    case here checks each backend's gradients at scale 1: so each scale once, the backends in turn."""
    need(op, backend, device)
    layout = "channels_last" if grad_scale in (3.0, 0.0) else "nchw"
    xs, kw = op.make(21, torch.float16, layout, device)
    target = op.labels(xs, kw, 21, 0.2)
    pseudo = op.prepare(xs, kw, None)
    got = run(op, xs, target, grad_scale=grad_scale, backend=backend, pseudo=pseudo, **kw)
    op.check(got, xs, target, grad_scale=grad_scale, backend=backend, pseudo=pseudo, **kw)


@pytest.mark.parametrize("op,device,backend", with_backends(OPS))
def test_no_target_partial_grad_and_forward_only(op, device, backend):
    """No target (sup = 0), a gradient for the first branch only, and a forward under no_grad."""
    need(op, backend, device)
    xs, kw = op.make(21, torch.float32, "nchw", device)
    inputs = [xs[0].clone().requires_grad_()] + xs[1:]  # no gradient wanted for the others
    loss, sup, cps = op.call(inputs, None, cps_weight=2.0, backend=backend, return_parts=True, **kw)
    assert sup.item() == 0.0
    loss.backward()
    x64 = [x.detach().double().requires_grad_(k == 0) for k, x in enumerate(xs)]
    ref = op.reference(x64, None, cps_weight=2.0, **kw)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(inputs[0].grad.double(), x64[0].grad, rtol=1e-4, atol=1e-6)
    assert all(x.grad is None for x in inputs[1:])
    xs, kw = op.make(21, torch.bfloat16, "channels_last", device)
    target = op.labels(xs, kw, 21, 0.2)
    pseudo = op.prepare(xs, kw, None)
    with torch.no_grad():
        loss = op.call(xs, target, pseudo=pseudo, backend=backend, **kw)
    assert not loss.requires_grad
    ref = op.reference([x.double() for x in xs], target, pseudo=pseudo, **kw)
    torch.testing.assert_close(loss.double(), ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("op,device,backend", with_backends(ALL_OPS))
def test_argmax_ties_go_to_lowest_class(op, device, backend):
    """Integer-valued logits tie often; torch.argmax picks the lowest class, and so must every kernel
    (the upsample at its own size with align_corners=True: an exact copy, the ties intact)."""
    need(op, backend, device)
    xs = [torch.randint(0, 3, (2, 7, 5, 6), device=device).float() for _ in range(op.K)]
    kw = {"size": (5, 6), "align_corners": True} if op.name == "cps_loss_upsampled" else {}
    got = run(op, xs, None, backend=backend, **kw)
    op.check(got, xs, None, backend=backend, **kw)


@pytest.mark.parametrize("op,device,backend", with_backends(ALL_OPS))
def test_non_dense_input(op, device, backend):
    """Sliced views (dense in no memory format) give the reference's value and gradients, which
    reach the sliced elements only; a forward-only call on them too."""
    need(op, backend, device)
    shape = ((2, 6, 14), (22, 25)) if op.name == "cps_loss_upsampled" else (2, 9, 14)
    full, kw = op.make(24, torch.float32, "nchw", device, shape=shape)
    if op.name == "cps_loss_upsampled":
        for f in full:  # through the view, which writes to its base
            break_upsampled_near_ties_(f[:, :21, :, ::2], kw["size"], kw["align_corners"])
    leaves = [f.detach().clone().requires_grad_() for f in full]
    views = [x[:, :21, :, ::2] for x in leaves]
    assert not fused.dense(views[0])
    target = op.labels(views, kw, 21, 0.2)
    loss, sup, cps = op.call(views, target, backend=backend, return_parts=True, **kw)
    loss.backward()
    grads = [x.grad[:, :21, :, ::2] for x in leaves]
    for x in leaves:
        outside = x.grad.clone()
        outside[:, :21, :, ::2] = 0
        assert not outside.any(), "a gradient reached logits outside the view"
    values = [v.detach() for v in views]
    op.check((loss.detach(), sup, cps, grads), values, target, backend=backend, **kw)
    with torch.no_grad():
        again = op.call(values, target, backend=backend, **kw)
    torch.testing.assert_close(again, loss.detach(), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- the API around the kernels


@pytest.mark.parametrize("op", params([(op,) for op in ALL_OPS]))
def test_module_and_return_parts(op):
    """The module form (options as constructor arguments, named in its repr) and return_parts: detached
    ``sup`` and ``cps`` with ``loss = sup + cps_weight * cps``."""
    xs, kw = op.make(5, torch.float32, "nchw", "cpu", shape=op.tiny, **op.module_kw)
    t = op.labels(xs, kw, 5, 0.1)
    mod = op.module(cps_weight=1.5, **kw)
    for k, v in dict(cps_weight=1.5, **kw).items():
        assert f"{k}={v}" in repr(mod), repr(mod)
    loss = op.call_module(mod, xs, t)
    ref = op.reference([x.double() for x in xs], t, cps_weight=1.5, **kw)
    torch.testing.assert_close(loss.double(), ref, rtol=2e-5, atol=2e-5)
    loss2, sup, cps = op.call_module(op.module(cps_weight=1.5, return_parts=True, **kw), xs, t)
    torch.testing.assert_close(loss2, sup + 1.5 * cps)
    assert not sup.requires_grad and not cps.requires_grad


@pytest.mark.parametrize("op", params([(op,) for op in ALL_OPS]))
def test_backward_twice_is_refused(op):
    """The gradients are scaled in place, so a second backward through one loss is refused."""
    xs, kw = op.make(3, torch.float32, "nchw", "cpu", shape=op.tiny)
    leaves = [x.requires_grad_() for x in xs]
    loss = op.call(leaves, None, **kw)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=f"^{op.name}: backward ran twice"):
        loss.backward()


@pytest.mark.parametrize("op", params([(op,) for op in OPS]))
def test_torch_compile_traces_the_fused_loss_without_graph_breaks(op):
    """Each op is a custom op with a fake implementation: fullgraph compilation traces it, forward and
    backward."""
    shape = ((2, 4, 5), (11, 13)) if op.name == "cps_loss_upsampled" else (2, 8, 9)
    xs, kw = op.make(5, torch.float32, "channels_last", "cpu", shape=shape)
    t = op.labels(xs, kw, 5, 0.2)
    f = torch.compile(lambda xs, t: op.call(xs, t, cps_weight=1.5, **kw), fullgraph=True)
    leaves = [x.clone().requires_grad_() for x in xs]
    loss = f(leaves, t)
    (2 * loss).backward()
    x64 = [x.double().requires_grad_() for x in xs]
    ref = op.reference(x64, t, cps_weight=1.5, **kw)
    (2 * ref).backward()
    torch.testing.assert_close(loss.detach().double(), ref.detach(), rtol=2e-5, atol=2e-5)
    for x, r in zip(leaves, x64):
        torch.testing.assert_close(x.grad.double(), r.grad, rtol=1e-4, atol=1e-6)


def test_the_backend_choice_carries_the_mark_of_assume_constant_result():
    """fused.select_backend is marked as torch.compiler.assume_constant_result marks a function (without
    importing torch._dynamo at every start, cps_fast/fused.py): should torch change how it marks one,
    this names the cause, where the compile test above would fail on a graph break inside the choice."""
    import subprocess
    import sys

    def probe():
        return None

    marked = torch.compiler.assume_constant_result(probe)
    marks = dict(vars(marked))
    assert marks and all(getattr(fused.select_backend, k, None) == v for k, v in marks.items()), marks
    code = "import sys, cps_fast, cps_fast.cli; print('torch._dynamo' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


# ----------------------------------------------------------------------------- bad input


def _bad(op, match, xs, target=None, exc=(ValueError, TypeError), **kw):
    with pytest.raises(exc, match=f"^{op.name}: {match}"):
        op.call(xs, target, **kw)


@pytest.mark.parametrize("op", params([(op,) for op in ALL_OPS]))
def test_bad_inputs_are_named(op):
    """The checks every op shares (cps_fast/fused.py) name the argument as the user passed it."""
    xs, kw = op.make(5, torch.float32, "nchw", "cpu", shape=op.tiny)
    a = xs[0]
    first, last = re.escape(op.names[0]), re.escape(op.names[-1])
    K = op.K
    shape = tuple(a.shape)
    wider = torch.randn(*shape[:-1], shape[-1] + 1)
    _bad(op, rf"{first} has shape \(2, 5, 3, 4\) but {last} has shape \(2, 5, 3, 5\)", [a] * (K - 1) + [wider],
         **kw)
    _bad(op, rf"{first} is torch.float32 but {last} is torch.float16", [a] * (K - 1) + [a.half()], **kw)
    _bad(op, rf"{first} is on cpu but {last} is on meta", [a] * (K - 1) + [a.to("meta")], **kw)
    _bad(op, rf"{re.escape(op.names[1])} has dtype torch.int64; expected float32, float16 or bfloat16",
         [a, a.long()] + [a] * (K - 2), **kw)
    _bad(op, r"the logits have C = 1 classes", [torch.randn(2, 1, 3, 4)] * K, **kw)
    if op.name == "cps_loss_upsampled":
        _bad(op, rf"{first} has shape \(60, 5\); expected \(N, C, h, w\) low-resolution logits",
             [torch.randn(60, 5)] * K, **kw)
    else:
        _bad(op, rf"{first} has shape \(5,\); expected \(N, C, H, W\) or \(P, C\) logits", [torch.randn(5)] * K, **kw)
    labels = op.labels(xs, kw, 5, 0.0)
    want = op.label_shape(xs, kw)
    if op.name == "cps_loss_upsampled":
        expected = r"full-resolution labels \(N, H, W\) = \(2, 9, 13\) for logits of shape \(2, 5, 3, 4\)"
    else:
        expected = r"\(2, 3, 4\) to match logits of shape \(2, 5, 3, 4\)"
    swapped = labels.transpose(1, 2)
    _bad(op, rf"target has shape \({want[0]}, {want[2]}, {want[1]}\); expected {expected}", xs, swapped, **kw)
    _bad(op, r"target has dtype torch.float32; expected integer labels", xs, labels.float(), **kw)
    _bad(op, rf"{re.escape(op.pseudo_names[-1])} has shape \({want[0]}, {want[1]}\); expected", xs,
         pseudo=[None] * (K - 1) + [labels[:, :, 0]], **kw)
    _bad(op, r"ignore_index=3 is also a class of the C = 5 logits", xs, labels, ignore_index=3, **kw)


@pytest.mark.parametrize("op", params([(op,) for op in ALL_OPS]))
def test_out_of_range_labels_are_reported(op):
    """A label outside [0, C) that is not ignore_index is named with its value and index (CPU tensors
    are checked by default); with validate=False it is ignored, never read out of bounds."""
    xs, kw = op.make(5, torch.float32, "nchw", "cpu", shape=op.tiny)
    t = op.labels(xs, kw, 5, 0.0)
    t[1, 2, 3] = 37
    _bad(op, r"target has value 37 at index \(1, 2, 3\), outside \[0, 5\) and not ignore_index \(255\)$", xs, t,
         **kw)
    p = torch.zeros_like(t)
    p[0, 0, 1] = -2
    _bad(op, rf"{re.escape(op.pseudo_names[-1])} has value -2 at index \(0, 0, 1\)", xs, pseudo=[None] * (op.K - 1) + [p], **kw)
    assert torch.isfinite(op.call(xs, t, validate=False, **kw))


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only machine's messages")
@pytest.mark.parametrize("op", params([(op,) for op in ALL_OPS]))
def test_forced_backend_that_cannot_run_says_why(op, monkeypatch):
    xs, kw = op.make(3, torch.float32, "nchw", "cpu", shape=op.tiny)
    with pytest.raises(backends.BackendUnavailable,
                       match=rf"^{op.name}: backend='cuda' cannot run on cpu tensors: {op.cuda_on_cpu}"):
        op.call(xs, backend="cuda", **kw)
    with pytest.raises(backends.BackendUnavailable, match="unknown backend 'fast'"):
        op.call(xs, backend="fast", **kw)
    monkeypatch.setenv("CPS_FAST_BACKEND", "cuda")
    with pytest.raises(backends.BackendUnavailable, match=r"\$CPS_FAST_BACKEND"):
        op.call(xs, **kw)
    monkeypatch.setenv("CPS_FAST_BACKEND", "torch")
    assert torch.isfinite(op.call(xs, **kw))


# ----------------------------------------------------------------------------- GPU only


GRAPH_SHAPES = {"cps_loss": (4, 64, 96), "ncps_loss": (2, 64, 96), "cps_loss_upsampled": ((2, 32, 24), (128, 96))}


@pytest.mark.gpu
@pytest.mark.parametrize("op,backend,layout", params(
    [(op, b, layout) for op in OPS + [NCPS(3, ensemble=True)] for b in op.backends("cuda") if b != "torch"
     for layout in ("nchw", "channels_last")]))
def test_cuda_graph_capture_and_replay(op, backend, layout):
    """The loss (forward + backward) captures into a CUDA graph, which a host synchronisation would
    make fail, and every replay on new inputs gives the reference's loss, parts and gradients
    (written into the same ``.grad`` tensors). bf16 logits, argmax pseudo labels."""
    need(op, backend, "cuda")
    shape = GRAPH_SHAPES[op.name]
    xs, kw = op.make(21, torch.bfloat16, layout, "cuda", shape=shape, align_corners=True)
    xs = [x.requires_grad_() for x in xs]
    t = op.labels(xs, kw, 21, 0.3, torch.uint8)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm-up: compile kernels, settle the allocator
            for x in xs:
                x.grad = None
            op.call(xs, t, backend=backend, **kw).backward()
    torch.cuda.current_stream().wait_stream(s)
    for x in xs:
        x.grad = None
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        loss, sup, cps = op.call(xs, t, backend=backend, cps_weight=1.5, return_parts=True, **kw)
        loss.backward()
    for _ in range(3):
        fresh, _ = op.make(21, torch.bfloat16, layout, "cuda", shape=shape, align_corners=True)
        with torch.no_grad():
            for x, f in zip(xs, fresh):
                x.copy_(f)
            t.copy_(op.labels(xs, kw, 21, 0.3, torch.uint8))
        g.replay()
        got = (loss.detach(), sup, cps, [x.grad for x in xs])
        op.check(got, [x.detach() for x in xs], t, backend=backend, cps_weight=1.5, **kw)
