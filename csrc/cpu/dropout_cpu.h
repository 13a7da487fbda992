// Counter-based dropout on the CPU (see dropout_cpu.cpp and lorakern/dropout.py).
#pragma once

#include <cstdint>

namespace lorakern {
namespace cpu {

// out[m, k] = keep(m * cols + k) ? x[m * x_stride + k] * scale : 0, for a row-major [rows, cols]
// out; dtype 0: float32, 1: float64. keep(i): the 24-bit hash of (seed, i) >= threshold.
void dropout(const void* x, void* out, int dtype, int64_t rows, int64_t cols, int64_t x_stride, uint32_t seed,
             uint32_t threshold, double scale, int threads);

}  // namespace cpu
}  // namespace lorakern
