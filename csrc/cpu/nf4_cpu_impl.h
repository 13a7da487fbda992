// The NF4 CPU algorithms, written once over a small vector interface V and compiled three times
// (nf4_scalar.cpp, nf4_avx2.cpp, nf4_avx512.cpp) with per-file ISA flags. Include only from those.
//
// V provides: vec, W (lanes), zero(), set1(f), load(p), store(p, v), add, fmadd(a, b, c), hsum(v),
//   decode32(bytes, scale, out): 16 packed bytes -> 32 weights in order (code[index] * scale,
//     float32, one rounding, like the reference) as 32 / W vectors;
//   scaled(scale) -> Table: the 16 code values times scale (one rounding each: bit-identical to multiplying
//     after the lookup), so the matmul pays one multiply per block instead of one per 16 weights;
//   decode32_split(bytes, table, out): the same 32 weights in a lane order of V's choosing,
//     lane_source(pos) naming the weight at position pos; matmul permutes x to match once per call.
//
// Decode (M = 1, 4096 x 4096): 16.8M weights in 8.4 MB of bytes + 1 MB of absmax. At ~20 GB/s
// that is ~0.45 ms, so the decode must cost a few instructions per 32 weights. The shuffle port
// is the limit on x86 (one per cycle): in order, 32 weights cost 2 unpacks + 2 widenings + 2
// permutes = 6 shuffles; split (even weights from the high nibbles, odd from the low ones, of the
// same widened bytes) costs 1 widening + 2 permutes = 3.
#pragma once

#include <stdint.h>
#include <string.h>

#include <algorithm>

#include "nf4_cpu.h"

namespace lorakern {
namespace cpu {
namespace impl {

constexpr int kMTile = 8;      // rows of x sharing one decode: 8 x 2 accumulators + 2 weights in 32 zmm
constexpr int64_t kRowBlock = 16;  // weight rows per task, sharing one L1-resident x tile
constexpr int64_t kKBlock = 512;   // columns of the x tile (a multiple of 64)
constexpr int64_t kMaxSegmentBlocks = 1024;  // decoded block scales per row segment (K <= 32768 at 32)
constexpr int64_t kTChunk = 256;  // columns per task in the transposed product (16 KB of fp32 acc at M=16)

// Element-by-element decode of W_flat[start:start+count) into float32: any alignment.
inline void decode_generic(const Nf4Weight& w, int64_t start, int64_t count, float* out) {
    for (int64_t i = 0; i < count; ++i) {
        const int64_t f = start + i;
        out[i] = nf4_value(nf4_index(w.packed, f)) * scale_of(w, f);
    }
}

inline void store_converted(const float* src, int64_t count, void* dst, int out_dtype) {
    if (out_dtype == kFloat32) {
        memcpy(dst, src, count * sizeof(float));
    } else if (out_dtype == kBFloat16) {
        uint16_t* o = static_cast<uint16_t*>(dst);
        for (int64_t i = 0; i < count; ++i) o[i] = float_to_bf16_bits(src[i]);
    } else {
        uint16_t* o = static_cast<uint16_t*>(dst);
        for (int64_t i = 0; i < count; ++i) o[i] = float_to_half_bits(src[i]);
    }
}

inline int64_t out_elem_size(int out_dtype) { return out_dtype == kFloat32 ? 4 : 2; }

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
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < body_chunks; ++c) {
        V v;
        const int64_t f = s0 + c * 32;
        typename V::vec wv[32 / V::W];
        v.decode32(w.packed + f / 2, v.set1(scale_of(w, f)), wv);
        float tmp[32];
        for (int j = 0; j < 32 / V::W; ++j) v.store(tmp + j * V::W, wv[j]);
        store_converted(tmp, 32, o + (head + c * 32) * esize, out_dtype);
    }
    const int64_t done = head + body_chunks * 32;
    if (done < count) {
        decode_generic(w, start + done, count - done, buf);
        store_converted(buf, count - done, o + done * esize, out_dtype);
    }
}

// out[m] += sum_{k in [k0, k0+klen)} x[m, k] W[n, k] for MT rows of x, one output row n.
// K % 64 == 0 (fast path); x is in V's split lane order (see permute_x). MT <= 2 keeps two 32-weight
// steps in flight so M = 1 has 4 independent FMA chains (AVX-512); larger tiles get theirs from rows.
template <class V, int MT>
inline void row_dot_fast(const V& v, const Nf4Weight& w, int64_t n, const float* x, int64_t ldx, int64_t k0,
                         int64_t klen, float* out) {
    constexpr int J = 32 / V::W;
    constexpr int U = MT <= 2 ? 2 : 1;
    const int64_t K = w.cols;
    const uint8_t* row = w.packed + n * K / 2;
    const int64_t f0 = n * K;
    typename V::vec acc[MT][U * J];
    for (int m = 0; m < MT; ++m)
        for (int j = 0; j < U * J; ++j) acc[m][j] = v.zero();
    const bool shared_scale = w.blocksize >= 32 * U;  // both steps of an iteration in one block
    // The segment's block scales up front when its blocks are whole: the absmax array itself, or
    // (double quantization) decoded in one loop before the FMA loop. Double quantization still
    // costs ~10% at M = 1 (measured; the decode itself is not the cause: gathers, or constant
    // scales, in this loop give the same time).
    const float* seg = nullptr;
    float decoded[kMaxSegmentBlocks];
    const int s = w.block_shift;
    if (((f0 + k0) & (w.blocksize - 1)) == 0 && (klen & (w.blocksize - 1)) == 0) {
        const int64_t b0 = (f0 + k0) >> s, nb = klen >> s;
        if (w.nested_absmax == nullptr) {
            seg = static_cast<const float*>(w.absmax) + b0;
        } else if (nb <= kMaxSegmentBlocks) {
            for (int64_t b = 0; b < nb; ++b) decoded[b] = block_scale(w, b0 + b);
            seg = decoded;
        }
    }
    for (int64_t k = k0; k < k0 + klen; k += 32 * U) {
        typename V::Table tab = v.scaled(seg ? seg[(k - k0) >> s] : scale_of(w, f0 + k));
        for (int u = 0; u < U; ++u) {
            const int64_t kk = k + 32 * u;
            if (u && !shared_scale) tab = v.scaled(seg ? seg[(kk - k0) >> s] : scale_of(w, f0 + kk));
            typename V::vec wv[J];
            v.decode32_split(row + kk / 2, tab, wv);
            for (int m = 0; m < MT; ++m)
                for (int j = 0; j < J; ++j)
                    acc[m][u * J + j] = v.fmadd(wv[j], v.load(x + m * ldx + kk + j * V::W), acc[m][u * J + j]);
        }
    }
    for (int m = 0; m < MT; ++m) {
        typename V::vec s = acc[m][0];
        for (int j = 1; j < U * J; ++j) s = v.add(s, acc[m][j]);
        out[m] += v.hsum(s);
    }
}

// y[m0:m0+MT, n0:n0+rows] for one tile of x rows. With MT > 2 the K loop is cut into kKBlock pieces
// so the x tile (8 rows x 512 x 4 B = 16 KB) stays in L1 while kRowBlock weight rows stream past it;
// unblocked, 8 rows of a 4096-wide x (128 KB) would be re-read from L2 for every weight row.
template <class V, int MT>
inline void tile_block(const V& v, const Nf4Weight& w, int64_t n0, int64_t rows, const float* x, float* y) {
    const int64_t K = w.cols, N = w.rows;
    const int64_t kb = MT <= 2 ? K : kKBlock;
    float part[kRowBlock][MT] = {};
    for (int64_t k0 = 0; k0 < K; k0 += kb) {
        const int64_t klen = std::min(kb, K - k0);
        for (int64_t i = 0; i < rows; ++i) row_dot_fast<V, MT>(v, w, n0 + i, x, K, k0, klen, part[i]);
    }
    for (int64_t i = 0; i < rows; ++i)
        for (int m = 0; m < MT; ++m) y[m * N + n0 + i] = part[i][m];
}

// x [M, K] -> the same values with every 32-chunk in V's split lane order.
template <class V>
inline void permute_x(const float* x, int64_t M, int64_t K, float* out) {
    int src[32];
    for (int p = 0; p < 32; ++p) src[p] = V::lane_source(p);
    for (int64_t i = 0; i < M * K; i += 32)
        for (int p = 0; p < 32; ++p) out[i + p] = x[i + src[p]];
}

// Any K: decode the row into a float buffer first, then dot products.
template <class V>
inline void row_dot_generic(const V& v, const Nf4Weight& w, int64_t n, const float* x, int64_t M, float* y,
                            int64_t ldy, float* rowbuf) {
    const int64_t K = w.cols;
    decode_generic(w, n * K, K, rowbuf);
    for (int64_t m = 0; m < M; ++m) {
        const float* xm = x + m * K;
        typename V::vec acc = v.zero();
        int64_t k = 0;
        for (; k + V::W <= K; k += V::W) acc = v.fmadd(v.load(rowbuf + k), v.load(xm + k), acc);
        float s = v.hsum(acc);
        for (; k < K; ++k) s += rowbuf[k] * xm[k];
        y[m * ldy] = s;
    }
}

template <class V>
inline void rows_block(const V& v, const Nf4Weight& w, int64_t n0, int64_t rows, const float* x, int64_t M,
                       float* y) {
    const int64_t K = w.cols, N = w.rows;
    int64_t m0 = 0;
    for (; m0 + kMTile <= M; m0 += kMTile) tile_block<V, kMTile>(v, w, n0, rows, x + m0 * K, y + m0 * N);
    const float* xt = x + m0 * K;
    float* yt = y + m0 * N;
    switch (M - m0) {
        case 7: tile_block<V, 7>(v, w, n0, rows, xt, yt); break;
        case 6: tile_block<V, 6>(v, w, n0, rows, xt, yt); break;
        case 5: tile_block<V, 5>(v, w, n0, rows, xt, yt); break;
        case 4: tile_block<V, 4>(v, w, n0, rows, xt, yt); break;
        case 3: tile_block<V, 3>(v, w, n0, rows, xt, yt); break;
        case 2: tile_block<V, 2>(v, w, n0, rows, xt, yt); break;
        case 1: tile_block<V, 1>(v, w, n0, rows, xt, yt); break;
        default: break;
    }
}

// y [M, N] = x [M, K] @ W^T
template <class V>
void matmul_nt(const Nf4Weight& w, const float* x, int64_t M, float* y, int threads) {
    const int64_t N = w.rows, K = w.cols;
    const bool fast = K % 64 == 0;
    float* xs = nullptr;
    if (fast) {
        xs = new float[M * K];
        permute_x<V>(x, M, K, xs);
        const int64_t blocks = (N + kRowBlock - 1) / kRowBlock;
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t b = 0; b < blocks; ++b) {
            V v;
            const int64_t n0 = b * kRowBlock;
            rows_block(v, w, n0, std::min(kRowBlock, N - n0), xs, M, y);
        }
    } else {
#pragma omp parallel num_threads(threads)
        {
            V v;
            float* rowbuf = new float[K];
#pragma omp for schedule(static)
            for (int64_t n = 0; n < N; ++n) row_dot_generic(v, w, n, x, M, y + n, N, rowbuf);
            delete[] rowbuf;
        }
    }
    delete[] xs;
}

// y [M, K] = x [M, N] @ W: each task owns kTChunk output columns and walks all N rows of W,
// decoding that row segment once and adding x[m, n] * segment into M accumulators.
template <class V>
void matmul_t(const Nf4Weight& w, const float* x, int64_t M, float* y, int threads) {
    const int64_t N = w.rows, K = w.cols;
    const int64_t chunks = (K + kTChunk - 1) / kTChunk;
#pragma omp parallel num_threads(threads)
    {
        V v;
        float* acc = new float[M * kTChunk];
        float seg[kTChunk];
#pragma omp for schedule(static)
        for (int64_t c = 0; c < chunks; ++c) {
            const int64_t k0 = c * kTChunk;
            const int64_t len = std::min(kTChunk, K - k0);
            std::fill(acc, acc + M * kTChunk, 0.0f);
            const bool fast = len == kTChunk && K % 32 == 0;
            for (int64_t n = 0; n < N; ++n) {
                const int64_t f = n * K + k0;
                if (fast) {
                    for (int64_t s = 0; s < kTChunk; s += 32) {
                        typename V::vec wv[32 / V::W];
                        v.decode32(w.packed + (f + s) / 2, v.set1(scale_of(w, f + s)), wv);
                        for (int j = 0; j < 32 / V::W; ++j) v.store(seg + s + j * V::W, wv[j]);
                    }
                } else {
                    decode_generic(w, f, len, seg);
                }
                for (int64_t m = 0; m < M; ++m) {
                    const typename V::vec xm = v.set1(x[m * N + n]);
                    float* am = acc + m * kTChunk;
                    int64_t k = 0;
                    for (; k + V::W <= len; k += V::W) v.store(am + k, v.fmadd(xm, v.load(seg + k), v.load(am + k)));
                    for (; k < len; ++k) am[k] += x[m * N + n] * seg[k];
                }
            }
            for (int64_t m = 0; m < M; ++m) memcpy(y + m * K + k0, acc + m * kTChunk, len * sizeof(float));
        }
        delete[] acc;
    }
}

template <class V>
void matmul(const Nf4Weight& w, const float* x, int64_t M, float* y, bool transpose, int threads) {
    if (M <= 0) return;
    if (transpose)
        matmul_t<V>(w, x, M, y, threads);
    else
        matmul_nt<V>(w, x, M, y, threads);
}

template <class V>
Kernels kernels() {
    return Kernels{&dequantize<V>, &matmul<V>};
}

}  // namespace impl
}  // namespace cpu
}  // namespace lorakern
