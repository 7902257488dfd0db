"""Triton kernels of the fused CPS loss and their host launchers.

The kernel contract (shapes, the meaning of ``counts`` and of the returned sums)
is in the docstring of :mod:`cps_fast.loss`. A program owns ``BLOCK_P`` pixels
and the whole class axis:

* ``C <= MAX_TILE_C``: one ``[BLOCK_P, BLOCK_C]`` tile per tensor lives in
  registers; max, argmax, log-sum-exp, label gathers and both gradients are
  computed from it, so each logits element is read once and each gradient
  element written once.
* larger ``C``: an online softmax over class blocks (running max, rescaled sum,
  running argmax) in a first sweep, label logits gathered by address, and a
  second sweep that writes the gradients (the re-read mostly hits L2).

Pixel ``p`` of the ``(N, C, L)`` view is at ``n * s_n + l * s_l + c * s_c`` with
``n, l = divmod(p, L)``, so NCHW (``s_c = L``, ``s_l = 1``) and channels_last
(``s_c = 1``, ``s_l = C``) are both read in place. Triton specialises integer
arguments equal to 1, so each layout compiles to its own coalesced variant.
All arithmetic is float32; loads are cast to float32 first (the interpreter
computes bfloat16 arithmetic wrongly otherwise).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

MAX_TILE_C = 256  # widest class axis kept in one register tile
LOOP_BLOCK_C = 64  # class block of the online-softmax path
TILE_ELEMS = 4096  # elements of one [BLOCK_P, BLOCK_C] tile
LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E)


@triton.jit
def _load_labels(ptr, n, l, s_n, s_l, pmask, ignore_index, C, HAS: tl.constexpr):
    """Labels of the tile's pixels as int32 and their validity (in range and not ignored)."""
    if HAS:
        lab = tl.load(ptr + n * s_n + l * s_l, mask=pmask, other=ignore_index).to(tl.int32)
        valid = pmask & (lab != ignore_index) & (lab >= 0) & (lab < C)
    else:  # no labels: class -1 matches no column and every pixel is invalid
        lab = tl.full(l.shape, -1, dtype=tl.int32)
        valid = lab >= 0
    return lab, valid


@triton.jit
def _pseudo_labels(pa_ptr, pb_ptr, n, l, s_pan, s_pal, s_pbn, s_pbl, pmask, ignore_index, C, arg_a, arg_b,
                   HAS_PA: tl.constexpr, HAS_PB: tl.constexpr):
    """Given pseudo labels (with validity), or the branches' argmax (always valid)."""
    if HAS_PA:
        pa, vpa = _load_labels(pa_ptr, n, l, s_pan, s_pal, pmask, ignore_index, C, True)
    else:
        pa, vpa = arg_a, pmask
    if HAS_PB:
        pb, vpb = _load_labels(pb_ptr, n, l, s_pbn, s_pbl, pmask, ignore_index, C, True)
    else:
        pb, vpb = arg_b, pmask
    return pa, vpa, pb, vpb


@triton.jit
def _store_sums(part_ptr, pid, lse_a, lse_b, xa_t, xb_t, xa_pb, xb_pa, vt, vpa, vpb):
    """This program's sums of vt*(CE(a,t)+CE(b,t)), vpb*CE(a,pb), vpa*CE(b,pa)."""
    tl.store(part_ptr + pid * 3 + 0, tl.sum(tl.where(vt, (lse_a - xa_t) + (lse_b - xb_t), 0.0), axis=0))
    tl.store(part_ptr + pid * 3 + 1, tl.sum(tl.where(vpb, lse_a - xa_pb, 0.0), axis=0))
    tl.store(part_ptr + pid * 3 + 2, tl.sum(tl.where(vpa, lse_b - xb_pa, 0.0), axis=0))


@triton.jit
def _grad_weights(counts_ptr, cps_weight, vt, vpa, vpb):
    """Per-pixel weights of the three cross-entropies in the loss: (target, pseudo_a, pseudo_b)."""
    inv_t = 1.0 / tl.maximum(tl.load(counts_ptr + 0), 1.0)
    inv_pa = 1.0 / tl.maximum(tl.load(counts_ptr + 1), 1.0)
    inv_pb = 1.0 / tl.maximum(tl.load(counts_ptr + 2), 1.0)
    ct = tl.where(vt, inv_t, 0.0)
    cpa = tl.where(vpa, cps_weight * inv_pa, 0.0)  # CE(b, pa) weight per pixel
    cpb = tl.where(vpb, cps_weight * inv_pb, 0.0)  # CE(a, pb) weight per pixel
    return ct, cpa, cpb


@triton.jit
def _tile_stats(x, c, pmask, BLOCK_C: tl.constexpr, AX: tl.constexpr):
    """Per-pixel statistics of a logits tile whose class axis is ``AX`` (``[BLOCK_P, BLOCK_C]`` with
    ``AX = 1``, ``[BLOCK_C, BLOCK_P]`` with ``AX = 0``; padding classes at -inf): max, argmax (int32,
    ties to the lowest class as torch.argmax), exp(x - max), its sum and the log-sum-exp.
    Padding pixels get max 0 and sum 1, so their log and divisions stay finite."""
    m = tl.where(pmask, tl.max(x, axis=AX), 0.0)
    arg = tl.min(tl.where(x == tl.expand_dims(m, AX), tl.expand_dims(c, 1 - AX), BLOCK_C), axis=AX).to(tl.int32)
    # exp(x - m) as exp2(x * log2(e) - m * log2(e)): one FMA and the exp2 unit per element
    e = tl.math.exp2(x * LOG2E - tl.expand_dims(m * LOG2E, AX))
    s = tl.where(pmask, tl.sum(e, axis=AX), 1.0)
    return m, arg, e, s, m + tl.log(s)


@triton.jit
def _label_hits(c, t, pa, pb, xa, xb, AX: tl.constexpr):
    """One-hot masks of the three labels over a tile's classes ``c`` (class axis ``AX``), and the logits
    they pick: ``(hit_t, hit_pa, hit_pb, xa_t, xb_t, xa_pb, xb_pa)`` (a label outside the classes picks 0)."""
    cc = tl.expand_dims(c, 1 - AX)
    hit_t = cc == tl.expand_dims(t, AX)
    hit_pa = cc == tl.expand_dims(pa, AX)
    hit_pb = cc == tl.expand_dims(pb, AX)
    xa_t = tl.sum(tl.where(hit_t, xa, 0.0), axis=AX)
    xb_t = tl.sum(tl.where(hit_t, xb, 0.0), axis=AX)
    xa_pb = tl.sum(tl.where(hit_pb, xa, 0.0), axis=AX)
    xb_pa = tl.sum(tl.where(hit_pa, xb, 0.0), axis=AX)
    return hit_t, hit_pa, hit_pb, xa_t, xb_t, xa_pb, xb_pa


@triton.jit
def _tile_grads(ea, eb, sa, sb, hit_t, hit_pa, hit_pb, ct, cpa, cpb, AX: tl.constexpr):
    """Both branches' gradient tiles (class axis ``AX``): softmax times the pixel's total weight minus
    each label's weight (a is supervised by the target and pseudo_b, b by the target and pseudo_a)."""
    ct2 = tl.expand_dims(ct, AX)
    ga = (ea * tl.expand_dims((ct + cpb) / sa, AX) - tl.where(hit_t, ct2, 0.0)
          - tl.where(hit_pb, tl.expand_dims(cpb, AX), 0.0))
    gb = (eb * tl.expand_dims((ct + cpa) / sb, AX) - tl.where(hit_t, ct2, 0.0)
          - tl.where(hit_pa, tl.expand_dims(cpa, AX), 0.0))
    return ga, gb


@triton.jit
def _tile_loss(xa, xb, c, pmask, pid, n, l, t_ptr, pa_ptr, pb_ptr, counts_ptr, part_ptr, C,
               s_tn, s_tl, s_pan, s_pal, s_pbn, s_pbl, cps_weight, ignore_index,
               HAS_T: tl.constexpr, HAS_PA: tl.constexpr, HAS_PB: tl.constexpr, BLOCK_C: tl.constexpr):
    """The loss of both branches' ``[BLOCK_P, BLOCK_C]`` float32 logits tiles (padding at -inf):
    stores this program's three sums and returns both gradient tiles (float32; a caller that does
    not store them leaves them, and their loads, to dead-code elimination)."""
    ma, arg_a, ea, sa, lse_a = _tile_stats(xa, c, pmask, BLOCK_C, 1)
    mb, arg_b, eb, sb, lse_b = _tile_stats(xb, c, pmask, BLOCK_C, 1)

    t, vt = _load_labels(t_ptr, n, l, s_tn, s_tl, pmask, ignore_index, C, HAS_T)
    pa, vpa, pb, vpb = _pseudo_labels(pa_ptr, pb_ptr, n, l, s_pan, s_pal, s_pbn, s_pbl, pmask, ignore_index, C,
                                      arg_a, arg_b, HAS_PA, HAS_PB)

    hit_t, hit_pa, hit_pb, xa_t, xb_t, xa_pb, xb_pa = _label_hits(c, t, pa, pb, xa, xb, 1)

    _store_sums(part_ptr, pid, lse_a, lse_b, xa_t, xb_t, xa_pb, xb_pa, vt, vpa, vpb)

    ct, cpa, cpb = _grad_weights(counts_ptr, cps_weight, vt, vpa, vpb)
    return _tile_grads(ea, eb, sa, sb, hit_t, hit_pa, hit_pb, ct, cpa, cpb, 1)


@triton.jit
def _image_block(L, BLOCK_P: tl.constexpr, WIDE: tl.constexpr):
    """This program's image ``n`` (int64 scalar) and pixel indices ``l`` inside it.

    Programs walk image by image, so ``l`` is contiguous and NCHW loads (pixel stride
    1) vectorise; offsets inside one image stay int32 unless ``WIDE`` (an image of
    2**31 elements or more).
    """
    blocks = tl.cdiv(L, BLOCK_P)
    pid = tl.program_id(0)
    n = (pid // blocks).to(tl.int64)
    l = (pid % blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    if WIDE:
        l = l.to(tl.int64)
    return pid, n, l


@triton.jit
def _cps_loss_tile_kernel(
    a_ptr, b_ptr, ga_ptr, gb_ptr, t_ptr, pa_ptr, pb_ptr, counts_ptr, part_ptr,
    L, C,
    s_an, s_ac, s_al, s_bn, s_bc, s_bl,
    s_tn, s_tl, s_pan, s_pal, s_pbn, s_pbl,
    cps_weight, ignore_index,
    HAS_T: tl.constexpr, HAS_PA: tl.constexpr, HAS_PB: tl.constexpr, WRITE_GRAD: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, WIDE: tl.constexpr,
):
    pid, n, l = _image_block(L, BLOCK_P, WIDE)
    pmask = l < L
    c = tl.arange(0, BLOCK_C)
    if WIDE:
        c = c.to(tl.int64)
    cmask = c < C
    m2 = pmask[:, None] & cmask[None, :]

    a_off = l[:, None] * s_al + c[None, :] * s_ac  # inside image n
    b_off = l[:, None] * s_bl + c[None, :] * s_bc
    xa = tl.load(a_ptr + n * s_an + a_off, mask=m2, other=float("-inf")).to(tl.float32)
    xb = tl.load(b_ptr + n * s_bn + b_off, mask=m2, other=float("-inf")).to(tl.float32)

    ga, gb = _tile_loss(xa, xb, c, pmask, pid, n, l, t_ptr, pa_ptr, pb_ptr, counts_ptr, part_ptr, C,
                        s_tn, s_tl, s_pan, s_pal, s_pbn, s_pbl, cps_weight, ignore_index,
                        HAS_T, HAS_PA, HAS_PB, BLOCK_C)
    if WRITE_GRAD:
        tl.store(ga_ptr + n * s_an + a_off, ga.to(ga_ptr.dtype.element_ty), mask=m2)
        tl.store(gb_ptr + n * s_bn + b_off, gb.to(gb_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _flat_to_tile(x, rows, c, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """``x``: the flat elements of ``BLOCK_P`` class-contiguous pixel rows (the first ``BLOCK_P * C``
    used), held as ``[BLOCK_P, BLOCK_C]``; returns them as the ``[pixels, classes]`` tile, padding
    columns repeating class ``C - 1`` (the caller masks them). ``rows``: 0 to ``BLOCK_P - 1``. The
    gather goes through shared memory."""
    idx = tl.reshape(rows[:, None] * C + tl.minimum(c, C - 1)[None, :], [BLOCK_P * BLOCK_C])
    return tl.reshape(tl.gather(tl.reshape(x, [BLOCK_P * BLOCK_C]), idx, 0), [BLOCK_P, BLOCK_C])


@triton.jit
def _tile_to_flat(g, rows, c, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """The inverse of :func:`_flat_to_tile`: flat element ``f = r * BLOCK_C + c`` of the
    ``[BLOCK_P, BLOCK_C]`` result is ``g[f // C, f % C]`` (past ``BLOCK_P * C`` the caller masks)."""
    f = tl.reshape(rows[:, None] * BLOCK_C + c[None, :], [BLOCK_P * BLOCK_C])
    # f // C without an integer division: (f + 0.5) / C lies 0.5 / C from the nearest integer, and
    # float32 misses it by at most about (f / C) * 2**-23, which is smaller while f < 2**22
    p = ((f.to(tl.float32) + 0.5) * (1.0 / C)).to(tl.int32)
    idx = tl.minimum(p, BLOCK_P - 1) * BLOCK_C + (f - p * C)
    return tl.reshape(tl.gather(tl.reshape(g, [BLOCK_P * BLOCK_C]), idx, 0), [BLOCK_P, BLOCK_C])


@triton.jit
def _pin_layout(x, ptrs, mask, L):
    """``x`` unchanged (plus 0.0), tied to the layout of the load ``ptrs`` (the flat tile's own
    addresses) issued again, predicated off: its mask also asks for ``L < 0``, false at run time
    but unknown to the compiler, so it moves no data.

    Why: a tile that comes out of ``tl.gather`` has no load of its own to fix its register layout.
    The compiler then kept the per-pixel vectors (labels, statistics) in a second layout and moved
    8 of them through shared memory, at two barriers each (29 barriers per program, where the tile
    kernel has 5; triton 3.9). With this anchor the gathered tile takes the flat load's layout, in
    which each thread holds 8 classes of one pixel, and no statistic moves (13 barriers: the
    gathers and the program's sums; benchmarks/kernel_report.py counts them). Pinned to a load of
    a different shape, triton 3.6 chose a column-major layout and reduced across warps."""
    z = tl.load(ptrs, mask=mask & (tl.zeros(x.shape, tl.int32) + L < 0), other=0.0)
    return x + z.to(tl.float32)


@triton.jit
def _cps_loss_flat_kernel(
    a_ptr, b_ptr, ga_ptr, gb_ptr, t_ptr, pa_ptr, pb_ptr, counts_ptr, part_ptr,
    L, C,
    s_an, s_ac, s_al, s_bn, s_bc, s_bl,
    s_tn, s_tl, s_pan, s_pal, s_pbn, s_pbl,
    cps_weight, ignore_index,
    HAS_T: tl.constexpr, HAS_PA: tl.constexpr, HAS_PB: tl.constexpr, WRITE_GRAD: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, WIDE: tl.constexpr,
):
    """The tile kernel for dense channels_last rows (``s_c == 1``, ``s_l == C``): a program's
    ``BLOCK_P`` pixels are ``BLOCK_P * C`` consecutive elements, read and written as flat vectors
    (128-bit accesses, where a ``[pixels, classes]`` tile of 21 classes can only use 16-bit ones)
    and moved to and from the ``[BLOCK_P, BLOCK_C]`` tile through shared memory.

    The flat elements (offsets ``f`` from the program's first pixel, valid below ``pixels * C``) are
    addressed as a ``[BLOCK_P, BLOCK_C]`` block ``f = r * BLOCK_C + c``, the tile's own shape, and
    :func:`_pin_layout` keeps the gathered tile in that load's register layout. Chosen by
    ``CPSLossConfig(flat=True)``."""
    pid, n, l = _image_block(L, BLOCK_P, WIDE)
    pmask = l < L
    c = tl.arange(0, BLOCK_C)
    m2 = pmask[:, None] & (c < C)[None, :]
    l0 = (pid % tl.cdiv(L, BLOCK_P)) * BLOCK_P
    if WIDE:
        l0 = l0.to(tl.int64)
    rows = l - l0
    f = rows[:, None] * BLOCK_C + c[None, :]
    fmask = f < tl.minimum(L - l0, BLOCK_P) * C
    a_flat = n * s_an + l0 * C + f  # offsets of the flat rows (the gradients share the strides)
    b_flat = n * s_bn + l0 * C + f
    # gathered in the logits' dtype (half the shared-memory traffic of float32), then widened
    fa = _flat_to_tile(tl.load(a_ptr + a_flat, mask=fmask, other=float("-inf")), rows, c, C, BLOCK_P, BLOCK_C)
    fb = _flat_to_tile(tl.load(b_ptr + b_flat, mask=fmask, other=float("-inf")), rows, c, C, BLOCK_P, BLOCK_C)
    xa = _pin_layout(tl.where(m2, fa.to(tl.float32), float("-inf")), a_ptr + a_flat, fmask, L)
    xb = _pin_layout(tl.where(m2, fb.to(tl.float32), float("-inf")), b_ptr + b_flat, fmask, L)

    ga, gb = _tile_loss(xa, xb, c, pmask, pid, n, l, t_ptr, pa_ptr, pb_ptr, counts_ptr, part_ptr, C,
                        s_tn, s_tl, s_pan, s_pal, s_pbn, s_pbl, cps_weight, ignore_index,
                        HAS_T, HAS_PA, HAS_PB, BLOCK_C)
    if WRITE_GRAD:
        ga = _tile_to_flat(ga.to(ga_ptr.dtype.element_ty), rows, c, C, BLOCK_P, BLOCK_C)
        gb = _tile_to_flat(gb.to(gb_ptr.dtype.element_ty), rows, c, C, BLOCK_P, BLOCK_C)
        tl.store(ga_ptr + a_flat, ga, mask=fmask)
        tl.store(gb_ptr + b_flat, gb, mask=fmask)


@triton.jit
def _online_stats(x_ptr, row_off, s_c, pmask, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Max, sum of exp(x - max) and argmax over the class axis, one class block at a time."""
    m = tl.full((BLOCK_P,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_P,), tl.float32)
    arg = tl.zeros((BLOCK_P,), tl.int32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        msk = pmask[:, None] & (c < C)[None, :]
        x = tl.load(x_ptr + row_off[:, None] + c.to(tl.int64)[None, :] * s_c, mask=msk, other=float("-inf")).to(tl.float32)
        bm = tl.max(x, axis=1)
        barg = tl.min(tl.where(x == bm[:, None], c[None, :], C), axis=1)
        arg = tl.where(bm > m, barg, arg)  # strictly greater: earlier blocks win ties
        m_new = tl.maximum(m, bm)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
        m = m_new
    m = tl.where(pmask, m, 0.0)
    s = tl.where(pmask, s, 1.0)
    return m, s, arg


@triton.jit
def _gather(x_ptr, row_off, s_c, lab, valid):
    return tl.load(x_ptr + row_off + lab.to(tl.int64) * s_c, mask=valid, other=0.0).to(tl.float32)


@triton.jit
def _write_grad_loop(x_ptr, g_ptr, row_off, s_c, pmask, C, m, s, coef, t, ct, pl, cpl,
                     BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        msk = pmask[:, None] & (c < C)[None, :]
        off = row_off[:, None] + c.to(tl.int64)[None, :] * s_c
        x = tl.load(x_ptr + off, mask=msk, other=float("-inf")).to(tl.float32)
        g = tl.exp(x - m[:, None]) * (coef / s)[:, None]
        g = g - tl.where(c[None, :] == t[:, None], ct[:, None], 0.0) - tl.where(c[None, :] == pl[:, None], cpl[:, None], 0.0)
        tl.store(g_ptr + off, g.to(g_ptr.dtype.element_ty), mask=msk)


@triton.jit
def _cps_loss_loop_kernel(
    a_ptr, b_ptr, ga_ptr, gb_ptr, t_ptr, pa_ptr, pb_ptr, counts_ptr, part_ptr,
    L, C,
    s_an, s_ac, s_al, s_bn, s_bc, s_bl,
    s_tn, s_tl, s_pan, s_pal, s_pbn, s_pbl,
    cps_weight, ignore_index,
    HAS_T: tl.constexpr, HAS_PA: tl.constexpr, HAS_PB: tl.constexpr, WRITE_GRAD: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, WIDE: tl.constexpr,
):
    pid, n, l = _image_block(L, BLOCK_P, WIDE)
    pmask = l < L
    a_row = n * s_an + l * s_al
    b_row = n * s_bn + l * s_bl

    ma, sa, arg_a = _online_stats(a_ptr, a_row, s_ac, pmask, C, BLOCK_P, BLOCK_C)
    mb, sb, arg_b = _online_stats(b_ptr, b_row, s_bc, pmask, C, BLOCK_P, BLOCK_C)
    lse_a = ma + tl.log(sa)
    lse_b = mb + tl.log(sb)

    t, vt = _load_labels(t_ptr, n, l, s_tn, s_tl, pmask, ignore_index, C, HAS_T)
    pa, vpa, pb, vpb = _pseudo_labels(pa_ptr, pb_ptr, n, l, s_pan, s_pal, s_pbn, s_pbl, pmask, ignore_index, C,
                                      arg_a, arg_b, HAS_PA, HAS_PB)

    xa_t = _gather(a_ptr, a_row, s_ac, t, vt)
    xb_t = _gather(b_ptr, b_row, s_bc, t, vt)
    xa_pb = _gather(a_ptr, a_row, s_ac, pb, vpb)
    xb_pa = _gather(b_ptr, b_row, s_bc, pa, vpa)
    _store_sums(part_ptr, pid, lse_a, lse_b, xa_t, xb_t, xa_pb, xb_pa, vt, vpa, vpb)

    if WRITE_GRAD:
        ct, cpa, cpb = _grad_weights(counts_ptr, cps_weight, vt, vpa, vpb)
        _write_grad_loop(a_ptr, ga_ptr, a_row, s_ac, pmask, C, ma, sa, ct + cpb, t, ct, pb, cpb, BLOCK_P, BLOCK_C)
        _write_grad_loop(b_ptr, gb_ptr, b_row, s_bc, pmask, C, mb, sb, ct + cpa, t, ct, pa, cpa, BLOCK_P, BLOCK_C)


@triton.jit
def _cps_scale_grad_kernel(g_ptr, s_ptr, numel, BLOCK: tl.constexpr):
    s = tl.load(s_ptr).to(tl.float32)
    if s != 1.0:  # decided on the device: no host synchronisation, no traffic when grad_output == 1
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        msk = offs < numel
        g = tl.load(g_ptr + offs, mask=msk).to(tl.float32)
        tl.store(g_ptr + offs, (g * s).to(g_ptr.dtype.element_ty), mask=msk)


# ----------------------------------------------------------------------------- launchers


class CPSLossConfig(NamedTuple):
    """A launch configuration forced on the tile path (benchmarks sweep these); 0 derives the value from C.

    ``flat``: dense channels_last logits through :func:`_cps_loss_flat_kernel` (128-bit accesses and a
    shared-memory transpose) instead of the ``[pixels, classes]`` tile's narrower ones; off by default
    until a GPU has measured which is faster (benchmarks/NOTES.md).
    """

    block_p: int = 0
    num_warps: int = 0
    flat: bool = False


def _block_sizes(C: int, class_contiguous: bool = False, config: CPSLossConfig | None = None,
                 ) -> tuple[int, int, int, bool]:
    """(BLOCK_P, BLOCK_C, num_warps, tiled) for a class axis of size C.

    Tile path: a ``[BLOCK_P, BLOCK_C]`` tile of ``TILE_ELEMS`` elements per tensor, 8 elements per
    thread, which keeps the kernel within 128 registers without spills on sm_90 (NCHW, 16 warps;
    tests/test_kernel_report.py). channels_last with 129 to 256 classes takes 8-pixel tiles at 8 warps
    (the 16-pixel tile spills). Loop path: 64 pixels per program when pixels are contiguous (NCHW:
    coalesced along pixels), 16 when classes are (channels_last). benchmarks/NOTES.md has the
    measurements behind each choice.
    """
    if C <= MAX_TILE_C:
        block_c = triton.next_power_of_2(C)
        block_p = max(16, min(256, TILE_ELEMS // block_c))
        if class_contiguous and block_c >= 256:
            block_p = 8
        if config is not None and config.block_p:
            block_p = config.block_p
        num_warps = max(1, min(16, block_p * block_c // 256))
        if config is not None and config.num_warps:
            num_warps = config.num_warps
        return block_p, block_c, num_warps, True
    return (16 if class_contiguous else 64), LOOP_BLOCK_C, 4, False


def label_args(y, dummy):
    """A kernel's label arguments ``(pointer, stride_n, stride_l, HAS)``: a dummy pointer that is never
    read when ``y`` is None."""
    if y is None:
        return dummy, 0, 0, False
    return y, y.stride(0), y.stride(1), True


def cps_loss_fwd(a3, b3, t2, pa2, pb2, counts, ga3, gb3, cps_weight, ignore_index,
                 config: CPSLossConfig | None = None):
    """Launch the fused kernel on ``(N, C, L)`` views; returns the float32 ``[3]`` sums.

    ``config``: a forced launch configuration (:class:`CPSLossConfig`), or None to derive it from C.
    """
    N, C, L = a3.shape
    block_p, block_c, num_warps, tiled = _block_sizes(C, class_contiguous=a3.stride(1) == 1 and L > 1, config=config)
    grid = (N * triton.cdiv(L, block_p),)  # programs walk image by image (see _image_block)
    # int32 offsets inside one image unless some tensor's image spans 2**31 elements
    wide = max(_image_span(x) for x in (a3, b3, ga3, gb3) if x is not None) >= 2**31
    partials = torch.empty((grid[0], 3), dtype=torch.float32, device=a3.device)
    write_grad = ga3 is not None
    t, s_tn, s_tl, has_t = label_args(t2, counts)
    pa, s_pan, s_pal, has_pa = label_args(pa2, counts)
    pb, s_pbn, s_pbl, has_pb = label_args(pb2, counts)
    if not tiled:
        kernel = _cps_loss_loop_kernel
    elif config is not None and config.flat and all(x.stride(1) == 1 and x.stride(2) == C for x in (a3, b3)):
        kernel = _cps_loss_flat_kernel  # rows of C classes back to back: the flat vectors cover them
    else:
        kernel = _cps_loss_tile_kernel
    kernel[grid](
        a3, b3, ga3 if write_grad else a3, gb3 if write_grad else b3, t, pa, pb, counts, partials,
        L, C,
        a3.stride(0), a3.stride(1), a3.stride(2), b3.stride(0), b3.stride(1), b3.stride(2),
        s_tn, s_tl, s_pan, s_pal, s_pbn, s_pbl,
        float(cps_weight), int(ignore_index),
        HAS_T=has_t, HAS_PA=has_pa, HAS_PB=has_pb, WRITE_GRAD=write_grad,
        BLOCK_P=block_p, BLOCK_C=block_c, WIDE=wide, num_warps=num_warps,
    )
    return partials.sum(dim=0)


def _image_span(x3: torch.Tensor) -> int:
    """One past the largest element offset inside one image of an ``(N, C, L)`` view."""
    _, C, L = x3.shape
    return (C - 1) * abs(x3.stride(1)) + (L - 1) * abs(x3.stride(2)) + 1


def _flat_storage_view(g: torch.Tensor) -> torch.Tensor:
    """A 1-D view over a dense tensor's memory, whatever its dimension order."""
    if g.is_contiguous():
        return g.view(-1)
    order = sorted(range(g.dim()), key=lambda d: -g.stride(d))
    dense = g.permute(order)
    if not dense.is_contiguous():
        raise ValueError(f"scale_: gradient with shape {tuple(g.shape)} and strides {g.stride()} is not dense")
    return dense.view(-1)


def scale_(grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """``grad *= grad_output`` in place; the kernel returns at once when ``grad_output == 1``."""
    flat = _flat_storage_view(grad)
    numel = flat.numel()
    if numel == 0:
        return grad
    block = 4096
    _cps_scale_grad_kernel[(triton.cdiv(numel, block),)](flat, grad_output.reshape(1), numel, BLOCK=block, num_warps=8)
    return grad
