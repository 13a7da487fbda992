// pybind11 module lorakern._C: pointers, sizes and a stream in; nothing of torch. The Python side
// (lorakern/nf4/native.py) validates every tensor (dtype, device, contiguity, sizes) before a call.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "cpu/dropout_cpu.h"
#include "cpu/huge_pages.h"
#include "cpu/nf4_cpu.h"
#include "cpu/thread_pool.h"
#include "nf4_decode.h"
#ifdef LORAKERN_WITH_CUDA
#include "cuda/nf4_cuda.h"
#endif

namespace py = pybind11;
using lorakern::Nf4Weight;
namespace cpu = lorakern::cpu;

namespace {

// (packed, absmax, nested_absmax, nested_code, offset, blocksize, rows, cols, code, shift,
// scale_stride, half_params); 0 for "none" (code: the 16 values before scaling, none: NF4's; shift:
// float32 per block, added; half_params: Nf4Weight's compact INT4 parameters, CPU only).
using WeightArgs = std::tuple<uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, int64_t, int64_t, int64_t,
                              uintptr_t, uintptr_t, int64_t, uintptr_t>;

Nf4Weight make_weight(const WeightArgs& a) {
    Nf4Weight w;
    w.packed = reinterpret_cast<const uint8_t*>(std::get<0>(a));
    w.absmax = reinterpret_cast<const void*>(std::get<1>(a));
    w.nested_absmax = reinterpret_cast<const float*>(std::get<2>(a));
    w.nested_code = reinterpret_cast<const float*>(std::get<3>(a));
    w.offset = reinterpret_cast<const float*>(std::get<4>(a));
    w.blocksize = std::get<5>(a);
    w.rows = std::get<6>(a);
    w.cols = std::get<7>(a);
    w.code = reinterpret_cast<const float*>(std::get<8>(a));
    w.shift = reinterpret_cast<const float*>(std::get<9>(a));
    w.scale_stride = std::get<10>(a);
    w.half_params = reinterpret_cast<const uint8_t*>(std::get<11>(a));
    if (w.half_params != nullptr && (w.shift == nullptr || w.nested_absmax != nullptr))
        throw std::invalid_argument("half_params need a shift (the INT4 base) and no double quantization");
    if (w.scale_stride < 1 || (w.scale_stride != 1 && w.nested_absmax != nullptr))
        throw std::invalid_argument("scale_stride must be >= 1, and 1 with double quantization");
    if (w.shift != nullptr && w.nested_absmax != nullptr)
        throw std::invalid_argument("a per-block shift is for plain block scales (no double quantization)");
    if (w.packed == nullptr || w.absmax == nullptr) throw std::invalid_argument("packed and absmax are required");
    if (w.blocksize < 32 || (w.blocksize & (w.blocksize - 1)) != 0)
        throw std::invalid_argument("blocksize must be a power of two >= 32");
    w.block_shift = 0;
    while ((int64_t{1} << w.block_shift) < w.blocksize) ++w.block_shift;
    return w;
}

// The CPU paths this machine runs, slowest first: the last is the default. AVX2 has two lookups
// of the 16 code values (nf4_avx2.cpp): vpshufb over byte planes (12 in-lane shuffles per 32
// weights, which AMD cores issue on two pipes) and vpermps halves plus a blend (8 lane-crossing
// permutes: one a cycle on Zen 4, 2 uops each in llvm-mca's Zen 3 model; Intel cores issue every
// shuffle on one port, so the fewer shuffles win there). The one listed later is the one "avx2"
// names: vpshufb on AMD, vpermps elsewhere.
const std::vector<std::pair<std::string, cpu::Kernels>>& cpu_paths() {
    static const std::vector<std::pair<std::string, cpu::Kernels>> paths = [] {
        std::vector<std::pair<std::string, cpu::Kernels>> p{{"scalar", cpu::scalar_kernels()}};
#ifdef LORAKERN_X86
        if (cpu::cpu_has_avx2()) {
            std::pair<std::string, cpu::Kernels> other{"avx2-vpshufb", cpu::avx2_kernels()};
            std::pair<std::string, cpu::Kernels> preferred{"avx2-vpermps", cpu::avx2_permute_kernels()};
            if (cpu::cpu_is_amd()) std::swap(other, preferred);
            p.push_back(other);
            p.push_back(preferred);
        }
        if (cpu::cpu_has_avx512()) p.push_back({"avx512", cpu::avx512_kernels()});
        const cpu::Kernels bf16 = cpu::avx512_bf16_kernels();  // no matmul_bf16: see nf4_avx512.cpp
        if (cpu::cpu_has_avx512_bf16() && bf16.matmul_bf16 != nullptr) p.push_back({"avx512-bf16", bf16});
#endif
        return p;
    }();
    return paths;
}

std::vector<std::string> available_isas() {
    std::vector<std::string> names;
    for (const auto& p : cpu_paths()) names.push_back(p.first);
    return names;
}

cpu::Kernels kernels_for(const std::string& isa) {
    const auto& paths = cpu_paths();
    if (isa == "avx2") {  // this CPU's AVX2 lookup: the later of the two
        for (auto it = paths.rbegin(); it != paths.rend(); ++it)
            if (it->first.rfind("avx2-", 0) == 0) return it->second;
    }
    for (const auto& p : paths)
        if (p.first == isa) return p.second;
    throw std::invalid_argument("isa '" + isa + "' is not available on this CPU");
}

void cpu_dropout(uintptr_t x, uintptr_t out, int dtype, int64_t rows, int64_t cols, int64_t x_stride, uint32_t seed,
                 uint32_t threshold, double scale, int threads) {
    if (x == 0 || out == 0) throw std::invalid_argument("x and out are required");
    if (dtype != 0 && dtype != 1) throw std::invalid_argument("dtype must be 0 (float32) or 1 (float64)");
    if (rows < 0 || cols < 0 || x_stride < 0) throw std::invalid_argument("bad rows, cols or x_stride");  // x is only read: any row stride
    py::gil_scoped_release nogil;
    cpu::dropout(reinterpret_cast<const void*>(x), reinterpret_cast<void*>(out), dtype, rows, cols, x_stride, seed,
                 threshold, scale, threads);
}

void cpu_dequantize(const WeightArgs& wa, int64_t start, int64_t count, uintptr_t out, int out_dtype,
                    const std::string& isa, int threads) {
    const Nf4Weight w = make_weight(wa);
    const cpu::Kernels k = kernels_for(isa);
    py::gil_scoped_release nogil;
    k.dequantize(w, start, count, reinterpret_cast<void*>(out), out_dtype, threads);
}

// (A, B, bias or 0, scaling, r, h): the LoRA term of the forward (see cpu::LoraTerm).
// (..., pool): QA-LoRA's pooled input, 0 for plain LoRA (see cpu::LoraTerm).
using LoraArgs = std::tuple<uintptr_t, uintptr_t, uintptr_t, double, int64_t, uintptr_t, int64_t>;

// (index [M] int64, A addresses [n], B addresses [n], ranks [n] int64, scalings [n] float32): one
// adapter per row instead of LoraArgs' A, B, r and scaling (see cpu::LoraTerm).
using MultiArgs = std::tuple<uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t>;

// A tensor in a half dtype (OutDtype) and its float32 copy, for the float32 kernels'
// half-precision callers.
struct HalfSpan {
    const void* half;
    float* f;
    int64_t n;
    int dtype;
};

// Every span loaded into its float32 copy (load) or its float32 copy rounded into it (store), in
// pieces of 16K elements (64 KB of float32, a few us) on the kernel's threads.
void convert_spans(const cpu::Kernels& k, const std::vector<HalfSpan>& spans, bool load, int threads) {
    constexpr int64_t kPiece = int64_t{1} << 14;
    std::vector<std::pair<size_t, int64_t>> pieces;  // (span, first element)
    for (size_t s = 0; s < spans.size(); ++s)
        for (int64_t i = 0; i < spans[s].n; i += kPiece) pieces.push_back({s, i});
    cpu::parallel_for(static_cast<int64_t>(pieces.size()), threads, [&](int64_t p) {
        const HalfSpan& sp = spans[pieces[p].first];
        const int64_t i = pieces[p].second, n = std::min(kPiece, sp.n - i);
        uint16_t* h = static_cast<uint16_t*>(const_cast<void*>(sp.half)) + i;
        if (load)
            k.load(h, n, sp.f + i, sp.dtype);
        else
            k.store(sp.f + i, n, h, sp.dtype);
    });
}

// x_dtype (OutDtype): the dtype of x and y; lora_dtype the dtype of A, B and h, bias_dtype the
// bias's (-1: x_dtype; with a half x each may also be float32: PEFT keeps its adapters in float32
// on a 16-bit model). A half dtype is computed in float32: its tensors are converted into float32
// buffers inside this call and the outputs rounded once into y (and h), so a half-precision layer
// is one call with no torch op between its pieces (after a parallel torch op, torch's OpenMP
// threads spin on the cores the kernel's threads want: see thread_pool.h); float32 tensors are
// read where they are. Several adapters (multi) take float32 alone.
void cpu_matmul(const WeightArgs& wa, uintptr_t x, int64_t M, uintptr_t y, bool transpose, const std::string& isa,
                int threads, const std::optional<LoraArgs>& lora_args, const std::optional<MultiArgs>& multi,
                int x_dtype, int lora_dtype, int bias_dtype) {
    if (lora_dtype == -1) lora_dtype = x_dtype;
    if (bias_dtype == -1) bias_dtype = x_dtype;
    if ((lora_dtype != x_dtype && lora_dtype != lorakern::kFloat32) ||
        (bias_dtype != x_dtype && bias_dtype != lorakern::kFloat32))
        throw std::invalid_argument("lora_dtype and bias_dtype must be x_dtype or 0 (float32)");
    const Nf4Weight w = make_weight(wa);
    const cpu::Kernels k = kernels_for(isa);
    cpu::LoraTerm lora{};
    if (lora_args) {
        if (transpose) throw std::invalid_argument("the LoRA term is for the forward (transpose=False) only");
        lora.A = reinterpret_cast<const float*>(std::get<0>(*lora_args));
        lora.B = reinterpret_cast<const float*>(std::get<1>(*lora_args));
        lora.bias = reinterpret_cast<const float*>(std::get<2>(*lora_args));
        lora.scaling = static_cast<float>(std::get<3>(*lora_args));
        lora.r = std::get<4>(*lora_args);
        lora.h = reinterpret_cast<float*>(std::get<5>(*lora_args));
        lora.pool = std::get<6>(*lora_args);
        if (lora.pool < 0 || (lora.pool > 0 && (w.cols % lora.pool != 0 || multi)))
            throw std::invalid_argument("pool must divide cols, and is for one adapter (not per-row adapters)");
        if (multi) {
            lora.index = reinterpret_cast<const int64_t*>(std::get<0>(*multi));
            lora.adapter_A = reinterpret_cast<const uintptr_t*>(std::get<1>(*multi));
            lora.adapter_B = reinterpret_cast<const uintptr_t*>(std::get<2>(*multi));
            lora.ranks = reinterpret_cast<const int64_t*>(std::get<3>(*multi));
            lora.scalings = reinterpret_cast<const float*>(std::get<4>(*multi));
            if (!lora.index || !lora.adapter_A || !lora.adapter_B || !lora.ranks || !lora.scalings || !lora.h ||
                lora.r < 1)
                throw std::invalid_argument("several adapters: index, A and B addresses, ranks, scalings, h, r >= 1");
        } else if (!lora.A || !lora.B || !lora.h || lora.r < 1) {
            throw std::invalid_argument("LoRA term: A, B, h and r >= 1 required");
        }
    } else if (multi) {
        throw std::invalid_argument("several adapters need the LoRA term's bias and h (lora_args)");
    }
    if (x_dtype == lorakern::kFloat32) {
        py::gil_scoped_release nogil;
        k.matmul(w, reinterpret_cast<const float*>(x), M, reinterpret_cast<float*>(y), transpose,
                 lora_args ? &lora : nullptr, threads);
        return;
    }
    if (x_dtype != lorakern::kBFloat16 && x_dtype != lorakern::kFloat16)
        throw std::invalid_argument("x_dtype must be 0 (float32), 1 (bfloat16) or 2 (float16)");
    if (multi) throw std::invalid_argument("several adapters take float32 tensors (x_dtype 0)");
    if (M < 0) throw std::invalid_argument("M must be >= 0");
    const int64_t k_in = transpose ? w.rows : w.cols, n_out = transpose ? w.cols : w.rows;
    const bool half_lora = lora_dtype != lorakern::kFloat32, half_bias = bias_dtype != lorakern::kFloat32;
    const int64_t a_n = lora_args && half_lora ? lora.r * (lora.pool > 0 ? w.cols / lora.pool : w.cols) : 0;
    const int64_t b_n = lora_args && half_lora ? w.rows * lora.r : 0;
    const int64_t bias_n = lora.bias && half_bias ? w.rows : 0;
    const int64_t h_n = lora_args && half_lora ? M * lora.r : 0;
    std::unique_ptr<float[]> buf(new float[M * k_in + M * n_out + a_n + b_n + bias_n + h_n]);
    float* xf = buf.get();
    float* yf = xf + M * k_in;
    float* af = yf + M * n_out;
    float* bf = af + a_n;
    float* biasf = bf + b_n;
    float* hf = biasf + bias_n;
    std::vector<HalfSpan> in{{reinterpret_cast<const void*>(x), xf, M * k_in, x_dtype}};
    std::vector<HalfSpan> out{{reinterpret_cast<const void*>(y), yf, M * n_out, x_dtype}};
    if (lora_args && half_lora) {
        in.push_back({lora.A, af, a_n, lora_dtype});
        in.push_back({lora.B, bf, b_n, lora_dtype});
        out.push_back({lora.h, hf, h_n, lora_dtype});
        lora.A = af;
        lora.B = bf;
        lora.h = hf;
    }
    if (lora.bias && half_bias) {
        in.push_back({lora.bias, biasf, bias_n, bias_dtype});
        lora.bias = biasf;
    }
    // bfloat16 dot products where the CPU has them (avx512-bf16) and take these rows: x is read as
    // it is, and its float32 copy only feeds the LoRA term's h. Against the float32 kernels on the
    // same bfloat16 x (4096 x 4096, 2 threads, 8 cold weights, interleaved, Zen 4): M = 1
    // 0.93x-0.98x the time, 2 0.75x-0.79x, 3 0.62x, 4 0.59x, 8 0.54x-0.56x, 12 0.59x, 16 0.54x.
    const bool dots =
        x_dtype == lorakern::kBFloat16 && k.matmul_bf16 != nullptr && !transpose && cpu::bf16_takes(w, M);
    if (dots && !lora_args) in.erase(in.begin());
    py::gil_scoped_release nogil;
    convert_spans(k, in, true, threads);
    if (dots)
        k.matmul_bf16(w, reinterpret_cast<const uint16_t*>(x), xf, M, yf, lora_args ? &lora : nullptr, threads);
    else
        k.matmul(w, xf, M, yf, transpose, lora_args ? &lora : nullptr, threads);
    convert_spans(k, out, false, threads);
}

// y [M, N] += each row's adapter term (MultiArgs: n adapters, the largest rank r_max), x [M, K]
// with rows ldx apart (x is only read: 0 for one row broadcast, any overlap), the adapters' row
// strides in a_strides / b_strides (int64 [n] addresses, 0: contiguous): the several adapters'
// terms over a base product computed elsewhere (see cpu::LoraTermsFn).
void cpu_lora_terms(uintptr_t x, int64_t ldx, int64_t M, int64_t K, int64_t N, uintptr_t y, const MultiArgs& multi,
                    uintptr_t a_strides, uintptr_t b_strides, int64_t n, int64_t r_max, const std::string& isa,
                    int threads) {
    const cpu::Kernels k = kernels_for(isa);
    cpu::LoraTerm lora{};
    lora.r = r_max;
    lora.index = reinterpret_cast<const int64_t*>(std::get<0>(multi));
    lora.adapter_A = reinterpret_cast<const uintptr_t*>(std::get<1>(multi));
    lora.adapter_B = reinterpret_cast<const uintptr_t*>(std::get<2>(multi));
    lora.ranks = reinterpret_cast<const int64_t*>(std::get<3>(multi));
    lora.scalings = reinterpret_cast<const float*>(std::get<4>(multi));
    lora.a_strides = reinterpret_cast<const int64_t*>(a_strides);
    lora.b_strides = reinterpret_cast<const int64_t*>(b_strides);
    if (M < 0 || K < 1 || N < 1 || n < 1 || r_max < 1 || ldx < 0 || (M > 0 && (!x || !y)))
        throw std::invalid_argument("lora terms: M >= 0, K, N, n, r_max >= 1, ldx >= 0 and x, y required");
    if (M == 0) return;  // an empty index has no address
    if (!lora.index || !lora.adapter_A || !lora.adapter_B || !lora.ranks || !lora.scalings)
        throw std::invalid_argument("lora terms: index, A and B addresses, ranks and scalings required");
    for (int64_t m = 0; m < M; ++m)
        if (lora.index[m] < -1 || lora.index[m] >= n) throw std::invalid_argument("lora terms: index out of range");
    for (int64_t a = 0; a < n; ++a)
        if (lora.ranks[a] < 0 || lora.ranks[a] > r_max ||
            (lora.a_strides && lora.a_strides[a] < 0) || (lora.b_strides && lora.b_strides[a] < lora.ranks[a]))
            throw std::invalid_argument("lora terms: ranks in [0, r_max], A row strides >= 0, B row strides >= rank");
    py::gil_scoped_release nogil;
    k.lora_terms(reinterpret_cast<const float*>(x), ldx, M, K, N, lora, n, reinterpret_cast<float*>(y), threads);
}

#ifdef LORAKERN_WITH_CUDA
void check_cuda(int code, const char* what) {
    if (code != 0) throw std::runtime_error(std::string(what) + ": " + lorakern::cuda::error_string(code));
}

// The CUDA kernels read float32 (scale, shift) pairs, never the CPU's compact INT4 parameters.
Nf4Weight make_cuda_weight(const WeightArgs& a) {
    const Nf4Weight w = make_weight(a);
    if (w.half_params != nullptr) throw std::invalid_argument("half_params are read by the CPU kernels only");
    return w;
}

void cuda_dequantize(const WeightArgs& wa, int64_t numel, uintptr_t out, int out_dtype, uintptr_t stream) {
    const Nf4Weight w = make_cuda_weight(wa);
    check_cuda(lorakern::cuda::dequantize(w, numel, reinterpret_cast<void*>(out), out_dtype, stream),
               "lorakern NF4 dequantize");
}

void cuda_gemv(const WeightArgs& wa, uintptr_t x, int64_t M, uintptr_t y, int dtype, uintptr_t stream) {
    const Nf4Weight w = make_cuda_weight(wa);
    check_cuda(lorakern::cuda::gemv(w, reinterpret_cast<const void*>(x), M, reinterpret_cast<void*>(y), dtype, stream),
               "lorakern NF4 gemv");
}

// (index, A addresses, B addresses, ranks, scalings, bias or 0, h, r_max): device pointers of
// lorakern::cuda::MultiLora.
using CudaMultiArgs = std::tuple<uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, int64_t>;

void cuda_gemv_multi(const WeightArgs& wa, uintptr_t x, int64_t M, uintptr_t y, int dtype, uintptr_t stream,
                     const CudaMultiArgs& args) {
    const Nf4Weight w = make_cuda_weight(wa);
    lorakern::cuda::MultiLora lora;
    lora.index = reinterpret_cast<const int64_t*>(std::get<0>(args));
    lora.A = reinterpret_cast<const uintptr_t*>(std::get<1>(args));
    lora.B = reinterpret_cast<const uintptr_t*>(std::get<2>(args));
    lora.ranks = reinterpret_cast<const int64_t*>(std::get<3>(args));
    lora.scalings = reinterpret_cast<const float*>(std::get<4>(args));
    lora.bias = reinterpret_cast<const void*>(std::get<5>(args));
    lora.h = reinterpret_cast<float*>(std::get<6>(args));
    lora.r_max = std::get<7>(args);
    if (!lora.index || !lora.A || !lora.B || !lora.ranks || !lora.scalings || !lora.h || lora.r_max < 1)
        throw std::invalid_argument("several adapters: index, A and B addresses, ranks, scalings, h, r_max >= 1");
    check_cuda(lorakern::cuda::gemv_multi(w, reinterpret_cast<const void*>(x), M, reinterpret_cast<void*>(y), dtype,
                                          lora, stream),
               "lorakern NF4 gemv (several adapters)");
}
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "lorakern native NF4 kernels (CPU: AVX-512 / AVX2 / scalar; CUDA when built with nvcc)";
    m.def("available_isas", &available_isas,
          "CPU paths this machine can run, slowest first (the last is the default; \"avx2\" names the later avx2-*)");
    m.def("openmp_team_available", &lorakern::cpu::openmp_team_available,
          "whether torch's OpenMP runtime was found (LORAKERN_CPU_TEAM=openmp runs loops on its threads)");
    m.def(
        "use_team", [](int team) { lorakern::cpu::use_team(static_cast<lorakern::cpu::Team>(team)); },
        "the team of the CPU loops that follow: 0 lorakern's pool, 1 torch's OpenMP team (where available), 2 the "
        "OpenMP team while its threads spin and the pool otherwise");
    m.def(
        "cpu_team_loops",
        [] {
            int64_t n[3];
            lorakern::cpu::team_loops(n);
            return std::make_tuple(n[0], n[1], n[2]);
        },
        "parallel loops run so far (alone, with lorakern's pool, with torch's OpenMP team)");
    m.def(
        "back_with_huge_pages",
        [](uintptr_t ptr, int64_t bytes) {
            return lorakern::cpu::back_with_huge_pages(reinterpret_cast<const void*>(ptr), bytes);
        },
        "move the whole huge pages (2 MiB on x86-64) inside [ptr, ptr + bytes) onto huge pages in place: the bytes now "
        "on them, 0 for none, or -errno (csrc/cpu/huge_pages.h)");
    m.def("cpu_dequantize", &cpu_dequantize);
    m.def("cpu_lora_terms", &cpu_lora_terms, "y += each row's adapter term (a base computed elsewhere)");
    m.def("cpu_dropout", &cpu_dropout, "x * keep / (1 - p) with lorakern's counter-based mask (float32/64)");
    m.def("cpu_matmul", &cpu_matmul, py::arg("weight"), py::arg("x"), py::arg("M"), py::arg("y"), py::arg("transpose"),
          py::arg("isa"), py::arg("threads"), py::arg("lora") = py::none(), py::arg("multi") = py::none(), py::arg("x_dtype") = 0,
          py::arg("lora_dtype") = -1, py::arg("bias_dtype") = -1);
#ifdef LORAKERN_WITH_CUDA
    m.attr("with_cuda") = true;
    m.def("cuda_dequantize", &cuda_dequantize);
    m.def("cuda_gemv", &cuda_gemv);
    m.def("cuda_gemv_multi", &cuda_gemv_multi);
#else
    m.attr("with_cuda") = false;
#endif
}
