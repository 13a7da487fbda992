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

// Several adapters over the base, one per row of x (serving many users' adapters at decode):
// y[m] = x[m] W^T + bias + s_a h[m] B_a^T with h[m] = x[m] A_a^T and a = index[m] (-1: the base
// alone). Device pointers: A_a [r_a, cols] and B_a [rows, r_a] contiguous in x's dtype (read where
// they lie, no stacking), bias [rows] in x's dtype or null, h a float32 scratch [M, r_max].
struct MultiLora {
    const int64_t* index = nullptr;    // [M]
    const uintptr_t* A = nullptr;      // [n] addresses
    const uintptr_t* B = nullptr;      // [n] addresses
    const int64_t* ranks = nullptr;    // [n]
    const float* scalings = nullptr;   // [n]
    const void* bias = nullptr;
    float* h = nullptr;
    int64_t r_max = 0;
};
int gemv_multi(const Nf4Weight& w, const void* x, int64_t M, void* y, int dtype, const MultiLora& lora,
               uintptr_t stream);
const char* error_string(int code);

}  // namespace cuda
}  // namespace lorakern
