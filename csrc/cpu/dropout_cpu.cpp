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

static inline __attribute__((always_inline)) uint32_t fmix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x85EBCA6Bu;
    x ^= x >> 13;
    x *= 0xC2B2AE35u;
    return x ^ (x >> 16);
}

// One row's stretch [k0, k1) whose element indices share their high 32 bits (so one key): the
// hash is then 32-bit integer work the compiler vectorizes (vpmulld), ~0.3 ns an element with
// AVX2 against ~5 ns for the 64-bit index form per element. target_clones: an AVX-512, an AVX2
// and a baseline body in the one binary, picked at load time by the CPU (this file is built for
// the baseline ISA like every file but the NF4 kernels).
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define LORAKERN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LORAKERN_CLONES
#endif

template <typename T>
LORAKERN_CLONES void dropout_stretch(const T* __restrict x, T* __restrict out, int64_t n, uint32_t lo0, uint32_t key,
                                     uint32_t threshold, T s) {
    for (int64_t k = 0; k < n; ++k) {
        const uint32_t bits = fmix32(fmix32((lo0 + static_cast<uint32_t>(k)) ^ key) + key) >> 8;
        out[k] = x[k] * (bits >= threshold ? s : T(0));  // x * 0: NaN and -0 as torch
    }
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
            const uint64_t first = static_cast<uint64_t>(m) * static_cast<uint64_t>(cols);
            for (int64_t k = 0; k < cols;) {  // split where the index crosses a multiple of 2**32
                const uint64_t i = first + static_cast<uint64_t>(k);
                const uint64_t room = (uint64_t{1} << 32) - (i & 0xFFFFFFFFu);
                const int64_t n = static_cast<int64_t>(std::min<uint64_t>(room, static_cast<uint64_t>(cols - k)));
                const uint32_t key = fmix32(seed ^ (static_cast<uint32_t>(i >> 32) * 0x9E3779B9u));
                dropout_stretch(x + m * x_stride + k, out + m * cols + k, n, static_cast<uint32_t>(i), key, threshold,
                                s);
                k += n;
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
