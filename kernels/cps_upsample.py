"""Triton kernel of the upsample-fused CPS loss and its host launcher.

Computes what ``F.interpolate(low, size=(H, W), mode="bilinear", align_corners=ac)``
followed by the fused CPS loss computes, value and gradients w.r.t. the LOW-resolution
logits, without materialising full-resolution logits or gradients. The launcher
contract (shapes, ``counts``, the returned sums) is in :mod:`cps_fast.upsample_loss`.

Work decomposition (a gather formulation: no atomics on the gradient):

* A program owns a ``BH x BW`` block of low-resolution pixels of one image and every
  class. It walks, ``BLOCK_F`` pixels at a time, the full-resolution pixels whose
  bilinear footprint touches its block (source row ``i0`` in ``[r0 - 1, r0 + BH)``,
  likewise columns; a slightly wider rectangle is walked and exact masks applied).
* For each such pixel it interpolates the ``C`` logits of both branches on the fly
  from their <= 4 low-resolution neighbours (reads that hit L1/L2), in float32, and
  computes max, argmax, log-sum-exp, label gathers and the full-resolution gradient
  in registers with the tile helpers of :mod:`cps_fast.kernels.cps_loss`.
* Tile orientation (``AX``, per class width in ``_CONFIGS``): up to 32 classes the tiles
  are ``[BLOCK_C, BLOCK_F]`` and a thread holds its pixel's classes (two lanes per pixel
  in the one-warp default for Triton >= 3.9), so the class reductions need no more than one
  shuffle and the per-pixel index and weight arithmetic is not repeated across lanes;
  wider class axes use ``[BLOCK_F, BLOCK_C]`` tiles with lanes across the classes.
* The full-resolution gradient ``G`` is reduced onto the owned pixels with the
  bilinear weights: ``acc += Wm @ G`` with a dense ``[BH*BW, BLOCK_F]`` weight matrix
  built in registers (``Wm[o, p] = wy(p, row o) * wx(p, col o)``, an outer product of
  each pixel's row and column weights), on ``tl.dot``. ``input_precision`` is "ieee"
  (exact float32 FMA) for float32 logits and "tf32" (tensor cores, operands rounded to
  10 mantissa bits, float32 accumulation) for bfloat16/float16 logits, whose gradient is
  rounded to 7/10 mantissa bits on output anyway (benchmarks/NOTES.md has the
  variants tried).
* Loss sums count each full-resolution pixel once, in the program that owns its
  ``(i0, j0)`` corner; per-program partial sums are added afterwards.

Halo recomputation: a program walks about ``(BH + 1)(BW + 1) s^2`` pixels for
``BH * BW * s^2`` owned ones at scale ``s`` (1.45x for 8x8 blocks, 1.72x for 4x8 at
512 / 128); without gradients only owned pixels are walked.

Source coordinates follow PyTorch's ``upsample_bilinear2d`` (float32
``area_pixel_compute_source_index``; ``i0 = min(floor(src), in - 1)``,
``lambda = clamp(src - i0, 0, 1)``, ``i1 = min(i0 + 1, in - 1)``), so the weights
agree with ``F.interpolate`` to float32 rounding, for any input and output sizes
(downsampling included). NCHW and channels_last logits are read in place via strides.

Class axis: C up to :data:`MAX_C` (256) on this register-tile kernel; larger C raises
a ``ValueError`` (the ``torch`` and ``cpu`` backends have no such limit).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl

from ..backends import triton_interpret
from .cps_loss import (LOG2E, _grad_weights, _label_hits, _load_labels, _pseudo_labels, _tile_grads, _tile_stats,
                       label_args)

MAX_C = 256

# BLOCK_C -> (BH, BW, BLOCK_F, num_warps, AX): up to 32 classes with Triton >= 3.9, AX = 0 and one
# warp of 16 full-res pixels (two lanes per pixel, the class reductions in registers plus one
# shuffle); otherwise lanes across the classes (AX = 1). benchmarks/NOTES.md has the compile evidence.
_PIXEL_MAJOR = tuple(int(v) for v in triton.__version__.split(".")[:2]) >= (3, 9)
_CONFIGS = {
    16: (4, 8, 16, 1, 0) if _PIXEL_MAJOR else (8, 8, 32, 8, 1),
    32: (4, 8, 16, 1, 0) if _PIXEL_MAJOR else (8, 8, 32, 8, 1),
    64: (4, 8, 16, 8, 1),
    128: (4, 4, 16, 16, 1),
    256: (4, 4, 16, 16, 1),
}
# float32 logits: the gradient pull-back's tl.dot runs as exact float32 FMAs (no tensor cores) on
# smaller owned blocks (benchmarks/NOTES.md)
_CONFIGS_FP32 = {16: (4, 4, 16, 1, 0), 32: (4, 4, 16, 1, 0)} if _PIXEL_MAJOR else {}


@triton.jit
def _source_index(d, scale, in_size, ALIGN: tl.constexpr):
    """PyTorch's bilinear source index of output coordinates ``d``: (i0, i1, lambda)."""
    df = d.to(tl.float32)
    if ALIGN:
        src = scale * df
    else:
        src = tl.maximum(scale * (df + 0.5) - 0.5, 0.0)
    i0 = tl.minimum(tl.floor(src).to(tl.int32), in_size - 1)
    lam = tl.minimum(tl.maximum(src - i0.to(tl.float32), 0.0), 1.0)
    i1 = tl.minimum(i0 + 1, in_size - 1)
    return i0, i1, lam


@triton.jit
def _footprint(lo, hi, inv_scale, out_size, ALIGN: tl.constexpr):
    """Output coordinates ``[start, stop)`` containing every one whose ``i0`` lies in ``[lo, hi]``.

    Inverts the source map and widens by one pixel on each side against float rounding;
    callers apply the exact masks. ``inv_scale < 0`` flags a zero scale (every i0 is 0).
    """
    if ALIGN:
        off = 0.0
    else:
        off = 0.5
    out_f = out_size.to(tl.float32)
    start = tl.floor((lo.to(tl.float32) + off) * inv_scale - off) - 1.0
    stop = tl.ceil((hi.to(tl.float32) + 1.0 + off) * inv_scale - off) + 1.0
    zero_scale = inv_scale < 0.0
    start = tl.where(zero_scale, tl.where(lo <= 0, 0.0, out_f), start)
    stop = tl.where(zero_scale, out_f, stop)
    start = tl.minimum(tl.maximum(start, 0.0), out_f)
    stop = tl.minimum(tl.maximum(stop, start), out_f)
    return start.to(tl.int32), stop.to(tl.int32)


@triton.jit
def _bilinear(base, i0, i1, j0, j1, ly, lx, s_h, s_w, c_off, cmask, AX: tl.constexpr):
    """Interpolated float32 logits, -inf on padding classes: ``[BLOCK_C, BLOCK_F]`` with the class axis
    ``AX = 0``, ``[BLOCK_F, BLOCK_C]`` with ``AX = 1``; ``c_off`` is the class offsets expanded on ``1 - AX``.

    Unmasked loads: the caller clamps padding classes to the last class and padding pixels to the
    last output pixel, so every address is inside the tensor (per-element masks cost more
    instructions than the loads)."""
    r0 = i0 * s_h
    r1 = i1 * s_h
    q0 = j0 * s_w
    q1 = j1 * s_w
    x00 = tl.load(base + c_off + tl.expand_dims(r0 + q0, AX)).to(tl.float32)
    x01 = tl.load(base + c_off + tl.expand_dims(r0 + q1, AX)).to(tl.float32)
    x10 = tl.load(base + c_off + tl.expand_dims(r1 + q0, AX)).to(tl.float32)
    x11 = tl.load(base + c_off + tl.expand_dims(r1 + q1, AX)).to(tl.float32)
    # one product per corner weight and three FMAs per element (PyTorch nests the two lerps:
    # the sums differ in rounding only)
    w00 = tl.expand_dims((1.0 - ly) * (1.0 - lx), AX)
    w01 = tl.expand_dims((1.0 - ly) * lx, AX)
    w10 = tl.expand_dims(ly * (1.0 - lx), AX)
    w11 = tl.expand_dims(ly * lx, AX)
    x = x00 * w00 + x01 * w01 + x10 * w10 + x11 * w11
    return tl.where(tl.expand_dims(cmask, 1 - AX), x, float("-inf"))


@triton.jit
def _axis_weights(start, i0, i1, lam, B: tl.constexpr):
    """``[B, BLOCK_F]`` bilinear weights of full-res pixels on the owned rows (or columns) ``start + [0, B)``."""
    own = start + tl.arange(0, B)
    w = tl.where(i0[None, :] == own[:, None], 1.0 - lam[None, :], 0.0)
    return w + tl.where(i1[None, :] == own[:, None], lam[None, :], 0.0)


# H, W unspecialised: Triton makes an int argument equal to 1 a compile-time constant, and
# _footprint converts the output size to float (a 1-pixel-high or -wide output did not compile)
@triton.jit(do_not_specialize=["H", "W"])
def _cps_upsample_kernel(
    a_ptr, b_ptr, ga_ptr, gb_ptr, t_ptr, pa_ptr, pb_ptr, counts_ptr, part_ptr,
    C, h, w, H, W, n_bands, n_tiles,
    s_an, s_ac, s_ah, s_aw, s_bn, s_bc, s_bh, s_bw,
    s_tn, s_tl, s_pan, s_pal, s_pbn, s_pbl,
    scale_h, scale_w, inv_h, inv_w,
    cps_weight, ignore_index,
    ALIGN: tl.constexpr, HAS_T: tl.constexpr, HAS_PA: tl.constexpr, HAS_PB: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BH: tl.constexpr, BW: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_C: tl.constexpr,
    DOT_PRECISION: tl.constexpr, AX: tl.constexpr,
):
    # The tiles' class axis is AX. The gathers have no contiguity for Triton (>= 3.9) to exploit, so
    # it spreads a tile's last axis over lanes (then warps): with AX = 0 ([BLOCK_C, BLOCK_F]) a thread
    # holds one pixel's classes (BLOCK_F = 32 * num_warps) or half of them (16 * num_warps), and the
    # class reductions stay in registers; with AX = 1 ([BLOCK_F, BLOCK_C]) lanes span the classes,
    # which keeps wide class axes in registers at the cost of shuffle reductions.
    pid = tl.program_id(0)
    tile = pid % n_tiles
    band = (pid // n_tiles) % n_bands
    n = pid // (n_tiles * n_bands)
    r0 = band * BH
    c0 = tile * BW
    if WRITE_GRAD:  # pixels whose i1 (not i0) falls on the block's first row/column contribute too
        lo_r = r0 - 1
        lo_c = c0 - 1
    else:
        lo_r = r0
        lo_c = c0
    y0, y1 = _footprint(lo_r, r0 + BH - 1, inv_h, H, ALIGN)
    x0, x1 = _footprint(lo_c, c0 + BW - 1, inv_w, W, ALIGN)
    fw = tl.maximum(x1 - x0, 1)
    n_pix = (y1 - y0) * (x1 - x0)

    n64 = n.to(tl.int64)
    a_base = a_ptr + n64 * s_an
    b_base = b_ptr + n64 * s_bn
    c = tl.arange(0, BLOCK_C)
    cmask = c < C
    c_load = tl.expand_dims(tl.minimum(c, C - 1), 1 - AX)  # padding classes read the last class (then -inf)
    ca = c_load * s_ac
    cb = c_load * s_bc
    nv = tl.zeros((BLOCK_F,), dtype=tl.int64) + n64  # image index per pixel, for the label helpers

    acc_a = tl.zeros((BH * BW, BLOCK_C), dtype=tl.float32)
    acc_b = tl.zeros((BH * BW, BLOCK_C), dtype=tl.float32)
    sum_t = tl.zeros((BLOCK_F,), dtype=tl.float32)
    sum_pb = tl.zeros((BLOCK_F,), dtype=tl.float32)
    sum_pa = tl.zeros((BLOCK_F,), dtype=tl.float32)

    for q0 in range(0, n_pix, BLOCK_F):
        q = q0 + tl.arange(0, BLOCK_F)
        pmask = q < n_pix
        fy = tl.minimum(y0 + q // fw, H - 1)
        fx = tl.minimum(x0 + q % fw, W - 1)
        i0, i1, ly = _source_index(fy, scale_h, h, ALIGN)
        j0, j1, lx = _source_index(fx, scale_w, w, ALIGN)
        xa = _bilinear(a_base, i0, i1, j0, j1, ly, lx, s_ah, s_aw, ca, cmask, AX)
        xb = _bilinear(b_base, i0, i1, j0, j1, ly, lx, s_bh, s_bw, cb, cmask, AX)

        # statistics of every pixel: the clamped gathers give padding pixels a real pixel's logits,
        # so theirs are finite too (the helper's padding rule, max 0 and sum 1, would let
        # exp(x - lse) overflow there); the label validities below keep them out of sums and gradients
        every = q >= 0
        _, arg_a, _, _, lse_a = _tile_stats(xa, c, every, BLOCK_C, AX)
        _, arg_b, _, _, lse_b = _tile_stats(xb, c, every, BLOCK_C, AX)

        l = fy * W + fx
        t, vt = _load_labels(t_ptr, nv, l, s_tn, s_tl, pmask, ignore_index, C, HAS_T)
        pa, vpa, pb, vpb = _pseudo_labels(pa_ptr, pb_ptr, nv, l, s_pan, s_pal, s_pbn, s_pbl, pmask, ignore_index,
                                          C, arg_a, arg_b, HAS_PA, HAS_PB)
        hit_t, hit_pa, hit_pb, xa_t, xb_t, xa_pb, xb_pa = _label_hits(c, t, pa, pb, xa, xb, AX)

        # each full-res pixel is counted by the program owning its (i0, j0) corner
        owned = pmask & (i0 >= r0) & (i0 < r0 + BH) & (j0 >= c0) & (j0 < c0 + BW)
        sum_t += tl.where(owned & vt, (lse_a - xa_t) + (lse_b - xb_t), 0.0)
        sum_pb += tl.where(owned & vpb, lse_a - xa_pb, 0.0)
        sum_pa += tl.where(owned & vpa, lse_b - xb_pa, 0.0)

        if WRITE_GRAD:
            ct, cpa, cpb = _grad_weights(counts_ptr, cps_weight, vt, vpa, vpb)
            # masked pixels have all weights 0, hence a zero gradient column
            # the softmax recomputed from the logits instead of kept from the statistics: exp(x - lse)
            # in one FMA and exp2 per element, and the exp(x - max) tiles need no registers between
            # the statistics and here (a pixel-per-thread tile is 32 registers per branch)
            pa_sm = tl.math.exp2(xa * LOG2E - tl.expand_dims(lse_a * LOG2E, AX))
            pb_sm = tl.math.exp2(xb * LOG2E - tl.expand_dims(lse_b * LOG2E, AX))
            ga, gb = _tile_grads(pa_sm, pb_sm, 1.0, 1.0, hit_t, hit_pa, hit_pb, ct, cpa, cpb, AX)
            # Wm[o, p] = wy(p, row o) * wx(p, col o) for owned pixel o = (row, col): an outer
            # product per pixel of BH row weights and BW column weights
            wy = _axis_weights(r0, i0, i1, ly, BH)
            wx = _axis_weights(c0, j0, j1, lx, BW)
            wm = tl.reshape(wy[:, None, :] * wx[None, :, :], (BH * BW, BLOCK_F))
            if AX == 0:
                ga = tl.trans(ga)
                gb = tl.trans(gb)
            acc_a = tl.dot(wm, ga, acc_a, input_precision=DOT_PRECISION)
            acc_b = tl.dot(wm, gb, acc_b, input_precision=DOT_PRECISION)

    tl.store(part_ptr + pid * 3 + 0, tl.sum(sum_t, axis=0))
    tl.store(part_ptr + pid * 3 + 1, tl.sum(sum_pb, axis=0))
    tl.store(part_ptr + pid * 3 + 2, tl.sum(sum_pa, axis=0))

    if WRITE_GRAD:
        # every low-res pixel has exactly one owner: the gradient is fully written (zeros included)
        own = tl.arange(0, BH * BW)
        own_r = r0 + own // BW
        own_c = c0 + own % BW
        om = ((own_r < h) & (own_c < w))[:, None] & cmask[None, :]
        off_a = (own_r * s_ah + own_c * s_aw)[:, None] + c[None, :] * s_ac
        off_b = (own_r * s_bh + own_c * s_bw)[:, None] + c[None, :] * s_bc
        tl.store(ga_ptr + n64 * s_an + off_a, acc_a.to(ga_ptr.dtype.element_ty), mask=om)
        tl.store(gb_ptr + n64 * s_bn + off_b, acc_b.to(gb_ptr.dtype.element_ty), mask=om)


# ----------------------------------------------------------------------------- launcher


def source_scale(in_size: int, out_size: int, align_corners: bool) -> np.float32:
    """PyTorch's float32 ``area_pixel_compute_scale`` for a bilinear resize without scale factors."""
    if align_corners:
        return np.float32(in_size - 1) / np.float32(out_size - 1) if out_size > 1 else np.float32(0.0)
    return np.float32(in_size) / np.float32(out_size)


class UpsampleConfig(NamedTuple):
    """A launch configuration forced for every class width (benchmarks/bench_upsample.py sweeps these):
    ``BH x BW`` low-res pixels per program, ``block_f`` full-res pixels per step, ``num_warps``, and
    the tile orientation ``ax`` (0: ``[classes, pixels]`` tiles, 1: ``[pixels, classes]``)."""

    bh: int
    bw: int
    block_f: int
    num_warps: int
    ax: int


# Under TRITON_INTERPRET=1 every op is a numpy call with a fixed Python overhead, so fewer,
# larger chunks of full-res pixels run much faster; registers do not matter there.
INTERPRET_BLOCK_F = 256


def block_config(C: int, interpret: bool | None = None, dtype: torch.dtype = torch.bfloat16,
                 config: UpsampleConfig | None = None) -> tuple[int, int, int, int, int, int]:
    """(BH, BW, BLOCK_F, BLOCK_C, num_warps, AX) for a class axis of size C (C <= MAX_C) of ``dtype``
    logits; ``config`` forces all but BLOCK_C."""
    if interpret is None:
        interpret = triton_interpret()
    block_c = max(16, triton.next_power_of_2(C))  # tl.dot needs every dimension >= 16
    if config is not None:
        bh, bw, block_f, num_warps, ax = config
        return bh, bw, block_f, block_c, num_warps, ax
    configs = _CONFIGS_FP32 if dtype == torch.float32 and block_c in _CONFIGS_FP32 else _CONFIGS
    bh, bw, block_f, num_warps, ax = configs[block_c]
    if interpret and INTERPRET_BLOCK_F:
        block_f = max(block_f, INTERPRET_BLOCK_F)
    return bh, bw, block_f, block_c, num_warps, ax


def _dot_precision(dtype: torch.dtype) -> str:
    if torch.version.hip is not None or dtype == torch.float32:
        return "ieee"
    return "tf32"


def cps_upsample_fwd(a4, b4, t2, pa2, pb2, counts, ga4, gb4, H, W, cps_weight, ignore_index, align_corners,
                     config: UpsampleConfig | None = None):
    """Launch the upsample-fused kernel; returns the float32 ``[3]`` full-resolution loss sums.

    ``a4``, ``b4``: ``(N, C, h, w)`` low-res logits (any strides); ``t2``, ``pa2``, ``pb2``:
    ``(N, H*W)`` labels or None; ``ga4``, ``gb4``: gradient outputs with the logits'
    shapes and strides, or None; ``config``: a forced :class:`UpsampleConfig`, or None. See
    :mod:`cps_fast.upsample_loss` for the contract.
    """
    N, C, h, w = a4.shape
    if C > MAX_C:
        raise ValueError(
            f"cps_upsample (triton): C = {C} classes exceeds the kernel's register tile of {MAX_C}; "
            f"use backend='torch' (or 'cpu' on CPU tensors) for wider class axes"
        )
    for name, g, x in (("grad_a", ga4, a4), ("grad_b", gb4, b4)):
        if g is not None and (g.shape != x.shape or g.stride() != x.stride() or g.dtype != x.dtype):
            raise ValueError(f"cps_upsample (triton): {name} must have the logits' shape, strides and dtype")
    # per-image offsets are int32 inside the kernel
    for name, x in (("low_a", a4), ("low_b", b4)):
        if max(x.stride(1) * (C - 1) + x.stride(2) * (h - 1) + x.stride(3) * (w - 1), 0) >= 2**31:
            raise ValueError(f"cps_upsample (triton): {name} has more than 2**31 elements per image")
    if H * W >= 2**31:
        raise ValueError(f"cps_upsample (triton): output size {H}x{W} has more than 2**31 pixels")
    bh, bw, block_f, block_c, num_warps, ax = block_config(C, dtype=a4.dtype, config=config)
    n_bands, n_tiles = triton.cdiv(h, bh), triton.cdiv(w, bw)
    n_prog = N * n_bands * n_tiles
    if n_prog == 0:
        for g in (ga4, gb4):
            if g is not None:
                g.zero_()
        return torch.zeros(3, dtype=torch.float32, device=a4.device)
    partials = torch.empty((n_prog, 3), dtype=torch.float32, device=a4.device)
    scale_h, scale_w = source_scale(h, H, align_corners), source_scale(w, W, align_corners)
    inv_h = float(1.0 / float(scale_h)) if scale_h > 0 else -1.0
    inv_w = float(1.0 / float(scale_w)) if scale_w > 0 else -1.0
    write_grad = ga4 is not None
    t, s_tn, s_tl, has_t = label_args(t2, counts)
    pa, s_pan, s_pal, has_pa = label_args(pa2, counts)
    pb, s_pbn, s_pbl, has_pb = label_args(pb2, counts)
    _cps_upsample_kernel[(n_prog,)](
        a4, b4, ga4 if write_grad else a4, gb4 if write_grad else b4, t, pa, pb, counts, partials,
        C, h, w, H, W, n_bands, n_tiles,
        *a4.stride(), *b4.stride(),
        s_tn, s_tl, s_pan, s_pal, s_pbn, s_pbl,
        float(scale_h), float(scale_w), inv_h, inv_w,
        float(cps_weight), int(ignore_index),
        ALIGN=bool(align_corners), HAS_T=has_t, HAS_PA=has_pa, HAS_PB=has_pb, WRITE_GRAD=write_grad,
        BH=bh, BW=bw, BLOCK_F=block_f, BLOCK_C=block_c, DOT_PRECISION=_dot_precision(a4.dtype), AX=ax,
        num_warps=num_warps, num_stages=1,  # software-pipelining the gathers only costs shared memory
    )
    return partials.sum(dim=0)
