// Host-side declaration of the GAE CUDA launcher (plain CUDA runtime types only, so the
// kernel file compiles with nvcc alone and the torch glue with the host compiler).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace lightning_rl {
namespace cuda {

enum class FloatKind : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// advantages/returns over packed sequences, one warp per sequence (see gae_kernel.cu).
// rewards/values: [T] of `kind`, values may be null; mask: [T] bytes or null;
// cu_seqlens: [B + 1] int32 (cu_is_int64 = false) or int64; adv/ret: [T] float32.
cudaError_t launch_gae(const void* rewards, const void* values, const uint8_t* mask,
                       const void* cu_seqlens, bool cu_is_int64, FloatKind kind, int64_t B,
                       float gamma, float gamma_lam, float* adv, float* ret, cudaStream_t stream);

}  // namespace cuda
}  // namespace lightning_rl
