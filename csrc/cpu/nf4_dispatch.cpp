// Run-time ISA detection: the extension is built once with all three paths and picks one per call.
#include "nf4_cpu.h"

namespace lorakern {
namespace cpu {

#if defined(__x86_64__) || defined(__i386__)
bool cpu_has_avx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
bool cpu_has_avx512() { return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"); }
bool cpu_is_amd() { return __builtin_cpu_is("amd"); }
bool cpu_has_avx512_bf16() { return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16"); }
#else
bool cpu_has_avx2() { return false; }
bool cpu_has_avx512() { return false; }
bool cpu_is_amd() { return false; }
bool cpu_has_avx512_bf16() { return false; }
#endif

}  // namespace cpu
}  // namespace lorakern
