// The fused CPS loss: argument checks, device dispatch and the CPU kernel.
//
// CPU kernel. The pixels of each image are cut into blocks of B consecutive
// pixels; at::parallel_for hands out contiguous ranges of blocks. A block of
// each branch is gathered into a float32 [C][B] buffer (a strided copy per
// class for NCHW, a transpose for channels_last), so every later loop runs
// over the pixel axis innermost and vectorises: max/argmax, exp and sum-exp,
// the label gathers, and the gradient, which is written back in the source
// layout. Each block stores its three partial sums (double) in its own slot
// and the slots are added in block order at the end, so the result does not
// depend on the number of threads.
#include "cps_loss.h"

#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__GNUC__) || defined(__clang__)
#define CPS_RESTRICT __restrict__
#else
#define CPS_RESTRICT
#endif

namespace cps_fast {

// ============================================================================ checks

namespace {

const char* kFn = "cps_fast._C.cps_loss_forward: ";

bool is_float_logits(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

void check_logits(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.defined(), kFn, name, " is an undefined tensor; expected (N, C, L) logits");
  TORCH_CHECK(x.dim() == 3, kFn, name, " has shape ", x.sizes(), " (", x.dim(),
              " dims); expected (N, C, L) logits with 3 dims");
  TORCH_CHECK(is_float_logits(x.scalar_type()), kFn, name, " has dtype ", x.scalar_type(),
              "; expected float32, float16 or bfloat16 logits");
  TORCH_CHECK(x.device().is_cpu() || x.device().is_cuda(), kFn, name, " is on ", x.device(),
              "; expected a CPU or CUDA tensor");
}

LabelArg check_labels(const std::optional<at::Tensor>& y, const char* name, const at::Tensor& a3) {
  LabelArg arg;
  if (!y.has_value() || !y->defined()) return arg;
  const at::Tensor& t = *y;
  const int64_t N = a3.size(0), L = a3.size(2);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == N && t.size(1) == L, kFn, name, " has shape ", t.sizes(),
              "; expected (N, L) = (", N, ", ", L, ") labels to match logits of shape ", a3.sizes());
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kByte || st == at::kInt || st == at::kLong, kFn, name, " has dtype ", st,
              "; expected integer labels (uint8, int32 or int64)");
  TORCH_CHECK(t.device() == a3.device(), kFn, name, " is on ", t.device(), " but the logits are on ",
              a3.device());
  arg.data = t.data_ptr();
  arg.kind = st == at::kByte ? LabelArg::kUInt8 : (st == at::kInt ? LabelArg::kInt32 : LabelArg::kInt64);
  arg.stride_n = t.stride(0);
  arg.stride_l = t.stride(1);
  return arg;
}

void check_grad(const std::optional<at::Tensor>& g, const char* name, const at::Tensor& x, const char* xname,
                const at::Tensor& other, const char* other_name) {
  if (!g.has_value() || !g->defined()) return;
  const at::Tensor& t = *g;
  TORCH_CHECK(t.sizes() == x.sizes(), kFn, name, " has shape ", t.sizes(), "; expected the shape of ", xname,
              ", ", x.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), kFn, name, " has dtype ", t.scalar_type(),
              "; expected the logits' dtype ", x.scalar_type());
  TORCH_CHECK(t.device() == x.device(), kFn, name, " is on ", t.device(), " but the logits are on ", x.device());
  TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, kFn, name, " (strides ", t.strides(),
              ") has elements that share memory; expected a writable output such as torch.empty_like(",
              xname, ")");
  for (const auto& [in, in_name] : {std::pair<const at::Tensor*, const char*>{&x, xname}, {&other, other_name}}) {
    const auto st = at::get_overlap_status(t, *in);
    TORCH_CHECK(st != at::MemOverlapStatus::Full && st != at::MemOverlapStatus::Partial, kFn, name,
                " overlaps the memory of ", in_name, "; the gradient must be a separate tensor");
  }
}

}  // namespace

// ============================================================================ CPU kernel

namespace {

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

template <typename scalar_t>
inline float to_f(scalar_t v) {
  return static_cast<float>(v);
}

// buf[c * ld + p] = x[c * sc + p * sl] for c < C, p < nb.
template <typename scalar_t>
void gather_block(const scalar_t* CPS_RESTRICT x, int64_t sc, int64_t sl, int64_t C, int64_t nb,
                  float* CPS_RESTRICT buf, int64_t ld) {
  if (sl == 1) {  // NCHW: each class is a contiguous row
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* CPS_RESTRICT src = x + c * sc;
      float* CPS_RESTRICT dst = buf + c * ld;
      for (int64_t p = 0; p < nb; ++p) dst[p] = to_f(src[p]);
    }
  } else if (sc == 1) {  // channels_last / (P, C): each pixel is a contiguous row, transpose
    for (int64_t p = 0; p < nb; ++p) {
      const scalar_t* CPS_RESTRICT src = x + p * sl;
      for (int64_t c = 0; c < C; ++c) buf[c * ld + p] = to_f(src[c]);
    }
  } else {
    for (int64_t c = 0; c < C; ++c) {
      float* CPS_RESTRICT dst = buf + c * ld;
      for (int64_t p = 0; p < nb; ++p) dst[p] = to_f(x[c * sc + p * sl]);
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

void load_labels(const LabelArg& lab, int64_t n, int64_t l0, int64_t nb, int64_t C, int64_t ignore_index,
                 int32_t* out) {
  switch (lab.kind) {
    case LabelArg::kUInt8: load_labels_t<uint8_t>(lab, n, l0, nb, C, ignore_index, out); break;
    case LabelArg::kInt32: load_labels_t<int32_t>(lab, n, l0, nb, C, ignore_index, out); break;
    default: load_labels_t<int64_t>(lab, n, l0, nb, C, ignore_index, out); break;
  }
}

// out[p] = am[p], or -1 where it equals ignore_index.
void ignore_argmax(const int32_t* CPS_RESTRICT am, int64_t nb, int64_t ignore_index, int32_t* CPS_RESTRICT out) {
  const int32_t ig = static_cast<int32_t>(ignore_index);
  for (int64_t p = 0; p < nb; ++p) out[p] = am[p] == ig ? -1 : am[p];
}

// Running max and argmax over classes; ties and NaN behave as torch.argmax
// (the first maximum wins; a NaN counts as the maximum).
void max_argmax(const float* CPS_RESTRICT buf, int64_t ld, int64_t C, int64_t nb, float* CPS_RESTRICT m,
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
void exp_sum(float* CPS_RESTRICT buf, int64_t ld, int64_t C, int64_t nb, const float* CPS_RESTRICT m,
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
void grad_block(float* CPS_RESTRICT buf, int64_t ld, int64_t C, int64_t nb, const float* CPS_RESTRICT m,
                const float* CPS_RESTRICT s, const int32_t* CPS_RESTRICT t, const int32_t* CPS_RESTRICT q, float inv_t, float wq,
                float* CPS_RESTRICT k) {
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

// Pixels per block: both branches' [C][B] float buffers stay within about
// 48 KiB (L1/L2-resident); B is a multiple of 16 in [16, 256].
int64_t block_pixels(int64_t C) {
  int64_t b = 6144 / C;
  b = std::min<int64_t>(256, std::max<int64_t>(16, b - b % 16));
  return b;
}

template <typename scalar_t>
void cps_loss_cpu_kernel(const CPSLossArgs& args, const scalar_t* a, const scalar_t* b, scalar_t* ga, scalar_t* gb,
                         float inv_t, float inv_pa, float inv_pb, double* sums) {
  const int64_t N = args.N, C = args.C, L = args.L;
  const int64_t B = block_pixels(C);
  const int64_t blocks_per_image = (L + B - 1) / B;
  const int64_t n_blocks = N * blocks_per_image;
  const bool has_t = args.t.kind != LabelArg::kNone;
  // An argmax equal to ignore_index (possible when 0 <= ignore_index < C) is
  // ignored like any other label with that value, as the reference does.
  const bool argmax_can_be_ignored = args.ignore_index >= 0 && args.ignore_index < C;
  const float w = args.cps_weight;
  const float w_pb = w * inv_pb;  // weight of CE(a, pb) per valid pixel
  const float w_pa = w * inv_pa;  // weight of CE(b, pa)
  std::vector<double> partial(static_cast<size_t>(3 * n_blocks), 0.0);

  at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> fbuf(static_cast<size_t>(2 * C * B + 12 * B));
    std::vector<int32_t> ibuf(static_cast<size_t>(5 * B));
    float* fa = fbuf.data();
    float* fb = fa + C * B;
    float* ma = fb + C * B;
    float* mb = ma + B;
    float* sa = mb + B;
    float* sb = sa + B;
    float* a_t = sb + B;
    float* b_t = a_t + B;
    float* a_pb = b_t + B;
    float* b_pa = a_pb + B;
    float* k = b_pa + B;
    int32_t* tl = ibuf.data();
    int32_t* ama = tl + B;
    int32_t* amb = ama + B;
    int32_t* pal = amb + B;
    int32_t* pbl = pal + B;

    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n = blk / blocks_per_image;
      const int64_t l0 = (blk % blocks_per_image) * B;
      const int64_t nb = std::min(B, L - l0);

      gather_block(a + n * args.a_sn + l0 * args.a_sl, args.a_sc, args.a_sl, C, nb, fa, B);
      gather_block(b + n * args.b_sn + l0 * args.b_sl, args.b_sc, args.b_sl, C, nb, fb, B);
      max_argmax(fa, B, C, nb, ma, ama);
      max_argmax(fb, B, C, nb, mb, amb);

      if (has_t) {
        load_labels(args.t, n, l0, nb, C, args.ignore_index, tl);
      } else {
        std::fill(tl, tl + nb, -1);
      }
      const int32_t* pa = ama;
      const int32_t* pb = amb;
      if (args.pa.kind != LabelArg::kNone) {
        load_labels(args.pa, n, l0, nb, C, args.ignore_index, pal);
        pa = pal;
      } else if (argmax_can_be_ignored) {
        ignore_argmax(ama, nb, args.ignore_index, pal);
        pa = pal;
      }
      if (args.pb.kind != LabelArg::kNone) {
        load_labels(args.pb, n, l0, nb, C, args.ignore_index, pbl);
        pb = pbl;
      } else if (argmax_can_be_ignored) {
        ignore_argmax(amb, nb, args.ignore_index, pbl);
        pb = pbl;
      }
      // Gather the labelled logits before the buffers are overwritten by exp.
      for (int64_t p = 0; p < nb; ++p) {
        a_t[p] = tl[p] >= 0 ? fa[tl[p] * B + p] : 0.0f;
        b_t[p] = tl[p] >= 0 ? fb[tl[p] * B + p] : 0.0f;
        a_pb[p] = pb[p] >= 0 ? fa[pb[p] * B + p] : 0.0f;
        b_pa[p] = pa[p] >= 0 ? fb[pa[p] * B + p] : 0.0f;
      }
      exp_sum(fa, B, C, nb, ma, sa);
      exp_sum(fb, B, C, nb, mb, sb);

      double s_sup = 0.0, s_apb = 0.0, s_bpa = 0.0;
      for (int64_t p = 0; p < nb; ++p) {
        const float lse_a = ma[p] + std::log(sa[p]);
        const float lse_b = mb[p] + std::log(sb[p]);
        if (tl[p] >= 0) s_sup += static_cast<double>((lse_a - a_t[p]) + (lse_b - b_t[p]));
        if (pb[p] >= 0) s_apb += static_cast<double>(lse_a - a_pb[p]);
        if (pa[p] >= 0) s_bpa += static_cast<double>(lse_b - b_pa[p]);
      }
      partial[3 * blk + 0] = s_sup;
      partial[3 * blk + 1] = s_apb;
      partial[3 * blk + 2] = s_bpa;

      if (ga != nullptr) {
        grad_block(fa, B, C, nb, ma, sa, tl, pb, inv_t, w_pb, k);
        scatter_block(ga + n * args.ga_sn + l0 * args.ga_sl, args.ga_sc, args.ga_sl, C, nb, fa, B);
      }
      if (gb != nullptr) {
        grad_block(fb, B, C, nb, mb, sb, tl, pa, inv_t, w_pa, k);
        scatter_block(gb + n * args.gb_sn + l0 * args.gb_sl, args.gb_sc, args.gb_sl, C, nb, fb, B);
      }
    }
  });

  sums[0] = sums[1] = sums[2] = 0.0;
  for (int64_t blk = 0; blk < n_blocks; ++blk) {
    for (int j = 0; j < 3; ++j) sums[j] += partial[3 * blk + j];
  }
}

at::Tensor cps_loss_forward_cpu(const CPSLossArgs& args, const at::Tensor& a3, const at::Tensor& b3,
                                const at::Tensor& counts, const std::optional<at::Tensor>& grad_a3,
                                const std::optional<at::Tensor>& grad_b3) {
  auto out = at::zeros({3}, a3.options().dtype(at::kFloat));
  const auto cnt = counts.accessor<float, 1>();
  // inv = 1 / max(count, 1), as the reference computes it (float32)
  const float inv_t = 1.0f / std::max(cnt[0], 1.0f);
  const float inv_pa = 1.0f / std::max(cnt[1], 1.0f);
  const float inv_pb = 1.0f / std::max(cnt[2], 1.0f);
  const bool want_ga = grad_a3.has_value() && grad_a3->defined();
  const bool want_gb = grad_b3.has_value() && grad_b3->defined();
  if (args.N * args.L == 0) return out;
  double sums[3];
  CPS_FAST_DISPATCH_LOGITS(a3.scalar_type(), "cps_loss_forward_cpu", [&] {
    cps_loss_cpu_kernel<scalar_t>(args, a3.const_data_ptr<scalar_t>(), b3.const_data_ptr<scalar_t>(),
                                  want_ga ? grad_a3->mutable_data_ptr<scalar_t>() : nullptr,
                                  want_gb ? grad_b3->mutable_data_ptr<scalar_t>() : nullptr, inv_t, inv_pa, inv_pb,
                                  sums);
  });
  float* o = out.data_ptr<float>();
  for (int j = 0; j < 3; ++j) o[j] = static_cast<float>(sums[j]);
  return out;
}

}  // namespace

// ============================================================================ entry point

bool has_cuda() {
#ifdef CPS_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

at::Tensor cps_loss_forward(const at::Tensor& a3, const at::Tensor& b3, const std::optional<at::Tensor>& t2,
                            const std::optional<at::Tensor>& pa2, const std::optional<at::Tensor>& pb2,
                            const at::Tensor& counts, const std::optional<at::Tensor>& grad_a3,
                            const std::optional<at::Tensor>& grad_b3, double cps_weight, int64_t ignore_index) {
  check_logits(a3, "a3 (logits_a)");
  check_logits(b3, "b3 (logits_b)");
  TORCH_CHECK(a3.sizes() == b3.sizes(), kFn, "a3 has shape ", a3.sizes(), " but b3 has shape ", b3.sizes(),
              "; expected the two branches' logits to have one shape");
  TORCH_CHECK(a3.scalar_type() == b3.scalar_type(), kFn, "a3 has dtype ", a3.scalar_type(), " but b3 has dtype ",
              b3.scalar_type(), "; expected one dtype");
  TORCH_CHECK(a3.device() == b3.device(), kFn, "a3 is on ", a3.device(), " but b3 is on ", b3.device());
  const int64_t C = a3.size(1);
  TORCH_CHECK(C >= 2, kFn, "the logits have C = ", C, " classes (dim 1 of ", a3.sizes(), "); expected C >= 2");
  TORCH_CHECK(C <= std::numeric_limits<int32_t>::max(), kFn, "C = ", C, " classes is too many");

  CPSLossArgs args;
  args.N = a3.size(0);
  args.C = C;
  args.L = a3.size(2);
  args.t = check_labels(t2, "t2 (target)", a3);
  args.pa = check_labels(pa2, "pa2 (pseudo_a)", a3);
  args.pb = check_labels(pb2, "pb2 (pseudo_b)", a3);

  TORCH_CHECK(counts.defined(), kFn, "counts is an undefined tensor; expected a float32 tensor of shape [3]");
  TORCH_CHECK(counts.scalar_type() == at::kFloat && counts.dim() == 1 && counts.size(0) == 3, kFn,
              "counts has dtype ", counts.scalar_type(), " and shape ", counts.sizes(),
              "; expected float32 of shape [3] (valid pixels of target, pseudo_a, pseudo_b)");
  TORCH_CHECK(counts.device() == a3.device(), kFn, "counts is on ", counts.device(), " but the logits are on ",
              a3.device());
  check_grad(grad_a3, "grad_a3", a3, "a3", b3, "b3");
  check_grad(grad_b3, "grad_b3", b3, "b3", a3, "a3");
  if (grad_a3.has_value() && grad_a3->defined() && grad_b3.has_value() && grad_b3->defined()) {
    const auto st = at::get_overlap_status(*grad_a3, *grad_b3);
    TORCH_CHECK(st != at::MemOverlapStatus::Full && st != at::MemOverlapStatus::Partial, kFn,
                "grad_a3 and grad_b3 share memory; expected two separate outputs");
  }
  TORCH_CHECK(std::isfinite(cps_weight), kFn, "cps_weight = ", cps_weight, "; expected a finite number");

  args.a_sn = a3.stride(0), args.a_sc = a3.stride(1), args.a_sl = a3.stride(2);
  args.b_sn = b3.stride(0), args.b_sc = b3.stride(1), args.b_sl = b3.stride(2);
  if (grad_a3.has_value() && grad_a3->defined()) {
    args.ga_sn = grad_a3->stride(0), args.ga_sc = grad_a3->stride(1), args.ga_sl = grad_a3->stride(2);
  }
  if (grad_b3.has_value() && grad_b3->defined()) {
    args.gb_sn = grad_b3->stride(0), args.gb_sc = grad_b3->stride(1), args.gb_sl = grad_b3->stride(2);
  }
  args.cps_weight = static_cast<float>(cps_weight);
  args.ignore_index = ignore_index;

  if (a3.device().is_cuda()) {
#ifdef CPS_FAST_WITH_CUDA
    return cps_loss_forward_cuda(args, a3, b3, counts, grad_a3, grad_b3);
#else
    TORCH_CHECK(false, kFn, "got CUDA tensors, but cps_fast._C was built without CUDA (CPU-only torch, no nvcc, "
                "or CPS_FAST_SKIP_CUDA_BUILD=1); rebuild with a CUDA torch or use backend=\"triton\"/\"torch\"");
#endif
  }
  return cps_loss_forward_cpu(args, a3, b3, counts, grad_a3, grad_b3);
}

}  // namespace cps_fast
