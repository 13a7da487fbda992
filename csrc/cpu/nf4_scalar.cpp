// Plain C++ NF4 kernels: the path for any x86-64 (or other) CPU without AVX2.
#include "nf4_cpu_impl.h"

namespace lorakern {
namespace cpu {
namespace {

struct ScalarVec {
    using vec = float;
    static constexpr int W = 1;
    static constexpr int kRegs = 32;  // vec is one float: the accumulator layout AVX-512 uses, placed by the compiler
    static constexpr bool kScaleAfter = false;  // the lookup table carries the block's scale
    static constexpr bool kCodes64 = false;
    float code[16];
    explicit ScalarVec(const float* table = nullptr) {
        for (int i = 0; i < 16; ++i) code[i] = table ? table[i] : nf4_value(i);
    }
    vec zero() const { return 0.0f; }
    vec in_register(vec a) const { return a; }
    vec set1(float f) const { return f; }
    vec load(const float* p) const { return *p; }
    void store(float* p, vec a) const { *p = a; }
    vec add(vec a, vec b) const { return a + b; }
    vec fmadd(vec a, vec b, vec c) const { return a * b + c; }
    float hsum(vec a) const { return a; }
    // out[j * ld + c] = B[c * ldb + j] (c < cols, j < r): the LoRA terms' B panel.
    void panel(const float* B, int64_t ldb, int64_t cols, int64_t r, float* out, int64_t ld) const {
        for (int64_t c = 0; c < cols; ++c)
            for (int64_t j = 0; j < r; ++j) out[j * ld + c] = B[c * ldb + j];
    }
    struct Table {
        float v[16];
    };
    Table scaled(float scale) const {
        Table t;
        for (int i = 0; i < 16; ++i) t.v[i] = code[i] * scale;
        return t;
    }
    Table affine(float scale, float shift) const {
        Table t;
        for (int i = 0; i < 16; ++i) t.v[i] = __builtin_fmaf(code[i], scale, shift);
        return t;
    }
    static int lane_source(int pos) { return pos; }
    void decode32_split(const uint8_t* p, const Table& t, vec* out) const {
        for (int i = 0; i < 16; ++i) {
            out[2 * i] = t.v[p[i] >> 4];
            out[2 * i + 1] = t.v[p[i] & 0xF];
        }
    }
    int64_t nested_scales(const uint8_t*, const float*, float, float, int64_t, float*) const { return 0; }  // the caller's loop
    void decode32(const uint8_t* p, vec scale, vec* out) const {
        for (int i = 0; i < 16; ++i) {
            out[2 * i] = code[p[i] >> 4] * scale;
            out[2 * i + 1] = code[p[i] & 0xF] * scale;
        }
    }
};

}  // namespace

Kernels scalar_kernels() { return impl::kernels<ScalarVec>(); }

}  // namespace cpu
}  // namespace lorakern
