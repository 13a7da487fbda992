// parallel_for for the CPU kernels: the calling thread and up to threads - 1 pooled workers take
// the indices of a loop one at a time from a shared counter.
//
// Why not OpenMP: an OpenMP region ends in a barrier that waits for every thread of the team to
// arrive, including one that the OS has not run yet because it shares its core with another
// process (a data loader, a tokenizer), and its idle threads spin between regions. Measured on a
// 2-core AMD EPYC with one busy process beside it, NF4 matmul M = 1 (4096 x 4096, AVX2): static
// OpenMP split 3.7 ms with 2 threads against 1.7 ms with 1; dynamic schedule 3.75 ms;
// OMP_WAIT_POLICY=passive plus dynamic 2.1 ms. Here the call waits only for the pieces that
// workers have started: a worker that wakes up after every piece is taken does nothing, so a late
// worker never holds the call, and the caller alone can always finish the loop (also in a child
// after fork, where the pool's threads do not exist).
#pragma once

#include <stdint.h>

#include <functional>

namespace lorakern {
namespace cpu {

// fn(i) for every i in [0, n), on up to `threads` threads (the caller included). Pieces should be
// a few microseconds or more (a grab is one compare-and-swap). fn must not throw.
void parallel_for(int64_t n, int threads, const std::function<void(int64_t)>& fn);

}  // namespace cpu
}  // namespace lorakern
