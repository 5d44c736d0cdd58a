// GAE over packed sequences on CUDA: one warp per sequence, walking it backwards 32 tokens
// at a time. Each token is an affine map of the state s = (A, V_next) with an upper
// triangular matrix [[a, b], [0, d]] and offset (p, q) (see lightning/kernels/gae/triton.py);
// the warp composes its 32 maps with a shuffle scan and applies them to the carried state.
// Spec: lightning/kernels/gae/reference.py.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "gae_kernel.cuh"

namespace lightning_rl {
namespace cuda {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpsPerBlock = 8;

struct Affine {
  float a, b, d, p, q;
};

// first, then second: second(first(s)).
__device__ __forceinline__ Affine compose(const Affine& first, const Affine& second) {
  return {second.a * first.a, second.a * first.b + second.b * first.d, second.d * first.d,
          second.a * first.p + second.b * first.q + second.p, second.d * first.q + second.q};
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename scalar_t, typename index_t>
__global__ void gae_warp_kernel(const scalar_t* __restrict__ rewards,
                                const scalar_t* __restrict__ values,
                                const uint8_t* __restrict__ mask,
                                const index_t* __restrict__ cu_seqlens, int64_t B, float gamma,
                                float gamma_lam, float* __restrict__ adv,
                                float* __restrict__ ret) {
  const int lane = threadIdx.x & 31;
  const int64_t seq = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (seq >= B) return;  // whole warps only: seq is per warp
  const int64_t start = cu_seqlens[seq];
  const int64_t end = cu_seqlens[seq + 1];
  float x0 = 0.f, x1 = 0.f;  // state past the chunk: (A, V_next), 0 past the sequence end
  for (int64_t top = end - 1; top >= start; top -= 32) {
    const int64_t t = top - lane;  // lane 0 is the latest token of the chunk
    const bool valid = t >= start;
    bool act = false;
    float v = 0.f;
    Affine m{1.f, 0.f, 1.f, 0.f, 0.f};  // identity: masked token or past the start
    if (valid) {
      act = mask == nullptr || mask[t] != 0;
      if (act) {
        v = values != nullptr ? to_float(values[t]) : 0.f;
        m = {gamma_lam, gamma, 0.f, to_float(rewards[t]) - v, v};
      }
    }
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {  // inclusive scan, lane order = reverse time
      Affine o;
      o.a = __shfl_up_sync(kFullMask, m.a, off);
      o.b = __shfl_up_sync(kFullMask, m.b, off);
      o.d = __shfl_up_sync(kFullMask, m.d, off);
      o.p = __shfl_up_sync(kFullMask, m.p, off);
      o.q = __shfl_up_sync(kFullMask, m.q, off);
      if (lane >= off) m = compose(o, m);
    }
    const float s0 = m.a * x0 + m.b * x1 + m.p;  // A_t
    const float s1 = m.d * x1 + m.q;             // V_next seen by token t - 1
    if (valid) {
      adv[t] = act ? s0 : 0.f;
      ret[t] = act ? s0 + v : 0.f;
    }
    x0 = __shfl_sync(kFullMask, s0, 31);
    x1 = __shfl_sync(kFullMask, s1, 31);
  }
}

template <typename scalar_t, typename index_t>
cudaError_t launch_typed(const void* rewards, const void* values, const uint8_t* mask,
                         const void* cu_seqlens, int64_t B, float gamma, float gamma_lam,
                         float* adv, float* ret, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  const int64_t blocks = (B + kWarpsPerBlock - 1) / kWarpsPerBlock;
  gae_warp_kernel<scalar_t, index_t><<<static_cast<unsigned>(blocks), kWarpsPerBlock * 32, 0, stream>>>(
      static_cast<const scalar_t*>(rewards), static_cast<const scalar_t*>(values), mask,
      static_cast<const index_t*>(cu_seqlens), B, gamma, gamma_lam, adv, ret);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_index(const void* rewards, const void* values, const uint8_t* mask,
                         const void* cu_seqlens, bool cu_is_int64, int64_t B, float gamma,
                         float gamma_lam, float* adv, float* ret, cudaStream_t stream) {
  return cu_is_int64 ? launch_typed<scalar_t, int64_t>(rewards, values, mask, cu_seqlens, B, gamma,
                                                       gamma_lam, adv, ret, stream)
                     : launch_typed<scalar_t, int32_t>(rewards, values, mask, cu_seqlens, B, gamma,
                                                       gamma_lam, adv, ret, stream);
}

}  // namespace

cudaError_t launch_gae(const void* rewards, const void* values, const uint8_t* mask,
                       const void* cu_seqlens, bool cu_is_int64, FloatKind kind, int64_t B,
                       float gamma, float gamma_lam, float* adv, float* ret, cudaStream_t stream) {
  switch (kind) {
    case FloatKind::kFloat32:
      return launch_index<float>(rewards, values, mask, cu_seqlens, cu_is_int64, B, gamma, gamma_lam,
                                 adv, ret, stream);
    case FloatKind::kFloat16:
      return launch_index<__half>(rewards, values, mask, cu_seqlens, cu_is_int64, B, gamma,
                                  gamma_lam, adv, ret, stream);
    case FloatKind::kBFloat16:
      return launch_index<__nv_bfloat16>(rewards, values, mask, cu_seqlens, cu_is_int64, B, gamma,
                                         gamma_lam, adv, ret, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace lightning_rl
