// AVX2 + FMA NF4 kernels. The 16-entry table does not fit one 8-lane permute, so a lookup is two
// permutes (codes 0-7 and 8-15) and a blend on bit 3 of the index.
#include <immintrin.h>

#include "nf4_cpu_impl.h"

namespace lorakern {
namespace cpu {
namespace {

struct Avx2Vec {
    using vec = __m256;
    static constexpr int W = 8;
    __m256 lut_lo, lut_hi;
    __m128i low_nibble;
    explicit Avx2Vec(const float* code = nullptr) {
        alignas(32) static const float table[16] = {LK_NF4_VALUES};
        const float* t = code ? code : table;
        lut_lo = _mm256_loadu_ps(t);
        lut_hi = _mm256_loadu_ps(t + 8);
        low_nibble = _mm_set1_epi8(0x0F);
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
    vec lookup(__m128i idx8) const { return lookup32(_mm256_cvtepu8_epi32(idx8), {lut_lo, lut_hi}); }
    // Index in the low 4 bits of each lane (higher bits ignored): permutes read bits 0-2, the blend
    // reads bit 3 moved to the sign.
    vec lookup32(__m256i idx, const Table& t) const {
        const __m256 lo = _mm256_permutevar8x32_ps(t.lo, idx);
        const __m256 hi = _mm256_permutevar8x32_ps(t.hi, idx);
        return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
    }
    // out = [weights 0,2..14], [1,3..15], [16,18..30], [17,19..31]: high / low nibbles of the same
    // widened bytes, no unpacks.
    static int lane_source(int pos) { return 16 * (pos / 16) + 2 * (pos % 8) + (pos / 8) % 2; }
    void decode32_split(const uint8_t* p, const Table& t, vec* out) const {
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
        const __m256i d0 = _mm256_cvtepu8_epi32(b);
        const __m256i d1 = _mm256_cvtepu8_epi32(_mm_srli_si128(b, 8));
        out[0] = lookup32(_mm256_srli_epi32(d0, 4), t);
        out[1] = lookup32(d0, t);
        out[2] = lookup32(_mm256_srli_epi32(d1, 4), t);
        out[3] = lookup32(d1, t);
    }
    void decode32(const uint8_t* p, vec scale, vec* out) const {
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), low_nibble);
        const __m128i lo = _mm_and_si128(b, low_nibble);
        const __m128i e0 = _mm_unpacklo_epi8(hi, lo);  // elements 0..15, in order
        const __m128i e1 = _mm_unpackhi_epi8(hi, lo);  // elements 16..31
        out[0] = _mm256_mul_ps(lookup(e0), scale);
        out[1] = _mm256_mul_ps(lookup(_mm_srli_si128(e0, 8)), scale);
        out[2] = _mm256_mul_ps(lookup(e1), scale);
        out[3] = _mm256_mul_ps(lookup(_mm_srli_si128(e1, 8)), scale);
    }
};

}  // namespace

Kernels avx2_kernels() { return impl::kernels<Avx2Vec>(); }

}  // namespace cpu
}  // namespace lorakern
