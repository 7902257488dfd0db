// Helpers shared by the CPU loss kernels (cps_loss.cpp, cps_upsample.cpp,
// ncps_loss.cpp): the branch-free vectorisable exp, the [C][B] block
// gather/scatter, label loading, the per-pixel max/argmax, exp-sum and
// gradient steps over a block, the whole loss step of a two-branch block
// (cps_loss and cps_upsample), the block size, and the argument checks.
//
// Every per-pixel loop runs over the pixel axis innermost with restrict
// pointers so that it vectorises under -O3 (and -march=native); keep it so.
#pragma once

#include "cps_loss.h"

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <utility>

#if defined(__GNUC__) || defined(__clang__)
#define CPS_RESTRICT __restrict__
#else
#define CPS_RESTRICT
#endif

namespace cps_fast::cpu {

inline uint32_t bits_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}

inline float float_of(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

// exp(x) with a relative error below 1e-7 for x in [-87.3, 88.7], written
// without branches or library calls so loops over it vectorise (std::exp does
// not without -ffast-math). Cody-Waite range reduction x = n*ln2 + f,
// |f| <= ln2/2, the Cephes expf polynomial, then scaling by 2^n built in the
// exponent bits. The clamps compare the bit patterns as integers because GCC
// does not if-convert float compares under the default -ftrapping-math.
// Inputs below -87.3 (including -inf) give about 1e-38 instead of 0, which no
// sum of exponentials here can notice.
inline float exp_vec(float x) {
  uint32_t u = bits_of(x);
  u = u > 0xC2AE999Au ? 0xC2AE999Au : u;                                    // x < -87.3 (or -NaN) -> -87.3
  u = static_cast<int32_t>(u) > 0x42B16666 ? 0x42B16666u : u;               // x > 88.7 (or +NaN) -> 88.7
  x = float_of(u);
  // Adding 1.5 * 2^23 rounds x*log2(e) to the nearest integer n, kept in the low mantissa bits.
  const float shifter = 12582912.0f;
  const float t = x * 1.44269504088896341f + shifter;
  const float n = t - shifter;
  float f = x - n * 0.693359375f;
  f = f - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * f + 1.3981999507e-3f;
  p = p * f + 8.3334519073e-3f;
  p = p * f + 4.1665795894e-2f;
  p = p * f + 1.6666665459e-1f;
  p = p * f + 5.0000001201e-1f;
  const float y = p * f * f + f + 1.0f;
  const uint32_t scale = (bits_of(t) - 0x4B400000u + 127u) << 23;  // 0x4B400000 = bits of the shifter
  return y * float_of(scale);
}

// buf[c * ld + p] = x[c * sc + p * sl] for c < C, p < nb.
template <typename scalar_t>
void gather_block(const scalar_t* CPS_RESTRICT x, int64_t sc, int64_t sl, int64_t C, int64_t nb,
                  float* CPS_RESTRICT buf, int64_t ld) {
  if (sl == 1) {  // NCHW: each class is a contiguous row
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* CPS_RESTRICT src = x + c * sc;
      float* CPS_RESTRICT dst = buf + c * ld;
      for (int64_t p = 0; p < nb; ++p) dst[p] = static_cast<float>(src[p]);
    }
  } else if (sc == 1) {  // channels_last / (P, C): each pixel is a contiguous row, transpose
    for (int64_t p = 0; p < nb; ++p) {
      const scalar_t* CPS_RESTRICT src = x + p * sl;
      for (int64_t c = 0; c < C; ++c) buf[c * ld + p] = static_cast<float>(src[c]);
    }
  } else {
    for (int64_t c = 0; c < C; ++c) {
      float* CPS_RESTRICT dst = buf + c * ld;
      for (int64_t p = 0; p < nb; ++p) dst[p] = static_cast<float>(x[c * sc + p * sl]);
    }
  }
}

// y[c * sc + p * sl] = buf[c * ld + p], the inverse of gather_block.
template <typename scalar_t>
void scatter_block(scalar_t* CPS_RESTRICT y, int64_t sc, int64_t sl, int64_t C, int64_t nb,
                   const float* CPS_RESTRICT buf, int64_t ld) {
  if (sl == 1) {
    for (int64_t c = 0; c < C; ++c) {
      scalar_t* CPS_RESTRICT dst = y + c * sc;
      const float* CPS_RESTRICT src = buf + c * ld;
      for (int64_t p = 0; p < nb; ++p) dst[p] = static_cast<scalar_t>(src[p]);
    }
  } else if (sc == 1) {
    for (int64_t p = 0; p < nb; ++p) {
      scalar_t* CPS_RESTRICT dst = y + p * sl;
      for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<scalar_t>(buf[c * ld + p]);
    }
  } else {
    for (int64_t c = 0; c < C; ++c) {
      const float* CPS_RESTRICT src = buf + c * ld;
      for (int64_t p = 0; p < nb; ++p) y[c * sc + p * sl] = static_cast<scalar_t>(src[p]);
    }
  }
}

// out[p] = the label of pixel (n, l0 + p) if it is in [0, C) and not ignore_index, else -1.
template <typename label_t>
void load_labels_t(const LabelArg& lab, int64_t n, int64_t l0, int64_t nb, int64_t C, int64_t ignore_index,
                   int32_t* CPS_RESTRICT out) {
  const label_t* src = static_cast<const label_t*>(lab.data) + n * lab.stride_n + l0 * lab.stride_l;
  for (int64_t p = 0; p < nb; ++p) {
    const int64_t v = static_cast<int64_t>(src[p * lab.stride_l]);
    out[p] = (v != ignore_index && v >= 0 && v < C) ? static_cast<int32_t>(v) : -1;
  }
}

inline void load_labels(const LabelArg& lab, int64_t n, int64_t l0, int64_t nb, int64_t C, int64_t ignore_index,
                        int32_t* out) {
  switch (lab.kind) {
    case LabelArg::kUInt8: load_labels_t<uint8_t>(lab, n, l0, nb, C, ignore_index, out); break;
    case LabelArg::kInt32: load_labels_t<int32_t>(lab, n, l0, nb, C, ignore_index, out); break;
    default: load_labels_t<int64_t>(lab, n, l0, nb, C, ignore_index, out); break;
  }
}

// out[p] = am[p], or -1 where it equals ignore_index.
inline void ignore_argmax(const int32_t* CPS_RESTRICT am, int64_t nb, int64_t ignore_index,
                          int32_t* CPS_RESTRICT out) {
  const int32_t ig = static_cast<int32_t>(ignore_index);
  for (int64_t p = 0; p < nb; ++p) out[p] = am[p] == ig ? -1 : am[p];
}

// Running max and argmax over classes; ties and NaN behave as torch.argmax
// (the first maximum wins; a NaN counts as the maximum).
inline void max_argmax(const float* CPS_RESTRICT buf, int64_t ld, int64_t C, int64_t nb, float* CPS_RESTRICT m,
                       int32_t* CPS_RESTRICT am) {
  for (int64_t p = 0; p < nb; ++p) {
    m[p] = buf[p];
    am[p] = 0;
  }
  for (int64_t c = 1; c < C; ++c) {
    const float* CPS_RESTRICT row = buf + c * ld;
    const int32_t ci = static_cast<int32_t>(c);
    for (int64_t p = 0; p < nb; ++p) {
      const float v = row[p];
      const float mp = m[p];
      const bool take = (v > mp) | ((v != v) & (mp == mp));
      m[p] = take ? v : mp;
      am[p] = take ? ci : am[p];
    }
  }
}

// buf <- exp(buf - m) in place; s = the sum over classes.
inline void exp_sum(float* CPS_RESTRICT buf, int64_t ld, int64_t C, int64_t nb, const float* CPS_RESTRICT m,
                    float* CPS_RESTRICT s) {
  for (int64_t p = 0; p < nb; ++p) s[p] = 0.0f;
  for (int64_t c = 0; c < C; ++c) {
    float* CPS_RESTRICT row = buf + c * ld;
    for (int64_t p = 0; p < nb; ++p) {
      const float e = exp_vec(row[p] - m[p]);
      row[p] = e;
      s[p] += e;
    }
  }
}

// buf holds exp(x - m); turn it into the gradient
//   softmax * (ct_p + w_p) - onehot(t) * ct_p - onehot(q) * w_p
// where ct_p = inv_t for a valid target and w_p = wq for a valid label q.
inline void grad_block(float* CPS_RESTRICT buf, int64_t ld, int64_t C, int64_t nb, const float* CPS_RESTRICT m,
                       const float* CPS_RESTRICT s, const int32_t* CPS_RESTRICT t, const int32_t* CPS_RESTRICT q,
                       float inv_t, float wq, float* CPS_RESTRICT k) {
  for (int64_t p = 0; p < nb; ++p) {
    const float coef = (t[p] >= 0 ? inv_t : 0.0f) + (q[p] >= 0 ? wq : 0.0f);
    k[p] = coef / s[p] + (m[p] - m[p]);  // + NaN when the row max is NaN or inf, as in the reference
  }
  for (int64_t c = 0; c < C; ++c) {
    float* CPS_RESTRICT row = buf + c * ld;
    for (int64_t p = 0; p < nb; ++p) row[p] *= k[p];
  }
  for (int64_t p = 0; p < nb; ++p) {
    if (t[p] >= 0) buf[t[p] * ld + p] -= inv_t;
    if (q[p] >= 0) buf[q[p] * ld + p] -= wq;
  }
}

// Pixels per block for the two-branch kernels: both branches' [C][B] float
// buffers stay within about 48 KiB (L1/L2-resident); B is a multiple of 16 in
// [16, 256].
inline int64_t block_pixels(int64_t C) {
  int64_t b = 6144 / C;
  b = std::min<int64_t>(256, std::max<int64_t>(16, b - b % 16));
  return b;
}

// One thread's scratch of a two-branch kernel (cps_loss, cps_upsample) for
// blocks of up to B pixels, carved from caller-owned buffers: f holds at least
// 2*C*B + 9*B floats, i at least 5*B int32.
struct PairScratch {
  float *fa, *fb;                          // [C][B] per branch: logits, then exp(x - max), then the gradient
  float *ma, *mb, *sa, *sb;                // [B] max and sum of exp per branch
  float *a_t, *b_t, *a_pb, *b_pa, *k;      // [B] labelled logits; grad_block's scratch
  int32_t *tl, *ama, *amb, *pal, *pbl;     // [B] target, argmaxes, pseudo labels (-1: invalid)
  const int32_t *pa = nullptr, *pb = nullptr;  // the pseudo labels of the last block (ama/amb or pal/pbl)

  PairScratch(float* f, int32_t* i, int64_t C, int64_t B)
      : fa(f), fb(fa + C * B), ma(fb + C * B), mb(ma + B), sa(mb + B), sb(sa + B), a_t(sb + B), b_t(a_t + B),
        a_pb(b_t + B), b_pa(a_pb + B), k(b_pa + B), tl(i), ama(tl + B), amb(ama + B), pal(amb + B), pbl(pal + B) {}
};

// The pseudo labels of one branch for a block: the given labels if any, else
// its argmax, with ignore_index masked when it can be a class (buf holds the
// result unless the argmax itself is returned).
inline const int32_t* pseudo_labels(const LabelArg& given, const int32_t* am, int64_t n, int64_t l0, int64_t nb,
                                    int64_t C, int64_t ignore_index, int32_t* buf) {
  if (given.kind != LabelArg::kNone) {
    load_labels(given, n, l0, nb, C, ignore_index, buf);
    return buf;
  }
  if (ignore_index >= 0 && ignore_index < C) {
    // An argmax equal to ignore_index is ignored like any other label with that value, as the reference does.
    ignore_argmax(am, nb, ignore_index, buf);
    return buf;
  }
  return am;
}

// The loss step of one block of nb pixels (pixels l0.. of image n) whose
// float32 logits of both branches are in s.fa and s.fb ([C][B]): max/argmax,
// the target t and the pseudo labels (pa for branch a, pb for branch b; None:
// the argmax), the labelled logits, exp and its sum, then pixel by pixel
// sums[0] += vt*(CE(a,t)+CE(b,t)), sums[1] += vpb*CE(a,pb),
// sums[2] += vpa*CE(b,pa). Leaves exp(x - max) in s.fa/s.fb and the labels in
// s.tl, s.pa, s.pb, as grad_block needs them.
inline void pair_block_loss(PairScratch& s, const LabelArg& t, const LabelArg& pa, const LabelArg& pb, int64_t n,
                            int64_t l0, int64_t nb, int64_t C, int64_t B, int64_t ignore_index, double* sums) {
  float *fa = s.fa, *fb = s.fb, *ma = s.ma, *mb = s.mb, *sa = s.sa, *sb = s.sb;
  float *a_t = s.a_t, *b_t = s.b_t, *a_pb = s.a_pb, *b_pa = s.b_pa;
  int32_t* tl = s.tl;
  max_argmax(fa, B, C, nb, ma, s.ama);
  max_argmax(fb, B, C, nb, mb, s.amb);
  if (t.kind != LabelArg::kNone) {
    load_labels(t, n, l0, nb, C, ignore_index, tl);
  } else {
    std::fill(tl, tl + nb, -1);
  }
  const int32_t* pal = s.pa = pseudo_labels(pa, s.ama, n, l0, nb, C, ignore_index, s.pal);
  const int32_t* pbl = s.pb = pseudo_labels(pb, s.amb, n, l0, nb, C, ignore_index, s.pbl);
  // Gather the labelled logits before the buffers are overwritten by exp.
  for (int64_t p = 0; p < nb; ++p) {
    a_t[p] = tl[p] >= 0 ? fa[tl[p] * B + p] : 0.0f;
    b_t[p] = tl[p] >= 0 ? fb[tl[p] * B + p] : 0.0f;
    a_pb[p] = pbl[p] >= 0 ? fa[pbl[p] * B + p] : 0.0f;
    b_pa[p] = pal[p] >= 0 ? fb[pal[p] * B + p] : 0.0f;
  }
  exp_sum(fa, B, C, nb, ma, sa);
  exp_sum(fb, B, C, nb, mb, sb);
  double s_sup = sums[0], s_apb = sums[1], s_bpa = sums[2];
  for (int64_t p = 0; p < nb; ++p) {
    const float lse_a = ma[p] + std::log(sa[p]);
    const float lse_b = mb[p] + std::log(sb[p]);
    if (tl[p] >= 0) s_sup += static_cast<double>((lse_a - a_t[p]) + (lse_b - b_t[p]));
    if (pbl[p] >= 0) s_apb += static_cast<double>(lse_a - a_pb[p]);
    if (pal[p] >= 0) s_bpa += static_cast<double>(lse_b - b_pa[p]);
  }
  sums[0] = s_sup, sums[1] = s_apb, sums[2] = s_bpa;
}

// The float32 [3] sums of a two-branch kernel (on the logits' device): run(zero,
// inv, sums) is called with zero a scalar_t of the logits' dtype, inv the
// three weights 1 / max(count, 1) of counts (float32, as the reference
// computes them) and sums the double[3] it fills; nothing runs when empty.
// The callers have checked the dtype (the dispatch name never shows).
template <typename Run>
at::Tensor pair_kernel_sums(const at::Tensor& logits, const at::Tensor& counts, bool empty, const Run& run) {
  auto out = at::zeros({3}, logits.options().dtype(at::kFloat));
  if (empty) return out;
  const auto cnt = counts.accessor<float, 1>();
  const float inv[3] = {1.0f / std::max(cnt[0], 1.0f), 1.0f / std::max(cnt[1], 1.0f),
                        1.0f / std::max(cnt[2], 1.0f)};
  double sums[3];
  CPS_FAST_DISPATCH_LOGITS(logits.scalar_type(), "pair_kernel_sums", [&] { run(scalar_t(0), inv, sums); });
  float* o = out.data_ptr<float>();
  for (int j = 0; j < 3; ++j) o[j] = static_cast<float>(sums[j]);
  return out;
}

// Checks an optional gradient output g (named `name`) for the logits x
// (`xname`): x's shape, dtype and device, no self-overlapping elements, and no
// memory shared with x or with the other branch's logits. `fn` prefixes every
// error message (the op's name).
inline void check_grad(const char* fn, const std::optional<at::Tensor>& g, const char* name, const at::Tensor& x,
                       const char* xname, const at::Tensor& other, const char* other_name) {
  if (!g.has_value() || !g->defined()) return;
  const at::Tensor& t = *g;
  TORCH_CHECK(t.sizes() == x.sizes(), fn, name, " has shape ", t.sizes(), "; expected the shape of ", xname,
              ", ", x.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), fn, name, " has dtype ", t.scalar_type(),
              "; expected the logits' dtype ", x.scalar_type());
  TORCH_CHECK(t.device() == x.device(), fn, name, " is on ", t.device(), " but the logits are on ", x.device());
  TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, fn, name, " (strides ", t.strides(),
              ") has elements that share memory; expected a writable output such as torch.empty_like(",
              xname, ")");
  for (const auto& [in, in_name] : {std::pair<const at::Tensor*, const char*>{&x, xname}, {&other, other_name}}) {
    const auto st = at::get_overlap_status(t, *in);
    TORCH_CHECK(st != at::MemOverlapStatus::Full && st != at::MemOverlapStatus::Partial, fn, name,
                " overlaps the memory of ", in_name, "; the gradient must be a separate tensor");
  }
}

// Checks the counts (float32 [3] on the logits' device) and the optional
// gradient outputs of a two-branch op: each as check_grad, and the two not
// sharing memory. an, bn, gan, gbn name a, b, ga, gb in the messages.
inline void check_pair_outputs(const char* fn, const at::Tensor& counts, const at::Tensor& a, const char* an,
                               const at::Tensor& b, const char* bn, const std::optional<at::Tensor>& ga,
                               const char* gan, const std::optional<at::Tensor>& gb, const char* gbn) {
  TORCH_CHECK(counts.defined(), fn, "counts is an undefined tensor; expected a float32 tensor of shape [3]");
  TORCH_CHECK(counts.scalar_type() == at::kFloat && counts.dim() == 1 && counts.size(0) == 3, fn,
              "counts has dtype ", counts.scalar_type(), " and shape ", counts.sizes(),
              "; expected float32 of shape [3] (valid pixels of target, pseudo_a, pseudo_b)");
  TORCH_CHECK(counts.device() == a.device(), fn, "counts is on ", counts.device(), " but the logits are on ",
              a.device());
  check_grad(fn, ga, gan, a, an, b, bn);
  check_grad(fn, gb, gbn, b, bn, a, an);
  if (ga.has_value() && ga->defined() && gb.has_value() && gb->defined()) {
    const auto st = at::get_overlap_status(*ga, *gb);
    TORCH_CHECK(st != at::MemOverlapStatus::Full && st != at::MemOverlapStatus::Partial, fn, gan, " and ", gbn,
                " share memory; expected two separate outputs");
  }
}

// The LabelArg of an (N, L) label tensor t (named `name`) whose shape the
// caller has checked: integer dtype (uint8, int32 or int64) and the logits'
// device. `fn` prefixes every error message.
inline LabelArg label_arg(const char* fn, const at::Tensor& t, const char* name, const at::Tensor& logits) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kByte || st == at::kInt || st == at::kLong, fn, name, " has dtype ", st,
              "; expected integer labels (uint8, int32 or int64)");
  TORCH_CHECK(t.device() == logits.device(), fn, name, " is on ", t.device(), " but the logits are on ",
              logits.device());
  LabelArg arg;
  arg.data = t.data_ptr();
  arg.kind = st == at::kByte ? LabelArg::kUInt8 : (st == at::kInt ? LabelArg::kInt32 : LabelArg::kInt64);
  arg.stride_n = t.stride(0);
  arg.stride_l = t.stride(1);
  return arg;
}

}  // namespace cps_fast::cpu
