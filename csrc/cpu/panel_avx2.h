// B panel transposition with AVX2 shuffles, for the AVX2 and AVX-512 kernels (both have AVX2).
// Include after <immintrin.h>, from the ISA files only.
#pragma once

#include <stdint.h>

namespace lorakern {
namespace cpu {

// out[j * ld + c] = B[c * ldb + j] for c < cols, j < r: whole 8 x 8 blocks as 8 loads, 24
// shuffles and 8 stores (the scalar loop is one store per element: at decode, one row per adapter,
// it was ~2/3 of the LoRA terms' time), the edges element by element.
// static: the AVX2 and AVX-512 files each keep their own copy (a shared one could carry AVX-512
// instructions into the AVX2 path).
static inline void transpose_panel_avx2(const float* B, int64_t ldb, int64_t cols, int64_t r, float* out, int64_t ld) {
    const int64_t c8 = cols / 8 * 8, j8 = r / 8 * 8;
    for (int64_t c = 0; c < c8; c += 8) {
        for (int64_t j = 0; j < j8; j += 8) {
            const float* b = B + c * ldb + j;
            const __m256 r0 = _mm256_loadu_ps(b), r1 = _mm256_loadu_ps(b + ldb), r2 = _mm256_loadu_ps(b + 2 * ldb),
                         r3 = _mm256_loadu_ps(b + 3 * ldb), r4 = _mm256_loadu_ps(b + 4 * ldb),
                         r5 = _mm256_loadu_ps(b + 5 * ldb), r6 = _mm256_loadu_ps(b + 6 * ldb),
                         r7 = _mm256_loadu_ps(b + 7 * ldb);
            const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
            const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
            const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
            const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
            const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
            const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
            const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
            const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
            float* o = out + j * ld + c;
            _mm256_storeu_ps(o, _mm256_permute2f128_ps(u0, u4, 0x20));
            _mm256_storeu_ps(o + ld, _mm256_permute2f128_ps(u1, u5, 0x20));
            _mm256_storeu_ps(o + 2 * ld, _mm256_permute2f128_ps(u2, u6, 0x20));
            _mm256_storeu_ps(o + 3 * ld, _mm256_permute2f128_ps(u3, u7, 0x20));
            _mm256_storeu_ps(o + 4 * ld, _mm256_permute2f128_ps(u0, u4, 0x31));
            _mm256_storeu_ps(o + 5 * ld, _mm256_permute2f128_ps(u1, u5, 0x31));
            _mm256_storeu_ps(o + 6 * ld, _mm256_permute2f128_ps(u2, u6, 0x31));
            _mm256_storeu_ps(o + 7 * ld, _mm256_permute2f128_ps(u3, u7, 0x31));
        }
        for (int64_t i = c; i < c + 8; ++i)
            for (int64_t j = j8; j < r; ++j) out[j * ld + i] = B[i * ldb + j];
    }
    for (int64_t i = c8; i < cols; ++i)
        for (int64_t j = 0; j < r; ++j) out[j * ld + i] = B[i * ldb + j];
}

}  // namespace cpu
}  // namespace lorakern
