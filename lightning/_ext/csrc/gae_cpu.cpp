// GAE and discounted returns over packed variable-length sequences, CPU.
// Spec: lightning/kernels/gae/reference.py. One sequential reverse scan per sequence;
// sequences run in parallel (at::parallel_for, OpenMP).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "gae_checks.h"

namespace lightning_rl {
namespace {

// Sequence b covers tokens [cu[b], cu[b+1]); checks cu[0] == 0, cu[B] == T, non-decreasing.
std::vector<int64_t> read_cu_seqlens(const at::Tensor& cu_seqlens, int64_t T) {
  CHECK_CPU(cu_seqlens);
  CHECK_DIM(cu_seqlens, 1);
  CHECK_INDEX(cu_seqlens);
  TORCH_CHECK(cu_seqlens.numel() >= 1, "cu_seqlens must have at least one element (B + 1)");
  at::Tensor cu = cu_seqlens.to(at::kLong).contiguous();
  const int64_t* p = cu.data_ptr<int64_t>();
  std::vector<int64_t> out(p, p + cu.numel());
  TORCH_CHECK(out.front() == 0, "cu_seqlens[0] must be 0, got ", out.front());
  TORCH_CHECK(out.back() == T, "cu_seqlens[-1] must equal the number of tokens ", T, ", got ",
              out.back());
  for (size_t b = 0; b + 1 < out.size(); ++b) {
    TORCH_CHECK(out[b] <= out[b + 1], "cu_seqlens must be non-decreasing, got cu_seqlens[", b,
                "]=", out[b], " > cu_seqlens[", b + 1, "]=", out[b + 1]);
  }
  return out;
}

template <typename scalar_t>
void gae_kernel(const scalar_t* __restrict__ rewards, const scalar_t* __restrict__ values,
                const uint8_t* __restrict__ mask, const std::vector<int64_t>& cu, float gamma,
                float lam, float* __restrict__ adv, float* __restrict__ ret) {
  const int64_t B = static_cast<int64_t>(cu.size()) - 1;
  const int64_t T = cu.back();
  // Without values: V == 0 and lam is ignored, so the scan is the discounted return-to-go.
  const float gl = values != nullptr ? gamma * lam : gamma;
  // ~256k tokens per task: smaller batches run on one thread (no fork/join cost).
  const int64_t grain = B > 0 ? std::max<int64_t>(1, (int64_t{1} << 18) * B / std::max<int64_t>(T, 1)) : 1;
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      float last_gae = 0.f;    // A_{t+1} over action tokens; 0 past the sequence end
      float next_value = 0.f;  // V of the next action token; 0 past the sequence end
      for (int64_t t = cu[b + 1] - 1; t >= cu[b]; --t) {
        if (mask != nullptr && mask[t] == 0) {  // masked token: state passes through
          adv[t] = 0.f;
          ret[t] = 0.f;
          continue;
        }
        const float v = values != nullptr ? static_cast<float>(values[t]) : 0.f;
        const float delta = static_cast<float>(rewards[t]) + gamma * next_value - v;
        last_gae = delta + gl * last_gae;
        adv[t] = last_gae;
        ret[t] = last_gae + v;
        next_value = v;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> gae_cpu(const at::Tensor& rewards,
                                           const std::optional<at::Tensor>& values,
                                           const std::optional<at::Tensor>& mask,
                                           const at::Tensor& cu_seqlens, double gamma,
                                           double lam) {
  check_gae_inputs(rewards, values, mask, c10::DeviceType::CPU);
  const int64_t T = rewards.numel();
  const std::vector<int64_t> cu = read_cu_seqlens(cu_seqlens, T);
  at::Tensor adv = at::empty({T}, rewards.options().dtype(at::kFloat));  // [T]
  at::Tensor ret = at::empty({T}, rewards.options().dtype(at::kFloat));  // [T]
  const uint8_t* m = mask.has_value() ? static_cast<const uint8_t*>(mask->data_ptr()) : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rewards.scalar_type(), "gae_cpu", [&] {
    gae_kernel<scalar_t>(rewards.data_ptr<scalar_t>(),
                         values.has_value() ? values->data_ptr<scalar_t>() : nullptr, m, cu,
                         static_cast<float>(gamma), static_cast<float>(lam),
                         adv.data_ptr<float>(), ret.data_ptr<float>());
  });
  return {adv, ret};
}

}  // namespace

TORCH_LIBRARY_IMPL(lightning_rl, CPU, m) { m.impl("gae", &gae_cpu); }

}  // namespace lightning_rl
