// The fused n-branch CPS loss (n-CPS) on the CPU, and its binding.
//
//   sums = cps_fast._C.ncps_loss_forward(xs, t2, ys, counts, gs, cps_weight, ignore_index, ensemble)
//
// xs: K >= 2 (N, C, L) logits (float32/float16/bfloat16, one dtype, any strides,
// CPU); t2: (N, L) uint8/int32/int64 labels or None; ys: K entries, each (N, L)
// labels or None (None = argmax of that branch; all None when ensemble);
// counts: float32 [K + 1], valid pixels of the target and of each label;
// gs: None, or K outputs with the logits' shapes and dtype (fully written);
// returns float32 [K + 1]: sum_p vt * sum_k CE(x_k, t) and per label j
// sum_p v_j * sum_{k != j} CE(x_k, y_j) (default) or sum_p CE(x_j, e_j)
// (ensemble: e_j = argmax of the other branches' summed softmax; for K = 2 the
// other branch's argmax). The gradients are the ones of cps_fast/ncps_loss.py.
//
// Structure as csrc/cps_loss.cpp: the pixels of each image are cut into blocks
// of B consecutive pixels and at::parallel_for hands out ranges of blocks. Each
// branch's block is gathered into a float32 [C][B] buffer (pixels innermost, so
// the class loops vectorise), turned into exp(x - max) in place and finally
// into the gradient, written back in the source layout. The labelled logits
// are read from the source tensors (the block was just read, so they hit the
// cache). Each block stores its K + 1 partial sums (double) in its own slot;
// the slots are added in block order, so the result does not depend on the
// number of threads.
// The vectorised exp, the gather/scatter and the per-pixel helpers are the
// ones of csrc/cps_loss.cpp, shared in csrc/cpu_kernel_utils.h.
#include "cps_loss.h"
#include "cpu_kernel_utils.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace cps_fast {

namespace {

const char* kNFn = "cps_fast._C.ncps_loss_forward: ";

using namespace cpu;  // the shared helpers of cpu_kernel_utils.h

// Pixels per block (cpu::block_pixels is the two-branch rule): the K [C][B] float buffers (and the ensemble sum) stay within
// about 48 KiB; B is a multiple of 16 in [16, 256].
int64_t block_pixels(int64_t C, int64_t K) {
  int64_t b = 12288 / ((K + 1) * C);
  return std::min<int64_t>(256, std::max<int64_t>(16, b - b % 16));
}

struct Branch {
  const void* x = nullptr;
  void* g = nullptr;
  int64_t sn = 0, sc = 0, sl = 0;     // logits strides
  int64_t gsn = 0, gsc = 0, gsl = 0;  // gradient strides
};

template <typename scalar_t>
void ncps_cpu_kernel(int64_t N, int64_t C, int64_t L, const std::vector<Branch>& br, const LabelArg& targ,
                     const std::vector<LabelArg>& ys, bool ensemble, bool write_grad, float cps_weight,
                     int64_t ignore_index, const float* cnt, double* sums) {
  const int64_t K = static_cast<int64_t>(br.size());
  const int64_t B = block_pixels(C, K);
  const int64_t blocks_per_image = (L + B - 1) / B;
  const int64_t n_blocks = N * blocks_per_image;
  const bool has_t = targ.kind != LabelArg::kNone;
  const float inv_t = 1.0f / std::max(cnt[0], 1.0f);
  std::vector<float> wlab(K);  // weight of one valid pixel of label j in the cross term
  for (int64_t j = 0; j < K; ++j) {
    const float inv = 1.0f / std::max(cnt[1 + j], 1.0f);
    wlab[j] = ensemble ? cps_weight * inv : cps_weight * inv / static_cast<float>(K - 1);
  }
  std::vector<double> partial(static_cast<size_t>((K + 1) * n_blocks), 0.0);

  at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
    const bool need_tot = ensemble && K > 2;
    std::vector<float> fbuf(static_cast<size_t>((K + (need_tot ? 1 : 0)) * C * B + (3 * K + 2) * B));
    std::vector<int32_t> ibuf(static_cast<size_t>((2 * K + 1) * B));
    float* xb = fbuf.data();               // K x [C][B]
    float* tot = xb + K * C * B;           // [C][B] summed softmax (ensemble, K > 2)
    float* mb = tot + (need_tot ? C * B : 0);  // K x [B] max
    float* sb = mb + K * B;                // K x [B] sum of exp
    float* lse = sb + K * B;               // K x [B]
    float* coef = lse + K * B;             // [B]
    float* best = coef + B;                // [B]
    int32_t* am = ibuf.data();             // K x [B] argmax
    int32_t* lab = am + K * B;             // K x [B] label j (-1: invalid)
    int32_t* tl = lab + K * B;             // [B] target (-1: invalid)

    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n = blk / blocks_per_image;
      const int64_t l0 = (blk % blocks_per_image) * B;
      const int64_t nb = std::min(B, L - l0);
      auto src = [&](int64_t k) {
        return static_cast<const scalar_t*>(br[k].x) + n * br[k].sn + l0 * br[k].sl;
      };
      // logit of branch k at class c of block pixel p, from the source tensor
      auto logit = [&](int64_t k, int64_t p, int32_t c) {
        return static_cast<float>(src(k)[c * br[k].sc + p * br[k].sl]);
      };

      for (int64_t k = 0; k < K; ++k) {
        float* buf = xb + k * C * B;
        gather_block(src(k), br[k].sc, br[k].sl, C, nb, buf, B);
        max_argmax(buf, B, C, nb, mb + k * B, am + k * B);
        exp_sum(buf, B, C, nb, mb + k * B, sb + k * B);
        for (int64_t p = 0; p < nb; ++p) lse[k * B + p] = mb[k * B + p] + std::log(sb[k * B + p]);
      }
      if (has_t) {
        load_labels(targ, n, l0, nb, C, ignore_index, tl);
      } else {
        std::fill(tl, tl + nb, -1);
      }

      // labels: default y_j (given or argmax); ensemble e_k
      if (!ensemble) {
        for (int64_t j = 0; j < K; ++j) {
          if (ys[j].kind != LabelArg::kNone) {
            load_labels(ys[j], n, l0, nb, C, ignore_index, lab + j * B);
          } else {
            std::copy(am + j * B, am + j * B + nb, lab + j * B);
          }
        }
      } else if (K == 2) {  // the mean softmax of one branch: its argmax, exactly as torch.argmax
        std::copy(am + B, am + B + nb, lab);
        std::copy(am, am + nb, lab + B);
      } else {
        std::fill(tot, tot + C * B, 0.0f);
        for (int64_t j = 0; j < K; ++j) {
          const float* e = xb + j * C * B;
          for (int64_t p = 0; p < nb; ++p) coef[p] = 1.0f / sb[j * B + p];
          for (int64_t c = 0; c < C; ++c) {
            for (int64_t p = 0; p < nb; ++p) tot[c * B + p] += e[c * B + p] * coef[p];
          }
        }
        for (int64_t k = 0; k < K; ++k) {
          // running argmax over classes of tot - softmax_k; strictly greater keeps the first maximum
          const float* e = xb + k * C * B;
          int32_t* arg = lab + k * B;
          for (int64_t p = 0; p < nb; ++p) {
            coef[p] = 1.0f / sb[k * B + p];
            best[p] = tot[p] - e[p] * coef[p];
            arg[p] = 0;
          }
          for (int64_t c = 1; c < C; ++c) {
            const int32_t ci = static_cast<int32_t>(c);
            for (int64_t p = 0; p < nb; ++p) {
              const float q = tot[c * B + p] - e[c * B + p] * coef[p];
              const bool take = q > best[p];
              best[p] = take ? q : best[p];
              arg[p] = take ? ci : arg[p];
            }
          }
        }
      }

      // partial sums
      double* out = partial.data() + (K + 1) * blk;
      for (int64_t p = 0; p < nb; ++p) {
        if (tl[p] < 0) continue;
        double s = 0.0;
        for (int64_t k = 0; k < K; ++k) s += static_cast<double>(lse[k * B + p] - logit(k, p, tl[p]));
        out[0] += s;
      }
      for (int64_t j = 0; j < K; ++j) {
        const int32_t* y = lab + j * B;
        double s = 0.0;
        for (int64_t p = 0; p < nb; ++p) {
          if (y[p] < 0) continue;
          if (ensemble) {
            s += static_cast<double>(lse[j * B + p] - logit(j, p, y[p]));
          } else {
            for (int64_t k = 0; k < K; ++k) {
              if (k != j) s += static_cast<double>(lse[k * B + p] - logit(k, p, y[p]));
            }
          }
        }
        out[1 + j] = s;
      }

      if (!write_grad) continue;
      // grad_k = exp_k / s_k * (ct + sum of k's label weights) - onehot(t) ct - sum onehot(label) weight
      for (int64_t k = 0; k < K; ++k) {
        float* buf = xb + k * C * B;
        for (int64_t p = 0; p < nb; ++p) {
          float w = tl[p] >= 0 ? inv_t : 0.0f;
          for (int64_t j = 0; j < K; ++j) {
            if ((ensemble ? j == k : j != k) && lab[j * B + p] >= 0) w += wlab[j];
          }
          const float m = mb[k * B + p];
          coef[p] = w / sb[k * B + p] + (m - m);  // + NaN when the row max is NaN or inf, as the reference
        }
        for (int64_t c = 0; c < C; ++c) {
          float* row = buf + c * B;
          for (int64_t p = 0; p < nb; ++p) row[p] *= coef[p];
        }
        for (int64_t p = 0; p < nb; ++p) {
          if (tl[p] >= 0) buf[tl[p] * B + p] -= inv_t;
          for (int64_t j = 0; j < K; ++j) {
            const int32_t y = lab[j * B + p];
            if ((ensemble ? j == k : j != k) && y >= 0) buf[y * B + p] -= wlab[j];
          }
        }
        scatter_block(static_cast<scalar_t*>(br[k].g) + n * br[k].gsn + l0 * br[k].gsl, br[k].gsc, br[k].gsl, C,
                      nb, buf, B);
      }
    }
  });

  for (int64_t j = 0; j <= K; ++j) sums[j] = 0.0;
  for (int64_t blk = 0; blk < n_blocks; ++blk) {
    for (int64_t j = 0; j <= K; ++j) sums[j] += partial[(K + 1) * blk + j];
  }
}

LabelArg label_arg(const std::optional<at::Tensor>& y, const std::string& name, const at::Tensor& x0) {
  if (!y.has_value() || !y->defined()) return LabelArg();
  const at::Tensor& t = *y;
  const int64_t N = x0.size(0), L = x0.size(2);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == N && t.size(1) == L, kNFn, name, " has shape ", t.sizes(),
              "; expected (N, L) = (", N, ", ", L, ") labels to match logits of shape ", x0.sizes());
  return cpu::label_arg(kNFn, t, name.c_str(), x0);  // x0 is on the CPU (checked)
}

}  // namespace

at::Tensor ncps_loss_forward(const std::vector<at::Tensor>& xs, const std::optional<at::Tensor>& t2,
                             const std::vector<std::optional<at::Tensor>>& ys, const at::Tensor& counts,
                             const std::optional<std::vector<at::Tensor>>& gs, double cps_weight,
                             int64_t ignore_index, bool ensemble) {
  const int64_t K = static_cast<int64_t>(xs.size());
  TORCH_CHECK(K >= 2, kNFn, "got K = ", K, " branch logits; expected K >= 2");
  const at::Tensor& x0 = xs[0];
  for (int64_t k = 0; k < K; ++k) {
    const at::Tensor& x = xs[k];
    TORCH_CHECK(x.defined() && x.dim() == 3, kNFn, "xs[", k, "] has shape ", x.sizes(),
                "; expected (N, C, L) logits with 3 dims");
    const auto st = x.scalar_type();
    TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, kNFn, "xs[", k, "] has dtype ", st,
                "; expected float32, float16 or bfloat16 logits");
    TORCH_CHECK(x.device().is_cpu(), kNFn, "xs[", k, "] is on ", x.device(),
                "; this kernel runs on CPU tensors (on CUDA use the triton backend)");
    TORCH_CHECK(x.sizes() == x0.sizes(), kNFn, "xs[0] has shape ", x0.sizes(), " but xs[", k, "] has shape ",
                x.sizes(), "; expected one shape");
    TORCH_CHECK(st == x0.scalar_type(), kNFn, "xs[0] has dtype ", x0.scalar_type(), " but xs[", k, "] has dtype ",
                st, "; expected one dtype");
  }
  const int64_t N = x0.size(0), C = x0.size(1), L = x0.size(2);
  TORCH_CHECK(C >= 2 && C <= std::numeric_limits<int32_t>::max(), kNFn, "the logits have C = ", C,
              " classes; expected 2 <= C < 2**31");
  TORCH_CHECK(static_cast<int64_t>(ys.size()) == K, kNFn, "ys has ", ys.size(), " entries for K = ", K,
              " branches; expected one label tensor or None per branch");
  std::vector<LabelArg> yargs;
  for (int64_t j = 0; j < K; ++j) {
    yargs.push_back(label_arg(ys[j], "ys[" + std::to_string(j) + "]", x0));
    TORCH_CHECK(!(ensemble && yargs.back().kind != LabelArg::kNone), kNFn,
                "ensemble=True takes no given pseudo labels, but ys[", j, "] is a tensor");
  }
  const LabelArg targ = label_arg(t2, "t2 (target)", x0);
  TORCH_CHECK(counts.defined() && counts.scalar_type() == at::kFloat && counts.dim() == 1 &&
                  counts.size(0) == K + 1 && counts.device().is_cpu(),
              kNFn, "counts has dtype ", counts.scalar_type(), ", shape ", counts.sizes(), " and device ",
              counts.device(), "; expected a float32 CPU tensor of shape [K + 1] = [", K + 1, "]");
  TORCH_CHECK(std::isfinite(cps_weight), kNFn, "cps_weight = ", cps_weight, "; expected a finite number");

  std::vector<Branch> br(K);
  const bool write_grad = gs.has_value();
  if (write_grad) {
    TORCH_CHECK(static_cast<int64_t>(gs->size()) == K, kNFn, "gs has ", gs->size(), " entries for K = ", K,
                " branches; expected one gradient per branch (or None for no gradients)");
  }
  for (int64_t k = 0; k < K; ++k) {
    br[k].x = xs[k].data_ptr();
    br[k].sn = xs[k].stride(0), br[k].sc = xs[k].stride(1), br[k].sl = xs[k].stride(2);
    if (!write_grad) continue;
    const at::Tensor& g = (*gs)[k];
    TORCH_CHECK(g.defined() && g.sizes() == x0.sizes() && g.scalar_type() == x0.scalar_type() && g.device().is_cpu(),
                kNFn, "gs[", k, "] has shape ", g.sizes(), ", dtype ", g.scalar_type(), " and device ", g.device(),
                "; expected the logits' shape ", x0.sizes(), ", dtype ", x0.scalar_type(), " on the CPU");
    TORCH_CHECK(at::has_internal_overlap(g) != at::MemOverlap::Yes, kNFn, "gs[", k, "] (strides ", g.strides(),
                ") has elements that share memory; expected a writable output such as torch.empty_like(xs[", k,
                "])");
    for (int64_t i = 0; i < K; ++i) {
      const auto st = at::get_overlap_status(g, xs[i]);
      TORCH_CHECK(st != at::MemOverlapStatus::Full && st != at::MemOverlapStatus::Partial, kNFn, "gs[", k,
                  "] overlaps the memory of xs[", i, "]; the gradient must be a separate tensor");
      if (i < k) {
        const auto sg = at::get_overlap_status(g, (*gs)[i]);
        TORCH_CHECK(sg != at::MemOverlapStatus::Full && sg != at::MemOverlapStatus::Partial, kNFn, "gs[", k,
                    "] and gs[", i, "] share memory; expected separate outputs");
      }
    }
    br[k].g = g.data_ptr();
    br[k].gsn = g.stride(0), br[k].gsc = g.stride(1), br[k].gsl = g.stride(2);
  }

  auto out = at::zeros({K + 1}, x0.options().dtype(at::kFloat));
  if (N * L == 0) return out;
  std::vector<double> sums(K + 1, 0.0);
  const at::Tensor counts_c = counts.contiguous();
  const float* cnt = counts_c.data_ptr<float>();
  CPS_FAST_DISPATCH_LOGITS(x0.scalar_type(), "ncps_loss_forward_cpu", [&] {
    ncps_cpu_kernel<scalar_t>(N, C, L, br, targ, yargs, ensemble, write_grad, static_cast<float>(cps_weight),
                              ignore_index, cnt, sums.data());
  });
  float* o = out.data_ptr<float>();
  for (int64_t j = 0; j <= K; ++j) o[j] = static_cast<float>(sums[j]);
  return out;
}

void bind_ncps_loss(pybind11::module_& m) {
  m.def("ncps_loss_forward", &ncps_loss_forward, pybind11::arg("xs"), pybind11::arg("t2"), pybind11::arg("ys"),
        pybind11::arg("counts"), pybind11::arg("gs"), pybind11::arg("cps_weight"), pybind11::arg("ignore_index"),
        pybind11::arg("ensemble"),
        R"doc(Fused n-branch CPS loss forward on CPU tensors, gradients computed in the same pass.

xs: K >= 2 (N, C, L) float32/float16/bfloat16 logits (one dtype, any strides).
t2: (N, L) uint8/int32/int64 labels or None. ys: K entries, (N, L) labels or
None (argmax of that branch); all None when ensemble. counts: float32 [K + 1],
valid pixels of the target and of each label. gs: None or K outputs with the
logits' shapes and dtype (fully written). Labels outside [0, C) that are not
ignore_index are ignored.

Returns float32 [K + 1]: sum vt * sum_k CE(x_k, t), then per label j
sum v_j * sum_{k != j} CE(x_k, y_j) (default) or sum CE(x_j, e_j) (ensemble).)doc");
}

}  // namespace cps_fast
