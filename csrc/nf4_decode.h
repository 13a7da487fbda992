// NF4 decode shared by the CPU and CUDA code: the code table, the per-block scale (with double
// quantization), and float -> bf16 / fp16 rounding. Torch-free: plain pointers and sizes.
//
// Layout (bitsandbytes'): element i of the flattened weight lives in byte i/2, high nibble when i
// is even; its scale is block i/blocksize. With double quantization the scale itself is
// code2[q[b]] * absmax2[b/256] + offset, rounded after the multiply and after the add (as
// bitsandbytes computes it: no fused multiply-add, hence __fmul_rn/__fadd_rn on the device and
// -ffp-contract=off on the host).
#pragma once

#include <stdint.h>
#include <string.h>

// Internal linkage on the host: the CPU kernels' translation units are compiled with different -m
// flags (scalar, AVX2, AVX-512), and an inline function with external linkage that one of them does
// not inline is merged at link time into one copy, possibly one with AVX instructions that the
// scalar path then calls on a CPU without them. LK_HD_ALWAYS for the few-instruction ones the
// loops call per block or per weight: block_scale left out of line in the AVX2 path (when its
// caller grew) took double quantization at M = 1 and 2 to 1.13x-1.38x the time.
#if defined(__CUDACC__)
#define LK_HD __host__ __device__ __forceinline__
#define LK_HD_ALWAYS __host__ __device__ __forceinline__
#else
#define LK_HD static inline
#define LK_HD_ALWAYS static inline __attribute__((always_inline))
#endif

namespace lorakern {

// The 16 NF4 values (QLoRA): quantiles of N(0, 1) scaled to [-1, 1], with an exact 0 at index 7.
#define LK_NF4_VALUES                                                                              \
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,                     \
        -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,                \
        0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,   \
        0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f

constexpr int kNestedBlocksize = 256;

// Everything that describes one NF4 weight. absmax is float32 [n_blocks], or, when nested_absmax
// is non-null, uint8 codes [n_blocks] into nested_code [256] scaled by nested_absmax [n_blocks/256]
// plus *offset.
struct Nf4Weight {
    const uint8_t* packed;
    const void* absmax;
    const float* nested_absmax;
    const float* nested_code;
    const float* offset;
    int64_t blocksize;
    int block_shift;  // log2(blocksize): a 64-bit divide per lookup costs ~40 cycles on x86
    int64_t rows;  // out_features
    int64_t cols;  // in_features
    // The 16 values a code stands for before its block's scale, or null for NF4's (the INT4 base
    // passes 0..15, with its zero points as the shift below); the CPU and CUDA kernels read either.
    const float* code = nullptr;
    // Per block, added to every decoded weight of the block (float32 [n_blocks], or null): the INT4
    // base's -scale * zero, so a block's table is code * scale + shift (one fma per entry).
    const float* shift = nullptr;
    // Plain scales (and shifts) of block b at absmax[b * scale_stride]: the INT4 base interleaves
    // (scale, shift) pairs, so the walk reads one stream of block parameters, not two (M = 1,
    // 4096 x 4096, Zen 5: two 1 MB streams cost 1.3x NF4's time, one ~1.1x).
    int64_t scale_stride = 1;
    // The INT4 base on the CPU, compact: block b's parameters are the 6 bytes at half_params + 6 b,
    // its shift (float32) and then its scale as an IEEE half (a normal one: a GPTQ checkpoint's
    // scales, or INT4Weight.quantize's, which rounds them to half). Read in place of absmax and
    // shift (which must be set, to this address). At G = 64 the weight is then 4.75 bits a weight
    // against 5 with float32 pairs, NF4's 4.5 (M = 1 reads the weight once: its time follows).
    const uint8_t* half_params = nullptr;
};

#if !defined(__CUDACC__)
// Block parameters of the compact INT4 layout (rec: the block's 6 bytes; any alignment).
LK_HD_ALWAYS float half_params_shift(const uint8_t* rec) {
    float f;
    memcpy(&f, rec, 4);
    return f;
}

// A normal IEEE half -> float32 (exact): the exponent rebiased from 15 to 127, the mantissa widened.
LK_HD_ALWAYS float half_params_scale(const uint8_t* rec) {
    uint16_t h;
    memcpy(&h, rec + 4, 2);
    const uint32_t u = (uint32_t(h & 0x8000u) << 16) | ((uint32_t(h & 0x7FFFu) + (112u << 10)) << 13);
    float f;
    memcpy(&f, &u, 4);
    return f;
}
#endif

LK_HD_ALWAYS float block_shift_value(const Nf4Weight& w, int64_t b) {
#if !defined(__CUDACC__)
    if (w.half_params) return half_params_shift(w.half_params + 6 * b);
#endif
    return w.shift[b * w.scale_stride];
}

LK_HD_ALWAYS float nf4_value(int index) {
    const float table[16] = {LK_NF4_VALUES};
    return table[index & 0xF];
}

LK_HD_ALWAYS float code_value(const Nf4Weight& w, int index) { return w.code ? w.code[index & 0xF] : nf4_value(index); }

LK_HD_ALWAYS float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
}

LK_HD_ALWAYS float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fadd_rn(a, b);
#else
    return a + b;
#endif
}

// a * b + c, rounded after the multiply and again after the add (never one fma): how the references
// compute INT4's code * scale + shift and double quantization's code2 * absmax2 + offset.
LK_HD_ALWAYS float mul_add_rn(float a, float b, float c) { return add_rn(mul_rn(a, b), c); }

// The float32 scale of block b.
LK_HD_ALWAYS float block_scale(const Nf4Weight& w, int64_t b) {
#if !defined(__CUDACC__)
    if (w.half_params) return half_params_scale(w.half_params + 6 * b);
#endif
    if (w.nested_absmax == nullptr) return static_cast<const float*>(w.absmax)[b * w.scale_stride];
    const uint8_t q = static_cast<const uint8_t*>(w.absmax)[b];
    return mul_add_rn(w.nested_code[q], w.nested_absmax[b >> 8], *w.offset);  // b / 256
}

// The float32 scale of the block holding flattened element f.
LK_HD_ALWAYS float scale_of(const Nf4Weight& w, int64_t f) { return block_scale(w, f >> w.block_shift); }

// The 4-bit code index of flattened element i.
LK_HD_ALWAYS int nf4_index(const uint8_t* packed, int64_t i) {
    const uint8_t byte = packed[i >> 1];
    return (i & 1) ? (byte & 0xF) : (byte >> 4);
}

// float -> bfloat16 bits, round to nearest even (torch's .to(torch.bfloat16)); NaN stays NaN.
LK_HD uint16_t float_to_bf16_bits(float f) {
    union { float f; uint32_t u; } v;
    v.f = f;
    if ((v.u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((v.u >> 16) | 0x40u);
    v.u += 0x7FFFu + ((v.u >> 16) & 1u);
    return static_cast<uint16_t>(v.u >> 16);
}

// float -> IEEE half bits, round to nearest even, with subnormals and overflow to inf.
LK_HD uint16_t float_to_half_bits(float f) {
    union { float f; uint32_t u; } v;
    v.f = f;
    const uint32_t sign = (v.u >> 16) & 0x8000u;
    const uint32_t absu = v.u & 0x7FFFFFFFu;
    if (absu > 0x7F800000u) return static_cast<uint16_t>(sign | 0x7E00u);  // NaN
    if (absu >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // rounds to >= 65520: inf
    if (absu < 0x38800000u) {  // below 2^-14: a subnormal half (or zero)
        if (absu < 0x33000000u) return static_cast<uint16_t>(sign);  // below half the smallest subnormal
        const uint32_t exp = absu >> 23;
        const uint32_t mant = (absu & 0x7FFFFFu) | 0x800000u;
        const uint32_t shift = 126u - exp;  // 14 + (127 - exp) - 10 - 1 + 1
        uint32_t half = mant >> shift;
        const uint32_t rem = mant & ((1u << shift) - 1u);
        const uint32_t halfway = 1u << (shift - 1u);
        if (rem > halfway || (rem == halfway && (half & 1u))) half += 1u;
        return static_cast<uint16_t>(sign | half);
    }
    uint32_t h = ((absu >> 13) - (112u << 10));  // rebias the exponent 127 -> 15
    const uint32_t rem = absu & 0x1FFFu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h += 1u;  // may carry into the exponent: fine
    return static_cast<uint16_t>(sign | h);
}

// bfloat16 bits -> float32 (exact).
LK_HD float bf16_bits_to_float(uint16_t b) {
    union { uint32_t u; float f; } v;
    v.u = uint32_t(b) << 16;
    return v.f;
}

// IEEE half bits -> float32 (exact, subnormals, inf and NaN included), without branches so a loop
// of it vectorizes: a normal half's exponent and mantissa are moved into a float's fields and
// the exponent rebiased by a multiply by 2^-112 (224 added first maps 31, inf / NaN, to 255); a
// subnormal's mantissa m becomes the low bits of 0.5 and 0.5 is subtracted: m * 2^-24, exact. No
// operation sees a subnormal float, so flush-to-zero modes change nothing.
LK_HD float half_bits_to_float(uint16_t h) {
    union { uint32_t u; float f; } w, normal, sub, out;
    const uint32_t two_w = (uint32_t(h) << 17);  // exponent and mantissa at the top, sign dropped
    w.u = (two_w >> 4) + (0xE0u << 23);
    normal.f = w.f * 0x1p-112f;
    w.u = (two_w >> 17) | (126u << 23);
    sub.f = w.f - 0.5f;
    out.u = (uint32_t(h & 0x8000u) << 16) | (two_w < (1u << 27) ? sub.u : normal.u);
    return out.f;
}

enum OutDtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

}  // namespace lorakern
