// AVX-512 NF4 kernels: the whole 16-entry table sits in one zmm register, so the lookup of 16
// weights is one vpermps.
#include <immintrin.h>

#include "nf4_cpu_impl.h"
#include "panel_avx2.h"

namespace lorakern {
namespace cpu {
namespace {

struct Avx512Vec {
    using vec = __m512;
    static constexpr int W = 16;
    static constexpr int kRegs = 32;  // zmm0-31
    static constexpr bool kScaleAfter = false;  // the lookup table carries the block's scale
    __m512 lut;
    __m128i low_nibble;
    explicit Avx512Vec(const float* code = nullptr) {
        alignas(64) static const float table[16] = {LK_NF4_VALUES};
        lut = _mm512_loadu_ps(code ? code : table);
        low_nibble = _mm_set1_epi8(0x0F);
    }
    vec zero() const { return _mm512_setzero_ps(); }
    vec in_register(vec a) const {
        __asm__("" : "+v"(a));
        return a;
    }
    vec set1(float f) const { return _mm512_set1_ps(f); }
    vec load(const float* p) const { return _mm512_loadu_ps(p); }
    void store(float* p, vec a) const { _mm512_storeu_ps(p, a); }
    vec add(vec a, vec b) const { return _mm512_add_ps(a, b); }
    vec fmadd(vec a, vec b, vec c) const { return _mm512_fmadd_ps(a, b, c); }
    float hsum(vec a) const { return _mm512_reduce_add_ps(a); }
    // out[j * ld + c] = B[c * ldb + j] (c < cols, j < r): the LoRA terms' B panel.
    void panel(const float* B, int64_t ldb, int64_t cols, int64_t r, float* out, int64_t ld) const {
        transpose_panel_avx2(B, ldb, cols, r, out, ld);
    }
    // out[0] = weights 0, 2, ..., 30 (high nibbles), out[1] = weights 1, 3, ..., 31 (low nibbles):
    // vpermps reads only the low 4 bits of each index, so the low nibble needs no mask.
    using Table = __m512;
    Table scaled(float scale) const { return _mm512_mul_ps(lut, _mm512_set1_ps(scale)); }
    Table affine(float scale, float shift) const {
        return _mm512_fmadd_ps(lut, _mm512_set1_ps(scale), _mm512_set1_ps(shift));
    }
    static int lane_source(int pos) { return pos < 16 ? 2 * pos : 2 * (pos - 16) + 1; }
    void decode32_split(const uint8_t* p, const Table& t, vec* out) const {
        const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
        out[0] = _mm512_permutexvar_ps(_mm512_srli_epi32(d, 4), t);
        out[1] = _mm512_permutexvar_ps(d, t);
    }
    // out[k] = code[q[k]] * a + off (mul_add_rn: two roundings, as block_scale), 16 at a time; returns how many.
    int64_t nested_scales(const uint8_t* q, const float* code, float a, float off, int64_t n, float* out) const {
        const __m512 va = _mm512_set1_ps(a), vo = _mm512_set1_ps(off);
        int64_t k = 0;
        for (; k + 16 <= n; k += 16) {
            const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k)));
            _mm512_storeu_ps(out + k, _mm512_add_ps(_mm512_mul_ps(_mm512_i32gather_ps(idx, code, 4), va), vo));
        }
        return k;
    }
    void decode32(const uint8_t* p, vec scale, vec* out) const {
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), low_nibble);
        const __m128i lo = _mm_and_si128(b, low_nibble);
        const __m512i e0 = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo));  // elements 0..15
        const __m512i e1 = _mm512_cvtepu8_epi32(_mm_unpackhi_epi8(hi, lo));  // elements 16..31
        out[0] = _mm512_mul_ps(_mm512_permutexvar_ps(e0, lut), scale);
        out[1] = _mm512_mul_ps(_mm512_permutexvar_ps(e1, lut), scale);
    }
};

}  // namespace

Kernels avx512_kernels() { return impl::kernels<Avx512Vec>(); }

}  // namespace cpu
}  // namespace lorakern
