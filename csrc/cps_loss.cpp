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

#include "cpu_kernel_utils.h"

#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

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
  if (!y.has_value() || !y->defined()) return LabelArg();
  const at::Tensor& t = *y;
  const int64_t N = a3.size(0), L = a3.size(2);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == N && t.size(1) == L, kFn, name, " has shape ", t.sizes(),
              "; expected (N, L) = (", N, ", ", L, ") labels to match logits of shape ", a3.sizes());
  return cpu::label_arg(kFn, t, name, a3);
}

}  // namespace

// ============================================================================ CPU kernel

namespace {

using namespace cpu;  // the shared helpers of cpu_kernel_utils.h

template <typename scalar_t>
void cps_loss_cpu_kernel(const CPSLossArgs& args, const scalar_t* a, const scalar_t* b, scalar_t* ga, scalar_t* gb,
                         float inv_t, float inv_pa, float inv_pb, double* sums) {
  const int64_t N = args.N, C = args.C, L = args.L;
  const int64_t B = block_pixels(C);
  const int64_t blocks_per_image = (L + B - 1) / B;
  const int64_t n_blocks = N * blocks_per_image;
  const float w = args.cps_weight;
  const float w_pb = w * inv_pb;  // weight of CE(a, pb) per valid pixel
  const float w_pa = w * inv_pa;  // weight of CE(b, pa)
  std::vector<double> partial(static_cast<size_t>(3 * n_blocks), 0.0);

  at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> fbuf(static_cast<size_t>(2 * C * B + 12 * B));
    std::vector<int32_t> ibuf(static_cast<size_t>(5 * B));
    PairScratch sc(fbuf.data(), ibuf.data(), C, B);

    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n = blk / blocks_per_image;
      const int64_t l0 = (blk % blocks_per_image) * B;
      const int64_t nb = std::min(B, L - l0);

      gather_block(a + n * args.a_sn + l0 * args.a_sl, args.a_sc, args.a_sl, C, nb, sc.fa, B);
      gather_block(b + n * args.b_sn + l0 * args.b_sl, args.b_sc, args.b_sl, C, nb, sc.fb, B);
      pair_block_loss(sc, args.t, args.pa, args.pb, n, l0, nb, C, B, args.ignore_index, partial.data() + 3 * blk);

      if (ga != nullptr) {
        grad_block(sc.fa, B, C, nb, sc.ma, sc.sa, sc.tl, sc.pb, inv_t, w_pb, sc.k);
        scatter_block(ga + n * args.ga_sn + l0 * args.ga_sl, args.ga_sc, args.ga_sl, C, nb, sc.fa, B);
      }
      if (gb != nullptr) {
        grad_block(sc.fb, B, C, nb, sc.mb, sc.sb, sc.tl, sc.pa, inv_t, w_pa, sc.k);
        scatter_block(gb + n * args.gb_sn + l0 * args.gb_sl, args.gb_sc, args.gb_sl, C, nb, sc.fb, B);
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
  const bool want_ga = grad_a3.has_value() && grad_a3->defined();
  const bool want_gb = grad_b3.has_value() && grad_b3->defined();
  return pair_kernel_sums(a3, counts, args.N * args.L == 0,
                          [&](auto zero, const float* inv, double* sums) {
                            using scalar_t = decltype(zero);
                            cps_loss_cpu_kernel<scalar_t>(
                                args, a3.const_data_ptr<scalar_t>(), b3.const_data_ptr<scalar_t>(),
                                want_ga ? grad_a3->mutable_data_ptr<scalar_t>() : nullptr,
                                want_gb ? grad_b3->mutable_data_ptr<scalar_t>() : nullptr, inv[0], inv[1], inv[2], sums);
                          });
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

  cpu::check_pair_outputs(kFn, counts, a3, "a3", b3, "b3", grad_a3, "grad_a3", grad_b3, "grad_b3");
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
