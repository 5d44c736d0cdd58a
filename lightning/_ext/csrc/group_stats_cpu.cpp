// Segmented group statistics (GRPO / RLOO baselines) and masked whitening, CPU.
// Spec: lightning/kernels/group_stats/reference.py. Accumulation in double; two passes
// (mean, then centred sum of squares) so large offsets do not cancel.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "checks.h"

namespace lightning_rl {
namespace {

template <typename scalar_t, typename index_t>
void group_stats_kernel(const scalar_t* __restrict__ scores, const index_t* __restrict__ ids,
                        int64_t N, int64_t G, float* __restrict__ mean_out,
                        float* __restrict__ std_out, int64_t* __restrict__ count_out) {
  std::vector<double> sum(G, 0.0), m2(G, 0.0), mean(G, 0.0), stdev(G, 0.0);  // [G]
  std::vector<int64_t> count(G, 0);                                            // [G]
  for (int64_t i = 0; i < N; ++i) {
    const int64_t g = static_cast<int64_t>(ids[i]);
    TORCH_CHECK(g >= 0 && g < G, "group_ids[", i, "]=", g, " is outside [0, num_groups=", G, ")");
    sum[g] += static_cast<double>(scores[i]);
    count[g] += 1;
  }
  for (int64_t g = 0; g < G; ++g) {
    mean[g] = count[g] > 0 ? sum[g] / static_cast<double>(count[g]) : 0.0;
  }
  for (int64_t i = 0; i < N; ++i) {
    const int64_t g = static_cast<int64_t>(ids[i]);
    const double d = static_cast<double>(scores[i]) - mean[g];
    m2[g] += d * d;
  }
  for (int64_t g = 0; g < G; ++g) {  // unbiased (Bessel); 0 for groups of one
    stdev[g] = count[g] > 1 ? std::sqrt(m2[g] / static_cast<double>(count[g] - 1)) : 0.0;
  }
  for (int64_t i = 0; i < N; ++i) {
    const int64_t g = static_cast<int64_t>(ids[i]);
    mean_out[i] = static_cast<float>(mean[g]);
    std_out[i] = static_cast<float>(stdev[g]);
    count_out[i] = count[g];
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_stats_cpu(const at::Tensor& scores,
                                                               const at::Tensor& group_ids,
                                                               int64_t num_groups) {
  CHECK_CPU(scores);
  CHECK_DIM(scores, 1);
  CHECK_CONTIGUOUS(scores);
  CHECK_FLOATING(scores);
  const int64_t N = scores.numel();
  CHECK_CPU(group_ids);
  CHECK_CONTIGUOUS(group_ids);
  CHECK_SHAPE(group_ids, N);
  CHECK_INDEX(group_ids);
  TORCH_CHECK(num_groups >= 0, "num_groups must be >= 0, got ", num_groups);
  TORCH_CHECK(N == 0 || num_groups > 0, "num_groups must be > 0 when there are scores");
  at::Tensor mean = at::empty({N}, scores.options().dtype(at::kFloat));   // [N]
  at::Tensor stdev = at::empty({N}, scores.options().dtype(at::kFloat));  // [N]
  at::Tensor count = at::empty({N}, scores.options().dtype(at::kLong));   // [N]
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "group_stats_cpu", [&] {
    AT_DISPATCH_INDEX_TYPES(group_ids.scalar_type(), "group_stats_cpu_ids", [&] {
      group_stats_kernel<scalar_t, index_t>(scores.data_ptr<scalar_t>(), group_ids.data_ptr<index_t>(),
                                            N, num_groups, mean.data_ptr<float>(),
                                            stdev.data_ptr<float>(), count.data_ptr<int64_t>());
    });
  });
  return {mean, stdev, count};
}

// Sums over the kept elements of [b, e): (sum of (x - shift), sum of (x - shift)^2, count),
// in double, with kLanes independent accumulators so the loop is not bound by the latency
// of one dependent add chain (and vectorises).
struct Moments {
  double s1 = 0.0, s2 = 0.0, n = 0.0;
  Moments operator+(const Moments& o) const { return {s1 + o.s1, s2 + o.s2, n + o.n}; }
};

template <typename scalar_t>
Moments chunk_moments(const scalar_t* __restrict__ x, const uint8_t* __restrict__ mask, int64_t b,
                      int64_t e, double shift) {
  constexpr int kLanes = 8;
  double s1[kLanes] = {}, s2[kLanes] = {}, n[kLanes] = {};
  int64_t i = b;
  for (; i + kLanes <= e; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const bool keep = mask == nullptr || mask[i + l] != 0;
      const double d = keep ? static_cast<double>(x[i + l]) - shift : 0.0;
      s1[l] += d;
      s2[l] += d * d;
      n[l] += keep ? 1.0 : 0.0;
    }
  }
  Moments m;
  for (; i < e; ++i) {
    if (mask == nullptr || mask[i] != 0) {
      const double d = static_cast<double>(x[i]) - shift;
      m.s1 += d;
      m.s2 += d * d;
      m.n += 1.0;
    }
  }
  for (int l = 0; l < kLanes; ++l) m = m + Moments{s1[l], s2[l], n[l]};
  return m;
}

constexpr int64_t kWhitenGrain = int64_t{1} << 18;  // smaller inputs run on one thread

template <typename scalar_t>
Moments moments(const scalar_t* x, const uint8_t* mask, int64_t T, double shift) {
  return at::parallel_reduce(
      0, T, kWhitenGrain, Moments{},
      [&](int64_t b, int64_t e, Moments acc) { return acc + chunk_moments(x, mask, b, e, shift); },
      [](const Moments& a, const Moments& c) { return a + c; });
}

template <typename scalar_t>
void whiten_kernel(const scalar_t* __restrict__ x, const uint8_t* __restrict__ mask, int64_t T,
                   bool shift_mean, float eps, float* __restrict__ out) {
  // Pass 1: the mean. Pass 2: sums about it (the centred form does not cancel).
  const Moments first = moments(x, mask, T, 0.0);
  const double mean = first.n > 0 ? first.s1 / first.n : 0.0;
  const Moments centred = moments(x, mask, T, mean);
  const double count = centred.n;
  // sum (x - mean)^2 - (sum (x - mean))^2 / n: exact algebra, removes the tiny residual mean.
  const double m2 = count > 0 ? centred.s2 - centred.s1 * centred.s1 / count : 0.0;
  const double var = count > 1 ? m2 / (count - 1) : 0.0;  // unbiased; 0 below two elements
  const float inv_std = static_cast<float>(1.0 / std::sqrt(var + static_cast<double>(eps)));
  const float mean_f = static_cast<float>(mean);
  const float add_back = shift_mean ? 0.f : mean_f;
  at::parallel_for(0, T, kWhitenGrain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const bool keep = mask == nullptr || mask[i] != 0;
      const float y = (static_cast<float>(x[i]) - mean_f) * inv_std + add_back;
      out[i] = keep ? y : 0.f;
    }
  });
}

at::Tensor masked_whiten_cpu(const at::Tensor& x, const std::optional<at::Tensor>& mask,
                             bool shift_mean, double eps) {
  CHECK_CPU(x);
  CHECK_DIM(x, 1);
  CHECK_CONTIGUOUS(x);
  CHECK_FLOATING(x);
  const int64_t T = x.numel();
  if (mask.has_value()) {
    CHECK_CPU(*mask);
    CHECK_CONTIGUOUS(*mask);
    CHECK_SHAPE(*mask, T);
    CHECK_MASK(*mask);
  }
  TORCH_CHECK(eps >= 0, "eps must be >= 0, got ", eps);
  at::Tensor out = at::empty({T}, x.options().dtype(at::kFloat));  // [T]
  const uint8_t* m = mask.has_value() ? static_cast<const uint8_t*>(mask->data_ptr()) : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_whiten_cpu", [&] {
    whiten_kernel<scalar_t>(x.data_ptr<scalar_t>(), m, T, shift_mean, static_cast<float>(eps),
                            out.data_ptr<float>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lightning_rl, CPU, m) {
  m.impl("group_stats", &group_stats_cpu);
  m.impl("masked_whiten", &masked_whiten_cpu);
}

}  // namespace lightning_rl
