// AVX2 + FMA NF4 kernels. The 16-entry table does not fit one 8-lane permute, so a lookup is two
// permutes (codes 0-7 and 8-15) and a blend on bit 3 of the index. Per 32 weights: 4 broadcast
// loads, 4 variable shifts, 8 permutes, 4 shifts, 4 blends. Widening the bytes with vpmovzxbd
// (2 more shuffles and 2 more shifts) took 1.4-1.7 ms at M = 1, 4096 x 4096, against 0.97-1.01 ms
// this way (AMD EPYC Zen 4, 2 threads, 8 cold copies, interleaved).
#include <immintrin.h>
#include <string.h>

#include "nf4_cpu_impl.h"
#include "panel_avx2.h"

namespace lorakern {
namespace cpu {
namespace {

struct Avx2Vec {
    using vec = __m256;
    static constexpr int W = 8;
    static constexpr int kRegs = 16;  // ymm0-15
    __m256 lut_lo, lut_hi;
    explicit Avx2Vec(const float* code = nullptr) {
        alignas(32) static const float table[16] = {LK_NF4_VALUES};
        const float* t = code ? code : table;
        lut_lo = _mm256_loadu_ps(t);
        lut_hi = _mm256_loadu_ps(t + 8);
    }
    vec zero() const { return _mm256_setzero_ps(); }
    vec in_register(vec a) const {
        __asm__("" : "+v"(a));
        return a;
    }
    vec set1(float f) const { return _mm256_set1_ps(f); }
    vec load(const float* p) const { return _mm256_loadu_ps(p); }
    void store(float* p, vec a) const { _mm256_storeu_ps(p, a); }
    vec add(vec a, vec b) const { return _mm256_add_ps(a, b); }
    vec fmadd(vec a, vec b, vec c) const { return _mm256_fmadd_ps(a, b, c); }
    float hsum(vec a) const {
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        s = _mm_add_ss(s, _mm_movehdup_ps(s));
        return _mm_cvtss_f32(s);
    }
    // out[j * ld + c] = B[c * ldb + j] (c < cols, j < r): the LoRA terms' B panel.
    void panel(const float* B, int64_t ldb, int64_t cols, int64_t r, float* out, int64_t ld) const {
        transpose_panel_avx2(B, ldb, cols, r, out, ld);
    }
    struct Table {
        __m256 lo, hi;
    };
    Table scaled(float scale) const {
        const __m256 s = _mm256_set1_ps(scale);
        return {_mm256_mul_ps(lut_lo, s), _mm256_mul_ps(lut_hi, s)};
    }
    Table affine(float scale, float shift) const {
        const __m256 s = _mm256_set1_ps(scale), c = _mm256_set1_ps(shift);
        return {_mm256_fmadd_ps(lut_lo, s, c), _mm256_fmadd_ps(lut_hi, s, c)};
    }
    // Index in the low 4 bits of each lane (higher bits ignored): permutes read bits 0-2, the blend
    // reads bit 3 moved to the sign.
    vec lookup32(__m256i idx, const Table& t) const {
        const __m256 lo = _mm256_permutevar8x32_ps(t.lo, idx);
        const __m256 hi = _mm256_permutevar8x32_ps(t.hi, idx);
        return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
    }
    // Weights 8g .. 8g + 7 (bytes 4g .. 4g + 3) as lookup indices, in order: the 4 bytes broadcast
    // to every lane (a load, no shuffle), lane j shifted right to its nibble (element 2i is the
    // high nibble of byte i), higher bits left for the lookup to ignore. Widening the 16 bytes
    // with vpmovzxbd instead costs two more shuffles per 32 weights, and on Intel the permutes
    // and the widening all go to the one shuffle port (port 5): 10 shuffles per 32 weights there,
    // 8 this way.
    static __m256i indices8(const uint8_t* p) {
        int32_t word;
        memcpy(&word, p, 4);
        return _mm256_srlv_epi32(_mm256_set1_epi32(word), _mm256_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24));
    }
    // Weights in order, so x needs no permuting.
    static int lane_source(int pos) { return pos; }
    void decode32_split(const uint8_t* p, const Table& t, vec* out) const {
        for (int g = 0; g < 4; ++g) out[g] = lookup32(indices8(p + 4 * g), t);
    }
    void decode32(const uint8_t* p, vec scale, vec* out) const {
        for (int g = 0; g < 4; ++g) out[g] = _mm256_mul_ps(lookup32(indices8(p + 4 * g), {lut_lo, lut_hi}), scale);
    }
};

}  // namespace

Kernels avx2_kernels() { return impl::kernels<Avx2Vec>(); }

}  // namespace cpu
}  // namespace lorakern
