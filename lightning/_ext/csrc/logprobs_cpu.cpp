// Log-prob batching, CPU: log-softmax of the sampled tokens (with temperature) and the
// entropy, from logits or from hidden states and the LM-head weight, plus the backward.
// Spec: lightning/kernels/logprobs/reference.py.
//
// From hidden states, logits are computed one [chunk_tokens x chunk_vocab] tile at a time
// (at::mm in the input dtype, then fp32), folded into per-row online-softmax state
// (max m, s = sum exp(z - m), t = sum exp(z - m) * z), and dropped: the [N, V] logits never
// exist. The backward recomputes each tile and turns it, in place, into
//   dz = g_lp * (onehot(y) - p) - g_H * p * (log p + H),   p = exp(z - lse)
// then accumulates dhidden += dz @ W_tile / T and dweight_tile += dz^T @ h_chunk / T.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>

#include "checks.h"

namespace lightning_rl {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct SoftmaxState {
  float m = kNegInf;  // running max of z
  float s = 0.f;      // sum exp(z - m)
  float t = 0.f;      // sum exp(z - m) * z  (entropy only)
};

// exp(x) for the softmax, written so the compiler vectorises the loops that call it (a libm
// call stops that; so do branches: the build passes -fno-trapping-math so the selects below
// if-convert). Cody-Waite range reduction x = n ln2 + r, |r| <= ln2 / 2, a degree-6
// polynomial for exp(r) (Cephes expf, ~1 ulp), 2^n built in the exponent bits. Exactly 0
// below -87.3 (and for -inf), where expf underflows anyway.
inline float fast_exp(float x) {
  const float keep = x >= -87.3f ? 1.0f : 0.0f;
  x = x < -87.3f ? -87.3f : x;
  x = x > 88.3f ? 88.3f : x;
  const int32_t n = static_cast<int32_t>(x * 1.44269504088896341f + 128.5f) - 128;  // round
  const float nf = static_cast<float>(n);
  const float r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale * keep;
}

// Folds z = x[j] * inv_temp, j in [0, n), into the online-softmax state of one row.
template <typename scalar_t, bool kEntropy>
inline void fold_row(const scalar_t* __restrict__ x, int64_t n, float inv_temp,
                     SoftmaxState& st) {
  float mc = kNegInf;
#pragma omp simd reduction(max : mc)
  for (int64_t j = 0; j < n; ++j) mc = std::max(mc, static_cast<float>(x[j]) * inv_temp);
  if (mc == kNegInf) return;  // the whole tile is -inf: adds nothing
  const float m_new = std::max(st.m, mc);
  // fp32 SIMD partial sums over blocks of kBlock, blocks summed in double: a 150k-term
  // float sum would lose ~1e-4 relative, mixing double into the vector loop stops it.
  constexpr int64_t kBlock = 1024;
  double s = 0.0, t = 0.0;
  for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
    const int64_t j1 = std::min(n, j0 + kBlock);
    float bs = 0.f, bt = 0.f;
#pragma omp simd reduction(+ : bs, bt)
    for (int64_t j = j0; j < j1; ++j) {
      const float z = static_cast<float>(x[j]) * inv_temp;
      const float e = fast_exp(z - m_new);
      bs += e;
      if constexpr (kEntropy) bt += e * (e > 0.f ? z : 0.f);  // guards 0 * -inf
    }
    s += bs;
    t += bt;
  }
  const float scale = fast_exp(st.m - m_new);  // 0 on the first finite tile
  st.s = st.s * scale + static_cast<float>(s);
  if constexpr (kEntropy) st.t = st.t * scale + static_cast<float>(t);
  st.m = m_new;
}

// d(g_lp * logp_y + g_H * H) / dx for one logit x that is not the sampled token.
template <bool kEntropy>
inline float grad_one(float x, float inv_temp, float lse, float ent, float g_lp, float g_ent) {
  const float z = x * inv_temp;
  const float p = fast_exp(z - lse);
  float dz = -p * g_lp;
  if constexpr (kEntropy) dz -= g_ent * p * ((p > 0.f ? z - lse : 0.f) + ent);  // 0 * -inf guard
  return dz * inv_temp;
}

// Over one row tile, possibly in place (dx == x): dx[j] <- d(g_lp * logp_y + g_H * H) / dx[j]
// for the columns [col0, col0 + n); y is the sampled token (global column).
template <typename scalar_t, bool kEntropy>
inline void grad_row(const scalar_t* x, scalar_t* dx, int64_t n, int64_t col0, int64_t y,
                     float inv_temp, float lse, float ent, float g_lp, float g_ent) {
  const bool has_y = y >= col0 && y < col0 + n;
  const float x_y = has_y ? static_cast<float>(x[y - col0]) : 0.f;  // read before overwriting
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    dx[j] = static_cast<scalar_t>(
        grad_one<kEntropy>(static_cast<float>(x[j]), inv_temp, lse, ent, g_lp, g_ent));
  }
  if (has_y) {  // the one-hot term, added in fp32 before the single rounding
    const float d = grad_one<kEntropy>(x_y, inv_temp, lse, ent, g_lp, g_ent);
    dx[y - col0] = static_cast<scalar_t>(d + g_lp * inv_temp);
  }
}

void check_common(const at::Tensor& token_ids, int64_t N, double temperature) {
  CHECK_CPU(token_ids);
  CHECK_SHAPE(token_ids, N);
  CHECK_INDEX(token_ids);
  TORCH_CHECK(temperature > 0, "temperature must be > 0, got ", temperature);
}

at::Tensor long_ids(const at::Tensor& token_ids, int64_t V) {
  at::Tensor ids = token_ids.to(at::kLong).contiguous();  // [N]
  const int64_t* p = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < ids.numel(); ++i) {
    TORCH_CHECK(p[i] >= 0 && p[i] < V, "token_ids[", i, "]=", p[i], " is outside [0, V=", V, ")");
  }
  return ids;
}

// Optional upstream gradient as a contiguous fp32 [N] tensor (undefined when absent).
at::Tensor grad_or_undefined(const std::optional<at::Tensor>& g, int64_t N, const char* name) {
  if (!g.has_value() || !g->defined()) return at::Tensor();
  TORCH_CHECK(g->numel() == N, name, " must have ", N, " elements, got ", g->numel());
  CHECK_CPU(*g);
  return g->to(at::kFloat).contiguous();
}

// ---------------------------------------------------------------- from logits [N, V]

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_logits_fwd_cpu(
    const at::Tensor& logits, const at::Tensor& token_ids, double temperature, bool entropy) {
  CHECK_CPU(logits);
  CHECK_DIM(logits, 2);
  CHECK_FLOATING(logits);
  TORCH_CHECK(logits.stride(1) == 1, "logits must be contiguous along the vocabulary");
  const int64_t N = logits.size(0), V = logits.size(1);
  check_common(token_ids, N, temperature);
  TORCH_CHECK(V > 0 || N == 0, "logits must have a non-empty vocabulary dimension");
  const at::Tensor ids = long_ids(token_ids, V);
  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor lp = at::empty({N}, f32);                 // [N]
  at::Tensor lse = at::empty({N}, f32);                // [N]
  at::Tensor ent = at::empty({entropy ? N : 0}, f32);  // [N] or [0]
  const float inv_t = static_cast<float>(1.0 / temperature);
  const int64_t ld = logits.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "logprobs_logits_fwd", [&] {
    const scalar_t* x = logits.data_ptr<scalar_t>();
    const int64_t* y = ids.data_ptr<int64_t>();
    float* lp_p = lp.data_ptr<float>();
    float* lse_p = lse.data_ptr<float>();
    float* ent_p = entropy ? ent.data_ptr<float>() : nullptr;
    at::parallel_for(0, N, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        SoftmaxState st;
        if (entropy) {
          fold_row<scalar_t, true>(x + i * ld, V, inv_t, st);
        } else {
          fold_row<scalar_t, false>(x + i * ld, V, inv_t, st);
        }
        const float l = st.m + std::log(st.s);
        lse_p[i] = l;
        lp_p[i] = static_cast<float>(x[i * ld + y[i]]) * inv_t - l;
        if (entropy) ent_p[i] = l - st.t / st.s;
      }
    });
  });
  return {lp, lse, ent};
}

at::Tensor logprobs_logits_bwd_cpu(const at::Tensor& logits, const at::Tensor& token_ids,
                                   const at::Tensor& lse, const at::Tensor& entropy,
                                   const std::optional<at::Tensor>& grad_logprobs,
                                   const std::optional<at::Tensor>& grad_entropy,
                                   double temperature) {
  CHECK_CPU(logits);
  CHECK_DIM(logits, 2);
  CHECK_FLOATING(logits);
  TORCH_CHECK(logits.stride(1) == 1, "logits must be contiguous along the vocabulary");
  const int64_t N = logits.size(0), V = logits.size(1);
  check_common(token_ids, N, temperature);
  CHECK_SHAPE(lse, N);
  const at::Tensor ids = long_ids(token_ids, V);
  const at::Tensor g_lp = grad_or_undefined(grad_logprobs, N, "grad_logprobs");  // [N]
  const at::Tensor g_ent = grad_or_undefined(grad_entropy, N, "grad_entropy");   // [N]
  const bool has_ent = g_ent.defined();
  if (has_ent) CHECK_SHAPE(entropy, N);
  const at::Tensor lse_c = lse.to(at::kFloat).contiguous();                     // [N]
  const at::Tensor ent_c = has_ent ? entropy.to(at::kFloat).contiguous() : at::Tensor();  // [N]
  at::Tensor dlogits = at::empty({N, V}, logits.options());  // [N, V], logits dtype
  const float inv_t = static_cast<float>(1.0 / temperature);
  const int64_t ld = logits.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "logprobs_logits_bwd", [&] {
    const scalar_t* x = logits.data_ptr<scalar_t>();
    scalar_t* dx = dlogits.data_ptr<scalar_t>();
    const int64_t* y = ids.data_ptr<int64_t>();
    const float* lse_p = lse_c.data_ptr<float>();
    const float* glp_p = g_lp.defined() ? g_lp.data_ptr<float>() : nullptr;
    const float* gent_p = has_ent ? g_ent.data_ptr<float>() : nullptr;
    const float* ent_p = has_ent ? ent_c.data_ptr<float>() : nullptr;
    at::parallel_for(0, N, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const float glp = glp_p ? glp_p[i] : 0.f;
        if (has_ent) {
          grad_row<scalar_t, true>(x + i * ld, dx + i * V, V, 0, y[i], inv_t, lse_p[i], ent_p[i],
                                   glp, gent_p[i]);
        } else {
          grad_row<scalar_t, false>(x + i * ld, dx + i * V, V, 0, y[i], inv_t, lse_p[i], 0.f, glp,
                                    0.f);
        }
      }
    });
  });
  return dlogits;
}

// ---------------------------------------------------------------- from hidden [N, H], W [V, H]

void check_hidden(const at::Tensor& hidden, const at::Tensor& weight, int64_t chunk_tokens,
                  int64_t chunk_vocab) {
  CHECK_CPU(hidden);
  CHECK_CPU(weight);
  CHECK_DIM(hidden, 2);
  CHECK_DIM(weight, 2);
  CHECK_FLOATING(hidden);
  CHECK_CONTIGUOUS(hidden);
  CHECK_CONTIGUOUS(weight);
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), "weight must have the dtype of hidden (",
              hidden.scalar_type(), "), got ", weight.scalar_type());
  TORCH_CHECK(weight.size(1) == hidden.size(1), "weight must be [V, H] with H = hidden.size(1) = ",
              hidden.size(1), ", got ", weight.sizes());
  TORCH_CHECK(chunk_tokens > 0, "chunk_tokens must be > 0, got ", chunk_tokens);
  TORCH_CHECK(chunk_vocab > 0, "chunk_vocab must be > 0, got ", chunk_vocab);
}

// fp32 logits tile z = h_chunk @ W_tile^T (unscaled), [n, vc], contiguous.
at::Tensor logits_tile(const at::Tensor& h_chunk, const at::Tensor& w_tile) {
  at::Tensor z = h_chunk.mm(w_tile.t());  // [n, vc], input dtype, fp32 accumulation in the GEMM
  return z.scalar_type() == at::kFloat ? z : z.to(at::kFloat);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_hidden_fwd_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& token_ids,
    double temperature, bool entropy, int64_t chunk_tokens, int64_t chunk_vocab) {
  check_hidden(hidden, weight, chunk_tokens, chunk_vocab);
  const int64_t N = hidden.size(0), V = weight.size(0);
  check_common(token_ids, N, temperature);
  TORCH_CHECK(V > 0 || N == 0, "weight must have at least one row (vocabulary)");
  const at::Tensor ids = long_ids(token_ids, V);
  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor lp = at::empty({N}, f32);                 // [N]
  at::Tensor lse = at::empty({N}, f32);                // [N]
  at::Tensor ent = at::empty({entropy ? N : 0}, f32);  // [N] or [0]
  const float inv_t = static_cast<float>(1.0 / temperature);
  const int64_t* y = ids.data_ptr<int64_t>();
  float* lp_p = lp.data_ptr<float>();
  float* lse_p = lse.data_ptr<float>();
  std::vector<SoftmaxState> state;
  std::vector<float> zy;
  for (int64_t n0 = 0; n0 < N; n0 += chunk_tokens) {
    const int64_t n = std::min(chunk_tokens, N - n0);
    const at::Tensor h = hidden.narrow(0, n0, n);  // [n, H]
    state.assign(n, SoftmaxState{});
    zy.assign(n, 0.f);
    for (int64_t v0 = 0; v0 < V; v0 += chunk_vocab) {
      const int64_t vc = std::min(chunk_vocab, V - v0);
      const at::Tensor z = logits_tile(h, weight.narrow(0, v0, vc));  // [n, vc] fp32
      const float* zp = z.data_ptr<float>();
      at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          if (entropy) {
            fold_row<float, true>(zp + i * vc, vc, inv_t, state[i]);
          } else {
            fold_row<float, false>(zp + i * vc, vc, inv_t, state[i]);
          }
          const int64_t col = y[n0 + i] - v0;
          if (col >= 0 && col < vc) zy[i] = zp[i * vc + col] * inv_t;
        }
      });
    }
    for (int64_t i = 0; i < n; ++i) {
      const SoftmaxState& st = state[i];
      const float l = st.m + std::log(st.s);
      lse_p[n0 + i] = l;
      lp_p[n0 + i] = zy[i] - l;
      if (entropy) ent.data_ptr<float>()[n0 + i] = l - st.t / st.s;
    }
  }
  return {lp, lse, ent};
}

std::tuple<at::Tensor, at::Tensor> logprobs_hidden_bwd_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& token_ids,
    const at::Tensor& lse, const at::Tensor& entropy,
    const std::optional<at::Tensor>& grad_logprobs, const std::optional<at::Tensor>& grad_entropy,
    double temperature, int64_t chunk_tokens, int64_t chunk_vocab, bool need_hidden,
    bool need_weight) {
  check_hidden(hidden, weight, chunk_tokens, chunk_vocab);
  const int64_t N = hidden.size(0), V = weight.size(0), H = hidden.size(1);
  check_common(token_ids, N, temperature);
  CHECK_SHAPE(lse, N);
  const at::Tensor ids = long_ids(token_ids, V);
  const at::Tensor g_lp = grad_or_undefined(grad_logprobs, N, "grad_logprobs");  // [N]
  const at::Tensor g_ent = grad_or_undefined(grad_entropy, N, "grad_entropy");   // [N]
  const bool has_ent = g_ent.defined();
  if (has_ent) CHECK_SHAPE(entropy, N);
  const at::Tensor lse_c = lse.to(at::kFloat).contiguous();  // [N]
  const at::Tensor ent_c = has_ent ? entropy.to(at::kFloat).contiguous() : at::Tensor();  // [N]
  const auto f32 = hidden.options().dtype(at::kFloat);
  const bool is_f32 = hidden.scalar_type() == at::kFloat;
  // fp32 accumulators; for fp32 inputs they are the outputs themselves.
  at::Tensor dh = need_hidden ? at::zeros({N, H}, f32) : at::Tensor();  // [N, H] fp32
  at::Tensor dw = need_weight ? at::zeros({V, H}, f32) : at::Tensor();  // [V, H] fp32
  const float inv_t = static_cast<float>(1.0 / temperature);
  const int64_t* y = ids.data_ptr<int64_t>();
  const float* lse_p = lse_c.data_ptr<float>();
  const float* glp_p = g_lp.defined() ? g_lp.data_ptr<float>() : nullptr;
  const float* gent_p = has_ent ? g_ent.data_ptr<float>() : nullptr;
  const float* ent_p = has_ent ? ent_c.data_ptr<float>() : nullptr;
  if (need_hidden || need_weight) {
    for (int64_t n0 = 0; n0 < N; n0 += chunk_tokens) {
      const int64_t n = std::min(chunk_tokens, N - n0);
      const at::Tensor h = hidden.narrow(0, n0, n);  // [n, H]
      for (int64_t v0 = 0; v0 < V; v0 += chunk_vocab) {
        const int64_t vc = std::min(chunk_vocab, V - v0);
        const at::Tensor w = weight.narrow(0, v0, vc);  // [vc, H]
        at::Tensor dz = logits_tile(h, w);              // [n, vc] fp32, turned into dz in place
        float* zp = dz.data_ptr<float>();
        at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
          for (int64_t i = b; i < e; ++i) {
            const int64_t r = n0 + i;
            const float glp = glp_p ? glp_p[r] : 0.f;
            if (has_ent) {
              grad_row<float, true>(zp + i * vc, zp + i * vc, vc, v0, y[r], inv_t, lse_p[r],
                                    ent_p[r], glp, gent_p[r]);
            } else {
              grad_row<float, false>(zp + i * vc, zp + i * vc, vc, v0, y[r], inv_t, lse_p[r], 0.f,
                                     glp, 0.f);
            }
          }
        });
        const at::Tensor dz_in = is_f32 ? dz : dz.to(hidden.scalar_type());  // [n, vc]
        if (need_hidden) {
          at::Tensor dh_c = dh.narrow(0, n0, n);  // [n, H]
          if (is_f32) {
            dh_c.addmm_(dz_in, w);
          } else {
            dh_c.add_(dz_in.mm(w));
          }
        }
        if (need_weight) {
          at::Tensor dw_c = dw.narrow(0, v0, vc);  // [vc, H]
          if (is_f32) {
            dw_c.addmm_(dz_in.t(), h);
          } else {
            dw_c.add_(dz_in.t().mm(h));
          }
        }
      }
    }
  }
  // A gradient that was not asked for comes back as an empty [0] tensor.
  at::Tensor dh_out = need_hidden ? (is_f32 ? dh : dh.to(hidden.scalar_type()))
                                  : at::empty({0}, hidden.options());
  at::Tensor dw_out = need_weight ? (is_f32 ? dw : dw.to(weight.scalar_type()))
                                  : at::empty({0}, weight.options());
  return {dh_out, dw_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(lightning_rl, CPU, m) {
  m.impl("logprobs_logits_fwd", &logprobs_logits_fwd_cpu);
  m.impl("logprobs_logits_bwd", &logprobs_logits_bwd_cpu);
  m.impl("logprobs_hidden_fwd", &logprobs_hidden_fwd_cpu);
  m.impl("logprobs_hidden_bwd", &logprobs_hidden_bwd_cpu);
}

}  // namespace lightning_rl
