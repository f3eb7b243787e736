// bn_seeded_backward on CPU (MATH.md, "BN's coupling, exactly"): per seed s (sample i = seeds[s],
// upstream dy_s on that sample only) and channel c,
//   a_sc = (1/M) sum_t dy_sct,  b_sc = (1/M) sum_t dy_sct xhat_ict,
//   dz_sjct = scale_c ([j = i] dy_sct - a_sc - xhat_jct b_sc)      for every sample j.
// Reductions parallel over (s, c), the expansion parallel over (s, j) rows (at::parallel_for).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <tuple>
#include <vector>

#include "../include/bnmem_common.h"

namespace bnmem {
namespace {


std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_seeded_backward_cpu(const at::Tensor& xhat_in,
                                                                       const at::Tensor& scale_in,
                                                                       const at::Tensor& dy_in,
                                                                       const at::Tensor& seeds_in) {
  check_bn_seeded_inputs(xhat_in, scale_in, dy_in, seeds_in, /*int32_seeds=*/true);
  const at::Tensor xhat = xhat_in.contiguous();
  const at::Tensor scale = scale_in.contiguous();
  const at::Tensor dy = dy_in.contiguous();
  const at::Tensor seeds = seeds_in.to(at::kLong).contiguous();
  const int64_t B = xhat.size(0), C = xhat.size(1), T = xhat.size(2), S = dy.size(0);
  const int64_t* sp = seeds.const_data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s)
    TORCH_CHECK(sp[s] >= 0 && sp[s] < B, "bnmem::bn_seeded_backward: seeds[", s, "] = ", sp[s],
                " is not a sample index in [0, ", B, ")");
  at::Tensor dz = at::empty({S, B, C, T}, xhat.options());
  at::Tensor a = at::empty({S, C}, xhat.options());
  at::Tensor b = at::empty({S, C}, xhat.options());
  if (S == 0 || B == 0 || C == 0) return {dz, a, b};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xhat.scalar_type(), "bn_seeded_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = xhat.const_data_ptr<scalar_t>();
    const scalar_t* scp = scale.const_data_ptr<scalar_t>();
    const scalar_t* gp = dy.const_data_ptr<scalar_t>();
    scalar_t* dzp = dz.data_ptr<scalar_t>();
    scalar_t* ap = a.data_ptr<scalar_t>();
    scalar_t* bp = b.data_ptr<scalar_t>();
    const acc_t inv_m = acc_t(1) / static_cast<acc_t>(B * T);
    // a, b kept in the accumulation dtype for the expansion (no rounding to scalar_t in between)
    std::vector<acc_t> aa(S * C), bb(S * C);
    at::parallel_for(0, S * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t sc = begin; sc < end; ++sc) {
        const int64_t s = sc / C, c = sc % C;
        const scalar_t* g = gp + sc * T;
        const scalar_t* xi = xp + (sp[s] * C + c) * T;
        acc_t sa = 0, sb = 0;
        for (int64_t t = 0; t < T; ++t) {
          const acc_t gv = static_cast<acc_t>(g[t]);
          sa += gv;
          sb += gv * static_cast<acc_t>(xi[t]);
        }
        aa[sc] = sa * inv_m;
        bb[sc] = sb * inv_m;
        ap[sc] = static_cast<scalar_t>(aa[sc]);
        bp[sc] = static_cast<scalar_t>(bb[sc]);
      }
    });
    at::parallel_for(0, S * B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t sj = begin; sj < end; ++sj) {
        const int64_t s = sj / B, j = sj % B;
        const bool own = (j == sp[s]);
        for (int64_t c = 0; c < C; ++c) {
          const acc_t k = static_cast<acc_t>(scp[c]);
          const acc_t av = aa[s * C + c], bv = bb[s * C + c];
          const scalar_t* xj = xp + (j * C + c) * T;
          const scalar_t* g = gp + (s * C + c) * T;
          scalar_t* out = dzp + ((s * B + j) * C + c) * T;
          if (own) {
            for (int64_t t = 0; t < T; ++t)
              out[t] = static_cast<scalar_t>(k * (static_cast<acc_t>(g[t]) - av - static_cast<acc_t>(xj[t]) * bv));
          } else {
            for (int64_t t = 0; t < T; ++t)
              out[t] = static_cast<scalar_t>(-k * (av + static_cast<acc_t>(xj[t]) * bv));
          }
        }
      }
    });
  });
  return {dz, a, b};
}

}  // namespace

TORCH_LIBRARY_IMPL(bnmem, CPU, m) { m.impl("bn_seeded_backward", &bn_seeded_backward_cpu); }

}  // namespace bnmem
