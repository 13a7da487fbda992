// Counter-based dropout on the CPU: out = x * keep / (1 - p), keep a pure function of (seed,
// element index), bit for bit the mask of lorakern/dropout.py (and of the Triton kernels).
//
// Why native: the torch-op version of the hash is ~30 elementwise int64 passes over [M, K]; a
// training step with dropout regenerates the mask three times (forward, dA, dx), which made a CPU
// Llama step 3x slower than PEFT's stored mask. One pass here computes the hash in registers.
#include "dropout_cpu.h"

#include <algorithm>

#include "thread_pool.h"

namespace lorakern {
namespace cpu {
namespace {

inline uint32_t fmix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x85EBCA6Bu;
    x ^= x >> 13;
    x *= 0xC2B2AE35u;
    return x ^ (x >> 16);
}

template <typename T>
void dropout_rows(const T* x, T* out, int64_t rows, int64_t cols, int64_t x_stride, uint32_t seed,
                  uint32_t threshold, double scale, int threads) {
    // Rows in pieces of >= 64k elements: below that one thread is faster than waking another.
    const int64_t per = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(cols, 1));
    const int64_t pieces = (rows + per - 1) / per;
    const T s = static_cast<T>(scale);
    parallel_for(pieces, pieces > 1 ? threads : 1, [&](int64_t piece) {
        for (int64_t m = piece * per, end = std::min(rows, m + per); m < end; ++m) {
            const T* xr = x + m * x_stride;
            T* orow = out + m * cols;
            for (int64_t k = 0; k < cols; ++k) {
                const uint64_t i = static_cast<uint64_t>(m) * static_cast<uint64_t>(cols) + static_cast<uint64_t>(k);
                const uint32_t key = fmix32(seed ^ (static_cast<uint32_t>(i >> 32) * 0x9E3779B9u));
                const uint32_t bits = fmix32(fmix32(static_cast<uint32_t>(i) ^ key) + key) >> 8;
                orow[k] = xr[k] * (bits >= threshold ? s : T(0));  // x * 0: NaN and -0 as torch
            }
        }
    });
}

}  // namespace

void dropout(const void* x, void* out, int dtype, int64_t rows, int64_t cols, int64_t x_stride, uint32_t seed,
             uint32_t threshold, double scale, int threads) {
    if (dtype == 0) {
        dropout_rows(static_cast<const float*>(x), static_cast<float*>(out), rows, cols, x_stride, seed, threshold,
                     scale, threads);
    } else {
        dropout_rows(static_cast<const double*>(x), static_cast<double*>(out), rows, cols, x_stride, seed, threshold,
                     scale, threads);
    }
}

}  // namespace cpu
}  // namespace lorakern
