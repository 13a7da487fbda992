// Backing a weight's bytes with huge pages (Linux transparent huge pages: 2 MiB on x86-64).
#pragma once

#include <stdint.h>

namespace lorakern {
namespace cpu {

// Asks the kernel to back the whole huge pages (2 MiB on x86-64: the kernel's hpage_pmd_size)
// inside [p, p + bytes) with huge pages now:
// madvise(MADV_HUGEPAGE), then madvise(MADV_COLLAPSE) (Linux 6.1+), which moves the bytes already
// there onto huge pages in place (same addresses, same contents). Returns the bytes now on huge
// pages, 0 when the range holds no whole aligned huge page, or -errno of the call that failed
// (EINVAL: a kernel without MADV_COLLAPSE or THP, a file-backed range; EAGAIN / ENOMEM: no free
// huge page now). A failed collapse leaves MADV_HUGEPAGE set: khugepaged may collapse the range
// later. Other systems: -ENOSYS.
int64_t back_with_huge_pages(const void* p, int64_t bytes);

}  // namespace cpu
}  // namespace lorakern
