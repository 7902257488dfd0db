// The upsample-fused CPS loss: bilinear upsampling of low-resolution logits
// (as F.interpolate(mode="bilinear")) fused with the CPS loss of cps_loss.h,
// without materialising full-resolution logits or their gradients.
//
//   sums = cps_upsample_forward(a4, b4, t2, pa2, pb2, counts, grad_a4, grad_b4,
//                               H, W, cps_weight, ignore_index, align_corners)
//
// a4, b4: (N, C, h, w) low-resolution logits with any strides (NCHW or
// channels_last read in place); t2/pa2/pb2: (N, H*W) FULL-resolution labels or
// None (a None pseudo label is the argmax of that branch's interpolated
// logits, ties to the lowest class); counts: float32 [3] valid-pixel counts
// (target, pseudo_a, pseudo_b); grad_a4/grad_b4: outputs with the logits'
// shapes, strides and dtype (every element written) or None; returns float32
// [3], sums over full-resolution pixels of
//   [vt*(CE(a,t)+CE(b,t)), vpb*CE(a,pb), vpa*CE(b,pa)].
// The gradients are d(loss)/d(a4), d(loss)/d(b4) for
//   loss = s0/max(c0,1) + cps_weight*(s1/max(c2,1) + s2/max(c1,1)).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace cps_fast {

// Checks every argument (TORCH_CHECK) and runs the CPU kernel (CUDA tensors
// are refused: the GPU implementation is the Triton kernel).
at::Tensor cps_upsample_forward(const at::Tensor& a4, const at::Tensor& b4, const std::optional<at::Tensor>& t2,
                                const std::optional<at::Tensor>& pa2, const std::optional<at::Tensor>& pb2,
                                const at::Tensor& counts, const std::optional<at::Tensor>& grad_a4,
                                const std::optional<at::Tensor>& grad_b4, int64_t H, int64_t W, double cps_weight,
                                int64_t ignore_index, bool align_corners);

}  // namespace cps_fast
