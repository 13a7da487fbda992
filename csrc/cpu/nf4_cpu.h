// The NF4 CPU backend: dequantize and small-M matmul, one implementation per ISA
// (AVX-512, AVX2, plain C++), chosen at run time. Torch-free.
#pragma once

#include <stdint.h>

#include "../nf4_decode.h"

namespace lorakern {
namespace cpu {

// out[0:count] = W_flat[start:start+count] (decoded, in out_dtype). Parallel over threads.
using DequantizeFn = void (*)(const Nf4Weight& w, int64_t start, int64_t count, void* out, int out_dtype,
                              int threads);

// The LoRA term the forward adds as it writes each output, so the layer is one call:
// y = x W^T + bias + scaling * h B^T with h = x A^T [M, r] computed first and written to h.
// A [r, cols], B [rows, r], bias [rows] (or null), h [M, r]: float32, row-major, contiguous.
struct LoraTerm {
    const float* A;
    const float* B;
    const float* bias;
    float scaling;
    int64_t r;
    float* h;
    float* scaled_h = nullptr;  // the kernel's own: scaling * h, so the term joins the FMA accumulators
    // Several adapters, one per row (serving many users' adapters over one base): row m takes
    // adapter index[m] (-1: none), whose A [r_a, cols], B [rows, r_a] (float32 row-major, their
    // addresses in adapter_A / adapter_B), rank ranks[a] and scaling scalings[a] replace A, B, r
    // and scaling; r is then the largest rank and h [M, r] holds zeros past each row's r_a.
    const int64_t* index = nullptr;
    const uintptr_t* adapter_A = nullptr;
    const uintptr_t* adapter_B = nullptr;
    const int64_t* ranks = nullptr;
    const float* scalings = nullptr;
    // The adapters' row strides (elements; null: contiguous), read by the terms kernel alone
    // (LoraTermsFn): stacked adapters' views B[a, :, :r_a] have rows r_max apart.
    const int64_t* a_strides = nullptr;
    const int64_t* b_strides = nullptr;
    // QA-LoRA: A is [r, cols / pool] and sees x averaged over each group of pool columns times
    // cols / pool (PEFT's use_qalora), so h[m, j] = sum_g A[j, g] (cols / pool) mean_g(x[m]). 0: plain.
    int64_t pool = 0;
};

// Row m's adapter: its A, B, rank and scaling (rank 0 and null pointers for a row of no adapter).
struct RowAdapter {
    const float* A;
    const float* B;
    int64_t r;
    float scaling;
};

static inline RowAdapter row_adapter(const LoraTerm& t, int64_t m) {  // static: see LK_HD
    if (t.index == nullptr) return {t.A, t.B, t.r, t.scaling};
    const int64_t a = t.index[m];
    if (a < 0) return {nullptr, nullptr, 0, 0.0f};
    return {reinterpret_cast<const float*>(t.adapter_A[a]), reinterpret_cast<const float*>(t.adapter_B[a]), t.ranks[a],
            t.scalings[a]};
}

// transpose == false: y [M, rows] = x [M, cols] @ W^T (+ the LoRA term when lora is non-null)
// transpose == true:  y [M, cols] = x [M, rows] @ W        (the backward dX = dY W; lora must be null)
// x, y float32, row-major and contiguous. Reads each packed byte once per tile of up to 8 rows of x.
using MatmulFn = void (*)(const Nf4Weight& w, const float* x, int64_t M, float* y, bool transpose,
                          const LoraTerm* lora, int threads);

// y [M, N] += each row's LoRA term alone (lora.index, n adapters, their ranks up to lora.r; lora.A,
// B, h and bias unused): x [M, K] float32 with rows ldx apart, y float32 row-major and contiguous.
// For a base product computed elsewhere.
using LoraTermsFn = void (*)(const float* x, int64_t ldx, int64_t M, int64_t K, int64_t N, const LoraTerm& lora,
                             int64_t n, float* y, int threads);

// Conversions between float32 and x's dtype (OutDtype: float32, bfloat16, float16), n elements,
// one thread: load exact, store rounded to nearest even. For the kernels' half-precision callers.
using LoadFn = void (*)(const void* src, int64_t n, float* dst, int dtype);
using StoreFn = void (*)(const float* src, int64_t n, void* dst, int dtype);

// y [M, rows] = x [M, cols] @ W^T in bfloat16 dot products (+ the LoRA term when lora is non-null):
// x bfloat16 (raw bits) and xf, the same rows as float32 (the LoRA term's h reads them), row-major
// and contiguous; y float32. Each weight is its float32 value (what the float32 kernels multiply
// by) rounded to bfloat16, as a dequantize to bfloat16 gives it; products summed in float32. For
// the rows bf16_takes() names; null where the CPU has no AVX512-BF16.
constexpr int64_t kBf16Rows = 16;
constexpr int64_t kBf16Chunk = 128;
// Whether the weight is whole 128-column chunks of blocks of >= 64 columns: the walk of 1 to 4
// rows that decodes a chunk from one load (nf4_avx512.cpp). (static: a copy per ISA's file.)
static inline bool bf16_chunks(const Nf4Weight& w) {
    return w.cols % kBf16Chunk == 0 && w.blocksize >= 64 && w.cols % w.blocksize == 0;
}
// The rows matmul_bf16 takes: 1 to 16, cols % 32 == 0 and blocks of >= 32 columns (a step of 32
// in one block); 1 and 2 rows only on the chunk walk, where it is faster than the float32 kernels
// (the other walk is not: 4096 x 4096, 2 threads, cold, M = 1 1.08x-1.18x their time, 2 ~1.0x).
static inline bool bf16_takes(const Nf4Weight& w, int64_t M) {
    return M >= 1 && M <= kBf16Rows && w.cols % 32 == 0 && w.blocksize >= 32 && (M >= 3 || bf16_chunks(w));
}
using MatmulBf16Fn = void (*)(const Nf4Weight& w, const uint16_t* x, const float* xf, int64_t M, float* y,
                              const LoraTerm* lora, int threads);

struct Kernels {
    DequantizeFn dequantize;
    MatmulFn matmul;
    LoraTermsFn lora_terms;
    LoadFn load;
    StoreFn store;
    MatmulBf16Fn matmul_bf16;
};

Kernels scalar_kernels();
Kernels avx2_kernels();          // vpshufb lookup ("avx2-vpshufb")
Kernels avx2_permute_kernels();  // vpermps lookup ("avx2-vpermps")
Kernels avx512_kernels();
Kernels avx512_bf16_kernels();  // avx512_kernels() and matmul_bf16 (AVX512-BF16's vdpbf16ps; null if not built)

bool cpu_has_avx2();
bool cpu_has_avx512();
bool cpu_has_avx512_bf16();
bool cpu_is_amd();

}  // namespace cpu
}  // namespace lorakern
