// parallel_for for the CPU kernels: the calling thread and up to threads - 1 others take the
// indices of a loop one at a time from a shared counter.
//
// Two teams can take the pieces with the caller, and neither is best everywhere; $LORAKERN_CPU_TEAM
// picks one, or ("auto", the default) each loop picks by the state of torch's OpenMP workers:
// - "pool": a pool of our own (thread_pool.cpp). An OpenMP region ends in a barrier that waits
//   for every thread of the team to arrive, including one that the OS has not run yet because it
//   shares its core with another process (a data loader, a tokenizer). Measured on a 2-core AMD
//   EPYC with one busy process beside it, NF4 matmul M = 1 (4096 x 4096, AVX2): static OpenMP
//   split 3.7 ms with 2 threads against 1.7 ms with 1; dynamic schedule 3.75 ms;
//   OMP_WAIT_POLICY=passive plus dynamic 2.1 ms. The pool's call waits only for the pieces that
//   workers have started: a worker that wakes up after every piece is taken does nothing, so a
//   late worker never holds the call, and the caller alone can always finish the loop (also in a
//   child after fork, where the pool's threads do not exist).
// - "openmp": torch's OpenMP team (GOMP_parallel of the runtime libtorch_cpu links), the same
//   claiming loop on each of its threads. After a parallel torch op (inside a model: a norm or an
//   activation over >= 32768 elements, so from M = 8 at 4096 features) torch's idle OpenMP
//   threads spin for a few ms on the cores the pool's workers want, and a pool worker gets half a
//   core: 2 threads as slow as 1. The spinning threads are the OpenMP team: it starts at once.
// - "auto": the OpenMP team while its workers spin on cores of their own, the pool otherwise
//   (TeamProbe in thread_pool.cpp). Five runs at f25892b (three AVX2, two AVX-512; results
//   ...-f25892b-threads-auto.jsonl, each step from rest), 2-thread speedup over 1 thread: after
//   a torch op, M = 16, 1.76-1.96x (pool 0.97-1.23x, OpenMP 1.68-2.00x); quiet 1.50-1.95x (pool
//   1.64-1.97x); beside a busy process 0.88-1.15x (pool 0.95-1.04x, OpenMP 0.38-0.79x).
// Zen 4, 2 threads, AVX2, 4096 x 4096, cold, 2-thread speedup over 1 thread, three runs
// (benchmarks/cpu_threads.py, results ...-197912b-threads-teams.jsonl): after a torch op, M = 16,
// pool 0.96-1.00x, OpenMP 1.72-1.75x; beside a busy process, pool 0.98-1.07x at M = 1 and
// 1.04-1.12x at M = 16, OpenMP 0.72-0.97x and 0.76-0.97x (its spinning threads also take the
// caller's core between calls: 1.4-3.1 ms a call against the pool's 1.3 ms in four runs); quiet,
// both 1.81-2.04x. An earlier automatic choice from timings (each call's wall time over the
// caller's CPU time, the other team tried now and then) took 1.2x the pool's time beside a busy
// process: switching left one team's spinning threads in the other's way.
#pragma once

#include <stdint.h>

#include <functional>

namespace lorakern {
namespace cpu {

// fn(i) for every i in [0, n), on up to `threads` threads (the caller included). Pieces should be
// a few microseconds or more (a grab is one compare-and-swap). fn must not throw.
void parallel_for(int64_t n, int threads, const std::function<void(int64_t)>& fn);

// Whether torch's OpenMP runtime was found (LORAKERN_CPU_TEAM=openmp needs it; never in a child
// after fork, where libgomp would wait for the parent's threads for ever).
bool openmp_team_available();

// The team of the loops that follow: lorakern's pool, torch's OpenMP team (where available), or
// per loop the OpenMP team while its threads are spinning and the pool otherwise. The Python side
// sets it from $LORAKERN_CPU_TEAM before each native call that changes it.
enum class Team : int { kPool = 0, kOpenMP = 1, kAuto = 2 };
void use_team(Team team);

// Loops run since the library loaded: [0] by the caller alone (1 thread, 1 piece, or another
// caller's loop running), [1] with the pool, [2] with the OpenMP team.
void team_loops(int64_t out[3]);

}  // namespace cpu
}  // namespace lorakern
