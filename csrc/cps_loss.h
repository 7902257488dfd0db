// The fused Cross Pseudo Supervision loss: declarations shared by the CPU
// kernel (cps_loss.cpp), the CUDA kernel (cps_loss_cuda.cu) and the bindings.
//
// The contract is the one of cps_fast/loss.py (module docstring):
//
//   sums = cps_loss_forward(a3, b3, t2, pa2, pb2, counts, grad_a3, grad_b3,
//                           cps_weight, ignore_index)
//
// a3, b3: (N, C, L) logits with any strides; t2/pa2/pb2: (N, L) labels or
// None (a None pseudo label is the argmax of that branch); counts: float32 [3]
// valid-pixel counts (target, pseudo_a, pseudo_b); grad_a3/grad_b3: outputs
// with the logits' shapes or None; returns float32 [3]:
//   [sum vt*(CE(a,t)+CE(b,t)), sum vpb*CE(a,pb), sum vpa*CE(b,pa)].
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

// AT_DISPATCH over the logits dtypes only (float32, float16, bfloat16).
#define CPS_FAST_DISPATCH_LOGITS(TYPE, NAME, ...)              \
  AT_DISPATCH_SWITCH(TYPE, NAME,                               \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace cps_fast {

// Integer label tensor of shape (N, L) seen by a kernel: a raw pointer, its
// element type and strides. kind == kNone means "no tensor".
struct LabelArg {
  enum Kind : int { kNone = 0, kUInt8 = 1, kInt32 = 2, kInt64 = 3 };
  const void* data = nullptr;
  int kind = kNone;
  int64_t stride_n = 0;
  int64_t stride_l = 0;
};

// Everything a kernel needs once the arguments were checked. Strides are in
// elements. Gradient pointers are null when that gradient is not wanted.
struct CPSLossArgs {
  int64_t N = 0, C = 0, L = 0;
  int64_t a_sn = 0, a_sc = 0, a_sl = 0;
  int64_t b_sn = 0, b_sc = 0, b_sl = 0;
  int64_t ga_sn = 0, ga_sc = 0, ga_sl = 0;
  int64_t gb_sn = 0, gb_sc = 0, gb_sl = 0;
  LabelArg t, pa, pb;
  float cps_weight = 1.0f;
  int64_t ignore_index = 255;
};

// Checks every argument (TORCH_CHECK) and runs the CPU or the CUDA kernel.
at::Tensor cps_loss_forward(const at::Tensor& a3, const at::Tensor& b3, const std::optional<at::Tensor>& t2,
                            const std::optional<at::Tensor>& pa2, const std::optional<at::Tensor>& pb2,
                            const at::Tensor& counts, const std::optional<at::Tensor>& grad_a3,
                            const std::optional<at::Tensor>& grad_b3, double cps_weight, int64_t ignore_index);

// True when the extension was compiled with the CUDA kernel.
bool has_cuda();

#ifdef CPS_FAST_WITH_CUDA
// The CUDA kernel; arguments already checked (all on one CUDA device).
// Returns float32 [3] on that device; no host synchronisation.
at::Tensor cps_loss_forward_cuda(const CPSLossArgs& args, const at::Tensor& a3, const at::Tensor& b3,
                                 const at::Tensor& counts, const std::optional<at::Tensor>& grad_a3,
                                 const std::optional<at::Tensor>& grad_b3);
#endif

}  // namespace cps_fast
