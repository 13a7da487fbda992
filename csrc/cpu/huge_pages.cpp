#include "huge_pages.h"

#include <errno.h>
#if defined(__linux__)
#include <stdio.h>
#include <sys/mman.h>
#endif

#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25  // linux/mman.h since 6.1; older headers lack the name, not the kernel
#endif

namespace lorakern {
namespace cpu {

#if defined(__linux__)
namespace {
// The kernel's huge page: 2 MiB on x86-64 (and on arm64 with 4 KiB pages; 512 MiB with 64 KiB ones).
uintptr_t huge_page_bytes() {
    static const uintptr_t size = [] {
        unsigned long long v = 0;
        if (FILE* f = fopen("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size", "r")) {
            if (fscanf(f, "%llu", &v) != 1) v = 0;
            fclose(f);
        }
        return v >= 4096 && (v & (v - 1)) == 0 ? static_cast<uintptr_t>(v) : uintptr_t{1} << 21;
    }();
    return size;
}
}  // namespace
#endif

int64_t back_with_huge_pages(const void* p, int64_t bytes) {
#if defined(__linux__)
    const uintptr_t kHuge = huge_page_bytes();
    const uintptr_t start = reinterpret_cast<uintptr_t>(p);
    if (bytes <= 0) return 0;
    const uintptr_t first = (start + kHuge - 1) & ~(kHuge - 1), end = (start + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
    if (end <= first) return 0;
    void* at = reinterpret_cast<void*>(first);
    const size_t len = end - first;
    if (madvise(at, len, MADV_HUGEPAGE) != 0) return -errno;
    if (madvise(at, len, MADV_COLLAPSE) != 0) return -errno;
    return static_cast<int64_t>(len);
#else
    (void)p;
    (void)bytes;
    return -ENOSYS;
#endif
}

}  // namespace cpu
}  // namespace lorakern
