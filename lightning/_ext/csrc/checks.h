// Argument checks shared by every op of lightning/_ext (flash-attention's flash_api.cpp style).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#define CHECK_DEVICE(x, dev)                                                              \
  TORCH_CHECK((x).device().type() == (dev), #x " must be on ", (dev), ", got ", (x).device())
#define CHECK_CPU(x) CHECK_DEVICE(x, c10::DeviceType::CPU)
#define CHECK_CUDA(x) CHECK_DEVICE(x, c10::DeviceType::CUDA)
#define CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define CHECK_DIM(x, d) \
  TORCH_CHECK((x).dim() == (d), #x " must be ", (d), "-D, got shape ", (x).sizes())
#define CHECK_SHAPE(x, ...)                                                                 \
  TORCH_CHECK((x).sizes() == at::IntArrayRef({__VA_ARGS__}), #x " must have shape (" #__VA_ARGS__ \
              "), got ", (x).sizes())
#define CHECK_FLOATING(x)                                                                  \
  TORCH_CHECK((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kHalf ||         \
                  (x).scalar_type() == at::kBFloat16,                                      \
              #x " must be float32, float16 or bfloat16, got ", (x).scalar_type())
#define CHECK_MASK(x)                                                                      \
  TORCH_CHECK((x).scalar_type() == at::kBool || (x).scalar_type() == at::kByte,            \
              #x " must be bool or uint8, got ", (x).scalar_type())
#define CHECK_INDEX(x)                                                                     \
  TORCH_CHECK((x).scalar_type() == at::kLong || (x).scalar_type() == at::kInt,             \
              #x " must be int32 or int64, got ", (x).scalar_type())
