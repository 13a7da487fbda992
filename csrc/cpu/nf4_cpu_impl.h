// The NF4 CPU algorithms, written once over a small vector interface V and compiled three times
// (nf4_scalar.cpp, nf4_avx2.cpp, nf4_avx512.cpp) with per-file ISA flags. Include only from those.
//
// V provides: vec, W (lanes), zero(), set1(f), load(p), store(p, v), add, fmadd(a, b, c), hsum(v),
//   panel(B, ldb, cols, r, out, ld): out[j * ld + c] = B[c * ldb + j], a transposed block of B;
//   decode32(bytes, scale, out): 16 packed bytes -> 32 weights in order (code[index] * scale,
//     float32, one rounding, like the reference) as 32 / W vectors;
//   scaled(scale) -> Table: the 16 code values times scale (one rounding each: bit-identical to multiplying
//     after the lookup), so the matmul pays one multiply per block instead of one per 16 weights;
//   in_register(v): v, kept in a register (the compiler would fold a load into each FMA using it);
//   decode32_split(bytes, table, out): the same 32 weights in a lane order of V's choosing,
//     lane_source(pos) naming the weight at position pos; matmul permutes x to match once per call;
//   kScaleAfter: whether V also has decode32_codes(bytes, out), the code values alone in the split
//     order, for the walk that sums a block's products first and scales the sum (see segment_codes);
//   kCodes64: whether V also has decode64_codes(bytes, half, out), 64 code values of 32 bytes in the
//     order lane_source64(pos) names, which that walk takes at M <= 2 where blocks are whole
//     multiples of 64 (x then packed in that order: codes64).
//
// Decode (M = 1, 4096 x 4096): 16.8M weights in 8.4 MB of bytes + 1 MB of absmax. At ~20 GB/s
// that is ~0.45 ms, so the decode must cost a few instructions per 32 weights. The shuffle port
// is the limit on x86 (one per cycle): with AVX-512, in order, 32 weights cost 2 unpacks + 2
// widenings + 2 permutes = 6 shuffles; split (even weights from the high nibbles, odd from the low
// ones, of the same widened bytes) costs 1 widening + 2 permutes = 3. AVX2 has two lookups
// (nf4_avx2.cpp): 8 lane-crossing permutes per 32 weights (two 8-entry halves of the table), or
// 12 in-lane shuffles (vpshufb over the values' byte planes), which AMD cores run on two pipes.
#pragma once

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if __has_include(<unistd.h>)
#include <unistd.h>  // sysconf: the L2 size
#endif
#if defined(__F16C__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <utility>
#include <vector>

#include "nf4_cpu.h"
#include "thread_pool.h"

namespace lorakern {
namespace cpu {
namespace impl {
// Internal linkage: each ISA's translation unit (compiled with its own -m flags) keeps its own
// copy of every function here. Shared inline functions would be merged at link time into one
// copy, possibly one compiled with AVX-512 instructions, and run on a CPU without them.
namespace {

// Threads: every loop hands out its work in small pieces (parallel_for, thread_pool.h), so that a
// thread sharing its core with another process takes fewer pieces instead of holding up the call
// with a fixed share. A piece of the product is up to kPieceBlocks row blocks of 16 weight rows
// (kRowBlock: ~5 us at M = 1, 4096 columns), a piece of the transposed product 256 columns, one
// of the dequantize kDequantizeGrab * 32 weights.
constexpr int64_t kDequantizeGrab = 512;  // 16K weights: 64 KB of fp32 output

constexpr int kMTile = 8;      // rows of x sharing one decode: 2 weight rows x 8 accumulators + 4 weights + 2 tables
constexpr int64_t kRowBlock = 16;  // weight rows sharing one L1-resident x tile
// Consecutive row blocks per piece: the weight bytes are row-major, so a piece reads one run of
// kPieceBlocks x 16 rows (128 KB at 4096 columns) instead of 32 KB runs that alternate between the
// threads, each a new stream for the hardware prefetchers. 4096 x 4096, 2 threads, cold, on Zen 4,
// against one block a piece, interleaved: AVX2 M = 1 0.95x-1.0x the time, M = 4 0.94x, M = 16
// 0.98x; AVX-512 M = 1 0.88x; 4096 -> 14336 M = 1 0.90x; with a busy process beside it the same.
// Fewer when a weight has too few blocks to give each thread 8 pieces.
constexpr int64_t kPieceBlocks = 4;
inline int64_t piece_blocks(int64_t blocks, int threads) {
    return std::max<int64_t>(1, std::min<int64_t>(kPieceBlocks, blocks / (8 * std::max(1, threads))));
}
// MT > 2: a row's accumulators restart every sum_columns(MT) columns (16384 / MT rounded down to
// a multiple of 256, so blocks up to 256 never straddle two), their sums added in column order: a
// blocked sum. Against float64, relative to torch's float32 error (4096, 14336 and 45120 columns,
// M = 3, 5, 8, AVX2 and AVX-512): 0.12x-0.93x; spans of 4096 / MT 0.09x-0.61x but a restart every
// 512 columns at M = 8 (1.02x-1.26x the time of these spans at M = 3 to 8, cold); no restart
// 0.18x-1.65x.
constexpr int64_t sum_columns(int MT) { return 16384 / MT / 256 * 256 > 256 ? 16384 / MT / 256 * 256 : 256; }
// Columns of the x panel that a row block's pairs walk before the next slice: a multiple of
// sum_columns, the panel slice (MT x columns x 4 B) a quarter of the L2 (64 KB to 512 KB; 256 KB
// on Zen 4's 1 MB; $LORAKERN_CPU_L2_BYTES overrides the size sysconf reports), so that it stays
// there while the weight rows stream past in long runs. The speed, not the bits, depends on it
// (the sums restart at the same columns). Against the slices of 16 KB of panel (and spans of
// 4096 / MT) before, which read each weight row in runs of 512 bytes at M = 4: 4096 x 4096, 4096 ->
// 14336 and 14336 -> 4096, M = 3, 4, 6, 8, 2 threads, cold, Zen 4, interleaved, AVX2 0.74x-0.94x
// the time, AVX-512 0.68x-0.87x.
inline int64_t panel_slice_bytes() {
    static const int64_t bytes = [] {
        int64_t l2 = 0;
        if (const char* env = getenv("LORAKERN_CPU_L2_BYTES")) {  // whole bytes (the Python side rejects others)
            char* end = nullptr;
            l2 = strtoll(env, &end, 10);
            if (end == env || *end != '\0') l2 = 0;
        }
#if defined(_SC_LEVEL2_CACHE_SIZE)
        if (l2 <= 0) l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
        if (l2 <= 0) l2 = int64_t{1} << 20;
        return std::min<int64_t>(int64_t{512} << 10, std::max<int64_t>(int64_t{64} << 10, l2 / 4));
    }();
    return bytes;
}
inline int64_t panel_columns(int MT) {
    const int64_t ks = sum_columns(MT);
    return std::max<int64_t>(ks, panel_slice_bytes() / (4 * MT) / ks * ks);
}
constexpr int64_t kTChunk = 256;  // columns per task in the transposed product (16 KB of fp32 sums at M=16)
// Rows of W the transposed product's sums run over before they are added to the span's total:
// one sum per output over all N rows was 4.9x the bound the tests hold it to (2x torch's float32
// error against float64: M = 8, N = 4096 to 45120, every ISA); spans of 256 rows 0.25x (512 0.31x,
// 1024 0.64x), at the same speed (4096 x 4096, M = 1 to 16, interleaved).
constexpr int64_t kTSumRows = 256;

// Element-by-element decode of W_flat[start:start+count) into float32: any alignment.
inline void decode_generic(const Nf4Weight& w, int64_t start, int64_t count, float* out) {
    for (int64_t i = 0; i < count; ++i) {
        const int64_t f = start + i;
        out[i] = code_value(w, nf4_index(w.packed, f)) * scale_of(w, f);
        if (w.shift) out[i] += block_shift_value(w, f >> w.block_shift);  // rounded as shift_all rounds
    }
}

// dst[0:count] = src rounded to out_dtype (round to nearest even, as torch's .to()). With F16C
// (the AVX2 and AVX-512 builds) float16 is vcvtps2ph, 8 at a time: the same bits as
// float_to_half_bits for every non-NaN value, which the loop of it (branches) costs ~10x.
inline void store_converted(const float* src, int64_t count, void* dst, int out_dtype) {
    if (out_dtype == kFloat32) {
        memcpy(dst, src, count * sizeof(float));
    } else if (out_dtype == kBFloat16) {
        uint16_t* o = static_cast<uint16_t*>(dst);
        for (int64_t i = 0; i < count; ++i) o[i] = float_to_bf16_bits(src[i]);
    } else {
        uint16_t* o = static_cast<uint16_t*>(dst);
        int64_t i = 0;
#if defined(__F16C__)
        for (; i + 8 <= count; i += 8)
            _mm_storeu_si128(reinterpret_cast<__m128i*>(o + i),
                             _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
        for (; i < count; ++i) o[i] = float_to_half_bits(src[i]);
    }
}

// dst[0:count] = src (in_dtype: float32, bfloat16 or float16) as float32, exact.
inline void load_converted(const void* src, int64_t count, float* dst, int in_dtype) {
    if (in_dtype == kFloat32) {
        memcpy(dst, src, count * sizeof(float));
    } else if (in_dtype == kBFloat16) {
        const uint16_t* p = static_cast<const uint16_t*>(src);
        for (int64_t i = 0; i < count; ++i) dst[i] = bf16_bits_to_float(p[i]);
    } else {
        const uint16_t* p = static_cast<const uint16_t*>(src);
        int64_t i = 0;
#if defined(__F16C__)
        for (; i + 8 <= count; i += 8)
            _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i))));
#endif
        for (; i < count; ++i) dst[i] = half_bits_to_float(p[i]);
    }
}

inline int64_t out_elem_size(int out_dtype) { return out_dtype == kFloat32 ? 4 : 2; }

// The decoded weights of one 32-step plus their block's shift (the INT4 base; rounded twice, after
// the multiply and after the add: the matmul walk's tables round once, an fma).
template <class V>
inline void shift_all(const V& v, typename V::vec* wv, float shift) {
    const typename V::vec s = v.set1(shift);
    for (int j = 0; j < 32 / V::W; ++j) wv[j] = v.add(wv[j], s);
}

template <class V>
void dequantize(const Nf4Weight& w, int64_t start, int64_t count, void* out, int out_dtype, int threads) {
    if (count <= 0) return;
    char* o = static_cast<char*>(out);
    const int64_t esize = out_elem_size(out_dtype);
    // Head up to a multiple of 32 flattened elements: from there every 32-chunk is byte-aligned and
    // inside one block (blocksize >= 32 and a power of two).
    const int64_t head = std::min<int64_t>(count, (32 - start % 32) % 32);
    float buf[32];
    if (head) {
        decode_generic(w, start, head, buf);
        store_converted(buf, head, o, out_dtype);
    }
    const int64_t body_chunks = (count - head) / 32;
    const int64_t s0 = start + head;
    parallel_for((body_chunks + kDequantizeGrab - 1) / kDequantizeGrab, threads, [&](int64_t g) {
        V v(w.code);
        for (int64_t c = g * kDequantizeGrab, c1 = std::min(body_chunks, c + kDequantizeGrab); c < c1; ++c) {
            const int64_t f = s0 + c * 32;
            typename V::vec wv[32 / V::W];
            v.decode32(w.packed + f / 2, v.set1(scale_of(w, f)), wv);
            if (w.shift) shift_all(v, wv, block_shift_value(w, f >> w.block_shift));
            float tmp[32];
            for (int j = 0; j < 32 / V::W; ++j) v.store(tmp + j * V::W, wv[j]);
            store_converted(tmp, 32, o + (head + c * 32) * esize, out_dtype);
        }
    });
    const int64_t done = head + body_chunks * 32;
    if (done < count) {
        decode_generic(w, start + done, count - done, buf);
        store_converted(buf, count - done, o + done * esize, out_dtype);
    }
}

// Block scales for the matmul walk, two sources behind one interface: enter(b) before using
// blocks of b's group, group_end(b) the first block after it, scale(b) the float32 scale.
// Plain: the float absmax itself. Nested (double quantization): the 256 possible scales of the
// group (code2[q] * absmax2[g] + offset, rounded as block_scale does) built into a table when
// the walk enters the group, so the FMA loop pays one byte load per block either way. Decoding
// each block's scale in the loop instead (load, multiply, add) cost +15% at M = 1: its scalar
// multiply and add take the two vector ports the decode and FMAs are bound by.
struct PlainScales {
    static constexpr bool kNested = false;
    const float* absmax;  // scale of block b at absmax[(b - first) * stride]
    const float* shift = nullptr;  // the INT4 base's per-block shift (same indexing), or null
    const uint8_t* half = nullptr;  // the compact INT4 parameters (Nf4Weight::half_params), or null
    int64_t first = 0;
    int64_t stride = 1;
    explicit PlainScales(const Nf4Weight& w)
        : absmax(static_cast<const float*>(w.absmax)), shift(w.shift), half(w.half_params), stride(w.scale_stride) {}
    PlainScales(const float* scales, int64_t first_block) : absmax(scales), first(first_block) {}
    void enter(int64_t) {}
    int64_t group_end(int64_t) const { return INT64_MAX; }
    bool plain() const { return shift == nullptr && half == nullptr; }  // scale alone, no shift (NF4)
    float scale(int64_t b) const { return half ? half_params_scale(half + 6 * b) : absmax[(b - first) * stride]; }
    // Block b's 16-entry table: code * scale (NF4), or code * scale + shift (INT4: scale * (q - zero)).
    template <class V>
    typename V::Table table(const V& v, int64_t b) const {
        if (half) return v.affine(half_params_scale(half + 6 * b), half_params_shift(half + 6 * b));
        const int64_t i = (b - first) * stride;
        return shift ? v.affine(absmax[i], shift[i]) : v.scaled(absmax[i]);
    }
};

struct NestedScales {
    static constexpr bool kNested = true;
    const uint8_t* q;
    const Nf4Weight& w;
    int64_t group = -1;
    alignas(64) float scales[256];
    explicit NestedScales(const Nf4Weight& w_) : q(static_cast<const uint8_t*>(w_.absmax)), w(w_) {}
    // Blocks are never negative: unsigned division, a shift (signed, it needs a fix-up per block).
    static int64_t group_of(int64_t b) { return static_cast<int64_t>(static_cast<uint64_t>(b) / kNestedBlocksize); }
    void enter(int64_t b) {
        const int64_t g = group_of(b);
        if (g == group) return;
        group = g;
        const float a = w.nested_absmax[g], off = *w.offset;
        const float* __restrict code = w.nested_code;
        float* __restrict out = scales;
        for (int i = 0; i < 256; ++i) out[i] = mul_add_rn(code[i], a, off);
    }
    int64_t group_end(int64_t b) const { return (group_of(b) + 1) * kNestedBlocksize; }
    bool plain() const { return true; }
    float scale(int64_t b) const { return scales[q[b]]; }
    template <class V>
    typename V::Table table(const V& v, int64_t b) const { return v.scaled(scale(b)); }
};

// Accumulators per row of x: one per vector of a step (J) for small tiles, where the FMA latency
// (4 cycles) would otherwise bind; one for MT >= 8, where a step's 2 x MT FMAs take longer than a
// chain of J dependent FMAs, so two weight rows' accumulators fit the register file.
// With 16 vector registers (AVX2) J accumulators per row spill: a pair of weight rows at M = 1
// holds 2 x 4 of them beside 2 x 2 table halves and the shift constant, and the compiler kept
// accumulators on the stack in every step. There: two per row at M = 1 (a chain of 2 FMAs per
// step, 8 cycles of latency against a step's ~16 cycles of lookups), one above. 4096 x 4096 on
// Zen 4 (AVX2 path), two builds interleaved, 1 and 2 threads: M = 1 0.87-0.92x the time (one run
// 1.0x), M = 2 0.85-0.92x, M = 4 0.76-0.79x; M = 8 and 16 (already one per row) unchanged.
template <class V, int MT>
constexpr int acc_per_row() {
    return V::kRegs < 32 ? (MT == 1 ? 2 : 1) : (MT >= 8 ? 1 : 32 / V::W);
}

// acc [MT][acc_per_row] += the 32 decoded weights wv (split lane order) times MT rows of the x
// panel at xp ([MT][32] floats).
template <class V, int MT>
__attribute__((always_inline)) inline void fma_rows(const V& v, const typename V::vec* wv, const float* xp,
                                                    typename V::vec* acc) {
    constexpr int J = 32 / V::W;
    constexpr int AJ = acc_per_row<V, MT>();
    for (int m = 0; m < MT; ++m)
        for (int j = 0; j < J; ++j) {
            typename V::vec& a = acc[m * AJ + j % AJ];
            a = v.fmadd(wv[j], v.load(xp + m * 32 + j * V::W), a);
        }
}

// One step: 32 weights at p (16 bytes) decoded with table t, FMA'd against MT rows of the x
// panel at xp into acc.
template <class V, int MT>
__attribute__((always_inline)) inline void step(const V& v, const uint8_t* p, const typename V::Table& t,
                                                const float* xp, typename V::vec* acc) {
    typename V::vec wv[32 / V::W];
    v.decode32_split(p, t, wv);
    fma_rows<V, MT>(v, wv, xp, acc);
}

// Software prefetch of the packed bytes, one per block (a 64-byte line holds two 64-blocks). Without it
// M = 1 from DRAM (4096 x 4096, 40 weights rotating past a 260 MB L3) took the decode time plus
// the transfer time, 0.66 ms: the hardware prefetchers did not run far enough ahead of a loop this
// dense in compute. Rows of x <= 2 walk each weight row once, front to back: 4 KB ahead (measured:
// 1 KB 0.53 ms, 2 KB 0.49, 4 KB 0.47, 16 KB 0.48). More rows walk a 16-row block in 512-column
// slices: the same slice 4 rows down (M = 16: none 3.03 ms, 1 row 2.90, 4 rows 2.67, 16 rows 2.68).
constexpr int64_t kPrefetchBytes = 4096;
constexpr int64_t kPrefetchRows = 4;

// acc += W_flat[f, f + len) . x panel, f and len multiples of 32 (a piece of one weight row);
// xp is the panel at the piece's first column ([len / 32][MT][32]). acc holds U sets of [MT][J]
// accumulators; with U == 2 consecutive steps alternate between them (M <= 2: four independent
// FMA chains per row of x, so the 4-cycle FMA latency never binds).
template <class V, int MT, int U, class S>
__attribute__((always_inline)) inline void segment(const V& v, S& sc, const Nf4Weight& w, int64_t f, int64_t len,
                                                   const float* xp, typename V::vec* acc) {
    constexpr int A = MT * acc_per_row<V, MT>();  // accumulators per set
    constexpr int64_t XS = MT * 32;  // panel floats per step
    const uint8_t* p = w.packed + f / 2;
    const int sh = w.block_shift;
    const int64_t end = f + len;
    if (((f | len) & (w.blocksize - 1)) == 0 && w.blocksize >= 32 * U) {
        // Whole blocks, each a multiple of U steps: the common case, kept free of per-step
        // bookkeeping (scalar instructions here share ports with the vector decode).
        const int64_t steps = w.blocksize / 32;
        for (int64_t b = f >> sh, b1 = end >> sh; b < b1;) {
            sc.enter(b);
            for (const int64_t ge = std::min(b1, sc.group_end(b)); b < ge; ++b) {
                __builtin_prefetch(p + (MT <= 2 ? kPrefetchBytes : kPrefetchRows * w.cols / 2));
                const typename V::Table t = sc.table(v, b);
                for (int64_t s = 0; s < steps; s += U) {
                    for (int u = 0; u < U; ++u) step<V, MT>(v, p + 16 * u, t, xp + XS * u, acc + u * A);
                    p += 16 * U;
                    xp += XS * U;
                }
            }
        }
        return;
    }
    // Pieces of blocks (rows starting mid-block, k-blocks inside a large block, blocksize 32 with U == 2).
    while (f < end) {
        const int64_t b = f >> sh;
        sc.enter(b);
        const int64_t stop = std::min(end, (b + 1) << sh);
        const typename V::Table t = sc.table(v, b);
        for (; f < stop; f += 32, p += 16, xp += XS) step<V, MT>(v, p, t, xp, acc);
    }
}

// sum_k a[k] b[k], vectorized (two accumulator chains) with a scalar tail. The chains restart every
// kDotBlock products and their sums are added up: one chain over all of n grew the error with n
// (the scalar build at n = 14336, two chains of 7168: 2.1x torch's float32 error on x A^T).
constexpr int64_t kDotBlock = 512;
template <class V>
inline float dot(const V& v, const float* a, const float* b, int64_t n) {
    typename V::vec total = v.zero();
    int64_t k = 0;
    while (k + 2 * V::W <= n) {
        typename V::vec acc0 = v.zero(), acc1 = v.zero();
        for (const int64_t end = std::min(n, k + kDotBlock); k + 2 * V::W <= end; k += 2 * V::W) {
            acc0 = v.fmadd(v.load(a + k), v.load(b + k), acc0);
            acc1 = v.fmadd(v.load(a + k + V::W), v.load(b + k + V::W), acc1);
        }
        total = v.add(total, v.add(acc0, acc1));
    }
    if (k + V::W <= n) {
        total = v.fmadd(v.load(a + k), v.load(b + k), total);
        k += V::W;
    }
    float s = v.hsum(total);
    for (; k < n; ++k) s += a[k] * b[k];
    return s;
}

constexpr int64_t kTermRows = 16;   // rows of x per h piece: 256 KiB at K = 4096, in L2 while A streams
constexpr int64_t kTermCols = 64;   // outputs per term piece: a [r, 64] panel, 4 KiB at r = 16, 64 KiB at 256
constexpr int64_t kTermDistance = 8;  // rows of y prefetched ahead: ~8 x 64 FMAs cover a DRAM miss at r = 16

// out[i * J + j] = dot(x_i, a_j) for R rows x_i and J rows a_j of length K: an R x J register tile,
// R + J loads per R * J FMAs (4 x 4: 0.5 loads per FMA; one dot per (i, j) needs 2 and was
// bound by L2 reads, ~12 GFMA/s on one Zen 4 core). The chains restart every kDotBlock products,
// as dot()'s do.
template <class V, int R, int J>
inline void dots(const V& v, const float* const* x, const float* const* a, int64_t K, float* out) {
    typename V::vec total[R][J];
    for (int i = 0; i < R; ++i)
        for (int j = 0; j < J; ++j) total[i][j] = v.zero();
    int64_t k = 0;
    while (k + V::W <= K) {
        typename V::vec acc[R][J];
        for (int i = 0; i < R; ++i)
            for (int j = 0; j < J; ++j) acc[i][j] = v.zero();
        for (const int64_t end = std::min(K, k + kDotBlock); k + V::W <= end; k += V::W) {
            typename V::vec av[J];
            for (int j = 0; j < J; ++j) av[j] = v.load(a[j] + k);
            for (int i = 0; i < R; ++i) {
                const typename V::vec xv = v.load(x[i] + k);
                for (int j = 0; j < J; ++j) acc[i][j] = v.fmadd(xv, av[j], acc[i][j]);
            }
        }
        for (int i = 0; i < R; ++i)
            for (int j = 0; j < J; ++j) total[i][j] = v.add(total[i][j], acc[i][j]);
    }
    for (int i = 0; i < R; ++i)
        for (int j = 0; j < J; ++j) {
            float s = v.hsum(total[i][j]);
            for (int64_t t = k; t < K; ++t) s += x[i][t] * a[j][t];
            out[i * J + j] = s;
        }
}

// Position p's row of x / y: order[p], or p itself when order is null (one adapter, rows in order).
inline int64_t row_at(const int64_t* order, int64_t p) { return order != nullptr ? order[p] : p; }

// out[t * ldo + j] = x_{rows[t]} . A_j for the n rows rows[0 .. n) of x (rows ldx apart; rows null:
// rows 0 .. n) and ranks j < r of A (rows lda apart): R x J tiles of dots(), the ranks in the outer loop so that J rows
// of A stay in L1 while the piece's rows of x (kTermRows of them, 256 KiB at K = 4096) come from L2.
template <class V>
inline void h_piece(const V& v, const float* x, int64_t ldx, const int64_t* rows, int64_t n, const float* A,
                    int64_t lda, int64_t r, int64_t K, float* out, int64_t ldo) {
    // 4 rows x 4 ranks (16 of 32 zmm registers); 4 x 2 with AVX2's 16 registers.
    constexpr int HR = 4, HJ = V::W >= 16 ? 4 : 2;
    const float* xs[HR];
    const float* as[HJ];
    float tile[HR * HJ];
    for (int64_t j0 = 0; j0 < r; j0 += HJ) {
        for (int64_t t0 = 0; t0 < n; t0 += HR) {
            const int rn = static_cast<int>(std::min<int64_t>(HR, n - t0));
            const int jn = static_cast<int>(std::min<int64_t>(HJ, r - j0));
            for (int t = 0; t < rn; ++t) xs[t] = x + row_at(rows, t0 + t) * ldx;
            for (int u = 0; u < jn; ++u) as[u] = A + (j0 + u) * lda;
            if (rn == HR && jn == HJ) {
                dots<V, HR, HJ>(v, xs, as, K, tile);
            } else {  // the last rows or ranks, one dot at a time (two chains)
                for (int t = 0; t < rn; ++t)
                    for (int u = 0; u < jn; ++u) tile[t * HJ + u] = dot(v, xs[t], as[u], K);
            }
            for (int t = 0; t < rn; ++t)
                for (int u = 0; u < jn; ++u) out[(t0 + t) * ldo + j0 + u] = tile[t * HJ + u];
        }
    }
}

// h = x A^T [M, r] (and scaled_h = scaling * h), before any output: one dot product of length K
// per (m, j) up to kTermRows rows, register tiles (h_piece) above (r x K x M FMAs: 64K at r = 16,
// M = 1, K = 4096). The workers join from 16K FMAs (64 KiB of A at M = 1): in a decode loop each
// layer's A comes from memory (a model's adapters are far more than the L3), and one thread
// reading it before the base product starts was most of the layer's cost over nf4_matmul's (M = 1,
// 1024 x 4096, 2 threads, 16 cold layers: +68 us). Against the caller alone below 1M FMAs (256K with
// several adapters), interleaved, Zen 4, M = 1: 1024 x 4096 AVX2 0.96x-0.98x the time, AVX-512
// 0.83x; 1024 x 14336 AVX2 0.94x, AVX-512 0.94x; 4096 x 4096 0.97x-0.99x; the same layer hot
// 0.93x-1.0x; M = 4 and 16 0.99x.
template <class V>
inline void lora_h(const LoraTerm* lora, const float* x, int64_t M, int64_t K, int threads) {
    if (lora == nullptr) return;
    const int64_t n = M * lora->r;
    // QA-LoRA: each row of x pooled once (group sums times groups / G: PEFT's mean times groups),
    // then h is a dot of length groups, as plain LoRA's is one of length K.
    const int64_t G = lora->pool, groups = G > 0 ? K / G : 0;
    std::vector<float> pooled(M * groups);
    for (int64_t row = 0; row < M * groups; ++row) {  // row = m * groups + g: x's columns g G .. g G + G
        float s = 0.0f;
        for (int64_t k = 0; k < G; ++k) s += x[row * G + k];
        pooled[row] = s * (static_cast<float>(groups) / static_cast<float>(G));
    }
    const int team = n * (G > 0 ? groups : K) >= (int64_t{1} << 14) ? threads : 1;  // FMAs (A's floats at M = 1)
    if (lora->index == nullptr && G == 0 && M > kTermRows) {
        // Register tiles (h_piece) over pieces of kTermRows rows x kHRanks ranks: one dot per
        // (m, j) is bound by L2 reads (~12 GFMA/s a Zen 4 core); at M = 256, r = 256, K = 4096
        // (268M FMAs) that was ~11 ms on 2 cores beside ~16 ms for the base.
        constexpr int64_t kHRanks = 16;
        const int64_t r = lora->r, row_pieces = (M + kTermRows - 1) / kTermRows, rank_pieces = (r + kHRanks - 1) / kHRanks;
        parallel_for(row_pieces * rank_pieces, team, [&](int64_t i) {
            V v;
            const int64_t m0 = i / rank_pieces * kTermRows, j0 = i % rank_pieces * kHRanks;
            const int64_t mn = std::min(kTermRows, M - m0), jn = std::min(kHRanks, r - j0);
            h_piece(v, x + m0 * K, K, nullptr, mn, lora->A + j0 * K, K, jn, K, lora->h + m0 * r + j0, r);
            for (int64_t m = m0; m < m0 + mn; ++m)
                for (int64_t j = j0; j < j0 + jn; ++j) lora->scaled_h[m * r + j] = lora->scaling * lora->h[m * r + j];
        });
        return;
    }
    parallel_for((n + 3) / 4, team, [&](int64_t g) {
        V v;
        for (int64_t i = 4 * g; i < std::min(n, 4 * g + 4); ++i) {
            const int64_t m = i / lora->r, j = i % lora->r;
            const RowAdapter a = row_adapter(*lora, m);  // several adapters: row m's own (rank 0: none)
            if (pooled.empty())
                lora->h[i] = j < a.r ? dot(v, x + m * K, a.A + j * K, K) : 0.0f;
            else
                lora->h[i] = dot(v, pooled.data() + m * groups, a.A + j * groups, groups);
            lora->scaled_h[i] = a.scaling * lora->h[i];
        }
    });
}

// y [M, N] += s_a (x_m A_a^T) B_a^T for every row m of an adapter (a = index[m], n adapters; -1:
// nothing): the LoRA terms alone, over a base product computed elsewhere (a dense W by BLAS).
// r (K + N) FMAs per row; 8 adapters of r = 16 over 64 rows of 4096 x 4096: 8.4M FMAs and 4 MiB
// of fp32 adapters, ~0.2 ms on 2 Zen 4 cores against ~20 ms for the base GEMM. Done by torch per
// adapter (gather, two skinny matmuls, scatter-add: ~6 ops of 10-50 us each), 8 adapters cost
// ~1.1 ms more than one there. Rows are grouped by adapter (a stable counting sort), so h reads
// each A once per chunk of kTermRows of its rows, and each column block of the term reads each B
// panel once, transposed to [r, kTermCols] so that a row's term is W-wide FMAs with no horizontal
// sums. Both loops keep 8 independent FMA chains (a chain of r dependent FMAs per output vector
// was latency-bound: 4 cycles each, 3x slower at M = 512).

// y_i[0:kTermCols] += sum_j h_i[j] panel[j, :] for R rows (whole vectors; R * kTermCols / W chains).
// The term is summed from zero and added to y once, as torch's h B^T then add does: summed into y
// (~3 in size), each of r = 256 roundings was at y's scale (3x torch's error against float64).
template <class V, int R>
inline void panel_rows(const V& v, const float* const* h, const float* panel, int64_t r, float* const* y) {
    constexpr int NV = kTermCols / V::W;
    typename V::vec acc[R][NV];
    for (int i = 0; i < R; ++i)
        for (int c = 0; c < NV; ++c) acc[i][c] = v.zero();
    for (int64_t j = 0; j < r; ++j) {
        typename V::vec hj[R];
        for (int i = 0; i < R; ++i) hj[i] = v.set1(h[i][j]);
        for (int c = 0; c < NV; ++c) {
            const typename V::vec b = v.load(panel + j * kTermCols + c * V::W);
            for (int i = 0; i < R; ++i) acc[i][c] = v.fmadd(hj[i], b, acc[i][c]);
        }
    }
    for (int i = 0; i < R; ++i)
        for (int c = 0; c < NV; ++c) v.store(y[i] + c * V::W, v.add(v.load(y[i] + c * V::W), acc[i][c]));
}

// y[order[p], :] += scaled_h[p] B_a^T for the positions p of each adapter a (start[a] .. start[a + 1];
// order null: row p), scaled_h [positions, lora.r]: column blocks of kTermCols outputs, each adapter's
// B panel read once per block and transposed to [r, kTermCols], so that a row's term is W-wide FMAs
// (no horizontal sums).
template <class V>
void add_terms(const float* scaled_h, const int64_t* order, const int64_t* start, int64_t n, const LoraTerm& lora,
               int64_t N, float* y, int team) {
    const int64_t r = lora.r;
    // Rows per panel_rows(): 8 chains of whole vectors (2 rows with 16 lanes, 1 with 8).
    constexpr int TR = kTermCols / V::W >= 8 ? 1 : 8 / (kTermCols / V::W);
    parallel_for((N + kTermCols - 1) / kTermCols, team, [&](int64_t blk) {
        V v;
        const int64_t n0 = blk * kTermCols, cols = std::min(kTermCols, N - n0);
        thread_local std::vector<float> panel;
        panel.resize(std::max<size_t>(panel.size(), r * kTermCols));
        const float* hs[TR];
        float* ys[TR];
        for (int64_t a = 0; a < n; ++a) {
            if (start[a] == start[a + 1]) continue;
            const RowAdapter ad = row_adapter(lora, row_at(order, start[a]));
            const int64_t ldb = lora.b_strides ? lora.b_strides[a] : ad.r;
            v.panel(ad.B + n0 * ldb, ldb, cols, ad.r, panel.data(), kTermCols);
            int64_t p = start[a];
            if (cols == kTermCols && V::W > 1) {
                for (; p + TR <= start[a + 1]; p += TR) {
                    for (int t = 0; t < TR; ++t) {
                        hs[t] = scaled_h + (p + t) * r;
                        ys[t] = y + row_at(order, p + t) * N + n0;
                        // the segment kTermDistance rows ahead (all 4 lines of it: each row's 256 B is
                        // a 16 KiB stride from the last, where the hardware prefetchers do not follow)
                        if (p + kTermDistance + t < start[a + 1])
                            for (int64_t l = 0; l < kTermCols; l += 16)
                                __builtin_prefetch(y + row_at(order, p + kTermDistance + t) * N + n0 + l, 1);
                    }
                    panel_rows<V, TR>(v, hs, panel.data(), ad.r, ys);
                }
                for (; p < start[a + 1]; ++p) {  // a last odd row (decode: often an adapter's only one)
                    hs[0] = scaled_h + p * r;
                    ys[0] = y + row_at(order, p) * N + n0;
                    panel_rows<V, 1>(v, hs, panel.data(), ad.r, ys);
                }
            }
            for (; p < start[a + 1]; ++p) {  // a block's last columns (N % kTermCols), the scalar path
                const float* hp = scaled_h + p * r;
                float* yp = y + row_at(order, p) * N + n0;
                for (int64_t c = 0; c < cols; ++c) {
                    float s = 0.0f;
                    for (int64_t j = 0; j < ad.r; ++j) s += hp[j] * panel[j * kTermCols + c];
                    yp[c] += s;
                }
            }
        }
    });
}

template <class V>
void lora_terms(const float* x, int64_t ldx, int64_t M, int64_t K, int64_t N, const LoraTerm& lora, int64_t n,
                float* y, int threads) {
    std::vector<int64_t> start(n + 1, 0), order(M);
    for (int64_t m = 0; m < M; ++m)
        if (lora.index[m] >= 0) ++start[lora.index[m] + 1];
    for (int64_t a = 0; a < n; ++a) start[a + 1] += start[a];
    {
        std::vector<int64_t> at(start.begin(), start.end() - 1);
        for (int64_t m = 0; m < M; ++m)
            if (lora.index[m] >= 0) order[at[lora.index[m]]++] = m;
    }
    const int64_t rows = start[n], r = lora.r;
    std::vector<float> scaled_h(rows * r);  // by position in order: [rows, r]
    std::vector<std::pair<int64_t, int64_t>> pieces;  // (adapter, first position)
    for (int64_t a = 0; a < n; ++a)
        for (int64_t p = start[a]; p < start[a + 1]; p += kTermRows) pieces.emplace_back(a, p);
    const int64_t fmas = rows * r * (K + N);
    const int team = fmas >= (int64_t{1} << 18) ? threads : 1;  // below ~0.05 ms a hand-off costs more
    parallel_for(static_cast<int64_t>(pieces.size()), team, [&](int64_t i) {
        V v;
        const int64_t a = pieces[i].first, p0 = pieces[i].second, p1 = std::min(start[a + 1], p0 + kTermRows);
        const RowAdapter ad = row_adapter(lora, order[p0]);
        float* hp = scaled_h.data() + p0 * r;
        h_piece(v, x, ldx, order.data() + p0, p1 - p0, ad.A, lora.a_strides ? lora.a_strides[a] : K, ad.r, K, hp, r);
        for (int64_t t = 0; t < (p1 - p0) * r; ++t) hp[t] *= ad.scaling;
    });
    add_terms<V>(scaled_h.data(), order.data(), start.data(), n, lora, N, y, team);
}

// The B rows n0 .. n0 + rows of every row's adapter, asked for before the block's decode (~10 us at
// M = 8) needs them: with one adapter per row (8 adapters of r = 16 at M = 8, 2 MiB of B) they
// come from memory as 8 scattered 1 KiB pieces per block, which the hardware prefetchers do not
// follow. 4096 x 4096, M = 8, 8 adapters, 2 Zen 4 threads, three interleaved timings each: 1.14x to
// 1.16x one adapter's call without it, 1.12x to 1.13x with it.
inline void prefetch_b_rows(const LoraTerm* lora, int64_t M, int64_t n0, int64_t rows) {
    if (lora == nullptr || lora->index == nullptr) return;
    for (int64_t m = 0; m < M; ++m) {
        const RowAdapter a = row_adapter(*lora, m);
        if (a.B == nullptr) continue;
        const char* p = reinterpret_cast<const char*>(a.B + n0 * a.r);
        const int64_t bytes = rows * a.r * static_cast<int64_t>(sizeof(float));
        for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off);
    }
}

// Output (m, n)'s LoRA term and bias: scaled_h[m] . B[n] added into the accumulator vector s
// (whole vectors; a horizontal sum per output for the term alone cost ~0.15 ms at M = 16 on 4096
// outputs), the rest (r % W elements, and the bias) returned as a scalar. 0 without a LoRA term.
template <class V>
inline float lora_into(const V& v, const LoraTerm* lora, int64_t m, int64_t n, typename V::vec& s) {
    if (lora == nullptr) return 0.0f;
    float rest = lora->bias ? lora->bias[n] : 0.0f;
    const RowAdapter a = row_adapter(*lora, m);
    if (a.B == nullptr) return rest;  // a row of no adapter: the base and bias alone
    const float* h = lora->scaled_h + m * lora->r;
    const float* b = a.B + n * a.r;
    int64_t j = 0;
    for (; j + V::W <= a.r; j += V::W) s = v.fmadd(v.load(h + j), v.load(b + j), s);
    for (; j < a.r; ++j) rest += h[j] * b[j];
    return rest;
}

// One step for two weight rows at once (p0, p1 with tables t0, t1) against the same MT rows of
// x: each x vector is loaded once for two FMAs. At M = 16 the FMAs with a memory operand were
// the limit (32 per step from the 16 KB panel: ~22 cycles measured against 16 for the FMAs
// alone); at M = 1 with in = 14336 the x row (56 KB) no longer fits L1 and is read from L2 for
// every weight row. Loading x into a register for two rows halves those loads.
// acc0 += w0 . x, acc1 += w1 . x for the 32 weights of one step (w0, w1: J vectors each, in the
// split lane order) against MT rows of the x panel at xp, each x vector loaded once for both.
template <class V, int MT>
__attribute__((always_inline)) inline void fma_pair(const V& v, const typename V::vec* w0, const typename V::vec* w1,
                                                    const float* xp, typename V::vec* acc0, typename V::vec* acc1) {
    constexpr int J = 32 / V::W;
    constexpr int AJ = acc_per_row<V, MT>();
    for (int m = 0; m < MT; ++m)
        for (int j = 0; j < J; ++j) {
            const typename V::vec xv = v.in_register(v.load(xp + m * 32 + j * V::W));
            const int a = m * AJ + j % AJ;
            acc0[a] = v.fmadd(w0[j], xv, acc0[a]);
            acc1[a] = v.fmadd(w1[j], xv, acc1[a]);
        }
}

template <class V, int MT>
__attribute__((always_inline)) inline void step_pair(const V& v, const uint8_t* p0, const uint8_t* p1,
                                                     const typename V::Table& t0, const typename V::Table& t1,
                                                     const float* xp, typename V::vec* acc0, typename V::vec* acc1) {
    constexpr int J = 32 / V::W;
    typename V::vec w0[J], w1[J];
    v.decode32_split(p0, t0, w0);
    v.decode32_split(p1, t1, w1);
    fma_pair<V, MT>(v, w0, w1, xp, acc0, acc1);
}

// Walks weight rows n and n + 1 together over whole blocks of [f, f + len) of row n (the caller
// checks that K and the slice are multiples of the blocksize, so both rows' pieces are whole
// blocks), calling step(p, t0, t1) for each 32 weights: p the row-n bytes (row n + 1's are
// row_bytes further), t0 / t1 the two blocks' tables. Prefetch: the same columns `ahead` rows
// down (rows walked whole, M <= 2: the next pair).
template <class V, class S, class Step>
__attribute__((always_inline)) inline void walk_pair(const V& v, S& sc0, S& sc1, const Nf4Weight& w, int64_t f,
                                                     int64_t len, int64_t ahead, Step&& step) {
    const int64_t row_bytes = w.cols / 2;
    const int sh = w.block_shift;
    const int64_t d = w.cols >> sh;  // blocks per row: row n + 1's block for row n's block b is b + d
    const int64_t steps = w.blocksize / 32;
    const uint8_t* p = w.packed + f / 2;
    for (int64_t b = f >> sh, b1 = (f + len) >> sh; b < b1;) {
        sc0.enter(b);
        sc1.enter(b + d);
        for (const int64_t ge = std::min(b1, std::min(sc0.group_end(b), sc1.group_end(b + d) - d)); b < ge; ++b) {
            __builtin_prefetch(p + ahead * row_bytes);
            __builtin_prefetch(p + (ahead + 1) * row_bytes);
            const typename V::Table t0 = sc0.table(v, b), t1 = sc1.table(v, b + d);
            if (steps == 2) {  // blocksize 64, the default: unrolled, so the tables stay in registers
                step(p, t0, t1);
                step(p + 16, t0, t1);
                p += 32;
                continue;
            }
            for (int64_t s = 0; s < steps; ++s, p += 16) step(p, t0, t1);
        }
    }
}

// Whether the walks at M rows of x take V's 64-weight decode (decode64_codes) and x is packed in
// its order (pack_x): M <= 2, NF4 scales alone (no INT4 shift), blocks of a multiple of 64 and
// whole blocks in every row, so that every weight row at that M is walked by segment_codes.
template <class V>
inline bool codes64(const Nf4Weight& w, int64_t M) {
    return V::kCodes64 && M <= 2 && w.shift == nullptr && w.half_params == nullptr && w.blocksize % 64 == 0 &&
           w.cols % w.blocksize == 0;
}

// segment()'s walk for R (1 or 2) weight rows n, n + 1 (row_bytes apart) where V's lookup leaves
// the scale to a multiply per vector (AVX2's byte-plane lookup: an fma per 8 weights, 4 of its ~22
// vector instructions per 32 weights, on the two pipes its FMAs use), at M <= 2 with a plain scale
// per block (NF4): each block's products of code values and x are summed in fresh accumulators and
// the sum is scaled once, acc += scale * sum. The product is rounded once per block instead of
// once per weight (code * scale, then times x): as close to the float64 result, not the same bits
// as the decode-then-multiply walk. The rows go one after the other inside a step (x read twice
// from L1), so that a row's decoded vectors, its accumulators and the byte planes fit AVX2's 16
// registers. Zen 4, AVX2, a loop of the lookup and the FMAs alone: 7.7 cycles per 32 weights
// against 9.3 with the fma per vector and 10.1 for the permute lookup. X64 (codes64): steps of 64
// weights (decode64_codes) against x packed in that order. With X64, the local copy of V and one
// accumulator a row, against steps of 32 (AMD EPYC Zen 3, AVX2 only, 2 threads, 8 cold copies,
// interleaved): 4096 x 4096 M = 1 0.82x the time, M = 2 0.92x; 4096 -> 14336 and 14336 -> 4096
// M = 1 0.85x-0.88x, M = 2 0.95x; one thread, hot, M = 1: 8.1 cycles per 32 weights (9.5 before).
template <class V, int MT, int R, bool X64, class S>
__attribute__((always_inline)) inline void segment_codes(const V& v_in, S& sc0, S& sc1, const Nf4Weight& w, int64_t f,
                                                         int64_t len, const float* xp, typename V::vec* acc0,
                                                         typename V::vec* acc1) {
    // A local copy: its byte planes stay in registers across the blocks (read through the
    // reference, the compiler loaded the 4 planes again for every block).
    const V v = v_in;
    constexpr int A = MT * acc_per_row<V, MT>();
    constexpr int J = 32 / V::W;
    using vec = typename V::vec;
    const int64_t row_bytes = w.cols / 2;
    const int sh = w.block_shift;
    const int64_t d = w.cols >> sh;  // blocks per row: row n + 1's block for row n's block b is b + d
    const int64_t steps = w.blocksize / 32;
    const uint8_t* p = w.packed + f / 2;
    for (int64_t b = f >> sh, b1 = (f + len) >> sh; b < b1; ++b) {
        sc0.enter(b);
        if (R == 2) sc1.enter(b + d);
        // The next pair's bytes, non-temporal: read once, they need not push the caller's data
        // (Python's, the adapter's) out of L3 (the QLoRA layer at M = 1, 4096 x 4096, 8 cold
        // copies: 0.93x-0.99x the time with plain prefetches, three interleaved runs on Zen 4).
        __builtin_prefetch(p + R * row_bytes, 0, 0);
        if (R == 2) __builtin_prefetch(p + 3 * row_bytes, 0, 0);
        vec sum[2][A];
        for (int r = 0; r < R; ++r)
            for (int a = 0; a < A; ++a) sum[r][a] = v.zero();
        if constexpr (X64) {
            for (int64_t s = 0; s < steps; s += 2, p += 32, xp += 2 * MT * 32)
                for (int r = 0; r < R; ++r)
                    for (int half = 0; half < 2; ++half) {
                        vec wv[J];
                        v.decode64_codes(p + r * row_bytes, half, wv);
                        fma_rows<V, MT>(v, wv, xp + half * MT * 32, sum[r]);
                    }
        } else {
            const auto step = [&](const uint8_t* q, const float* xq) __attribute__((always_inline)) {
                for (int r = 0; r < R; ++r) {
                    vec wv[J];
                    v.decode32_codes(q + r * row_bytes, wv);
                    fma_rows<V, MT>(v, wv, xq, sum[r]);
                }
            };
            if (steps == 2) {  // blocksize 64, the default: unrolled
                step(p, xp);
                step(p + 16, xp + MT * 32);
                p += 32;
                xp += 2 * MT * 32;
            } else {
                for (int64_t s = 0; s < steps; ++s, p += 16, xp += MT * 32) step(p, xp);
            }
        }
        // A row's sums added first, then one FMA: acc[m][0] alone carries the row (the others stay
        // zero), two registers a row of x fewer (with two, the pair walk spilled three per block).
        constexpr int AJ = acc_per_row<V, MT>();
        const vec s0 = v.set1(sc0.scale(b));
        const vec s1 = R == 2 ? v.set1(sc1.scale(b + d)) : s0;
        for (int m = 0; m < MT; ++m)
            for (int r = 0; r < R; ++r) {
                vec t = sum[r][m * AJ];
                for (int j = 1; j < AJ; ++j) t = v.add(t, sum[r][m * AJ + j]);
                vec& a = (r == 0 ? acc0 : acc1)[m * AJ];
                a = v.fmadd(t, r == 0 ? s0 : s1, a);
            }
    }
}

// segment() for weight rows n and n + 1 together (see walk_pair; segment_codes where V and
// the scales allow).
template <class V, int MT, bool X64, class S>
__attribute__((always_inline)) inline void segment_pair(const V& v, S& sc0, S& sc1, const Nf4Weight& w, int64_t f,
                                                        int64_t len, const float* xp, typename V::vec* acc0,
                                                        typename V::vec* acc1) {
    if constexpr (V::kScaleAfter && MT <= 2) {
        if (X64 || sc0.plain()) return segment_codes<V, MT, 2, X64>(v, sc0, sc1, w, f, len, xp, acc0, acc1);
    }
    const int64_t row_bytes = w.cols / 2;
    walk_pair(v, sc0, sc1, w, f, len, MT <= 2 ? 2 : kPrefetchRows,
              [&](const uint8_t* p, const typename V::Table& t0, const typename V::Table& t1) {
                  step_pair<V, MT>(v, p, p + row_bytes, t0, t1, xp, acc0, acc1);
                  xp += MT * 32;
              });
}

// A row's accumulators at the end of a slice ([MT][AJ] vectors), which start each slice at zero:
// added to the slices' total (keep), and at the last slice summed into y[m * N + n] (y at the
// tile's first row, m0 its index in x) with the LoRA term. Restarted per slice, an accumulator's
// chain is one slice long: carried over all of K, the scalar build's one accumulator a row (8-row
// tiles) summed 14336 products in a row, 7x torch's float32 error against float64 (M = 12).
template <class V, int MT, int AJ>
inline void finish_row(const V& v, typename V::vec* acc, bool first, bool last, typename V::vec* keep,
                       const LoraTerm* lora, int64_t m0, int64_t n, int64_t N, float* y) {
    if (!first)
        for (int a = 0; a < MT * AJ; ++a) acc[a] = v.add(keep[a], acc[a]);
    if (!last) {
        for (int a = 0; a < MT * AJ; ++a) keep[a] = acc[a];
        return;
    }
    for (int m = 0; m < MT; ++m) {
        typename V::vec s = acc[m * AJ];
        for (int j = 1; j < AJ; ++j) s = v.add(s, acc[m * AJ + j]);
        const float rest = lora_into(v, lora, m0 + m, n, s);
        y[m * N + n] = v.hsum(s) + rest;
    }
}

// Whether weight rows can go in pairs: whole blocks in every row and every span of kb columns.
inline bool pairs_fit(const Nf4Weight& w, int64_t kb) { return w.cols % w.blocksize == 0 && kb % w.blocksize == 0; }

// y[m0:m0+MT, n0:n0+rows] for one tile of x rows (its panel: [K / 32][MT][32]). With MT > 2 the K
// loop is cut into panel slices (panel_columns) that each pair of weight rows walks in turn, its
// accumulators restarting every sum_columns and their sums waiting in `keep` (as vectors: a
// horizontal sum per row and span cost ~30% at M = 16). Weight rows go in pairs where the blocks
// allow (K and the span multiples of the blocksize), else one at a time.
template <class V, class S, int MT, bool X64 = false>
inline void tile_block(const V& v, S& sc, S& sc1, const Nf4Weight& w, int64_t n0, int64_t rows, const float* panel,
                       const LoraTerm* lora, int64_t m0, float* y) {
    constexpr int AJ = acc_per_row<V, MT>();
    constexpr int U = MT <= 2 ? 2 : 1;
    constexpr int A = MT * AJ;
    using vec = typename V::vec;
    const int64_t K = w.cols, N = w.rows;
    const int64_t ks = MT <= 2 ? K : sum_columns(MT);
    const int64_t kb = MT <= 2 ? K : panel_columns(MT);
    const bool pairs = pairs_fit(w, ks);
    vec keep[kRowBlock][A];  // unused when MT <= 2 (one span)
    for (int64_t k0 = 0; k0 < K; k0 += kb) {
        const int64_t k1 = std::min(K, k0 + kb);
        int64_t i = 0;
        for (; pairs && i + 2 <= rows; i += 2)
            for (int64_t s = k0; s < k1; s += ks) {
                const int64_t len = std::min(ks, k1 - s);
                vec acc0[A], acc1[A];
                for (int a = 0; a < A; ++a) acc0[a] = acc1[a] = v.zero();
                segment_pair<V, MT, X64>(v, sc, sc1, w, (n0 + i) * K + s, len, panel + s * MT, acc0, acc1);
                finish_row<V, MT, AJ>(v, acc0, s == 0, s + ks >= K, keep[i], lora, m0, n0 + i, N, y);
                finish_row<V, MT, AJ>(v, acc1, s == 0, s + ks >= K, keep[i + 1], lora, m0, n0 + i + 1, N, y);
            }
        for (; i < rows; ++i)
            for (int64_t s = k0; s < k1; s += ks) {
                const int64_t len = std::min(ks, k1 - s);
                vec acc[U * A];
                for (int a = 0; a < U * A; ++a) acc[a] = v.zero();
                if constexpr (X64)
                    segment_codes<V, MT, 1, true>(v, sc, sc, w, (n0 + i) * K + s, len, panel + s * MT, acc, acc);
                else
                    segment<V, MT, U>(v, sc, w, (n0 + i) * K + s, len, panel + s * MT, acc);
                for (int a = 0; a < A; ++a)
                    for (int u = 1; u < U; ++u) acc[a] = v.add(acc[a], acc[u * A + a]);
                finish_row<V, MT, AJ>(v, acc, s == 0, s + ks >= K, keep[i], lora, m0, n0 + i, N, y);
            }
    }
}

// From 11 rows of x (14 with AVX-512) up, every V: the outputs of R weight rows for 16 rows of
// x sit in R x 16 / W accumulator vectors whose lanes are the rows of x, as in a BLAS micro-kernel.
// Per column k: 16 / W loads of x (the panel is [K][16]), R broadcasts of decoded weights, 16 R / W
// FMAs, no horizontal sums until the end. The dot-product walk above (lanes over k) needs 2 x 8
// accumulators for a weight-row pair against an 8-row tile, more than AVX2's 16 registers beside
// the weights and x, and loads a weight or x vector for every FMA. The weights of R rows x one
// slice of columns are decoded once into an L1 buffer for all 16 rows (~22 vector instructions per
// 32 weights on AVX2 against 64 FMAs). M = 16, 4096 x 4096, Zen 4, against the two 8-row tiles
// sharing one decode, interleaved: AVX2 0.81x the time (2 threads, cold; 1 thread, hot: 0.82x-0.89x,
// 0.39-0.40 ns a weight, the FMAs alone 0.29), AVX-512 0.84x (hot 0.77x), the scalar build
// (which the compiler vectorizes over the 16 rows) 0.34x.
constexpr int kXRows = 16;             // rows of x of the broadcast kernel: two 8-float vectors
// Weight rows per micro-tile: with 16 registers 6 (12 accumulators + 2 x + a broadcast; 4 rows:
// 1.02x-1.03x the time, more accumulators hide the 4-cycle FMA latency better), with 32 8 (one
// vector of x).
template <class V>
constexpr int bcast_rows() {
    return V::kRegs < 32 ? 6 : 8;
}
constexpr int64_t kBcastSlice = 256;   // columns per slice: the x panel slice is 16 KB, in L1

// Fewer than 16 rows of x pad the panel with zero rows: the FMAs are those of 16, the decode is
// shared by all of them (the tiles of 8 decode once per tile). 4096 x 4096, 2 threads, cold, Zen 4,
// time against the tiles, interleaved: AVX2 M = 9 1.14x, 10 1.06x, 11 0.86x-0.90x, 12 0.85x, 15
// 0.77x, 16 0.81x; AVX-512 (one vector per weight row, 8 rows a micro-tile) M = 9 1.39x, 11 1.16x,
// 13 1.0x, 14 0.90x, 15 0.84x, 16 0.84x.
template <class V>
constexpr bool broadcast_tile(int64_t M) {
    return kXRows % V::W == 0 && M >= (V::kRegs < 32 ? 11 : 14);
}

// Above 16 rows: tiles of 16 (the last padded) share each decoded slice, rows of x taken
// kChunkBytes of packed x at a time (so the panel copy stays a few MB whatever M is; the decode is
// repeated per chunk, 1 / 16 of a 256-row chunk's vector work).
constexpr int64_t kChunkBytes = int64_t{4} << 20;
inline int64_t chunk_rows(int64_t M, int64_t K) {
    const int64_t fit = kChunkBytes / (K * static_cast<int64_t>(sizeof(float))) / kXRows * kXRows;
    return std::min(M, std::max<int64_t>(kXRows, std::min<int64_t>(256, fit)));
}

// The weight index (0-31) at each position of V's split lane order within a 32-step (P = 64: within
// a 64-step of decode64_codes).
template <class V, int P = 32>
struct LaneSources {
    int at[P];
    LaneSources() {
        for (int p = 0; p < P; ++p) {
            if constexpr (P == 64)
                at[p] = V::lane_source64(p);
            else
                at[p] = V::lane_source(p);
        }
    }
};

// x [M, K] -> tiles of 16 rows, each [K][16] (x's columns in V's split lane order within each 32,
// as the decode gives them; the last tile's rows past M zero).
template <class V>
inline void pack_x_columns(const float* x, int64_t M, int64_t K, float* out) {
    const LaneSources<V> lanes;
    const int* src = lanes.at;
    for (int64_t m0 = 0; m0 < M; m0 += kXRows, x += kXRows * K, out += kXRows * K) {
        const int64_t mt = std::min<int64_t>(kXRows, M - m0);
        for (int64_t c = 0; c < K / 32; ++c)
            for (int p = 0; p < 32; ++p)
                for (int m = 0; m < kXRows; ++m)
                    out[(c * 32 + p) * kXRows + m] = m < mt ? x[m * K + c * 32 + src[p]] : 0.0f;
    }
}

inline int64_t x_tiles(int64_t M) { return (M + kXRows - 1) / kXRows; }

// The decoded weights of rows n0 .. n0 + nr, columns k0 .. k0 + klen, into o[r * kBcastSlice + k]
// (rows nr .. R - 1 zero: their outputs are dropped), with prefetches of what comes next.
template <class V, class S, int R>
__attribute__((always_inline)) inline void decode_rows(const V& v, S& sc, const Nf4Weight& w, int64_t n0, int nr,
                                                       int64_t k0, int64_t klen, float* o) {
    using vec = typename V::vec;
    const int64_t K = w.cols, N = w.rows, row_bytes = K / 2;
    const bool last = k0 + kBcastSlice >= K;
    for (int r = 0; r < R; ++r, o += kBcastSlice) {
        if (r >= nr) {
            std::fill(o, o + klen, 0.0f);
            continue;
        }
        const int64_t n = n0 + r, f0 = n * K + k0;
        const uint8_t* p = w.packed + f0 / 2;
        // This row's next slice, or (last slice) the first slice of the row a block down: both
        // are read after the rest of this block's rows at this slice.
        const uint8_t* next =
            last ? (n + kRowBlock < N ? w.packed + (n + kRowBlock) * row_bytes : nullptr) : p + klen / 2;
        if (next != nullptr)
            for (int64_t l = 0; l < kBcastSlice / 2; l += 64) __builtin_prefetch(next + l);
        for (int64_t s = 0; s < klen; s += 32, p += 16) {
            const int64_t b = (f0 + s) >> w.block_shift;  // a 32-chunk lies in one block (blocksize >= 32)
            sc.enter(b);
            vec wv[32 / V::W];
            v.decode32_split(p, sc.table(v, b), wv);
            for (int j = 0; j < 32 / V::W; ++j) v.store(o + s + j * V::W, wv[j]);
        }
    }
}

// sums[r][0:16] (+)= the products of R decoded weight rows (wb, [R][kBcastSlice]) and the x panel
// slice xp ([klen][16]), for r < nr. Not inlined: inlined beside the decode (whose constants the
// compiler keeps in registers), one of AVX2's 12 accumulators went to the stack, a load and a store
// in every column's chain: 1.3x-1.5x the time of the 4-row micro-tile.
template <class V, int R>
__attribute__((noinline)) void broadcast_tile_fmas(const V& v, const float* wb, const float* xp, int64_t klen, int nr,
                                                   bool first, float (*sums)[kXRows]) {
    constexpr int XV = kXRows / V::W;
    using vec = typename V::vec;
    vec acc[R][XV];
    for (int r = 0; r < R; ++r)
        for (int q = 0; q < XV; ++q) acc[r][q] = v.zero();
    for (int64_t k = 0; k < klen; ++k, xp += kXRows) {
        vec xv[XV];
        for (int q = 0; q < XV; ++q) xv[q] = v.load(xp + q * V::W);
        for (int r = 0; r < R; ++r) {
            const vec b = v.set1(wb[r * kBcastSlice + k]);
            for (int q = 0; q < XV; ++q) acc[r][q] = v.fmadd(b, xv[q], acc[r][q]);
        }
    }
    // Each slice sums in fresh accumulators, added to the total once (a chain of 256 FMAs per
    // output and slice, then one of K / 256 adds: as accurate as the 8-lane dot products).
    for (int r = 0; r < nr; ++r)
        for (int q = 0; q < XV; ++q) {
            float* t = sums[r] + q * V::W;
            v.store(t, first ? acc[r][q] : v.add(v.load(t), acc[r][q]));
        }
}

// y[0:M, n0:n0+rows] for one row block, x packed by pack_x_columns into xt (x_tiles(M) tiles).
template <class V, class S, int R>
__attribute__((always_inline)) inline void broadcast_group(const V& v, S& sc, const Nf4Weight& w, int64_t n0,
                                                           int nr, int64_t k0, int64_t klen, const float* xt,
                                                           int64_t tiles, float* wbuf, float (*sums)[kXRows]) {
    decode_rows<V, S, R>(v, sc, w, n0, nr, k0, klen, wbuf);
    for (int64_t t = 0; t < tiles; ++t)
        broadcast_tile_fmas<V, R>(v, wbuf, xt + (t * w.cols + k0) * kXRows, klen, nr, k0 == 0, sums + t * kRowBlock);
}

template <class V, class S>
inline void rows_block_broadcast(const V& v, S& sc, const Nf4Weight& w, int64_t n0, int64_t rows, const float* xt,
                                 int64_t M, const LoraTerm* lora, float* y) {
    constexpr int R = bcast_rows<V>();  // then rows % R in a last micro-tile of 4, or padded
    constexpr int64_t kb = kBcastSlice;
    using vec = typename V::vec;
    const int64_t K = w.cols, N = w.rows, tiles = x_tiles(M);
    alignas(64) float wbuf[R * kb];
    // every output's sum over the slices so far, [tiles][kRowBlock][16]
    thread_local std::vector<float> sum_buf;
    sum_buf.resize(std::max<size_t>(sum_buf.size(), tiles * kRowBlock * kXRows));
    float(*sums)[kXRows] = reinterpret_cast<float(*)[kXRows]>(sum_buf.data());
    for (int64_t k0 = 0; k0 < K; k0 += kb) {
        const int64_t klen = std::min(kb, K - k0);
        for (int64_t i = 0; i < rows;) {
            const int nr = static_cast<int>(std::min<int64_t>(R, rows - i));
            if (nr > 4)
                broadcast_group<V, S, R>(v, sc, w, n0 + i, nr, k0, klen, xt, tiles, wbuf, sums + i);
            else
                broadcast_group<V, S, 4>(v, sc, w, n0 + i, nr, k0, klen, xt, tiles, wbuf, sums + i);
            i += nr;
        }
    }
    for (int64_t m = 0; m < M; ++m)
        for (int64_t i = 0; i < rows; ++i) {
            vec s = v.zero();
            const float rest = lora_into(v, lora, m, n0 + i, s);
            y[m * N + n0 + i] = sums[m / kXRows * kRowBlock + i][m % kXRows] + (v.hsum(s) + rest);
        }
}

// x [M, K] -> panels: tiles of kMTile rows (the last one shorter), each [K / 32][rows][32] with
// every 32-chunk in V's split lane order, so a step reads one contiguous run of x. order64
// (codes64): each pair of 32-chunks in decode64_codes' order instead.
template <class V>
inline void pack_x(const float* x, int64_t M, int64_t K, float* out, bool order64) {
    const LaneSources<V> lanes;
    int src[64];
    for (int p = 0; p < 64; ++p) src[p] = lanes.at[p % 32] + 32 * (p / 32);
    if constexpr (V::kCodes64) {
        if (order64) {
            const LaneSources<V, 64> lanes64;
            memcpy(src, lanes64.at, sizeof src);
        }
    }
    for (int64_t m0 = 0; m0 < M; m0 += kMTile) {
        const int64_t mt = std::min<int64_t>(kMTile, M - m0);
        float* panel = out + m0 * K;
        for (int64_t c = 0; c < K / 32; ++c)
            for (int64_t m = 0; m < mt; ++m)
                for (int p = 0; p < 32; ++p)
                    panel[(c * mt + m) * 32 + p] = x[(m0 + m) * K + (c & ~int64_t{1}) * 32 + src[32 * (c & 1) + p]];
    }
}

// Any K: decode the row into a float buffer first, then dot products.
template <class V>
inline void row_dot_generic(const V& v, const Nf4Weight& w, int64_t n, const float* x, int64_t M,
                            const LoraTerm* lora, float* y, int64_t ldy, float* rowbuf) {
    const int64_t K = w.cols;
    decode_generic(w, n * K, K, rowbuf);
    for (int64_t m = 0; m < M; ++m) {
        typename V::vec s = v.zero();
        const float rest = lora_into(v, lora, m, n, s);
        y[m * ldy] = dot(v, rowbuf, x + m * K, K) + v.hsum(s) + rest;
    }
}

// tile_block for a tile of 1 or 2 rows: on V's 64-weight walk where the call's M takes it (codes64).
template <class V, class S, int MT>
inline void small_tile(const V& v, S& sc, S& sc1, const Nf4Weight& w, int64_t n0, int64_t rows, const float* xt,
                       int64_t M, const LoraTerm* lora, int64_t m0, float* y) {
    if constexpr (V::kCodes64) {
        if (codes64<V>(w, M)) return tile_block<V, S, MT, true>(v, sc, sc1, w, n0, rows, xt, lora, m0, y);
    }
    tile_block<V, S, MT>(v, sc, sc1, w, n0, rows, xt, lora, m0, y);
}

template <class V, class S>
inline void rows_block(const V& v, S& sc, S& sc1, const Nf4Weight& w, int64_t n0, int64_t rows, const float* xs, int64_t M,
                       const LoraTerm* lora, float* y) {
    const int64_t K = w.cols, N = w.rows;
    int64_t m0 = 0;
    if (broadcast_tile<V>(M)) {
        rows_block_broadcast(v, sc, w, n0, rows, xs, M, lora, y);
        return;
    }
    for (; m0 + kMTile <= M; m0 += kMTile) tile_block<V, S, kMTile>(v, sc, sc1, w, n0, rows, xs + m0 * K, lora, m0, y + m0 * N);
    const float* xt = xs + m0 * K;
    float* yt = y + m0 * N;
    switch (M - m0) {
        case 7: tile_block<V, S, 7>(v, sc, sc1, w, n0, rows, xt, lora, m0, yt); break;
        case 6: tile_block<V, S, 6>(v, sc, sc1, w, n0, rows, xt, lora, m0, yt); break;
        case 5: tile_block<V, S, 5>(v, sc, sc1, w, n0, rows, xt, lora, m0, yt); break;
        case 4: tile_block<V, S, 4>(v, sc, sc1, w, n0, rows, xt, lora, m0, yt); break;
        case 3: tile_block<V, S, 3>(v, sc, sc1, w, n0, rows, xt, lora, m0, yt); break;
        case 2: small_tile<V, S, 2>(v, sc, sc1, w, n0, rows, xt, M, lora, m0, yt); break;
        case 1: small_tile<V, S, 1>(v, sc, sc1, w, n0, rows, xt, M, lora, m0, yt); break;
        default: break;
    }
}

// out[i - b0] = block_scale(w, i) for the double-quantized blocks b0..b1 (the same bits): per group
// of 256 blocks its absmax and the offset loaded once, V's gathers where it has them (8 or 16
// scales an instruction) and a scalar tail. Against a loop of block_scale, 4096 x 4096, 2 threads,
// cold, Zen 4: AVX2 M = 3-8 0.97x-0.99x the time, AVX-512 M = 3-16 0.92x-0.98x.
template <class V>
inline void nested_scales_flat(const V& v, const Nf4Weight& w, int64_t b0, int64_t b1, float* out) {
    const uint8_t* q = static_cast<const uint8_t*>(w.absmax);
    const float off = *w.offset;
    for (int64_t i = b0; i <= b1;) {
        const int64_t g = NestedScales::group_of(i);
        const int64_t end = std::min(b1 + 1, (g + 1) * kNestedBlocksize);  // past this group's last block
        const float a = w.nested_absmax[g];
        int64_t k = i + v.nested_scales(q + i, w.nested_code, a, off, end - i, out + (i - b0));
        for (; k < end; ++k) out[k - b0] = mul_add_rn(w.nested_code[q[k]], a, off);
        i = end;
    }
}

template <class V, class S>
void matmul_nt_fast(const Nf4Weight& w, const float* x, const float* xs, int64_t M, const LoraTerm* lora, float* y,
                    int threads) {
    const int64_t N = w.rows;
    const int64_t blocks = (N + kRowBlock - 1) / kRowBlock;
    const int64_t K = w.cols;
    const int sh = w.block_shift;
    // Double quantization with M > 2, or AVX2's permute lookup at any M: each row block's scales are
    // decoded once into a float array (nested_scales_flat) and the walk is the plain one. Walked
    // through the per-group tables instead, M = 16 took 7% to 11% longer than without double
    // quantization (the compiler spills a table register in that loop), and AVX2's permute walk at
    // M = 1 and 2 1.5x and 1.6x as long (4096 x 4096, Zen 4). At M <= 2 AVX-512 (32 vector registers)
    // and AVX2's byte lookup (the scale a broadcast after the block's sums) read the tables: the
    // flat array took the byte lookup's layer at M = 1 to 1.06x-1.22x the plain-NF4 time (nf4 suite,
    // four shapes), the tables 0.99x-1.05x.
    const bool tables = M <= 2 && (V::W >= 16 || V::kScaleAfter);  // the walks that read the group tables
    const bool flat = S::kNested && !tables;
    lora_h<V>(lora, x, M, K, threads);  // h is complete before any output
    const auto block = [&](const V& v, int64_t b) {
        const int64_t n0 = b * kRowBlock, rows = std::min(kRowBlock, N - n0);
        prefetch_b_rows(lora, M, n0, rows);
        if (!flat) {
            S sc(w), sc1(w);  // the walk's block scales for a row and (pairs) the next one
            rows_block(v, sc, sc1, w, n0, rows, xs, M, lora, y);
            return;
        }
        thread_local std::vector<float> flat_scales;
        flat_scales.resize(std::max<size_t>(flat_scales.size(), ((kRowBlock * K) >> sh) + 2));
        const int64_t b0 = (n0 * K) >> sh, b1 = ((n0 + rows) * K - 1) >> sh;
        nested_scales_flat(v, w, b0, b1, flat_scales.data());
        PlainScales p0(flat_scales.data(), b0), p1(flat_scales.data(), b0);
        rows_block(v, p0, p1, w, n0, rows, xs, M, lora, y);
    };
    const int64_t per = piece_blocks(blocks, threads);
    parallel_for((blocks + per - 1) / per, threads, [&](int64_t piece) {
        V v(w.code);
        for (int64_t b = piece * per; b < std::min(blocks, piece * per + per); ++b) block(v, b);
    });
}

// term = *lora with its scaled_h in buf ([M, r]): the forward's own copy of the LoRA term. Returns
// &term, or null (and leaves both alone) for no term.
inline LoraTerm* with_scaled_h(const LoraTerm* lora, int64_t M, LoraTerm& term, std::vector<float>& buf) {
    if (lora == nullptr) return nullptr;
    term = *lora;
    buf.resize(M * term.r);
    term.scaled_h = buf.data();
    return &term;
}

// y [M, N] = x [M, K] @ W^T
template <class V>
void matmul_nt(const Nf4Weight& w, const float* x, int64_t M, const LoraTerm* lora_in, float* y, int threads) {
    const int64_t N = w.rows, K = w.cols;
    LoraTerm term;
    std::vector<float> scaled_h;
    const LoraTerm* lora = with_scaled_h(lora_in, M, term, scaled_h);
    if (K % 32 == 0) {
        const bool tiles16 = broadcast_tile<V>(M);
        // Up to 8 rows past the last whole 16-row tile, which a tile would pad to 16, are a chunk
        // of their own on the small-M walk: one more pass over W for them instead of the FMAs of
        // 16 rows. 4096 x 4096, 2 threads, 4 cold weights, interleaved, Zen 4, against the padded
        // tile: M = 17 0.64x the time (AVX2 0.65x), 20 0.72x (0.77x), 24 0.85x (0.91x), 33 0.75x
        // (0.74x), 40 0.92x (0.91x), 100 0.91x (0.92x); 10 rows past it 0.93x (1.02x), 13 1.03x.
        const int64_t rem = M % kXRows;
        const int64_t tiled = tiles16 && M > kXRows && rem != 0 && rem <= 8 ? M - rem : M;
        const int64_t per = tiles16 ? chunk_rows(tiled, K) : M;
        std::vector<float> xs((tiles16 ? x_tiles(per) * kXRows : M) * K);
        for (int64_t c0 = 0, mc; c0 < M; c0 += mc) {
            mc = c0 < tiled ? std::min(per, tiled - c0) : M - c0;
            LoraTerm chunk;  // the chunk's rows of h and the adapter index
            if (lora != nullptr) {
                chunk = term;
                chunk.h += c0 * term.r;
                chunk.scaled_h += c0 * term.r;
                if (chunk.index != nullptr) chunk.index += c0;
            }
            // One adapter above kTermRows rows: the term after the chunk's base, in column blocks
            // (add_terms), not as a dot of length r per output beside it (with a horizontal sum
            // each: at M = 256, r = 256 that epilogue was ~1/6 of the call).
            const bool after = lora != nullptr && lora->index == nullptr && mc > kTermRows;
            LoraTerm base = chunk;  // what the base's epilogue adds: the bias alone when `after`
            if (after) base.B = nullptr;
            if (broadcast_tile<V>(mc))
                pack_x_columns<V>(x + c0 * K, mc, K, xs.data());
            else
                pack_x<V>(x + c0 * K, mc, K, xs.data(), codes64<V>(w, mc));
            if (w.nested_absmax == nullptr)
                matmul_nt_fast<V, PlainScales>(w, x + c0 * K, xs.data(), mc, lora ? &base : nullptr, y + c0 * N,
                                               threads);
            else
                matmul_nt_fast<V, NestedScales>(w, x + c0 * K, xs.data(), mc, lora ? &base : nullptr, y + c0 * N,
                                                threads);
            if (after) {
                const int64_t one[2] = {0, mc};
                add_terms<V>(chunk.scaled_h, nullptr, one, 1, chunk, N, y + c0 * N, threads);
            }
        }
        return;
    }
    lora_h<V>(lora, x, M, K, threads);
    parallel_for((N + kRowBlock - 1) / kRowBlock, threads, [&](int64_t b) {
        V v(w.code);
        thread_local std::vector<float> rowbuf;
        rowbuf.resize(std::max<size_t>(rowbuf.size(), K));
        for (int64_t n = b * kRowBlock; n < std::min(N, (b + 1) * kRowBlock); ++n)
            row_dot_generic(v, w, n, x, M, lora, y + n, N, rowbuf.data());
    });
}

// A software prefetch of block b's scale (its float32 absmax, 8-bit code, or compact INT4 parameters).
inline void prefetch_block_scale(const Nf4Weight& w, int64_t b) {
    if (w.half_params)
        __builtin_prefetch(w.half_params + 6 * b);
    else if (w.nested_absmax)
        __builtin_prefetch(static_cast<const uint8_t*>(w.absmax) + b);
    else
        __builtin_prefetch(static_cast<const float*>(w.absmax) + b * w.scale_stride);
}

// A transposed-product task's sums, zeroed: [M][kTChunk] for the running span of kTSumRows rows,
// then [M][kTChunk] for the finished spans' total (per thread, reused across calls).
inline float* t_sums(int64_t M) {
    thread_local std::vector<float> buf;
    buf.resize(std::max<size_t>(buf.size(), 2 * M * kTChunk));
    std::fill(buf.begin(), buf.begin() + 2 * M * kTChunk, 0.0f);
    return buf.data();
}
// The end of a span: its sums added to the total (spans in row order), the running sums restarted.
inline void t_end_span(float* acc, int64_t M) {
    float* total = acc + M * kTChunk;
    for (int64_t i = 0; i < M * kTChunk; ++i) total[i] += acc[i];
    std::fill(acc, acc + M * kTChunk, 0.0f);
}

// y [M, K] = x [M, N] @ W for any K (the element-wise decode where a chunk is not whole 32-steps):
// each task owns kTChunk output columns and walks all N rows of W, decoding that row segment once
// and adding x[m, n] * segment into M accumulators, which restart every kTSumRows rows (their sums
// added in row order).
template <class V>
void matmul_t_any(const Nf4Weight& w, const float* x, int64_t M, float* y, int threads) {
    const int64_t N = w.rows, K = w.cols;
    const int64_t chunks = (K + kTChunk - 1) / kTChunk;
    parallel_for(chunks, threads, [&](int64_t c) {
        V v(w.code);
        float* acc = t_sums(M);
        float* total = acc + M * kTChunk;
        float seg[kTChunk];
        const int64_t k0 = c * kTChunk;
        const int64_t len = std::min(kTChunk, K - k0);
        for (int64_t n = 0; n < N; ++n) {
            decode_generic(w, n * K + k0, len, seg);
            for (int64_t m = 0; m < M; ++m) {
                const typename V::vec xm = v.set1(x[m * N + n]);
                float* am = acc + m * kTChunk;
                int64_t k = 0;
                for (; k + V::W <= len; k += V::W) v.store(am + k, v.fmadd(xm, v.load(seg + k), v.load(am + k)));
                for (; k < len; ++k) am[k] += x[m * N + n] * seg[k];
            }
            if ((n + 1) % kTSumRows == 0 && n + 1 < N) t_end_span(acc, M);
        }
        for (int64_t m = 0; m < M; ++m)
            for (int64_t k = 0; k < len; ++k) y[m * K + k0 + k] = total[m * kTChunk + k] + acc[m * kTChunk + k];
    });
}

// Rows of x sharing one decoded 32-step of W in the transposed product's register tile (MT x 32
// accumulators): AVX-512 8 (16 zmm of sums, 2 of weights, the table), AVX2 2 (8 ymm of sums, 4
// of weights, the byte planes), the scalar build 4.
template <class V>
constexpr int t_rows() {
    return V::W == 1 ? 4 : V::kRegs >= 32 ? 8 : 2;
}
// The same for tiles that read the decoded weights from the L1 buffer (more than t_rows rows of
// x): no decode in the loop, so AVX2 fits 3 rows (12 ymm of sums, the weights read by the FMAs).
// 4096 x 4096, 2 threads, cold, Zen 4, against 2 rows: M = 17 0.85x the time, 64 and 256 0.78x
// (4 rows: 1.18x-1.23x, spilled); AVX-512 at 12 rows instead of 8: 1.04x-1.14x, at 6 the same.
template <class V>
constexpr int t_rows_loaded() {
    return V::W == 1 ? 4 : V::kRegs >= 32 ? 8 : 3;
}
// Weight rows a task decodes before moving to the next 32 columns: 64 rows x 128 bytes (8 KB) of
// the chunk stay in L1 while its 8 steps of 32 columns are walked one after the other.
constexpr int64_t kTGroupRows = 64;
constexpr int64_t kTRowsPerPass = 256;  // rows of x a pass over W serves (see matmul_t)

// acc[m * kTChunk + i] (m < MT, i < 32, i in V's split lane order) += x[m * N + n] * w_n[i] for the
// rows n < rows, w_n from row(n, wv): the sums held in registers across the rows.
template <class V, int MT, class Row>
__attribute__((always_inline)) inline void t_tile(const V& v, const float* x, int64_t N, int64_t rows, float* acc,
                                                  Row&& row) {
    constexpr int J = 32 / V::W;
    using vec = typename V::vec;
    vec a[MT][J];
    for (int m = 0; m < MT; ++m)
        for (int j = 0; j < J; ++j) a[m][j] = v.load(acc + m * kTChunk + j * V::W);
    for (int64_t n = 0; n < rows; ++n) {
        vec wv[J];
        row(n, wv);
        for (int m = 0; m < MT; ++m) {
            const vec b = v.set1(x[m * N + n]);
            for (int j = 0; j < J; ++j) a[m][j] = v.fmadd(b, wv[j], a[m][j]);
        }
    }
    for (int m = 0; m < MT; ++m)
        for (int j = 0; j < J; ++j) v.store(acc + m * kTChunk + j * V::W, a[m][j]);
}

// t_tile for mt (1 .. t_rows) rows of x.
template <class V, int MT = t_rows<V>(), class Row>
__attribute__((always_inline)) inline void t_tile_rows(const V& v, int mt, const float* x, int64_t N, int64_t rows,
                                                       float* acc, Row&& row) {
    if constexpr (MT > 1) {
        if (mt < MT) return t_tile_rows<V, MT - 1>(v, mt, x, N, rows, acc, row);
    }
    t_tile<V, MT>(v, x, N, rows, acc, row);
}

// y [M, K] = x [M, N] @ W with K a multiple of 32: each task owns kTChunk output columns (whole
// 32-steps, each inside one block) and walks all N rows of W in groups of kTGroupRows rows; per
// group and 32-step the rows of x go in register tiles of t_rows: x[m, n] broadcast times the
// step's 32 decoded weights into MT x 32 sums. Up to t_rows rows of x the step is decoded inside the
// tile's loop; above, once into an L1 buffer that every tile reads. Each sum restarts every
// kTSumRows rows and the spans' sums are added in row order, the same operations on each output
// as matmul_t_any (the same bits). The decode gives V's split lane order, put back when y is
// written. Against matmul_t_any's loop (decode the chunk's 256 columns of a row into a buffer,
// then for each row of x a load, an FMA and a store of every 8 or 16 sums: two stores per weight
// and row), 4096 x 4096, 2 threads, 8 cold weights, interleaved, Zen 4: AVX-512 M = 1 0.87x the
// time, 2 0.69x, 4 0.53x, 16 0.46x, 32 0.37x; AVX2 0.72x / 0.58x / 0.54x / 0.31x / 0.28x. From 64
// rows on it takes the time of x W^T of the same size (1.00x-1.02x); at M = 1 still ~2x it (1.1 ms
// against 0.5): a task reads 128 bytes of each weight row, 2 KB apart, and from memory that runs
// slower than whole rows (hot, one weight in L3: 1.6x x W^T's time). Wider tasks read more of each
// row (1024 columns: M = 1 0.66x the time) but leave 4 tasks for 2 threads at 4096 columns, too
// few to share with a busy process (see parallel_for).
template <class V>
void matmul_t(const Nf4Weight& w, const float* x, int64_t M, float* y, int threads) {
    const int64_t N = w.rows, K = w.cols;
    if (K % 32 != 0) return matmul_t_any<V>(w, x, M, y, threads);
    if (M > kTRowsPerPass) {
        // Passes over W for kTRowsPerPass rows of x each: a task's sums (2 x M x 256 floats) stay
        // in L2 (256 KB at 256 rows), for one more read of W per pass. 4096 x 4096, 2 threads,
        // Zen 4, time against the dequantized tiles' (torch's GEMM): all 1024 rows in one pass
        // 1.05x (AVX-512) and 1.17x (AVX2).
        for (int64_t m0 = 0; m0 < M; m0 += kTRowsPerPass)
            matmul_t<V>(w, x + m0 * N, std::min(kTRowsPerPass, M - m0), y + m0 * K, threads);
        return;
    }
    constexpr int J = 32 / V::W, MT = t_rows<V>();
    using vec = typename V::vec;
    const int64_t chunks = (K + kTChunk - 1) / kTChunk;
    parallel_for(chunks, threads, [&](int64_t c) {
        V v(w.code);
        float* acc = t_sums(M);
        const float* total = acc + M * kTChunk;
        alignas(64) float wbuf[kTGroupRows * 32];  // a group's decoded 32-step, above MT rows of x
        const int64_t k0 = c * kTChunk;
        const int64_t steps = std::min(kTChunk, K - k0) / 32;
        for (int64_t n0 = 0; n0 < N; n0 += kTGroupRows) {
            const int64_t rows = std::min(kTGroupRows, N - n0);
            for (int64_t s = 0; s < steps; ++s) {
                const int64_t f0 = n0 * K + k0 + 32 * s;  // row n0's first weight of the step
                const auto decode = [&](int64_t n, vec* wv) __attribute__((always_inline)) {
                    const int64_t f = f0 + n * K;
                    // The next group's rows, spread over this group's decodes: every 4th decode
                    // prefetches one of the 128 lines (2 a row) the next group reads, and the
                    // row's scales with its first line. A task reads 128 bytes a row, K / 2 bytes
                    // apart, which the hardware prefetchers did not follow.
                    const int64_t i = s * kTGroupRows + n;
                    if ((i & 3) == 0) {
                        const int64_t line = i >> 2, fa = (n0 + kTGroupRows + (line >> 1)) * K + k0;
                        __builtin_prefetch(w.packed + fa / 2 + 64 * (line & 1));
                        if ((line & 1) == 0) prefetch_block_scale(w, fa >> w.block_shift);
                    }
                    v.decode32_split(w.packed + f / 2, v.scaled(scale_of(w, f)), wv);
                    if (w.shift) shift_all(v, wv, block_shift_value(w, f >> w.block_shift));
                };
                float* acc_s = acc + 32 * s;
                if (M <= MT) {
                    t_tile_rows<V>(v, static_cast<int>(M), x + n0, N, rows, acc_s, decode);
                    continue;
                }
                for (int64_t n = 0; n < rows; ++n) {
                    vec wv[J];
                    decode(n, wv);
                    for (int j = 0; j < J; ++j) v.store(wbuf + n * 32 + j * V::W, wv[j]);
                }
                const auto load = [&](int64_t n, vec* wv) __attribute__((always_inline)) {
                    for (int j = 0; j < J; ++j) wv[j] = v.load(wbuf + n * 32 + j * V::W);
                };
                constexpr int MB = t_rows_loaded<V>();
                for (int64_t m0 = 0; m0 < M; m0 += MB)
                    t_tile_rows<V, MB>(v, static_cast<int>(std::min<int64_t>(MB, M - m0)), x + m0 * N + n0, N, rows,
                                       acc_s + m0 * kTChunk, load);
            }
            const int64_t done = n0 + rows;
            if (done % kTSumRows == 0 || done == N) t_end_span(acc, M);
        }
        const LaneSources<V> src;  // the output column of each split lane
        for (int64_t m = 0; m < M; ++m)
            for (int64_t s = 0; s < steps; ++s)
                for (int i = 0; i < 32; ++i) y[m * K + k0 + 32 * s + src.at[i]] = total[m * kTChunk + 32 * s + i];
    });
}

template <class V>
void matmul(const Nf4Weight& w, const float* x, int64_t M, float* y, bool transpose, const LoraTerm* lora,
            int threads) {
    if (M <= 0) return;
    if (transpose)
        matmul_t<V>(w, x, M, y, threads);
    else
        matmul_nt<V>(w, x, M, lora, y, threads);
}

template <class V>
Kernels kernels() {
    return Kernels{&dequantize<V>, &matmul<V>, &lora_terms<V>, &load_converted, &store_converted, nullptr};
}

}  // namespace
}  // namespace impl
}  // namespace cpu
}  // namespace lorakern
