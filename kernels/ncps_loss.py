"""Triton kernels of the fused n-branch CPS loss (n-CPS) and their host launcher.

The contract (the meaning of ``counts``, of the returned sums and of the
gradients) is in the docstring of :mod:`cps_fast.ncps_loss`. The ``K`` branches
arrive in fixed pointer slots (``MAX_K`` of them; unused slots get a dummy
pointer that is never dereferenced) and ``K`` is a compile-time constant, so
no ``torch.stack`` copy is made and every per-branch loop is unrolled.

* ``C <= MAX_TILE_C``: a program owns ``BLOCK_P`` pixels and keeps all ``K``
  ``[BLOCK_P, BLOCK_C]`` tiles in registers (``BLOCK_P`` shrinks with ``K`` so
  the tile set stays about ``TILE_ELEMS`` elements). Each branch's max,
  argmax, log-sum-exp and softmax are computed once; each logits element is
  read once and each gradient element written once.
* larger ``C``: per branch an online softmax over class blocks (reusing the
  helpers of :mod:`cps_fast.kernels.cps_loss`), labels gathered by address, an
  extra sweep for the ensemble labels when ``K > 2``, and a final sweep that
  writes the gradients (the re-reads mostly hit L2).

Pixel ``p`` of branch ``k``'s ``(N, C, L)`` view is at
``n * s_n[k] + l * s_l[k] + c * s_c[k]`` with ``n, l = divmod(p, L)``; each
branch has its own strides, so NCHW and channels_last are read in place (and
may even be mixed). The gradients have their branch's strides. All arithmetic
is float32.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .cps_loss import (LOG2E, MAX_TILE_C, TILE_ELEMS, _gather, _image_block, _image_span, _load_labels, _online_stats,
                       _tile_stats)

MAX_K = 8  # pointer slots of the kernels
TILE_SET_ELEMS = TILE_ELEMS  # elements of all K register tiles together
LOOP_BLOCK_C = 64  # class block of the online-softmax path
LOOP_BLOCK_P = 32


class NCPSLossConfig(NamedTuple):
    """A launch configuration forced on the tile path (benchmarks sweep these); 0 derives the value
    from C and K. ``elems_per_thread``: elements of each branch's tile per thread."""

    block_p: int = 0
    num_warps: int = 0
    elems_per_thread: int = 0


@triton.jit
def _branch_labels(ys, yns, yls, n, l, pmask, ignore_index, C, ARG, HAS_Y: tl.constexpr, K: tl.constexpr):
    """Default mode: branch j's label (given pseudo label, or its argmax) and validity, as tuples."""
    Y = ()
    V = ()
    for j in tl.static_range(K):
        if (HAS_Y >> j) & 1:
            y, v = _load_labels(ys[j], n, l, yns[j], yls[j], pmask, ignore_index, C, True)
        else:
            y, v = ARG[j], pmask
        Y = Y + (y,)
        V = V + (v,)
    return Y, V


@triton.jit
def _exp_shifted(x, m):
    """``exp(x - m)`` of a ``[BLOCK_P, BLOCK_C]`` tile and its per-pixel max, as :func:`_tile_stats`
    computes it (so the softmax and its normaliser agree to the last bit)."""
    return tl.math.exp2(x * LOG2E - (m * LOG2E)[:, None])


@triton.jit
def _cross_weights(counts_ptr, cps_weight, V, ENSEMBLE: tl.constexpr, K: tl.constexpr):
    """Per-pixel weight of each label's cross-entropies in the loss (c_j in the module docstring)."""
    W = ()
    for j in tl.static_range(K):
        inv = 1.0 / tl.maximum(tl.load(counts_ptr + 1 + j), 1.0)
        if ENSEMBLE:
            w = cps_weight * inv
        else:
            w = cps_weight * inv / (K - 1)
        W = W + (tl.where(V[j], w, 0.0),)
    return W


@triton.jit
def _ncps_tile_kernel(
    x0, x1, x2, x3, x4, x5, x6, x7,
    g0, g1, g2, g3, g4, g5, g6, g7,
    y0, y1, y2, y3, y4, y5, y6, y7,
    t_ptr, counts_ptr, part_ptr,
    L, C,
    sn0, sn1, sn2, sn3, sn4, sn5, sn6, sn7,
    sc0, sc1, sc2, sc3, sc4, sc5, sc6, sc7,
    sl0, sl1, sl2, sl3, sl4, sl5, sl6, sl7,
    yn0, yn1, yn2, yn3, yn4, yn5, yn6, yn7,
    yl0, yl1, yl2, yl3, yl4, yl5, yl6, yl7,
    s_tn, s_tl,
    cps_weight, ignore_index,
    K: tl.constexpr, HAS_T: tl.constexpr, HAS_Y: tl.constexpr, ENSEMBLE: tl.constexpr,
    WRITE_GRAD: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, WIDE: tl.constexpr,
):
    xs = (x0, x1, x2, x3, x4, x5, x6, x7)
    gs = (g0, g1, g2, g3, g4, g5, g6, g7)
    ys = (y0, y1, y2, y3, y4, y5, y6, y7)
    sns = (sn0, sn1, sn2, sn3, sn4, sn5, sn6, sn7)
    scs = (sc0, sc1, sc2, sc3, sc4, sc5, sc6, sc7)
    sls = (sl0, sl1, sl2, sl3, sl4, sl5, sl6, sl7)
    yns = (yn0, yn1, yn2, yn3, yn4, yn5, yn6, yn7)
    yls = (yl0, yl1, yl2, yl3, yl4, yl5, yl6, yl7)

    pid, n, l = _image_block(L, BLOCK_P, WIDE)
    pmask = l < L
    c = tl.arange(0, BLOCK_C)
    if WIDE:
        c = c.to(tl.int64)
    m2 = pmask[:, None] & (c < C)[None, :]

    # Every branch's tile, read once: max, argmax (ties to the lowest class), sum of exp, lse.
    # Only the logits tiles stay live; exp(x - m) is recomputed where needed (cheaper than
    # keeping a second tile per branch in registers).
    X = ()
    M = ()
    S = ()
    LSE = ()
    ARG = ()
    for k in tl.static_range(K):
        x = tl.load(xs[k] + n * sns[k] + l[:, None] * sls[k] + c[None, :] * scs[k], mask=m2,
                    other=float("-inf")).to(tl.float32)
        m, arg, _, s, lse = _tile_stats(x, c, pmask, BLOCK_C, 1)  # the exp tile is recomputed below
        X = X + (x,)
        M = M + (m,)
        S = S + (s,)
        LSE = LSE + (lse,)
        ARG = ARG + (arg,)

    t, vt = _load_labels(t_ptr, n, l, s_tn, s_tl, pmask, ignore_index, C, HAS_T)
    hit_t = c[None, :] == t[:, None]

    # Y[j], V[j]: label j and its validity. Default mode: label j is made by branch j and
    # supervises every other branch. Ensemble: label k supervises branch k only.
    if ENSEMBLE:
        if K == 2:  # the mean softmax of one branch: its argmax, exactly as torch.argmax
            Y = (ARG[1], ARG[0])
        else:
            tot = _exp_shifted(X[0], M[0]) * (1.0 / S[0])[:, None]
            for j in tl.static_range(1, K):
                tot += _exp_shifted(X[j], M[j]) * (1.0 / S[j])[:, None]
            Y = ()
            for k in tl.static_range(K):
                # the other branches' summed softmax; padding classes stay 0, below any real mean
                q = tot - _exp_shifted(X[k], M[k]) * (1.0 / S[k])[:, None]
                qm = tl.max(q, axis=1)
                Y = Y + (tl.min(tl.where(q == qm[:, None], c[None, :], BLOCK_C), axis=1).to(tl.int32),)
        V = ()
        for k in tl.static_range(K):
            V = V + (pmask,)
    else:
        Y, V = _branch_labels(ys, yns, yls, n, l, pmask, ignore_index, C, ARG, HAS_Y, K)

    # partial sums: [sum vt * sum_k CE(x_k, t), cross sums of label 0 .. K-1]
    sup = tl.zeros((BLOCK_P,), tl.float32)
    for k in tl.static_range(K):
        sup += LSE[k] - tl.sum(tl.where(hit_t, X[k], 0.0), axis=1)
    tl.store(part_ptr + pid * (K + 1), tl.sum(tl.where(vt, sup, 0.0), axis=0))
    for j in tl.static_range(K):
        hit_j = c[None, :] == Y[j][:, None]
        if ENSEMBLE:
            ce = LSE[j] - tl.sum(tl.where(hit_j, X[j], 0.0), axis=1)
        else:
            ce = tl.zeros((BLOCK_P,), tl.float32)
            for k in tl.static_range(K):
                if k != j:
                    ce += LSE[k] - tl.sum(tl.where(hit_j, X[k], 0.0), axis=1)
        tl.store(part_ptr + pid * (K + 1) + 1 + j, tl.sum(tl.where(V[j], ce, 0.0), axis=0))

    if WRITE_GRAD:
        ct = tl.where(vt, 1.0 / tl.maximum(tl.load(counts_ptr), 1.0), 0.0)
        W = _cross_weights(counts_ptr, cps_weight, V, ENSEMBLE, K)
        for k in tl.static_range(K):
            # grad_k = softmax_k * (ct + sum of k's label weights) - onehot(t) ct - sum onehot(label) weight
            hits = tl.where(hit_t, ct[:, None], 0.0)
            coef = ct
            for j in tl.static_range(K):
                if (ENSEMBLE and j == k) or (not ENSEMBLE and j != k):
                    coef += W[j]
                    hits += tl.where(c[None, :] == Y[j][:, None], W[j][:, None], 0.0)
            g = _exp_shifted(X[k], M[k]) * (coef / S[k])[:, None] - hits
            tl.store(gs[k] + n * sns[k] + l[:, None] * sls[k] + c[None, :] * scs[k],
                     g.to(gs[k].dtype.element_ty), mask=m2)


@triton.jit
def _ensemble_label_loop(xs, ROW, scs, M, S, pmask, C, k, K: tl.constexpr, BLOCK_P: tl.constexpr,
                         BLOCK_C: tl.constexpr):
    """argmax over classes of the sum of the other branches' softmax, one class block at a time."""
    best = tl.full((BLOCK_P,), -1.0, tl.float32)
    arg = tl.zeros((BLOCK_P,), tl.int32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        msk = pmask[:, None] & (c < C)[None, :]
        q = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
        for j in tl.static_range(K):
            if j != k:
                x = tl.load(xs[j] + ROW[j][:, None] + c.to(tl.int64)[None, :] * scs[j], mask=msk,
                            other=float("-inf")).to(tl.float32)
                q += tl.exp(x - M[j][:, None]) * (1.0 / S[j])[:, None]
        q = tl.where(msk, q, -1.0)
        bm = tl.max(q, axis=1)
        barg = tl.min(tl.where(q == bm[:, None], c[None, :], C), axis=1)
        arg = tl.where(bm > best, barg, arg)  # strictly greater: earlier blocks win ties
        best = tl.maximum(best, bm)
    return arg


@triton.jit
def _ncps_loop_kernel(
    x0, x1, x2, x3, x4, x5, x6, x7,
    g0, g1, g2, g3, g4, g5, g6, g7,
    y0, y1, y2, y3, y4, y5, y6, y7,
    t_ptr, counts_ptr, part_ptr,
    L, C,
    sn0, sn1, sn2, sn3, sn4, sn5, sn6, sn7,
    sc0, sc1, sc2, sc3, sc4, sc5, sc6, sc7,
    sl0, sl1, sl2, sl3, sl4, sl5, sl6, sl7,
    yn0, yn1, yn2, yn3, yn4, yn5, yn6, yn7,
    yl0, yl1, yl2, yl3, yl4, yl5, yl6, yl7,
    s_tn, s_tl,
    cps_weight, ignore_index,
    K: tl.constexpr, HAS_T: tl.constexpr, HAS_Y: tl.constexpr, ENSEMBLE: tl.constexpr,
    WRITE_GRAD: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, WIDE: tl.constexpr,
):
    xs = (x0, x1, x2, x3, x4, x5, x6, x7)
    gs = (g0, g1, g2, g3, g4, g5, g6, g7)
    ys = (y0, y1, y2, y3, y4, y5, y6, y7)
    sns = (sn0, sn1, sn2, sn3, sn4, sn5, sn6, sn7)
    scs = (sc0, sc1, sc2, sc3, sc4, sc5, sc6, sc7)
    sls = (sl0, sl1, sl2, sl3, sl4, sl5, sl6, sl7)
    yns = (yn0, yn1, yn2, yn3, yn4, yn5, yn6, yn7)
    yls = (yl0, yl1, yl2, yl3, yl4, yl5, yl6, yl7)

    pid, n, l = _image_block(L, BLOCK_P, WIDE)
    pmask = l < L

    ROW = ()
    M = ()
    S = ()
    LSE = ()
    ARG = ()
    for k in tl.static_range(K):
        row = n * sns[k] + l * sls[k]
        m, s, arg = _online_stats(xs[k], row, scs[k], pmask, C, BLOCK_P, BLOCK_C)
        ROW = ROW + (row,)
        M = M + (m,)
        S = S + (s,)
        LSE = LSE + (m + tl.log(s),)
        ARG = ARG + (arg,)

    t, vt = _load_labels(t_ptr, n, l, s_tn, s_tl, pmask, ignore_index, C, HAS_T)
    if ENSEMBLE:
        if K == 2:
            Y = (ARG[1], ARG[0])
        else:
            Y = ()
            for k in tl.static_range(K):
                Y = Y + (_ensemble_label_loop(xs, ROW, scs, M, S, pmask, C, k, K, BLOCK_P, BLOCK_C),)
        V = ()
        for k in tl.static_range(K):
            V = V + (pmask,)
    else:
        Y, V = _branch_labels(ys, yns, yls, n, l, pmask, ignore_index, C, ARG, HAS_Y, K)

    sup = tl.zeros((BLOCK_P,), tl.float32)
    for k in tl.static_range(K):
        sup += LSE[k] - _gather(xs[k], ROW[k], scs[k], t, vt)
    tl.store(part_ptr + pid * (K + 1), tl.sum(tl.where(vt, sup, 0.0), axis=0))
    for j in tl.static_range(K):
        if ENSEMBLE:
            ce = LSE[j] - _gather(xs[j], ROW[j], scs[j], Y[j], V[j])
        else:
            ce = tl.zeros((BLOCK_P,), tl.float32)
            for k in tl.static_range(K):
                if k != j:
                    ce += LSE[k] - _gather(xs[k], ROW[k], scs[k], Y[j], V[j])
        tl.store(part_ptr + pid * (K + 1) + 1 + j, tl.sum(tl.where(V[j], ce, 0.0), axis=0))

    if WRITE_GRAD:
        ct = tl.where(vt, 1.0 / tl.maximum(tl.load(counts_ptr), 1.0), 0.0)
        W = _cross_weights(counts_ptr, cps_weight, V, ENSEMBLE, K)
        for k in tl.static_range(K):
            coef = ct
            for j in tl.static_range(K):
                if (ENSEMBLE and j == k) or (not ENSEMBLE and j != k):
                    coef += W[j]
            scale = coef / S[k]
            for c0 in range(0, C, BLOCK_C):
                c = c0 + tl.arange(0, BLOCK_C)
                msk = pmask[:, None] & (c < C)[None, :]
                off = ROW[k][:, None] + c.to(tl.int64)[None, :] * scs[k]
                x = tl.load(xs[k] + off, mask=msk, other=float("-inf")).to(tl.float32)
                g = tl.exp(x - M[k][:, None]) * scale[:, None] - tl.where(c[None, :] == t[:, None], ct[:, None], 0.0)
                for j in tl.static_range(K):
                    if (ENSEMBLE and j == k) or (not ENSEMBLE and j != k):
                        g -= tl.where(c[None, :] == Y[j][:, None], W[j][:, None], 0.0)
                tl.store(gs[k] + off, g.to(gs[k].dtype.element_ty), mask=msk)


# ----------------------------------------------------------------------------- launcher


def block_sizes(C: int, K: int, class_contiguous: bool = False, config: NCPSLossConfig | None = None,
                ) -> tuple[int, int, int, bool]:
    """(BLOCK_P, BLOCK_C, num_warps, tiled) for K branches with a class axis of size C.

    Tile path: the K tiles together hold ``TILE_SET_ELEMS`` elements (BLOCK_P shrinks as K grows);
    each thread holds 8 elements of each branch's tile for K <= 4, 4 for more branches (8 contiguous
    NCHW pixels make 128-bit bf16 accesses, and K x 8 values in flight per thread cover the memory
    latency). Loop path: 16 pixels per program when classes are contiguous (channels_last), 32
    otherwise. benchmarks/NOTES.md (n-CPS) has the measurements and register counts behind these.
    """
    if C <= MAX_TILE_C:
        block_c = triton.next_power_of_2(C)
        k2 = triton.next_power_of_2(K)
        block_p = max(2, min(256, TILE_SET_ELEMS // (k2 * block_c)))
        if config is not None and config.block_p:
            block_p = config.block_p
        per_thread = (config.elems_per_thread if config is not None and config.elems_per_thread
                      else 8 if K <= 4 else 4)
        num_warps = max(1, min(16, block_p * block_c // (per_thread * 32)))
        if config is not None and config.num_warps:
            num_warps = config.num_warps
        return block_p, block_c, num_warps, True
    block_p = (16 if class_contiguous else LOOP_BLOCK_P) // (1 if K <= 2 else 2 if K <= 4 else 4)
    return block_p, LOOP_BLOCK_C, 4, False


def _slots(values, fill):
    values = list(values)
    return values + [fill] * (MAX_K - len(values))


def ncps_loss_fwd(xs, t2, ys, counts, gs, cps_weight, ignore_index, ensemble, config: NCPSLossConfig | None = None):
    """Launch the fused kernel on ``K`` ``(N, C, L)`` views; returns the float32 ``[K + 1]`` sums.

    ``xs``: the branches' logits views; ``t2``: ``(N, L)`` labels or None; ``ys``:
    ``K`` entries, each ``(N, L)`` pseudo labels or None (argmax); ``counts``:
    float32 ``[K + 1]``; ``gs``: ``K`` gradient views with the logits' strides, or
    None to skip the gradients; ``config``: a forced launch configuration, or None.
    """
    K = len(xs)
    if not 2 <= K <= MAX_K:
        raise ValueError(f"ncps_loss (triton): K = {K} branches; the kernel has slots for 2 to {MAX_K}")
    N, C, L = xs[0].shape
    write_grad = gs is not None
    if write_grad:
        for k, (x, g) in enumerate(zip(xs, gs)):
            if g.stride() != x.stride():
                raise ValueError(f"ncps_loss (triton): gradient {k} has strides {g.stride()} but its logits "
                                 f"have {x.stride()}; the kernel writes gradients with the logits' strides")
    block_p, block_c, num_warps, tiled = block_sizes(C, K, class_contiguous=xs[0].stride(1) == 1 and L > 1, config=config)
    grid = (N * triton.cdiv(L, block_p),)  # programs walk image by image (see cps_loss._image_block)
    # int32 offsets inside one image unless some tensor's image spans 2**31 elements
    wide = max(_image_span(x) for x in list(xs) + list(gs or [])) >= 2**31
    partials = torch.empty((grid[0], K + 1), dtype=torch.float32, device=xs[0].device)
    has_y = 0
    for j, y in enumerate(ys):
        if y is not None:
            has_y |= 1 << j
    dummy = counts
    kernel = _ncps_tile_kernel if tiled else _ncps_loop_kernel
    kernel[grid](
        *_slots(xs, dummy), *_slots(gs if write_grad else xs, dummy),
        *_slots((dummy if y is None else y for y in ys), dummy),
        dummy if t2 is None else t2, counts, partials,
        L, C,
        *_slots((x.stride(0) for x in xs), 0), *_slots((x.stride(1) for x in xs), 0),
        *_slots((x.stride(2) for x in xs), 0),
        *_slots((0 if y is None else y.stride(0) for y in ys), 0),
        *_slots((0 if y is None else y.stride(1) for y in ys), 0),
        0 if t2 is None else t2.stride(0), 0 if t2 is None else t2.stride(1),
        float(cps_weight), int(ignore_index),
        K=K, HAS_T=t2 is not None, HAS_Y=has_y, ENSEMBLE=bool(ensemble), WRITE_GRAD=write_grad,
        BLOCK_P=block_p, BLOCK_C=block_c, WIDE=wide, num_warps=num_warps,
    )
    return partials.sum(dim=0)
