// Python bindings of the extension cps_fast._C.
#include <torch/extension.h>

#include "cps_loss.h"

namespace cps_fast {
void bind_cps_upsample(pybind11::module_& m);
void bind_ncps_loss(pybind11::module_& m);
}  // namespace cps_fast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "cps-fast C++/CUDA kernels (fused Cross Pseudo Supervision loss)";
  m.def("cps_loss_forward", &cps_fast::cps_loss_forward, pybind11::arg("a3"), pybind11::arg("b3"),
        pybind11::arg("t2"), pybind11::arg("pa2"), pybind11::arg("pb2"), pybind11::arg("counts"),
        pybind11::arg("grad_a3"), pybind11::arg("grad_b3"), pybind11::arg("cps_weight"),
        pybind11::arg("ignore_index"),
        R"doc(Fused CPS loss forward, gradients computed in the same pass.

a3, b3: (N, C, L) float32/float16/bfloat16 logits, any strides, one device.
t2, pa2, pb2: (N, L) uint8/int32/int64 labels or None; a None pseudo label is
the argmax of that branch (ties to the lowest class). counts: float32 [3],
valid pixels of target, pseudo_a, pseudo_b. grad_a3, grad_b3: outputs with
the logits' shapes and dtype (fully written), or None to skip. Labels outside
[0, C) that are not ignore_index are ignored.

Returns float32 [3] on the logits' device: sums over pixels of
vt*(CE(a,t)+CE(b,t)), vpb*CE(a,pb), vpa*CE(b,pa).)doc");
  m.def("has_cuda", &cps_fast::has_cuda, "True when the extension was compiled with the CUDA kernel.");
  cps_fast::bind_cps_upsample(m);
  cps_fast::bind_ncps_loss(m);
}
