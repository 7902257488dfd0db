// The fused CPS loss in CUDA C++ (arguments are checked in cps_loss.cpp).
//
// A group of G threads owns one pixel; lane j of the group handles classes
// j, j + G, j + 2G, ... G is 1 when a class row is not contiguous (NCHW: the
// threads of a warp read consecutive pixels of one class, coalesced) and 4 to
// 32 when classes are contiguous (channels_last, (P, C)), chosen from C so a
// lane holds a few classes. Each lane runs an online softmax (running max,
// rescaled sum of exponentials, first argmax) over its classes, keeping the
// values in registers; the group merges its lanes with xor shuffles, which
// leaves every lane with bit-identical results. The gradient is then written
// from the registers, so each logit is read once (classes beyond the register
// cache, C > 256 with contiguous classes or C > 24 with G = 1, are read a second
// time, mostly from L2).
//
// Loss sums: lane 0 of each group accumulates its pixels; each block reduces
// its threads in a fixed order into its own slot of a partial-sum buffer, and
// a one-block kernel adds the slots in a fixed order. No atomics, no host
// synchronisation; the result is deterministic for a given grid.
//
// Only the ATen operators used here are included (not ATen/ATen.h, whose every
// declaration nvcc parses twice, once for the host and once for the device):
// about a third of the compile time.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include "cps_loss.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>

namespace cps_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kReduceThreads = 256;

template <typename scalar_t>
__device__ __forceinline__ float load_f(const scalar_t* p) {
  return static_cast<float>(*p);
}

// The label of pixel (n, l) if it lies in [0, C) and is not ignore_index, else -1.
__device__ __forceinline__ int load_label(const LabelArg& lab, int64_t n, int64_t l, int64_t C,
                                          int64_t ignore_index) {
  const int64_t off = n * lab.stride_n + l * lab.stride_l;
  int64_t v;
  switch (lab.kind) {
    case LabelArg::kUInt8: v = static_cast<const uint8_t*>(lab.data)[off]; break;
    case LabelArg::kInt32: v = static_cast<const int32_t*>(lab.data)[off]; break;
    default: v = static_cast<const int64_t*>(lab.data)[off]; break;
  }
  return (v != ignore_index && v >= 0 && v < C) ? static_cast<int>(v) : -1;
}

// Online softmax state of one lane: max m, sum of exp(x - m), first argmax.
struct SoftmaxState {
  float m;
  float s;
  int idx;
};

// Adds value v of class c (classes arrive in increasing order within a lane).
// A NaN counts as the maximum and the first maximum wins, as in torch.argmax.
__device__ __forceinline__ void softmax_add(SoftmaxState& st, float v, int c) {
  const bool take = (v > st.m) || (isnan(v) && !isnan(st.m));
  if (take) {
    st.s = st.s * __expf(st.m - v) + 1.0f;  // m = -inf at first: exp(-inf) = 0
    st.m = v;
    st.idx = c;
  } else {
    const float d = v - st.m;
    st.s += (d == d) ? __expf(d) : 0.0f;  // -inf - (-inf) would be NaN; it adds nothing
  }
}

__device__ __forceinline__ float rescale(float x, float m) {
  return x == m ? 1.0f : __expf(x - m);
}

// Merges the states of the G lanes of a group (xor butterfly); all lanes end
// with the same bits because each step combines the same two operands.
template <int G>
__device__ __forceinline__ void softmax_group_merge(SoftmaxState& st) {
#pragma unroll
  for (int off = G / 2; off > 0; off >>= 1) {
    const float om = __shfl_xor_sync(0xffffffffu, st.m, off, G);
    const float os = __shfl_xor_sync(0xffffffffu, st.s, off, G);
    const int oi = __shfl_xor_sync(0xffffffffu, st.idx, off, G);
    bool other;
    if (isnan(om)) {
      other = !isnan(st.m) || oi < st.idx;
    } else if (isnan(st.m)) {
      other = false;
    } else {
      other = om > st.m || (om == st.m && oi < st.idx);
    }
    const float nm = other ? om : st.m;
    st.s = st.s * rescale(st.m, nm) + os * rescale(om, nm);
    st.m = nm;
    st.idx = other ? oi : st.idx;
  }
}

// One branch's gradient row of a pixel: softmax(x) * (ct + q) - onehot(t) * ct - onehot(pl) * q,
// classes lane, lane + G, ... (the first K from the register cache r, the rest re-read from xp).
template <typename scalar_t, int G, int K>
__device__ __forceinline__ void write_grad_row(scalar_t* gp, int64_t g_sc, const float (&r)[K], const scalar_t* xp,
                                               int64_t x_sc, float lse, float ct, float q, int t, int pl, int lane,
                                               int64_t C) {
  const float coef = ct + q;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int c = lane + k * G;
    if (c < C) {
      gp[c * g_sc] = static_cast<scalar_t>(__expf(r[k] - lse) * coef - (c == t ? ct : 0.0f) - (c == pl ? q : 0.0f));
    }
  }
  for (int64_t c = lane + static_cast<int64_t>(K) * G; c < C; c += G) {
    gp[c * g_sc] = static_cast<scalar_t>(__expf(load_f(xp + c * x_sc) - lse) * coef - (c == t ? ct : 0.0f) -
                                         (c == pl ? q : 0.0f));
  }
}

template <typename scalar_t, int G, int K>
__global__ void __launch_bounds__(kThreads)
    cps_loss_kernel(const CPSLossArgs args, const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                    scalar_t* __restrict__ ga, scalar_t* __restrict__ gb, const float* __restrict__ counts,
                    int64_t counts_stride, float* __restrict__ partials) {
  const int64_t C = args.C;
  const int64_t L = args.L;
  const int64_t total = args.N * L;
  const int lane = threadIdx.x % G;
  const int64_t gtid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  // Groups of one warp advance together so that the shuffles see all 32 lanes.
  const int64_t warp_first_group = (gtid / 32) * (32 / G);
  const int group_in_warp = (threadIdx.x % 32) / G;
  const int64_t groups_total = static_cast<int64_t>(gridDim.x) * blockDim.x / G;

  const float inv_t = 1.0f / fmaxf(counts[0], 1.0f);
  const float inv_pa = 1.0f / fmaxf(counts[counts_stride], 1.0f);
  const float inv_pb = 1.0f / fmaxf(counts[2 * counts_stride], 1.0f);
  const float w_pb = args.cps_weight * inv_pb;
  const float w_pa = args.cps_weight * inv_pa;
  const bool has_t = args.t.kind != LabelArg::kNone;

  float acc_sup = 0.0f, acc_apb = 0.0f, acc_bpa = 0.0f;

  for (int64_t base = warp_first_group; base < total; base += groups_total) {
    const int64_t pix = base + group_in_warp;
    const bool active = pix < total;
    const int64_t n = active ? pix / L : 0;
    const int64_t l = active ? pix - n * L : 0;
    const scalar_t* ap = a + n * args.a_sn + l * args.a_sl;
    const scalar_t* bp = b + n * args.b_sn + l * args.b_sl;

    float ra[K], rb[K];
    SoftmaxState sa{-INFINITY, 0.0f, lane < C ? lane : INT_MAX};
    SoftmaxState sb = sa;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int c = lane + k * G;
      if (active && c < C) {
        ra[k] = load_f(ap + c * args.a_sc);
        rb[k] = load_f(bp + c * args.b_sc);
        softmax_add(sa, ra[k], c);
        softmax_add(sb, rb[k], c);
      }
    }
    if (active) {
      for (int64_t c = lane + static_cast<int64_t>(K) * G; c < C; c += G) {  // beyond the register cache
        softmax_add(sa, load_f(ap + c * args.a_sc), static_cast<int>(c));
        softmax_add(sb, load_f(bp + c * args.b_sc), static_cast<int>(c));
      }
    }
    if (G > 1) {
      softmax_group_merge<G>(sa);
      softmax_group_merge<G>(sb);
    }
    if (!active) continue;  // no shuffles below

    const float lse_a = sa.m + __logf(sa.s);
    const float lse_b = sb.m + __logf(sb.s);
    const int t = has_t ? load_label(args.t, n, l, C, args.ignore_index) : -1;
    // An argmax equal to ignore_index (0 <= ignore_index < C) is ignored like any label with that value.
    const int pa = args.pa.kind != LabelArg::kNone ? load_label(args.pa, n, l, C, args.ignore_index)
                                                   : (sa.idx == args.ignore_index ? -1 : sa.idx);
    const int pb = args.pb.kind != LabelArg::kNone ? load_label(args.pb, n, l, C, args.ignore_index)
                                                   : (sb.idx == args.ignore_index ? -1 : sb.idx);

    if (lane == 0) {
      if (t >= 0) acc_sup += (lse_a - load_f(ap + t * args.a_sc)) + (lse_b - load_f(bp + t * args.b_sc));
      if (pb >= 0) acc_apb += lse_a - load_f(ap + pb * args.a_sc);
      if (pa >= 0) acc_bpa += lse_b - load_f(bp + pa * args.b_sc);
    }

    const float ct = t >= 0 ? inv_t : 0.0f;
    const float qa = pb >= 0 ? w_pb : 0.0f;  // a is supervised by pb
    const float qb = pa >= 0 ? w_pa : 0.0f;  // b is supervised by pa
    if (ga != nullptr) {
      write_grad_row<scalar_t, G, K>(ga + n * args.ga_sn + l * args.ga_sl, args.ga_sc, ra, ap, args.a_sc, lse_a,
                                     ct, qa, t, pb, lane, C);
    }
    if (gb != nullptr) {
      write_grad_row<scalar_t, G, K>(gb + n * args.gb_sn + l * args.gb_sl, args.gb_sc, rb, bp, args.b_sc, lse_b,
                                     ct, qb, t, pa, lane, C);
    }
  }

  // Block reduction in a fixed order: warps by shuffles, then warp 0 over the warps.
  __shared__ float smem[3][kThreads / 32];
  float v[3] = {acc_sup, acc_apb, acc_bpa};
#pragma unroll
  for (int j = 0; j < 3; ++j) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v[j] += __shfl_down_sync(0xffffffffu, v[j], off);
  }
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 == 0) {
    smem[0][warp] = v[0];
    smem[1][warp] = v[1];
    smem[2][warp] = v[2];
  }
  __syncthreads();
  if (threadIdx.x < 3) {
    float s = 0.0f;
    for (int w = 0; w < kThreads / 32; ++w) s += smem[threadIdx.x][w];
    partials[static_cast<int64_t>(blockIdx.x) * 3 + threadIdx.x] = s;
  }
}

// out[j] = sum over blocks of partials[block][j], in a fixed order (double).
__global__ void __launch_bounds__(kReduceThreads)
    cps_loss_reduce_kernel(const float* __restrict__ partials, int n_blocks, float* __restrict__ out) {
  __shared__ double smem[3][kReduceThreads];
  double s[3] = {0.0, 0.0, 0.0};
  for (int i = threadIdx.x; i < n_blocks; i += kReduceThreads) {
    s[0] += partials[3 * i + 0];
    s[1] += partials[3 * i + 1];
    s[2] += partials[3 * i + 2];
  }
  for (int j = 0; j < 3; ++j) smem[j][threadIdx.x] = s[j];
  __syncthreads();
  for (int stride = kReduceThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) {
      for (int j = 0; j < 3; ++j) smem[j][threadIdx.x] += smem[j][threadIdx.x + stride];
    }
    __syncthreads();
  }
  if (threadIdx.x < 3) out[threadIdx.x] = static_cast<float>(smem[threadIdx.x][0]);
}

// Threads per pixel: 1 unless both logits have contiguous classes; then about
// C / 4 (a power of two, at most a warp).
int group_size(const CPSLossArgs& args) {
  if (args.a_sc != 1 || args.b_sc != 1) return 1;
  if (args.C <= 4) return 1;
  if (args.C <= 16) return 4;
  if (args.C <= 32) return 8;
  return 32;
}

template <typename scalar_t, int G>
void launch(const CPSLossArgs& args, const at::Tensor& a3, const at::Tensor& b3, const at::Tensor& counts,
            scalar_t* ga, scalar_t* gb, at::Tensor& partials, int grid, cudaStream_t stream) {
  // Classes per lane kept in registers: all of C <= 24 (VOC, Cityscapes) for
  // G = 1, and all classes of the C range group_size() maps to each G, up to 256.
  constexpr int K = G == 1 ? 24 : (G == 32 ? 8 : 4);
  cps_loss_kernel<scalar_t, G, K><<<grid, kThreads, 0, stream>>>(
      args, a3.const_data_ptr<scalar_t>(), b3.const_data_ptr<scalar_t>(), ga, gb, counts.const_data_ptr<float>(),
      counts.stride(0), partials.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor cps_loss_forward_cuda(const CPSLossArgs& args, const at::Tensor& a3, const at::Tensor& b3,
                                 const at::Tensor& counts, const std::optional<at::Tensor>& grad_a3,
                                 const std::optional<at::Tensor>& grad_b3) {
  const c10::cuda::CUDAGuard guard(a3.device());
  const int64_t total = args.N * args.L;
  if (total == 0) return at::zeros({3}, a3.options().dtype(at::kFloat));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(a3.device().index()).stream();

  const int G = group_size(args);
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, a3.device().index()));
  const int64_t groups_per_block = kThreads / G;
  const int64_t needed = (total + groups_per_block - 1) / groups_per_block;
  const int grid = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(needed, 8LL * sm_count)));

  auto partials = at::empty({grid, 3}, a3.options().dtype(at::kFloat));
  auto out = at::empty({3}, a3.options().dtype(at::kFloat));
  const bool want_ga = grad_a3.has_value() && grad_a3->defined();
  const bool want_gb = grad_b3.has_value() && grad_b3->defined();

  CPS_FAST_DISPATCH_LOGITS(a3.scalar_type(), "cps_loss_forward_cuda", [&] {
    scalar_t* ga = want_ga ? grad_a3->mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gb = want_gb ? grad_b3->mutable_data_ptr<scalar_t>() : nullptr;
    switch (G) {
      case 1: launch<scalar_t, 1>(args, a3, b3, counts, ga, gb, partials, grid, stream); break;
      case 4: launch<scalar_t, 4>(args, a3, b3, counts, ga, gb, partials, grid, stream); break;
      case 8: launch<scalar_t, 8>(args, a3, b3, counts, ga, gb, partials, grid, stream); break;
      default: launch<scalar_t, 32>(args, a3, b3, counts, ga, gb, partials, grid, stream); break;
    }
  });
  cps_loss_reduce_kernel<<<1, kReduceThreads, 0, stream>>>(partials.const_data_ptr<float>(), grid,
                                                           out.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace cps_fast
