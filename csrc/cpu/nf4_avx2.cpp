// AVX2 + FMA NF4 kernels, two lookups of the 16 code values (bindings.cpp picks one per vendor):
// - vpermps ("avx2-vpermps"): the table does not fit one 8-lane permute, so a lookup is two
//   permutes (codes 0-7 and 8-15) and a blend on bit 3 of the index. Per 32 weights: 4 broadcast
//   loads, 4 variable shifts, 8 permutes, 4 shifts, 4 blends. Widening the bytes with vpmovzxbd
//   (2 more shuffles and 2 more shifts) took 1.4-1.7 ms at M = 1, 4096 x 4096, against 0.97-1.01
//   ms this way (AMD EPYC Zen 4, 2 threads, 8 cold copies, interleaved). Intel cores issue every
//   shuffle on one port, so the fewest shuffles win there.
// - vpshufb ("avx2-vpshufb"): a 16-entry byte table per 128-bit lane is exactly a 4-bit lookup;
//   one vpshufb per byte plane of the float32 values (4) and two rounds of unpacks (8) give 32
//   weights, all in-lane shuffles, which AMD cores issue on two pipes, against lane-crossing
//   permutes at one a cycle on Zen 4. llvm-mca 14 on the loop of lookup, scale and FMA, cycles
//   per 32 weights, vpermps against vpshufb: Zen 3 model 16 against 10 (a vpermps is 2 uops
//   there), Skylake and Alder Lake models 10 against 12 (one shuffle port); its Zen 2 model
//   leaves vpermps unmodelled. The scale is then a multiply per vector, which the M <= 2 walk
//   takes out of the loop (segment_codes in nf4_cpu_impl.h). Zen 4, M = 1, 4096 x 4096, 2
//   threads, cold, against vpermps in one process: 0.77x-0.80x the time (the layer 0.81x), M = 2
//   0.82x, M = 4 to 16 0.95x-1.08x (noise), INT4 0.93x, double quantization 0.89x.
#include <immintrin.h>
#include <string.h>

#include "nf4_cpu_impl.h"
#include "panel_avx2.h"

namespace lorakern {
namespace cpu {
namespace {

template <bool kBytes>
struct Avx2Vec {
    using vec = __m256;
    static constexpr int W = 8;
    static constexpr int kRegs = 16;  // ymm0-15
    static constexpr bool kScaleAfter = kBytes;
    static constexpr bool kCodes64 = kBytes;
    __m256 lut_lo, lut_hi;
    __m256i plane[4];  // byte k of each of the 16 code values, in both 128-bit lanes (kBytes)
    // One V is made per piece of every loop; the NF4 table's planes are built once, a custom
    // table's (INT4) per V.
    explicit Avx2Vec(const float* code = nullptr) {
        alignas(32) static const float table[16] = {LK_NF4_VALUES};
        const float* t = code ? code : table;
        lut_lo = _mm256_loadu_ps(t);
        lut_hi = _mm256_loadu_ps(t + 8);
        if constexpr (kBytes) {
            static const BytePlanes nf4(table);
            set_planes(code ? BytePlanes(code) : nf4);
        }
    }
    struct BytePlanes {
        alignas(16) uint8_t bytes[4][16];  // bytes[k][i]: byte k of value i
        explicit BytePlanes(const float* t) {
            for (int i = 0; i < 16; ++i) {
                uint32_t u;
                memcpy(&u, t + i, 4);
                for (int k = 0; k < 4; ++k) bytes[k][i] = static_cast<uint8_t>(u >> (8 * k));
            }
        }
        __m128i load(int k) const { return _mm_load_si128(reinterpret_cast<const __m128i*>(bytes[k])); }
    };
    void set_planes(const BytePlanes& b) {
        for (int k = 0; k < 4; ++k) plane[k] = _mm256_broadcastsi128_si256(b.load(k));
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
    // Permutes: the block's 16 values (code * scale + shift). Bytes: scale and shift themselves,
    // applied after the lookup (an fma, one rounding as the table's; shift -0.0 for a plain scale,
    // so that code * scale + -0.0 keeps the product's bits, its zeros' signs included).
    struct Table {
        __m256 lo, hi;  // permutes: the values of codes 0-7 and 8-15; bytes: scale and shift
    };
    Table scaled(float scale) const {
        const __m256 s = _mm256_set1_ps(scale);
        if (kBytes) return {s, _mm256_set1_ps(-0.0f)};
        return {_mm256_mul_ps(lut_lo, s), _mm256_mul_ps(lut_hi, s)};
    }
    Table affine(float scale, float shift) const {
        const __m256 s = _mm256_set1_ps(scale), c = _mm256_set1_ps(shift);
        if (kBytes) return {s, c};
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
    // Permutes: weights in order, so x needs no permuting. Bytes: the 16 bytes in both lanes, the
    // low nibbles (odd weights) in lane 0 and the high ones (even weights) in lane 1; a vpshufb
    // per byte plane looks 32 codes up, and two rounds of unpacks put each float's 4 bytes
    // together: position 8g + l of the output comes from lane position 4g + l (l < 4) or
    // 16 + 4g + l - 4 (l >= 4).
    static int lane_source(int pos) {
        if (!kBytes) return pos;
        const int g = pos / 8, l = pos % 8;
        const int lane_pos = l < 4 ? 4 * g + l : 16 + 4 * g + (l - 4);
        return lane_pos < 16 ? 2 * lane_pos + 1 : 2 * (lane_pos - 16);
    }
    __attribute__((always_inline)) void decode32_split(const uint8_t* p, const Table& t, vec* out) const {
        if (!kBytes) {
            for (int g = 0; g < 4; ++g) out[g] = lookup32(indices8(p + 4 * g), t);
            return;
        }
        decode32_codes(p, out);
        for (int g = 0; g < 4; ++g) out[g] = _mm256_fmadd_ps(out[g], t.lo, t.hi);
    }
    // The 32 code values alone (bytes lookup), in decode32_split's order.
    __attribute__((always_inline)) void decode32_codes(const uint8_t* p, vec* out) const {
        const __m256i b = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
        codes_of(_mm256_and_si256(_mm256_srlv_epi32(b, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)),
                                  _mm256_set1_epi8(0x0F)),
                 out);
    }
    // The 64 code values of 32 packed bytes (bytes lookup), in lane_source64's order: positions 0-31
    // from the low nibbles (bytes 0-15 in lane 0, 16-31 in lane 1), 32-63 from the high ones. One
    // 32-byte load and one shift (a vpmulhuw: the multiply pipes, not the two shuffle pipes the
    // lookup is bound by) per 64 weights, against a broadcast and a vpsrlvd per 32. Zen 3, one
    // core, a loop of the M <= 2 walk (a pair of rows, 4096 columns, L2): 7.6-7.7 cycles per 32
    // weights against 8.9-9.0 with decode32_codes (a vpsrlw for the shift: 8.2).
    // One half a call, into out[0..3]: half 0 positions 0-31, half 1 positions 32-63 (so that one
    // half's vectors are live at a time: decoding both before the FMAs took 1.15x the time).
    __attribute__((always_inline)) void decode64_codes(const uint8_t* p, int half, vec* out) const {
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
        const __m256i low4 = _mm256_set1_epi8(0x0F);
        if (half == 0)
            codes_of(_mm256_and_si256(b, low4), out);
        else
            codes_of(_mm256_and_si256(_mm256_mulhi_epu16(b, _mm256_set1_epi16(0x1000)), low4), out);  // b >> 4
    }
    // The weight (0-63) at position pos of decode64_codes' order.
    static int lane_source64(int pos) {
        const int q = pos % 32, g = q / 8, l = q % 8;
        const int byte = 16 * (l / 4) + 4 * g + l % 4;
        return 2 * byte + (pos < 32 ? 1 : 0);
    }
    // The code values of the 32 indices in idx (bytes 0-15 of each lane; lane position i of
    // output position 8g + l: 4g + l % 4 in lane l / 4).
    __attribute__((always_inline)) void codes_of(__m256i idx, vec* out) const {
        const __m256i q0 = _mm256_shuffle_epi8(plane[0], idx), q1 = _mm256_shuffle_epi8(plane[1], idx);
        const __m256i q2 = _mm256_shuffle_epi8(plane[2], idx), q3 = _mm256_shuffle_epi8(plane[3], idx);
        const __m256i l01 = _mm256_unpacklo_epi8(q0, q1), h01 = _mm256_unpackhi_epi8(q0, q1);
        const __m256i l23 = _mm256_unpacklo_epi8(q2, q3), h23 = _mm256_unpackhi_epi8(q2, q3);
        out[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(l01, l23));
        out[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(l01, l23));
        out[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(h01, h23));
        out[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(h01, h23));
    }
    // out[k] = code[q[k]] * a + off (mul_add_rn: two roundings, as block_scale), 8 at a time; returns how many.
    int64_t nested_scales(const uint8_t* q, const float* code, float a, float off, int64_t n, float* out) const {
        const __m256 va = _mm256_set1_ps(a), vo = _mm256_set1_ps(off);
        int64_t k = 0;
        for (; k + 8 <= n; k += 8) {
            const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + k)));
            _mm256_storeu_ps(out + k, _mm256_add_ps(_mm256_mul_ps(_mm256_i32gather_ps(code, idx, 4), va), vo));
        }
        return k;
    }
    void decode32(const uint8_t* p, vec scale, vec* out) const {
        for (int g = 0; g < 4; ++g) out[g] = _mm256_mul_ps(lookup32(indices8(p + 4 * g), {lut_lo, lut_hi}), scale);
    }
};

}  // namespace

Kernels avx2_kernels() { return impl::kernels<Avx2Vec<true>>(); }
Kernels avx2_permute_kernels() { return impl::kernels<Avx2Vec<false>>(); }

}  // namespace cpu
}  // namespace lorakern
