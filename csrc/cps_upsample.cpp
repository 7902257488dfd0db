// The upsample-fused CPS loss on the CPU: argument checks and the kernel.
//
// Work split. The low-resolution rows of all images, flattened to global rows
// g = n*h + r, are cut into T contiguous segments (T = threads), one per task
// of at::parallel_for. Low-res row r "owns" the full-resolution rows y whose
// top source row i0(y) is r; every full-res pixel is computed exactly once,
// by the owner of its row, and its loss terms are added to that row's partial
// sums (reduced in row order at the end, so the result does not depend on T).
//
// One full-res row: the two source rows (converted once to float32 [C][w] and
// kept in a two-row ring) are blended vertically into tmp[C][w]; blocks of up
// to B pixels are blended horizontally into [C][B] buffers and go through the
// same per-pixel steps as the cps_loss CPU kernel (max/argmax, labels,
// exp-sum, log-sum-exp, gradient). The full-res gradient of a block is pulled
// back through the horizontal weights at once (a gather over each low-res
// column's contiguous range of full-res columns, no scatter), then added to
// two float32 row accumulators: `own` (row r) and `halo` (row r+1).
//
// Gradient reduction without atomics: low-res row r receives from its own
// full-res rows (`own`) and from row r-1's (its `halo`); the final value is
// own + halo, always in that order, written once in the logits' dtype. Inside
// a segment the halo is handed from row to row; the first row of a segment
// (unless it starts an image) waits for the previous segment's halo and is
// finished after the parallel loop. Each element therefore has the same
// float32 rounding whatever T is.
#include "cps_upsample.h"

#include <torch/extension.h>

#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>

// x86-64 builds carry AVX-512 and AVX2 versions of the column paths whatever
// the compiler flags (a portable build included) and pick one at run time.
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define CPS_UPS_X86 1
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "cps_loss.h"
#include "cpu_kernel_utils.h"

namespace cps_fast {

// ============================================================================ checks

namespace {

const char* kFn = "cps_fast._C.cps_upsample_forward: ";

void check_logits4(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.defined(), kFn, name, " is an undefined tensor; expected (N, C, h, w) low-resolution logits");
  TORCH_CHECK(x.dim() == 4, kFn, name, " has shape ", x.sizes(), " (", x.dim(),
              " dims); expected (N, C, h, w) low-resolution logits with 4 dims");
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, kFn, name, " has dtype ", st,
              "; expected float32, float16 or bfloat16 logits");
  TORCH_CHECK(!x.device().is_cuda(), "cps_upsample_forward: no CUDA kernel; use backend='triton' (", name,
              " is on ", x.device(), ")");
  TORCH_CHECK(x.device().is_cpu(), kFn, name, " is on ", x.device(), "; expected a CPU tensor");
}

LabelArg check_labels(const std::optional<at::Tensor>& y, const char* name, const at::Tensor& a4, int64_t H,
                      int64_t W) {
  if (!y.has_value() || !y->defined()) return LabelArg();
  const at::Tensor& t = *y;
  const int64_t N = a4.size(0);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == N && t.size(1) == H * W, kFn, name, " has shape ", t.sizes(),
              "; expected full-resolution labels of shape (N, H*W) = (", N, ", ", H * W, ") for size (H, W) = (",
              H, ", ", W, ")");
  return cpu::label_arg(kFn, t, name, a4);
}

}  // namespace

// ============================================================================ per-pixel helpers
//
// The per-pixel steps are the ones of the cps_loss CPU kernel (shared in
// cpu_kernel_utils.h), so the fused op computes each full-resolution pixel
// exactly as cps_loss does.

namespace {

using namespace cpu;

}  // namespace

// ============================================================================ bilinear tables

namespace {

// Source indices and weights along one axis, as PyTorch's upsample_bilinear2d
// computes them (area_pixel_compute_scale / area_pixel_compute_source_index /
// guard_index_and_lambda, in float32), plus the transposed map used by the
// backward: low-res index j receives from output indices [lo[j], hi[j]) with
// weights wt[off[j] + d - lo[j]].
struct Axis {
  std::vector<int32_t> i0, i1;
  std::vector<float> w0, w1;
  std::vector<int64_t> lo, hi, off;
  std::vector<float> wt;
};

Axis make_axis(int64_t in, int64_t out, bool align_corners) {
  Axis ax;
  ax.i0.resize(out), ax.i1.resize(out), ax.w0.resize(out), ax.w1.resize(out);
  const float scale = align_corners ? (out > 1 ? static_cast<float>(in - 1) / static_cast<float>(out - 1) : 0.0f)
                                    : static_cast<float>(in) / static_cast<float>(out);
  for (int64_t d = 0; d < out; ++d) {
    if (in == out) {  // PyTorch copies when the sizes match
      ax.i0[d] = ax.i1[d] = static_cast<int32_t>(d);
      ax.w0[d] = 1.0f, ax.w1[d] = 0.0f;
      continue;
    }
    float src = align_corners ? scale * static_cast<float>(d) : scale * (static_cast<float>(d) + 0.5f) - 0.5f;
    if (!align_corners && src < 0.0f) src = 0.0f;
    const int64_t i = std::min<int64_t>(static_cast<int64_t>(std::floor(src)), in - 1);
    const float lambda = std::min(std::max(src - static_cast<float>(i), 0.0f), 1.0f);
    ax.i0[d] = static_cast<int32_t>(i);
    ax.i1[d] = static_cast<int32_t>(i + (i < in - 1 ? 1 : 0));
    ax.w0[d] = 1.0f - lambda;
    ax.w1[d] = lambda;
  }
  ax.lo.assign(in, out);
  ax.hi.assign(in, 0);
  for (int64_t d = 0; d < out; ++d) {
    for (const int32_t j : {ax.i0[d], ax.i1[d]}) {
      ax.lo[j] = std::min(ax.lo[j], d);
      ax.hi[j] = std::max(ax.hi[j], d + 1);
    }
  }
  ax.off.assign(in + 1, 0);
  for (int64_t j = 0; j < in; ++j) ax.off[j + 1] = ax.off[j] + std::max<int64_t>(0, ax.hi[j] - ax.lo[j]);
  ax.wt.assign(ax.off[in], 0.0f);
  for (int64_t j = 0; j < in; ++j) {
    for (int64_t d = ax.lo[j]; d < ax.hi[j]; ++d) {
      // an index that is both i0 and i1 (the last row or column) gets both weights, as autograd does
      ax.wt[ax.off[j] + d - ax.lo[j]] = (ax.i0[d] == j ? ax.w0[d] : 0.0f) + (ax.i1[d] == j ? ax.w1[d] : 0.0f);
    }
  }
  return ax;
}

// out[c * ld + p] = w0 * tmp[c * w + i0] + w1 * tmp[c * w + i1] for the output columns p of a block.
void interp_columns(const float* CPS_RESTRICT tmp, int64_t w, int64_t C, const int32_t* CPS_RESTRICT i0,
                    const int32_t* CPS_RESTRICT i1, const float* CPS_RESTRICT w0, const float* CPS_RESTRICT w1,
                    int64_t nb, float* CPS_RESTRICT out, int64_t ld) {
  for (int64_t c = 0; c < C; ++c) {
    const float* CPS_RESTRICT t = tmp + c * w;
    float* CPS_RESTRICT o = out + c * ld;
    for (int64_t p = 0; p < nb; ++p) o[p] = w0[p] * t[i0[p]] + w1[p] * t[i1[p]];
  }
}

// gt[c * w + j] += sum over the block's output columns d of weight(d -> j) * g[c * ld + d - xb]:
// the transpose of interp_columns, as a gather per low-res column (no scatter conflicts).
void pull_columns(const float* CPS_RESTRICT g, int64_t ld, int64_t C, int64_t xb, int64_t nb, const Axis& ax,
                  float* CPS_RESTRICT gt, int64_t w) {
  const int64_t xe = xb + nb;
  const int64_t jlo = ax.i0[xb], jhi = ax.i1[xe - 1];
  for (int64_t j = jlo; j <= jhi; ++j) {
    const int64_t d0 = std::max(ax.lo[j], xb), d1 = std::min(ax.hi[j], xe);
    if (d0 >= d1) continue;
    const float* CPS_RESTRICT wt = ax.wt.data() + ax.off[j] + (d0 - ax.lo[j]);
    const float* CPS_RESTRICT gp = g + (d0 - xb);
    const int64_t len = d1 - d0;
    for (int64_t c = 0; c < C; ++c) {
      const float* CPS_RESTRICT gc = gp + c * ld;
      float acc = 0.0f;
      for (int64_t k = 0; k < len; ++k) acc += wt[k] * gc[k];
      gt[c * w + j] += acc;
    }
  }
}

// The output columns in groups of L (one vector: 16 floats with AVX-512, 8
// with AVX2). A group whose source columns span at most L (upsampling by more
// than about L/(L-1)) reads one L-float window of the source row at `base` and
// blends it with two in-register permutes instead of gathers; its backward
// pulls each window position's contributions out of the group's gradient
// vector with K permutes (K = the most output columns feeding one source
// column in the group). Other groups (downsampling) take the scalar loops.
struct ColumnPlan {
  int64_t lanes = 16, groups = 0;
  std::vector<int32_t> base, kcount;
  std::vector<uint8_t> fits;
  std::vector<int32_t> loc0, loc1;  // [group][L] source column - base
  std::vector<int64_t> koff;        // [group + 1], in rows of L
  std::vector<int32_t> kidx;        // [row][L] lane of the group feeding window position jl
  std::vector<float> kwt;           // [row][L] its weight (0 where none)
};

ColumnPlan make_plan(const Axis& ax, int64_t out, int64_t L) {
  ColumnPlan pl;
  pl.lanes = L;
  pl.groups = (out + L - 1) / L;
  pl.base.assign(pl.groups, 0), pl.kcount.assign(pl.groups, 0), pl.fits.assign(pl.groups, 0);
  pl.loc0.assign(pl.groups * L, 0), pl.loc1.assign(pl.groups * L, 0);
  pl.koff.assign(pl.groups + 1, 0);
  std::vector<int32_t> first(L), end(L);
  for (int64_t v = 0; v < pl.groups; ++v) {
    const int64_t x0 = L * v, lanes = std::min<int64_t>(L, out - x0);
    const int32_t base = ax.i0[x0];
    pl.base[v] = base;
    pl.fits[v] = ax.i1[x0 + lanes - 1] - base < L;
    pl.koff[v + 1] = pl.koff[v];
    if (!pl.fits[v]) continue;
    for (int64_t l = 0; l < lanes; ++l) {
      pl.loc0[L * v + l] = ax.i0[x0 + l] - base;
      pl.loc1[L * v + l] = ax.i1[x0 + l] - base;
    }
    // lanes [first[jl], end[jl]) feed window position jl (contiguous: i0 and i1 are nondecreasing)
    int32_t K = 0;
    for (int64_t jl = 0; jl < L; ++jl) {
      first[jl] = static_cast<int32_t>(L), end[jl] = 0;
      for (int32_t l = 0; l < lanes; ++l) {
        if (ax.i0[x0 + l] == base + jl || ax.i1[x0 + l] == base + jl) {
          first[jl] = std::min(first[jl], l);
          end[jl] = std::max(end[jl], l + 1);
        }
      }
      K = std::max(K, end[jl] - first[jl]);
    }
    pl.kcount[v] = K;
    pl.koff[v + 1] = pl.koff[v] + K;
    for (int32_t k = 0; k < K; ++k) {
      for (int64_t jl = 0; jl < L; ++jl) {
        const int32_t l = first[jl] + k;
        const int64_t j = base + jl;
        const bool has = l < end[jl];
        const int64_t x = x0 + (has ? l : 0);
        pl.kidx.push_back(has ? l : 0);
        pl.kwt.push_back(has ? (ax.i0[x] == j ? ax.w0[x] : 0.0f) + (ax.i1[x] == j ? ax.w1[x] : 0.0f) : 0.0f);
      }
    }
  }
  return pl;
}

#if defined(CPS_UPS_X86)
namespace avx512 {
#define CPS_SIMD_FN __attribute__((target("avx512f"))) inline
constexpr int64_t kLanes = 16;
using F = __m512;
using I = __m512i;
using M = __mmask16;
CPS_SIMD_FN M mask(int64_t n) { return static_cast<M>((1u << n) - 1u); }
CPS_SIMD_FN F load(const float* p) { return _mm512_loadu_ps(p); }
CPS_SIMD_FN I loadi(const int32_t* p) { return _mm512_loadu_si512(p); }
CPS_SIMD_FN F maskload(M m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
CPS_SIMD_FN void maskstore(float* p, M m, F v) { _mm512_mask_storeu_ps(p, m, v); }
// (the maskz form: GCC 12 warns of the plain one's _mm512_undefined_ps, GCC bug 105593)
CPS_SIMD_FN F perm(I ix, F v) { return _mm512_maskz_permutexvar_ps(0xFFFF, ix, v); }
CPS_SIMD_FN F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
CPS_SIMD_FN F add(F a, F b) { return _mm512_add_ps(a, b); }
CPS_SIMD_FN F mul(F a, F b) { return _mm512_mul_ps(a, b); }
CPS_SIMD_FN F zero() { return _mm512_setzero_ps(); }
#include "cps_upsample_simd.inc"
#undef CPS_SIMD_FN
}  // namespace avx512

namespace avx2 {
#define CPS_SIMD_FN __attribute__((target("avx2,fma"))) inline
constexpr int64_t kLanes = 8;
using F = __m256;
using I = __m256i;
using M = __m256i;  // all ones in the active lanes, as maskload/maskstore take it
CPS_SIMD_FN M mask(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
CPS_SIMD_FN F load(const float* p) { return _mm256_loadu_ps(p); }
CPS_SIMD_FN I loadi(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
CPS_SIMD_FN F maskload(M m, const float* p) { return _mm256_maskload_ps(p, m); }
CPS_SIMD_FN void maskstore(float* p, M m, F v) { _mm256_maskstore_ps(p, m, v); }
CPS_SIMD_FN F perm(I ix, F v) { return _mm256_permutevar8x32_ps(v, ix); }
CPS_SIMD_FN F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
CPS_SIMD_FN F add(F a, F b) { return _mm256_add_ps(a, b); }
CPS_SIMD_FN F mul(F a, F b) { return _mm256_mul_ps(a, b); }
CPS_SIMD_FN F zero() { return _mm256_setzero_ps(); }
#include "cps_upsample_simd.inc"
#undef CPS_SIMD_FN
}  // namespace avx2
#endif

// The column paths the kernel runs: "avx512", "avx2" or "scalar" (the widest
// this CPU has, unless set_upsample_simd chose another).
std::atomic<int> g_simd_lanes{-1};

int cpu_simd_lanes() {
#if defined(CPS_UPS_X86)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return 16;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 8;
#endif
  return 0;
}

const char* simd_name(int lanes) { return lanes == 16 ? "avx512" : lanes == 8 ? "avx2" : "scalar"; }

int simd_lanes() {
  int lanes = g_simd_lanes.load(std::memory_order_relaxed);
  if (lanes < 0) {
    lanes = cpu_simd_lanes();
    g_simd_lanes.store(lanes, std::memory_order_relaxed);
  }
  return lanes;
}

void interp_block(int64_t lanes, const float* tmp, int64_t w, int64_t C, const Axis& ax, const ColumnPlan& pl,
                  int64_t xb, int64_t nb, float* out, int64_t ld) {
#if defined(CPS_UPS_X86)
  if (lanes == 16) return avx512::interp_block(tmp, w, C, ax, pl, xb, nb, out, ld);
  if (lanes == 8) return avx2::interp_block(tmp, w, C, ax, pl, xb, nb, out, ld);
#endif
  (void)lanes, (void)pl;
  interp_columns(tmp, w, C, ax.i0.data() + xb, ax.i1.data() + xb, ax.w0.data() + xb, ax.w1.data() + xb, nb, out,
                 ld);
}

void pull_block(int64_t lanes, const float* g, int64_t ld, int64_t C, int64_t xb, int64_t nb, const Axis& ax,
                const ColumnPlan& pl, float* gt, int64_t w) {
#if defined(CPS_UPS_X86)
  if (lanes == 16) return avx512::pull_block(g, ld, C, xb, nb, ax, pl, gt, w);
  if (lanes == 8) return avx2::pull_block(g, ld, C, xb, nb, ax, pl, gt, w);
#endif
  (void)lanes, (void)pl;
  pull_columns(g, ld, C, xb, nb, ax, gt, w);
}

// ============================================================================ CPU kernel

struct UpsampleArgs {
  int64_t N = 0, C = 0, h = 0, w = 0, H = 0, W = 0;
  int64_t a_s[4] = {0, 0, 0, 0}, b_s[4] = {0, 0, 0, 0};
  int64_t ga_s[4] = {0, 0, 0, 0}, gb_s[4] = {0, 0, 0, 0};
  LabelArg t, pa, pb;
  float cps_weight = 1.0f;
  int64_t ignore_index = 255;
  bool align_corners = true;
};

template <typename scalar_t>
void upsample_cpu_kernel(const UpsampleArgs& args, const scalar_t* a, const scalar_t* b, scalar_t* ga, scalar_t* gb,
                         float inv_t, float inv_pa, float inv_pb, double* sums) {
  const int64_t N = args.N, C = args.C, h = args.h, w = args.w, H = args.H, W = args.W;
  const Axis ry = make_axis(h, H, args.align_corners);
  const Axis cx = make_axis(w, W, args.align_corners);
  const int64_t lanes = simd_lanes();
  const ColumnPlan plan = make_plan(cx, W, lanes > 0 ? lanes : 16);
  // Low-res row r owns the full-res rows [ys[r], ys[r + 1]) (those with i0 == r).
  std::vector<int64_t> ys(h + 1);
  for (int64_t r = 0, y = 0; r <= h; ++r) {
    while (y < H && ry.i0[y] < r) ++y;
    ys[r] = r == h ? H : y;
  }
  const int64_t G = N * h;  // global low-res rows
  const int64_t T = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), G));
  std::vector<int64_t> seg(T + 1);
  for (int64_t s = 0; s <= T; ++s) seg[s] = s * G / T;  // T <= G: no segment is empty

  const int64_t B = block_pixels(C);
  const int64_t CW = C * w;
  const int64_t CWp = CW + 16;
  const float w_pb = args.cps_weight * inv_pb;  // weight of CE(a, pb) per valid pixel
  const float w_pa = args.cps_weight * inv_pa;  // weight of CE(b, pa)
  const bool want_ga = ga != nullptr, want_gb = gb != nullptr;

  std::vector<double> partial(static_cast<size_t>(3 * G), 0.0);
  // Per segment: its first row's own part (waiting for the previous segment's
  // halo) and the halo it hands to the next segment; [branch][2][C*w].
  std::vector<float> edge(static_cast<size_t>((want_ga || want_gb) ? T * 4 * CW : 0));
  auto edge_own = [&](int64_t s, int br) { return edge.data() + (s * 4 + br * 2 + 0) * CW; };
  auto edge_halo = [&](int64_t s, int br) { return edge.data() + (s * 4 + br * 2 + 1) * CW; };

  auto write_row = [&](scalar_t* g, const int64_t* st, int64_t n, int64_t r, const float* own, const float* halo,
                       float* fin) {
    for (int64_t i = 0; i < CW; ++i) fin[i] = own[i] + halo[i];
    scatter_block(g + n * st[0] + r * st[2], st[1], st[3], C, w, fin, w);
  };

  at::parallel_for(0, T, 1, [&](int64_t s_begin, int64_t s_end) {
    // float buffers: ring[2 branches][2 slots][CW], tmp[2][CW], gt[2][CW], own/hin/hout[2][CW], fin[CW],
    // block[2][C*B], per-pixel [12][B]
    // (+ 16 floats after each tmp and gt buffer: the vector paths read/write windows of up to 16 floats)
    std::vector<float> fbuf(static_cast<size_t>(4 * CW + 2 * CWp + 2 * CWp + 6 * CW + CW + 2 * C * B + 12 * B));
    std::vector<int32_t> ibuf(static_cast<size_t>(5 * B));
    float* ring = fbuf.data();
    float* tmp[2] = {ring + 4 * CW, ring + 4 * CW + CWp};
    float* gt[2] = {ring + 4 * CW + 2 * CWp, ring + 4 * CW + 3 * CWp};
    float* own[2] = {ring + 4 * CW + 4 * CWp, ring + 5 * CW + 4 * CWp};
    float* hin[2] = {ring + 6 * CW + 4 * CWp, ring + 7 * CW + 4 * CWp};
    float* hout[2] = {ring + 8 * CW + 4 * CWp, ring + 9 * CW + 4 * CWp};
    float* fin = ring + 10 * CW + 4 * CWp;
    PairScratch sc(ring + 11 * CW + 4 * CWp, ibuf.data(), C, B);

    for (int64_t s = s_begin; s < s_end; ++s) {
      // The float32 [C][w] copies of global low-res row g of both branches live in ring slot g % 2.
      int64_t slot_row[2] = {-1, -1};  // global low-res row held by each ring slot
      auto source_row = [&](int64_t g, int br) -> const float* { return ring + (br * 2 + (g & 1)) * CW; };
      auto load_source = [&](int64_t g) {
        if (slot_row[g & 1] == g) return;
        const int64_t n = g / h, r = g % h;
        gather_block(a + n * args.a_s[0] + r * args.a_s[2], args.a_s[1], args.a_s[3], C, w,
                     ring + (0 * 2 + (g & 1)) * CW, w);
        gather_block(b + n * args.b_s[0] + r * args.b_s[2], args.b_s[1], args.b_s[3], C, w,
                     ring + (1 * 2 + (g & 1)) * CW, w);
        slot_row[g & 1] = g;
      };

      for (int br = 0; br < 2; ++br) std::fill(hin[br], hin[br] + CW, 0.0f);
      for (int64_t g = seg[s]; g < seg[s + 1]; ++g) {
        const int64_t n = g / h, r = g % h;
        if (r == 0) {
          for (int br = 0; br < 2; ++br) std::fill(hin[br], hin[br] + CW, 0.0f);
        }
        for (int br = 0; br < 2; ++br) {
          std::fill(own[br], own[br] + CW, 0.0f);
          std::fill(hout[br], hout[br] + CW, 0.0f);
        }
        double* sums_g = partial.data() + 3 * g;  // this row's three sums

        for (int64_t y = ys[r]; y < ys[r + 1]; ++y) {
          const int64_t y1 = ry.i1[y];
          const float wy0 = ry.w0[y], wy1 = ry.w1[y];
          const int64_t g1 = n * h + y1;
          load_source(g);
          load_source(g1);
          for (int br = 0; br < 2; ++br) {
            const float* CPS_RESTRICT s0 = source_row(g, br);
            const float* CPS_RESTRICT s1 = source_row(g1, br);
            float* CPS_RESTRICT tm = tmp[br];
            for (int64_t i = 0; i < CW; ++i) tm[i] = wy0 * s0[i] + wy1 * s1[i];
          }
          if (want_ga) std::fill(gt[0], gt[0] + CW, 0.0f);
          if (want_gb) std::fill(gt[1], gt[1] + CW, 0.0f);

          for (int64_t xb = 0; xb < W; xb += B) {
            const int64_t nb = std::min(B, W - xb);
            const int64_t l0 = y * W + xb;
            interp_block(lanes, tmp[0], w, C, cx, plan, xb, nb, sc.fa, B);
            interp_block(lanes, tmp[1], w, C, cx, plan, xb, nb, sc.fb, B);
            pair_block_loss(sc, args.t, args.pa, args.pb, n, l0, nb, C, B, args.ignore_index, sums_g);
            if (want_ga) {
              grad_block(sc.fa, B, C, nb, sc.ma, sc.sa, sc.tl, sc.pb, inv_t, w_pb, sc.k);
              pull_block(lanes, sc.fa, B, C, xb, nb, cx, plan, gt[0], w);
            }
            if (want_gb) {
              grad_block(sc.fb, B, C, nb, sc.mb, sc.sb, sc.tl, sc.pa, inv_t, w_pa, sc.k);
              pull_block(lanes, sc.fb, B, C, xb, nb, cx, plan, gt[1], w);
            }
          }

          for (int br = 0; br < 2; ++br) {
            if (!(br == 0 ? want_ga : want_gb)) continue;
            const float* CPS_RESTRICT gr = gt[br];
            float* CPS_RESTRICT o = own[br];
            if (y1 == r) {  // last low-res row: both weights land on it
              for (int64_t i = 0; i < CW; ++i) o[i] += wy0 * gr[i] + wy1 * gr[i];
            } else {
              float* CPS_RESTRICT ho = hout[br];
              for (int64_t i = 0; i < CW; ++i) o[i] += wy0 * gr[i];
              for (int64_t i = 0; i < CW; ++i) ho[i] += wy1 * gr[i];
            }
          }
        }

        for (int br = 0; br < 2; ++br) {
          scalar_t* gout = br == 0 ? ga : gb;
          if (gout == nullptr) continue;
          if (g == seg[s] && r > 0) {  // the halo into this row comes from the previous segment
            std::copy(own[br], own[br] + CW, edge_own(s, br));
          } else {
            write_row(gout, br == 0 ? args.ga_s : args.gb_s, n, r, own[br], hin[br], fin);
          }
          std::swap(hin[br], hout[br]);
        }
      }
      for (int br = 0; br < 2; ++br) {
        if ((br == 0 ? want_ga : want_gb)) std::copy(hin[br], hin[br] + CW, edge_halo(s, br));
      }
    }
  });

  // The first row of each segment that does not start an image: own part + the previous segment's halo.
  if (want_ga || want_gb) {
    std::vector<float> fin(static_cast<size_t>(CW));
    for (int64_t s = 1; s < T; ++s) {
      const int64_t g = seg[s];
      if (g % h == 0) continue;
      for (int br = 0; br < 2; ++br) {
        scalar_t* gout = br == 0 ? ga : gb;
        if (gout == nullptr) continue;
        write_row(gout, br == 0 ? args.ga_s : args.gb_s, g / h, g % h, edge_own(s, br), edge_halo(s - 1, br),
                  fin.data());
      }
    }
  }

  sums[0] = sums[1] = sums[2] = 0.0;
  for (int64_t g = 0; g < G; ++g) {
    for (int j = 0; j < 3; ++j) sums[j] += partial[3 * g + j];
  }
}

}  // namespace

// ============================================================================ entry point

at::Tensor cps_upsample_forward(const at::Tensor& a4, const at::Tensor& b4, const std::optional<at::Tensor>& t2,
                                const std::optional<at::Tensor>& pa2, const std::optional<at::Tensor>& pb2,
                                const at::Tensor& counts, const std::optional<at::Tensor>& grad_a4,
                                const std::optional<at::Tensor>& grad_b4, int64_t H, int64_t W, double cps_weight,
                                int64_t ignore_index, bool align_corners) {
  check_logits4(a4, "a4 (low_a)");
  check_logits4(b4, "b4 (low_b)");
  TORCH_CHECK(a4.sizes() == b4.sizes(), kFn, "a4 has shape ", a4.sizes(), " but b4 has shape ", b4.sizes(),
              "; expected the two branches' logits to have one shape");
  TORCH_CHECK(a4.scalar_type() == b4.scalar_type(), kFn, "a4 has dtype ", a4.scalar_type(), " but b4 has dtype ",
              b4.scalar_type(), "; expected one dtype");
  const int64_t N = a4.size(0), C = a4.size(1), h = a4.size(2), w = a4.size(3);
  TORCH_CHECK(C >= 2, kFn, "the logits have C = ", C, " classes (dim 1 of ", a4.sizes(), "); expected C >= 2");
  TORCH_CHECK(C <= std::numeric_limits<int32_t>::max(), kFn, "C = ", C, " classes is too many");
  TORCH_CHECK(h >= 1 && w >= 1, kFn, "the logits have spatial size (h, w) = (", h, ", ", w, ") (shape ", a4.sizes(),
              "); expected h >= 1 and w >= 1 to interpolate from");
  TORCH_CHECK(h <= std::numeric_limits<int32_t>::max() && w <= std::numeric_limits<int32_t>::max(), kFn,
              "the logits' spatial size (", h, ", ", w, ") is too large");
  TORCH_CHECK(H >= 1 && W >= 1, kFn, "output size (H, W) = (", H, ", ", W, "); expected H >= 1 and W >= 1");
  TORCH_CHECK(H <= (int64_t{1} << 24) && W <= (int64_t{1} << 24), kFn, "output size (H, W) = (", H, ", ", W,
              ") is too large (at most 2^24 per axis, where float32 source coordinates stay exact)");

  UpsampleArgs args;
  args.N = N, args.C = C, args.h = h, args.w = w, args.H = H, args.W = W;
  args.t = check_labels(t2, "t2 (target)", a4, H, W);
  args.pa = check_labels(pa2, "pa2 (pseudo_a)", a4, H, W);
  args.pb = check_labels(pb2, "pb2 (pseudo_b)", a4, H, W);

  cpu::check_pair_outputs(kFn, counts, a4, "a4", b4, "b4", grad_a4, "grad_a4", grad_b4, "grad_b4");
  const bool want_ga = grad_a4.has_value() && grad_a4->defined();
  const bool want_gb = grad_b4.has_value() && grad_b4->defined();
  TORCH_CHECK(std::isfinite(cps_weight), kFn, "cps_weight = ", cps_weight, "; expected a finite number");

  for (int d = 0; d < 4; ++d) {
    args.a_s[d] = a4.stride(d);
    args.b_s[d] = b4.stride(d);
    if (want_ga) args.ga_s[d] = grad_a4->stride(d);
    if (want_gb) args.gb_s[d] = grad_b4->stride(d);
  }
  args.cps_weight = static_cast<float>(cps_weight);
  args.ignore_index = ignore_index;
  args.align_corners = align_corners;

  return cpu::pair_kernel_sums(a4, counts, N == 0,
                               [&](auto zero, const float* inv, double* sums) {
                                 using scalar_t = decltype(zero);
                                 upsample_cpu_kernel<scalar_t>(
                                     args, a4.const_data_ptr<scalar_t>(), b4.const_data_ptr<scalar_t>(),
                                     want_ga ? grad_a4->mutable_data_ptr<scalar_t>() : nullptr,
                                     want_gb ? grad_b4->mutable_data_ptr<scalar_t>() : nullptr, inv[0], inv[1],
                                     inv[2], sums);
                               });
}

void bind_cps_upsample(pybind11::module_& m) {
  m.def(
      "upsample_simd", [] { return std::string(simd_name(simd_lanes())); },
      R"doc(The column paths cps_upsample_forward runs on this CPU: "avx512", "avx2" or "scalar".)doc");
  m.def(
      "set_upsample_simd",
      [](const std::string& name) {
        const int best = cpu_simd_lanes();
        const int lanes = name == "auto" ? best : name == "avx512" ? 16 : name == "avx2" ? 8 : name == "scalar" ? 0 : -1;
        TORCH_CHECK(lanes >= 0, "cps_fast._C.set_upsample_simd: unknown name '", name,
                    "'; expected 'auto', 'avx512', 'avx2' or 'scalar'");
        TORCH_CHECK(lanes <= best, "cps_fast._C.set_upsample_simd: '", name, "' is not available on this CPU (",
                    best == 16 ? "it has avx512, avx2 and scalar" : best == 8 ? "it has avx2 and scalar"
                                                                        : "only scalar here",
                    ")");
        const int old = simd_lanes();
        g_simd_lanes.store(lanes, std::memory_order_relaxed);
        return std::string(simd_name(old));
      },
      pybind11::arg("name"),
      R"doc(Choose the column paths of cps_upsample_forward ("auto" = the widest this CPU has; for tests and
benchmarks). Returns the previous choice; a path the CPU lacks is refused.)doc");
  m.def("cps_upsample_forward", &cps_upsample_forward, pybind11::arg("a4"), pybind11::arg("b4"),
        pybind11::arg("t2"), pybind11::arg("pa2"), pybind11::arg("pb2"), pybind11::arg("counts"),
        pybind11::arg("grad_a4"), pybind11::arg("grad_b4"), pybind11::arg("H"), pybind11::arg("W"),
        pybind11::arg("cps_weight"), pybind11::arg("ignore_index"), pybind11::arg("align_corners"),
        R"doc(Upsample-fused CPS loss forward on the CPU, low-res gradients computed in the same pass.

a4, b4: (N, C, h, w) float32/float16/bfloat16 low-resolution logits, any strides
(NCHW or channels_last read in place). They are upsampled bilinearly to (H, W)
as F.interpolate(mode="bilinear", align_corners=align_corners) does, in float32,
never materialised. t2, pa2, pb2: (N, H*W) full-resolution uint8/int32/int64
labels or None; a None pseudo label is the argmax of that branch's upsampled
logits (ties to the lowest class). counts: float32 [3], valid pixels of target,
pseudo_a, pseudo_b. grad_a4, grad_b4: outputs with the logits' shapes and dtype
(every element written), or None to skip. Labels outside [0, C) that are not
ignore_index are ignored. CUDA tensors are refused (use the Triton backend).

Returns float32 [3]: sums over full-resolution pixels of vt*(CE(a,t)+CE(b,t)),
vpb*CE(a,pb), vpa*CE(b,pa).)doc");
}

}  // namespace cps_fast
