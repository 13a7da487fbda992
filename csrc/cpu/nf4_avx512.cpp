// AVX-512 NF4 kernels: the whole 16-entry table sits in one zmm register, so the lookup of 16
// weights is one vpermps.
#include <immintrin.h>

#include <array>
#include <utility>

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
    static constexpr bool kCodes64 = false;
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


// The bfloat16 product (Kernels::matmul_bf16), for bfloat16 layers on CPUs with AVX512-BF16
// (AMD Zen 4 and later, Intel Cooper Lake and Sapphire Rapids and later). vdpbf16ps multiplies 32
// bfloat16 pairs into 16 float32 sums per instruction, at the rate of a 16-lane float32 FMA on Zen
// 4 (3.65 G instructions a second on one core either way, measured): twice the multiply-adds,
// where the float32 kernels at 4 to 16 rows of x are bound by their FMAs (46 GMAC/s on one Zen 4
// core, 4096 x 4096, M = 16). Lanes are 16 pairs of columns of one weight row: x's rows are read as
// they are (bfloat16, in order), each weight row's 16 packed bytes widen to 16 dwords holding two
// codes (vpmovzxbd, shifts), and vpermw looks both up in the block's table of 16 bfloat16 weights
// (its float32 table, what the float32 walk multiplies by, rounded to nearest even: the weight a
// dequantize to bfloat16 gives). A register tile of MT rows of x by NT weight rows shares each
// decoded step among MT rows and each loaded step of x among NT rows; each output's 16 lane sums
// are added at the end. 1 to 4 rows take another walk where the weight allows (chunk_tile), which
// pairs the columns in other lanes: a row's bits depend on which walk M takes, never on the
// thread count. vdpbf16ps and the bfloat16 conversions take subnormal inputs as zero (x below
// 1.2e-38 in magnitude, or a weight whose float32 value is).
// The AVX512-BF16 intrinsics need gcc >= 10 or clang >= 9 (gcc 9, Ubuntu 20.04's, has none): with
// an older compiler the path is left out (avx512_bf16_kernels() has no matmul_bf16, and the
// extension does not offer "avx512-bf16"), and the rest builds as before.
#if (defined(__clang__) && __clang_major__ >= 9) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 10)
#define LK_HAVE_BF16 1
#else
#define LK_HAVE_BF16 0
#endif

#if LK_HAVE_BF16
namespace bf16 {

#define LK_BF16 __attribute__((target("avx512bf16,avx512bw,avx512f")))

// Weight rows per register tile for MT rows of x (MT * NT accumulators, NT weight vectors and NT
// tables: at most 32 zmm). One Zen 4 core, 960 x 4096, hot, GMAC/s: MT = 8, NT = 2 80, NT = 3 84;
// MT = 4, NT = 4 72, NT = 6 70; MT = 2, NT = 8 45; MT = 1, NT = 12 26 (the float32 kernels: 46.5
// at M = 16, 44 at M = 4, 35 at M = 2, 22.5 at M = 1).
constexpr int nt_for(int MT) { return MT >= 5 ? 3 : MT == 4 ? 4 : MT == 3 ? 6 : 8; }
// Weight rows per piece of the loop: 48, a multiple of every NT (and chunk_nt). The chunk walk
// (1 to 4 rows) takes up to 384 KB of codes a piece (192 rows at 4096 columns), fewer where a
// thread would get fewer than 8 pieces: 4096 x 4096, 2 threads, 8 cold weights, interleaved,
// against 48 rows: M = 1 0.86x-0.92x the time, 2 0.91x-0.96x, 4 0.95x-1.0x (96 rows: 0.91x-0.94x,
// 0.95x-0.98x; a piece's first tile prefetched instead: no change); M = 8 1.0x and 16 1.03x, so
// the other walk keeps 48; 14336 columns (48 rows is 344 KB) 0.99x at M = 1.
constexpr int64_t kPieceRows = 48;
inline int64_t chunk_piece_rows(int64_t N, int64_t K, int threads) {
    const int64_t even = N / (8 * std::max(threads, 1)), by_bytes = (int64_t{384} << 10) / (K / 2);
    return std::max(kPieceRows, std::min(even, by_bytes) / kPieceRows * kPieceRows);
}

// Block b's 16 weights as bfloat16 in the low words (vpermw reads indices 0-15 only).
template <class S>
LK_BF16 inline __m512i table(const Avx512Vec& v, S& sc, int64_t b) {
    sc.enter(b);
    return _mm512_castsi256_si512(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(sc.table(v, b))));
}

// One step: 32 columns from k of each of NT weight rows (bytes at p[j]), decoded with tab[j],
// times MT rows of x (K apart) into acc.
template <int MT, int NT>
LK_BF16 __attribute__((always_inline)) inline void step(const uint8_t* const* p, int64_t k, const __m512i* tab,
                                                        const uint16_t* x, int64_t K, __m512 (*acc)[NT]) {
    const __m512i high = _mm512_set1_epi32(0xF0000);
    __m512i wv[NT];
#pragma GCC unroll 16
    for (int j = 0; j < NT; ++j) {
        const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p[j] + k / 2)));
        // dword i: the code of column k + 2i (the byte's high nibble) in its low word, of k + 2i + 1
        // in its high word (ternary logic 0xEC: (a & c) | b)
        const __m512i idx = _mm512_ternarylogic_epi32(_mm512_slli_epi32(d, 16), _mm512_srli_epi32(d, 4), high, 0xEC);
        wv[j] = _mm512_permutexvar_epi16(idx, tab[j]);
    }
#pragma GCC unroll 16
    for (int i = 0; i < MT; ++i) {
        const __m512bh xv = reinterpret_cast<__m512bh>(_mm512_loadu_si512(x + i * K + k));
#pragma GCC unroll 16
        for (int j = 0; j < NT; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv, reinterpret_cast<__m512bh>(wv[j]));
    }
}

// A tile's outputs, both walks: y[i * N + n0 + j] = acc[i][j]'s lane sum + bias[n0 + j].
template <int MT, int NT>
LK_BF16 inline void store_tile(const __m512 (*acc)[NT], int64_t n0, int64_t N, float* y, const float* bias) {
#pragma GCC unroll 16
    for (int i = 0; i < MT; ++i)
#pragma GCC unroll 16
        for (int j = 0; j < NT; ++j)
            y[i * N + n0 + j] = _mm512_reduce_add_ps(acc[i][j]) + (bias != nullptr ? bias[n0 + j] : 0.0f);
}

// y[i * N + n] = bias[n] + sum_k x[i * K + k] W_bf16[n, k] for i < MT, n0 <= n < n0 + NT.
template <int MT, int NT, class S>
LK_BF16 void tile(const Avx512Vec& v, S* sc, const Nf4Weight& w, int64_t n0, const uint16_t* x, float* y,
                  const float* bias) {
    const int64_t K = w.cols, N = w.rows;
    const int sh = w.block_shift;
    __m512 acc[MT][NT] = {};
    __m512i tab[NT];
    int64_t cur[NT];
    const uint8_t* p[NT];
#pragma GCC unroll 16
    for (int j = 0; j < NT; ++j) {
        cur[j] = -1;
        tab[j] = _mm512_setzero_si512();
        p[j] = w.packed + (n0 + j) * K / 2;
    }
    if ((K & (w.blocksize - 1)) == 0) {  // rows start on a block: all NT rows change block together
        const int64_t bs = w.blocksize;
        for (int64_t k0 = 0; k0 < K; k0 += bs) {
#pragma GCC unroll 16
            for (int j = 0; j < NT; ++j) {
                tab[j] = table(v, sc[j], ((n0 + j) * K + k0) >> sh);
                // the next tile's row j at the same column: a tile (K / 32 steps) ahead
                __builtin_prefetch(p[j] + k0 / 2 + NT * K / 2);
            }
            for (int64_t k = k0; k < k0 + bs; k += 32) step<MT, NT>(p, k, tab, x, K, acc);
        }
    } else {
        for (int64_t k = 0; k < K; k += 32) {
#pragma GCC unroll 16
            for (int j = 0; j < NT; ++j) {
                const int64_t b = ((n0 + j) * K + k) >> sh;
                if (b != cur[j]) {
                    cur[j] = b;
                    tab[j] = table(v, sc[j], b);
                }
            }
            step<MT, NT>(p, k, tab, x, K, acc);
        }
    }
    store_tile<MT, NT>(acc, n0, N, y, bias);
}

// 1 to 4 rows of x, where the decode is the limit (two shuffles a step: the widening and the
// lookup, on the two pipes that take them): a chunk of 128 columns of a weight row is one 64-byte
// load of its codes, and its word j (bytes 2j, 2j + 1) shifted by 0, 4, 8, 12 has in its low 4
// bits the code of column 4j + 1, 4j, 4j + 3, 4j + 2, so four lookups (vpermw) give the chunk's
// 128 weights without a widening. The table holds the first block's 16 weights in words 0-15 and
// the second block's in 16-31 (the same block twice where blocks are >= 128 columns), bit 4 of
// each index set in words 16-31. x is permuted to match once per call (chunk_x). One Zen 4 core,
// 960 x 4096, hot, GMAC/s, against step(): M = 1 35 (26), 2 58 (45), 3 69 (51); from 4 rows the
// same (74 against 72) and from 8 slower (its 3 x NT registers of codes, tables and weights).
constexpr int kChunkSource[4] = {1, 0, 3, 2};  // the column 4j + kChunkSource[s] of lookup s

// Rows that take the chunk walk: up to 4 (2 threads, 8 cold 4096 x 4096 weights: M = 4 0.60 ms
// against step()'s 0.69; M = 5 0.87-0.94 against 0.72, and from 2 tiles of it up to 16 rows slower
// still), where the weight has whole 128-column chunks of blocks of >= 64 columns.
inline bool chunk_walk(const Nf4Weight& w, int64_t M) { return M <= 4 && bf16_chunks(w); }
// Weight rows a tile on the chunk walk: 4 at every MT. Against 8 at M = 1: 0.87x-0.92x the time
// (4096 x 4096 and the 14336 shapes, 2 threads, cold; one thread hot 0.92x; 12: 1.3x); against
// 6 at M = 2: 0.91x-0.93x; 3 at M = 3 and 4: 1.0x-1.035x its time. (2 threads, interleaved.)
constexpr int chunk_nt(int) { return 4; }

// xc [M][K / 128][4][32] = x [M][K] with chunk c's column 4j + kChunkSource[s] at [m][c][s][j].
LK_BF16 inline void chunk_x(const uint16_t* x, int64_t M, int64_t K, uint16_t* xc) {
    alignas(64) uint16_t idx[4][32];
    for (int s = 0; s < 4; ++s)
        for (int j = 0; j < 32; ++j) idx[s][j] = static_cast<uint16_t>((4 * j + kChunkSource[s]) % 64);
    for (int64_t m = 0; m < M; ++m)
        for (int64_t c = 0; c < K / kBf16Chunk; ++c) {
            const uint16_t* src = x + m * K + c * kBf16Chunk;
            const __m512i a0 = _mm512_loadu_si512(src), a1 = _mm512_loadu_si512(src + 32);
            const __m512i b0 = _mm512_loadu_si512(src + 64), b1 = _mm512_loadu_si512(src + 96);
            for (int s = 0; s < 4; ++s) {
                const __m512i i = _mm512_load_si512(idx[s]);
                // words 0-15 from columns 0-63, 16-31 from 64-127
                const __m512i lo = _mm512_permutex2var_epi16(a0, i, a1), hi = _mm512_permutex2var_epi16(b0, i, b1);
                _mm512_storeu_si512(xc + (m * (K / kBf16Chunk) + c) * kBf16Chunk + 32 * s,
                                    _mm512_mask_blend_epi16(0xFFFF0000u, lo, hi));
            }
        }
}

// tile() over the chunk walk: xc from chunk_x.
template <int MT, int NT, class S>
LK_BF16 void chunk_tile(const Avx512Vec& v, S* sc, const Nf4Weight& w, int64_t n0, const uint16_t* xc, float* y,
                        const float* bias) {
    const int64_t K = w.cols, N = w.rows, chunks = K / kBf16Chunk;
    const int sh = w.block_shift;
    const __m512i low4 = _mm512_set1_epi16(0x0F);
    const __m512i upper = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(0x10), 1);
    __m512 acc[MT][NT] = {};
    for (int64_t c = 0; c < chunks; ++c) {
        __m512i tab[NT], codes[NT];
#pragma GCC unroll 16
        for (int j = 0; j < NT; ++j) {
            const int64_t f = (n0 + j) * K + c * kBf16Chunk;
            const int64_t b0 = f >> sh, b1 = (f + 64) >> sh;
            sc[j].enter(b0);
            const __m512 t0 = sc[j].table(v, b0);
            sc[j].enter(b1);
            tab[j] = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(sc[j].table(v, b1), t0));
            codes[j] = _mm512_loadu_si512(w.packed + f / 2);
            // The next tile's row j, a tile ahead, into L2 (prefetcht1): into L1 (t0) each of the
            // NT rows' prefetches holds an L1 miss buffer until its line arrives, and the walk
            // stalled on them (4096 x 4096, 2 threads, 8 cold weights, interleaved: t1 0.78x-0.86x
            // the time at M = 1, 0.89x-0.92x at 2, 0.94x-0.97x at 4; t2 the same; t1 in the other
            // walk, 5 to 16 rows: no change).
            __builtin_prefetch(w.packed + (f + NT * K) / 2, 0, 2);
        }
#pragma GCC unroll 4
        for (int s = 0; s < 4; ++s) {
            __m512i wv[NT];
#pragma GCC unroll 16
            for (int j = 0; j < NT; ++j) {
                const __m512i shifted = s == 0 ? codes[j] : _mm512_srli_epi16(codes[j], 4 * s);
                // (shifted & 0x0F) | upper: ternary logic 0xEA, (a & b) | c
                wv[j] = _mm512_permutexvar_epi16(_mm512_ternarylogic_epi32(shifted, low4, upper, 0xEA), tab[j]);
            }
#pragma GCC unroll 16
            for (int i = 0; i < MT; ++i) {
                const uint16_t* xs = xc + (i * chunks + c) * kBf16Chunk + 32 * s;
                const __m512bh xv = reinterpret_cast<__m512bh>(_mm512_loadu_si512(xs));
#pragma GCC unroll 16
                for (int j = 0; j < NT; ++j)
                    acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv, reinterpret_cast<__m512bh>(wv[j]));
            }
        }
    }
    store_tile<MT, NT>(acc, n0, N, y, bias);
}

template <class S, size_t... I>
std::array<S, sizeof...(I)> scales_for(const Nf4Weight& w, std::index_sequence<I...>) {
    return {{((void)I, S(w))...}};
}

// Weight rows [n0, n1) for MT rows of x: tiles of NT rows, then single rows; on the chunk walk
// (kChunks: x from chunk_x, MT <= 4) or in steps of 32 (x as it is).
template <bool kChunks, int MT, class S>
void rows(const Avx512Vec& v, const Nf4Weight& w, int64_t n0, int64_t n1, const uint16_t* x, float* y,
          const float* bias) {
    constexpr int NT = kChunks ? chunk_nt(MT) : nt_for(MT);
    std::array<S, NT> sc = scales_for<S>(w, std::make_index_sequence<NT>());
    const auto run = [&](auto nt, int64_t n) {
        constexpr int kNT = decltype(nt)::value;
        if constexpr (kChunks)
            chunk_tile<MT, kNT>(v, sc.data(), w, n, x, y, bias);
        else
            tile<MT, kNT>(v, sc.data(), w, n, x, y, bias);
    };
    int64_t n = n0;
    for (; n + NT <= n1; n += NT) run(std::integral_constant<int, NT>(), n);
    for (; n < n1; ++n) run(std::integral_constant<int, 1>(), n);
}

template <class S>
void rows_any(int64_t mt, const Avx512Vec& v, const Nf4Weight& w, int64_t n0, int64_t n1, const uint16_t* x,
              float* y, const float* bias) {
    switch (mt) {
        case 1: return rows<false, 1, S>(v, w, n0, n1, x, y, bias);
        case 2: return rows<false, 2, S>(v, w, n0, n1, x, y, bias);
        case 3: return rows<false, 3, S>(v, w, n0, n1, x, y, bias);
        case 4: return rows<false, 4, S>(v, w, n0, n1, x, y, bias);
        case 5: return rows<false, 5, S>(v, w, n0, n1, x, y, bias);
        case 6: return rows<false, 6, S>(v, w, n0, n1, x, y, bias);
        case 7: return rows<false, 7, S>(v, w, n0, n1, x, y, bias);
        default: return rows<false, 8, S>(v, w, n0, n1, x, y, bias);
    }
}

template <class S>
void base(const Nf4Weight& w, const uint16_t* x, int64_t M, float* y, const float* bias, int threads) {
    const int64_t N = w.rows, K = w.cols;
    // Up to 8 rows of x a tile (24 accumulators at NT = 3); 9 to 16 rows in two tiles, each
    // decoding the weights again (at M = 16 a step's decode is ~10 instructions beside 24 vdpbf16ps).
    const int64_t first = M <= 8 ? M : (M + 1) / 2;
    if (chunk_walk(w, M)) {
        thread_local std::vector<uint16_t> buf;  // the caller's: x in the chunks' column order
        buf.resize(std::max<size_t>(buf.size(), M * K));
        chunk_x(x, M, K, buf.data());
        const uint16_t* xc = buf.data();
        const int64_t per = chunk_piece_rows(N, K, threads);
        parallel_for((N + per - 1) / per, threads, [&](int64_t piece) {
            const Avx512Vec v(w.code);
            const int64_t n0 = piece * per, n1 = std::min(N, n0 + per);
            switch (M) {
                case 1: return rows<true, 1, S>(v, w, n0, n1, xc, y, bias);
                case 2: return rows<true, 2, S>(v, w, n0, n1, xc, y, bias);
                case 3: return rows<true, 3, S>(v, w, n0, n1, xc, y, bias);
                default: return rows<true, 4, S>(v, w, n0, n1, xc, y, bias);
            }
        });
        return;
    }
    parallel_for((N + kPieceRows - 1) / kPieceRows, threads, [&](int64_t piece) {
        const Avx512Vec v(w.code);
        const int64_t n0 = piece * kPieceRows, n1 = std::min(N, n0 + kPieceRows);
        rows_any<S>(first, v, w, n0, n1, x, y, bias);
        if (first < M) rows_any<S>(M - first, v, w, n0, n1, x + first * K, y + first * N, bias);
    });
}

void matmul(const Nf4Weight& w, const uint16_t* x, const float* xf, int64_t M, float* y, const LoraTerm* lora,
            int threads) {
    if (M <= 0) return;
    LoraTerm term;
    std::vector<float> scaled_h;
    if (impl::with_scaled_h(lora, M, term, scaled_h)) impl::lora_h<Avx512Vec>(&term, xf, M, w.cols, threads);
    const float* bias = lora != nullptr ? lora->bias : nullptr;
    if (w.nested_absmax == nullptr)
        base<impl::PlainScales>(w, x, M, y, bias, threads);
    else
        base<impl::NestedScales>(w, x, M, y, bias, threads);
    if (lora != nullptr) {
        const int64_t one[2] = {0, M};
        impl::add_terms<Avx512Vec>(term.scaled_h, nullptr, one, 1, term, w.rows, y, threads);
    }
}

}  // namespace bf16
#endif  // LK_HAVE_BF16

}  // namespace

Kernels avx512_kernels() { return impl::kernels<Avx512Vec>(); }

Kernels avx512_bf16_kernels() {
    Kernels k = impl::kernels<Avx512Vec>();
#if LK_HAVE_BF16
    k.matmul_bf16 = &bf16::matmul;
#endif
    return k;
}

}  // namespace cpu
}  // namespace lorakern
