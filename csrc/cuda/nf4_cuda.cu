// NF4 CUDA kernels: dequantize (bandwidth-bound) and a small-M fused dequant-GEMV.
// Torch-free: the Python side validates tensors and passes pointers, sizes and the stream.
//
// Floors on an H100 (~3 TB/s), 4096 x 4096, blocksize 64:
//   dequantize to bf16: reads 8.4 MB + 1 MB absmax, writes 33.5 MB -> ~14 us.
//   GEMV, M = 1: reads 9.4 MB of weight (vs 33.5 MB in bf16) -> ~3.1 us, 3.6x below bf16 cuBLAS.
// So both are memory-bound: 16-byte loads of packed weights (32 weights per load), the table in
// registers, fp32 accumulation, one warp per output row so every weight byte is read once.
//
// The INT4 base (lorakern.INT4Weight) is the same walk with another table: the codes 0..15
// (w.code) and a per-block shift -scale * zero read from the (scale, shift) pairs of its native
// view, so a block's weight is code * scale + shift. The GEMV rounds that once (an fma, as the CPU
// matmul's tables); the dequantize rounds after the multiply and after the add, as the CPU
// dequantize does, so both devices decode the same bits. Bytes at 4096 x 4096, group 64: 8.4 MB
// of codes + 2.1 MB of fp32 (scale, shift) pairs -> ~3.5 us at 3 TB/s, 1.1x NF4's floor.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "../nf4_decode.h"
#include "nf4_cuda.h"

namespace lorakern {
namespace cuda {
namespace {

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// The 16 code values in shared memory: lanes index it with data-dependent nibbles (a local array
// would be placed in local memory, i.e. DRAM-backed stack), 16 distinct words never conflict.
__constant__ float kNf4Table[16] = {LK_NF4_VALUES};

__device__ __forceinline__ void load_table(float* lut, const float* code) {
    if (threadIdx.x < 16) lut[threadIdx.x] = code ? code[threadIdx.x] : kNf4Table[threadIdx.x];
    __syncthreads();
}

// 16-byte loads need a 16-byte aligned base: a weight whose bytes start inside a larger buffer
// (a view at an odd offset) takes the element-wise walk instead of a misaligned-address fault.
__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// How a code becomes a weight: NF4 (code * scale), INT4 in the GEMV (fma(code, scale, shift)),
// INT4 in the dequantize (code * scale, then + shift, each rounded: the CPU dequantize's bits).
enum Decode { kScaled, kAffineFma, kAffineTwoRoundings };

template <Decode D>
__device__ __forceinline__ float decode_one(float code, float scale, float shift) {
    if (D == kScaled) return mul_rn(code, scale);
    if (D == kAffineFma) return fmaf(code, scale, shift);
    return mul_add_rn(code, scale, shift);
}

// The INT4 shift of the block holding flattened element f (0, unread, for NF4).
template <Decode D>
__device__ __forceinline__ float shift_of(const Nf4Weight& w, int64_t f) {
    return D == kScaled ? 0.0f : block_shift_value(w, f >> w.block_shift);
}

// 32 weights from 16 bytes: element 2i is the high nibble of byte i.
template <Decode D>
__device__ __forceinline__ void decode32(const float* lut, const uint4 bytes, float scale, float shift, float* out) {
    const uint32_t words[4] = {bytes.x, bytes.y, bytes.z, bytes.w};
#pragma unroll
    for (int q = 0; q < 4; ++q) {
#pragma unroll
        for (int b = 0; b < 4; ++b) {
            const uint32_t byte = (words[q] >> (8 * b)) & 0xFFu;
            out[8 * q + 2 * b] = decode_one<D>(lut[byte >> 4], scale, shift);
            out[8 * q + 2 * b + 1] = decode_one<D>(lut[byte & 0xF], scale, shift);
        }
    }
}

// out[i] = W_flat[i] for i in [0, numel): one thread per 32 elements, plus a scalar tail.
template <typename T, Decode D>
__global__ void dequantize_kernel(Nf4Weight w, int64_t numel, T* __restrict__ out) {
    __shared__ float lut[16];
    load_table(lut, w.code);
    const int64_t chunk = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    const int64_t first = chunk * 32;
    if (first >= numel) return;
    if (first + 32 <= numel && aligned16(w.packed)) {
        const uint4 bytes = *reinterpret_cast<const uint4*>(w.packed + first / 2);
        float v[32];
        decode32<D>(lut, bytes, scale_of(w, first), shift_of<D>(w, first), v);
#pragma unroll
        for (int i = 0; i < 32; ++i) out[first + i] = from_float<T>(v[i]);
    } else {
        for (int64_t i = first; i < numel; ++i)
            out[i] = from_float<T>(decode_one<D>(lut[nf4_index(w.packed, i)], scale_of(w, i), shift_of<D>(w, i)));
    }
}

constexpr int kWarpsPerBlock = 4;

// h[m, r] = x[m] A_a[r]^T for a = index[m] (0 for r >= r_a and rows of no adapter): a block per
// row of x, a warp per rank column. 2 * M * r * cols FLOPs, M * r * cols reads of A (L2-resident
// across rows of one adapter): at M = 8, r = 16, cols = 4096, 1 MB of bf16 adapters against the
// 9.4 MB the GEMV reads of W.
template <typename T>
__global__ void multi_h_kernel(MultiLora lora, const T* __restrict__ x, int64_t K) {
    const int64_t m = blockIdx.x;
    const int64_t a = lora.index[m];
    const int64_t rank = a >= 0 ? lora.ranks[a] : 0;
    const int lane = threadIdx.x & 31;
    const T* xm = x + m * K;
    for (int64_t r = threadIdx.x >> 5; r < lora.r_max; r += blockDim.x >> 5) {  // uniform per warp
        float acc = 0.0f;
        if (r < rank) {
            const T* Ar = reinterpret_cast<const T*>(lora.A[a]) + r * K;
            for (int64_t k = lane; k < K; k += 32) acc = fmaf(to_float<T>(xm[k]), to_float<T>(Ar[k]), acc);
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xFFFFFFFFu, acc, off);
        if (lane == 0) lora.h[m * lora.r_max + r] = acc;
    }
}

// acc[m] += s_a h[m] B_a[n]^T (+ bias[n]) for the MT rows of a tile: every lane holds the
// reduced sums; lanes split the rank and reduce again. Adapter and rank are uniform per warp.
template <typename T, int MT>
__device__ __forceinline__ void add_adapters(const MultiLora& lora, int64_t n, int lane, float* acc) {
#pragma unroll
    for (int m = 0; m < MT; ++m) {
        const int64_t a = lora.index[m];
        if (a < 0) continue;
        const int64_t rank = lora.ranks[a];
        const T* Bn = reinterpret_cast<const T*>(lora.B[a]) + n * rank;
        const float* hm = lora.h + m * lora.r_max;
        float t = 0.0f;
        for (int64_t r = lane; r < rank; r += 32) t = fmaf(hm[r], to_float<T>(Bn[r]), t);
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) t += __shfl_xor_sync(0xFFFFFFFFu, t, off);
        acc[m] = fmaf(lora.scalings[a], t, acc[m]);
    }
    if (lora.bias != nullptr) {
        const float b = to_float<T>(static_cast<const T*>(lora.bias)[n]);
#pragma unroll
        for (int m = 0; m < MT; ++m) acc[m] += b;
    }
}

// y [M, N] = x [M, K] @ W^T, MT rows of x per launch (M <= 8 per tile). One warp per output row n;
// lane l reads 16-byte chunks l, l + 32, ... of row n. With K % 32 == 0 every chunk is aligned and
// lies in one absmax block; otherwise the lanes walk single elements.
template <typename T, int MT, Decode D>
__global__ void gemv_kernel(Nf4Weight w, const T* __restrict__ x, int64_t ldx, T* __restrict__ y, int64_t ldy,
                            MultiLora lora) {
    __shared__ float lut[16];
    load_table(lut, w.code);
    const int lane = threadIdx.x & 31;
    const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
    if (n >= w.rows) return;
    const int64_t K = w.cols;
    const int64_t f0 = n * K;
    float acc[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[m] = 0.0f;
    if (K % 32 == 0 && aligned16(w.packed)) {
        const uint4* row = reinterpret_cast<const uint4*>(w.packed + f0 / 2);
        for (int64_t c = lane; c < K / 32; c += 32) {
            float wv[32];
            decode32<D>(lut, row[c], scale_of(w, f0 + c * 32), shift_of<D>(w, f0 + c * 32), wv);
#pragma unroll
            for (int m = 0; m < MT; ++m) {
                const T* xm = x + m * ldx + c * 32;
#pragma unroll
                for (int i = 0; i < 32; ++i) acc[m] = fmaf(wv[i], to_float<T>(xm[i]), acc[m]);
            }
        }
    } else {
        for (int64_t k = lane; k < K; k += 32) {
            const float wk = decode_one<D>(lut[nf4_index(w.packed, f0 + k)], scale_of(w, f0 + k), shift_of<D>(w, f0 + k));
#pragma unroll
            for (int m = 0; m < MT; ++m) acc[m] = fmaf(wk, to_float<T>(x[m * ldx + k]), acc[m]);
        }
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) acc[m] += __shfl_xor_sync(0xFFFFFFFFu, acc[m], off);
    }
    if (lora.h != nullptr) add_adapters<T, MT>(lora, n, lane, acc);
    if (lane == 0) {
#pragma unroll
        for (int m = 0; m < MT; ++m) y[m * ldy + n] = from_float<T>(acc[m]);
    }
}

template <typename T>
int launch_dequantize(const Nf4Weight& w, int64_t numel, void* out, cudaStream_t stream) {
    const int threads = 256;
    const int64_t chunks = (numel + 31) / 32;
    const unsigned blocks = static_cast<unsigned>((chunks + threads - 1) / threads);
    T* o = static_cast<T*>(out);
    if (w.shift)
        dequantize_kernel<T, kAffineTwoRoundings><<<blocks, threads, 0, stream>>>(w, numel, o);
    else
        dequantize_kernel<T, kScaled><<<blocks, threads, 0, stream>>>(w, numel, o);
    return static_cast<int>(cudaGetLastError());
}

template <typename T, Decode D>
int launch_gemv(const Nf4Weight& w, const void* x, int64_t M, void* y, const MultiLora& lora, cudaStream_t stream) {
    const T* xp = static_cast<const T*>(x);
    T* yp = static_cast<T*>(y);
    const unsigned blocks = static_cast<unsigned>((w.rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
    const int threads = 32 * kWarpsPerBlock;
    if (lora.h != nullptr) {
        multi_h_kernel<T><<<static_cast<unsigned>(M), threads, 0, stream>>>(lora, xp, w.cols);
        const cudaError_t err = cudaGetLastError();
        if (err != cudaSuccess) return static_cast<int>(err);
    }
    for (int64_t m0 = 0; m0 < M; m0 += 8) {
        const int64_t mt = M - m0 < 8 ? M - m0 : 8;
        const T* xm = xp + m0 * w.cols;
        T* ym = yp + m0 * w.rows;
        MultiLora tile = lora;  // the tile's rows of index and h
        if (lora.h != nullptr) {
            tile.index += m0;
            tile.h += m0 * lora.r_max;
        }
        switch (mt) {
            case 1: gemv_kernel<T, 1, D><<<blocks, threads, 0, stream>>>(w, xm, w.cols, ym, w.rows, tile); break;
            case 2: gemv_kernel<T, 2, D><<<blocks, threads, 0, stream>>>(w, xm, w.cols, ym, w.rows, tile); break;
            case 3: gemv_kernel<T, 3, D><<<blocks, threads, 0, stream>>>(w, xm, w.cols, ym, w.rows, tile); break;
            case 4: gemv_kernel<T, 4, D><<<blocks, threads, 0, stream>>>(w, xm, w.cols, ym, w.rows, tile); break;
            case 5: gemv_kernel<T, 5, D><<<blocks, threads, 0, stream>>>(w, xm, w.cols, ym, w.rows, tile); break;
            case 6: gemv_kernel<T, 6, D><<<blocks, threads, 0, stream>>>(w, xm, w.cols, ym, w.rows, tile); break;
            case 7: gemv_kernel<T, 7, D><<<blocks, threads, 0, stream>>>(w, xm, w.cols, ym, w.rows, tile); break;
            default: gemv_kernel<T, 8, D><<<blocks, threads, 0, stream>>>(w, xm, w.cols, ym, w.rows, tile); break;
        }
        const cudaError_t err = cudaGetLastError();
        if (err != cudaSuccess) return static_cast<int>(err);
    }
    return 0;
}

}  // namespace

int dequantize(const Nf4Weight& w, int64_t numel, void* out, int out_dtype, uintptr_t stream) {
    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    if (numel <= 0) return 0;
    switch (out_dtype) {
        case kFloat32: return launch_dequantize<float>(w, numel, out, s);
        case kBFloat16: return launch_dequantize<__nv_bfloat16>(w, numel, out, s);
        default: return launch_dequantize<__half>(w, numel, out, s);
    }
}

int gemv_multi(const Nf4Weight& w, const void* x, int64_t M, void* y, int dtype, const MultiLora& lora,
               uintptr_t stream) {
    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    if (M <= 0 || w.rows <= 0) return 0;
    const bool affine = w.shift != nullptr;
    switch (dtype) {
        case kFloat32:
            return affine ? launch_gemv<float, kAffineFma>(w, x, M, y, lora, s)
                          : launch_gemv<float, kScaled>(w, x, M, y, lora, s);
        case kBFloat16:
            return affine ? launch_gemv<__nv_bfloat16, kAffineFma>(w, x, M, y, lora, s)
                          : launch_gemv<__nv_bfloat16, kScaled>(w, x, M, y, lora, s);
        default:
            return affine ? launch_gemv<__half, kAffineFma>(w, x, M, y, lora, s)
                          : launch_gemv<__half, kScaled>(w, x, M, y, lora, s);
    }
}

int gemv(const Nf4Weight& w, const void* x, int64_t M, void* y, int dtype, uintptr_t stream) {
    return gemv_multi(w, x, M, y, dtype, MultiLora{}, stream);
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace cuda
}  // namespace lorakern
