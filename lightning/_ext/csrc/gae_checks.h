// Argument checks of the GAE op, shared by its CPU and CUDA entry points.
#pragma once

#include <optional>

#include "checks.h"

namespace lightning_rl {

// rewards [T] floating; values [T] of the same dtype; mask [T] bool/uint8; all contiguous
// and on `dev`.
inline void check_gae_inputs(const at::Tensor& rewards, const std::optional<at::Tensor>& values,
                             const std::optional<at::Tensor>& mask, c10::DeviceType dev) {
  CHECK_DEVICE(rewards, dev);
  CHECK_DIM(rewards, 1);
  CHECK_CONTIGUOUS(rewards);
  CHECK_FLOATING(rewards);
  const int64_t T = rewards.numel();
  if (values.has_value()) {
    CHECK_DEVICE(*values, dev);
    CHECK_CONTIGUOUS(*values);
    CHECK_SHAPE(*values, T);
    TORCH_CHECK(values->scalar_type() == rewards.scalar_type(),
                "values must have the dtype of rewards (", rewards.scalar_type(), "), got ",
                values->scalar_type());
  }
  if (mask.has_value()) {
    CHECK_DEVICE(*mask, dev);
    CHECK_CONTIGUOUS(*mask);
    CHECK_SHAPE(*mask, T);
    CHECK_MASK(*mask);
  }
}

}  // namespace lightning_rl
