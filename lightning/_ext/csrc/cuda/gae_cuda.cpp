// torch glue of the GAE CUDA kernel (gae_kernel.cu): checks, stream, outputs.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../gae_checks.h"
#include "gae_kernel.cuh"

namespace lightning_rl {
namespace {

std::tuple<at::Tensor, at::Tensor> gae_cuda(const at::Tensor& rewards,
                                            const std::optional<at::Tensor>& values,
                                            const std::optional<at::Tensor>& mask,
                                            const at::Tensor& cu_seqlens, double gamma,
                                            double lam) {
  check_gae_inputs(rewards, values, mask, c10::DeviceType::CUDA);
  const int64_t T = rewards.numel();
  CHECK_CUDA(cu_seqlens);
  CHECK_DIM(cu_seqlens, 1);
  CHECK_CONTIGUOUS(cu_seqlens);
  CHECK_INDEX(cu_seqlens);
  TORCH_CHECK(cu_seqlens.numel() >= 1, "cu_seqlens must have at least one element (B + 1)");
  const c10::cuda::CUDAGuard guard(rewards.device());
  at::Tensor adv = at::empty({T}, rewards.options().dtype(at::kFloat));  // [T]
  at::Tensor ret = at::empty({T}, rewards.options().dtype(at::kFloat));  // [T]
  const auto kind = rewards.scalar_type() == at::kFloat  ? cuda::FloatKind::kFloat32
                    : rewards.scalar_type() == at::kHalf ? cuda::FloatKind::kFloat16
                                                         : cuda::FloatKind::kBFloat16;
  const float g = static_cast<float>(gamma);
  const float gl = values.has_value() ? static_cast<float>(gamma * lam) : g;
  const cudaError_t err = cuda::launch_gae(
      rewards.data_ptr(), values.has_value() ? values->data_ptr() : nullptr,
      mask.has_value() ? static_cast<const uint8_t*>(mask->data_ptr()) : nullptr,
      cu_seqlens.data_ptr(), cu_seqlens.scalar_type() == at::kLong, kind, cu_seqlens.numel() - 1, g,
      gl, adv.data_ptr<float>(), ret.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "lightning_rl::gae CUDA launch failed: ", cudaGetErrorString(err));
  return {adv, ret};
}

}  // namespace

TORCH_LIBRARY_IMPL(lightning_rl, CUDA, m) { m.impl("gae", &gae_cuda); }

}  // namespace lightning_rl
