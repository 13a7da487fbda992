// Host entry points of the NF4 CUDA kernels (compiled by nvcc, called from bindings.cpp).
// Return 0 or a cudaError_t code; the stream is a cudaStream_t passed as an integer.
#pragma once

#include <stdint.h>

#include "../nf4_decode.h"

namespace lorakern {
namespace cuda {

// out [numel] (out_dtype) = the decoded weight, W_flat[0:numel).
int dequantize(const Nf4Weight& w, int64_t numel, void* out, int out_dtype, uintptr_t stream);
// y [M, rows] = x [M, cols] @ W^T; x, y contiguous, of dtype `dtype`, fp32 accumulation.
int gemv(const Nf4Weight& w, const void* x, int64_t M, void* y, int dtype, uintptr_t stream);
const char* error_string(int code);

}  // namespace cuda
}  // namespace lorakern
