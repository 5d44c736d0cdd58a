// Schemas of every lightning/_ext op. Implementations register per device in *_cpu.cpp and
// cuda/*_cuda.cpp with TORCH_LIBRARY_IMPL; the Python side calls torch.ops.lightning_rl.<op>.
// Semantics: lightning/kernels/<op>/reference.py is the specification of each op.
#include <torch/library.h>

TORCH_LIBRARY(lightning_rl, m) {
  // GAE / discounted returns over packed sequences -> (advantages[T], returns[T]) fp32.
  m.def(
      "gae(Tensor rewards, Tensor? values, Tensor? mask, Tensor cu_seqlens, float gamma, "
      "float lam) -> (Tensor, Tensor)");
  // Per-sample statistics of dense group ids 0..G-1 -> (mean[N] fp32, std[N] fp32, count[N] i64).
  m.def("group_stats(Tensor scores, Tensor group_ids, int num_groups) -> (Tensor, Tensor, Tensor)");
  // Masked whitening over all elements -> whitened[T] fp32 (0 where mask is 0).
  m.def("masked_whiten(Tensor x, Tensor? mask, bool shift_mean, float eps) -> Tensor");
  // Log-probs of token_ids under softmax(logits / temperature) -> (logprobs, lse, entropy).
  m.def(
      "logprobs_logits_fwd(Tensor logits, Tensor token_ids, float temperature, bool entropy) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "logprobs_logits_bwd(Tensor logits, Tensor token_ids, Tensor lse, Tensor entropy, "
      "Tensor? grad_logprobs, Tensor? grad_entropy, float temperature) -> Tensor");
  // Same with logits = hidden @ weight.T computed chunk by chunk (never [N, V] at once).
  m.def(
      "logprobs_hidden_fwd(Tensor hidden, Tensor weight, Tensor token_ids, float temperature, "
      "bool entropy, int chunk_tokens, int chunk_vocab) -> (Tensor, Tensor, Tensor)");
  m.def(
      "logprobs_hidden_bwd(Tensor hidden, Tensor weight, Tensor token_ids, Tensor lse, "
      "Tensor entropy, Tensor? grad_logprobs, Tensor? grad_entropy, float temperature, "
      "int chunk_tokens, int chunk_vocab, bool need_hidden, bool need_weight) "
      "-> (Tensor, Tensor)");
}
