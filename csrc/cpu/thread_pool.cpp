#include "thread_pool.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#if defined(__linux__)
#include <dlfcn.h>
#include <fcntl.h>
#include <link.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define LK_PAUSE() _mm_pause()
#else
#define LK_PAUSE() ((void)0)
#endif

namespace lorakern {
namespace cpu {
namespace {

// How long an idle worker checks for the next loop before it sleeps: a decode loop calls layer
// after layer with ~20-100 us of Python between calls, so a worker that spins this long is awake
// for the next one without a futex wake-up (~10-30 us); bounded, so an idle pool costs the machine
// nothing after that.
constexpr auto kSpin = std::chrono::microseconds(50);

// The loop being run, packed in one word so that a claim is one compare-and-swap that also checks
// which loop it claims from: epoch (16 bits) | next index (24) | count (24).
constexpr int kIndexBits = 24;
constexpr uint64_t kIndexMask = (uint64_t{1} << kIndexBits) - 1;
constexpr int64_t kMaxPieces = int64_t{1} << kIndexBits;

uint64_t pack(uint64_t epoch, uint64_t next, uint64_t count) {
    return (epoch << (2 * kIndexBits)) | (next << kIndexBits) | count;
}

using Clock = std::chrono::steady_clock;

// GOMP_parallel(fn, data, num_threads, flags): what `#pragma omp parallel` compiles to with gcc;
// LLVM's and Intel's OpenMP runtimes export it too.
using OpenMPParallel = void (*)(void (*)(void*), void*, unsigned, unsigned);

// The OpenMP runtime torch runs its ops on: GOMP_parallel as libtorch_cpu (already loaded: the
// kernels are called through torch tensors) resolves it, so the one among its dependencies,
// never another copy a second library brought. nullptr when torch is not loaded or has none.
OpenMPParallel find_torch_openmp() {
#if defined(__linux__)
    OpenMPParallel found = nullptr;
    dl_iterate_phdr(
        [](struct dl_phdr_info* info, size_t, void* out) {
            if (info->dlpi_name == nullptr || strstr(info->dlpi_name, "libtorch_cpu.") == nullptr) return 0;
            if (void* lib = dlopen(info->dlpi_name, RTLD_NOLOAD | RTLD_LAZY)) {
                // dlsym on a library's handle searches it and then its dependencies.
                *static_cast<OpenMPParallel*>(out) = reinterpret_cast<OpenMPParallel>(dlsym(lib, "GOMP_parallel"));
                dlclose(lib);  // only drops the reference dlopen added: torch keeps it loaded
            }
            return 1;
        },
        &found);
    return found;
#else
    return nullptr;
#endif
}

// Set in a child after fork(): the parent's OpenMP threads do not exist there, and libgomp's next
// parallel region waits for them for ever (torch's own parallel ops hang in such a child too:
// seen with torch 2.13's libgomp, 2 threads). The pool starts new workers there instead.
std::atomic<bool> g_forked{false};

OpenMPParallel torch_openmp() {
    static const OpenMPParallel f = find_torch_openmp();
    return g_forked.load(std::memory_order_relaxed) ? nullptr : f;
}

// Set by use_team() (the Python side, from $LORAKERN_CPU_TEAM): no getenv on the loop's path,
// where another thread's setenv could race with it.
std::atomic<int> g_team{static_cast<int>(Team::kPool)};

int current_tid() {
#if defined(__linux__)
    return static_cast<int>(syscall(SYS_gettid));
#else
    return 0;
#endif
}

// Whether the calling thread's OpenMP workers are spinning now on cores of their own (Team::kAuto).
// libgomp keeps one team per thread that starts regions, and its idle workers spin for a few ms
// after each region (torch's ops included) before they sleep. While they spin, a region starts at
// once and a pool worker would get half a core; but a region's end barrier waits for every
// worker, and one that shares its core with another process loses it now and then for a time
// slice: beside a busy process the OpenMP team took 0.55 ms for ~3 calls, then 2-3.4 ms for one,
// where the pool took ~1 ms steadily (M = 1, 4096 x 4096, 2 threads, AVX2, Zen 4). So a look at
// each worker before a loop: its CPU clock unchanged since the last look, it is asleep (one clock
// read, ~0.3 us); else /proc/self/task/<tid>/status (~5 us): its state (R: running or runnable)
// and whether it slept since (voluntary_ctxt_switches); awake all along but on a CPU for less than
// 3/4 of the time since, its core is shared. (Counting its preemptions instead sent loops to the
// pool on a machine with nothing else running: kernel threads preempt a spinning worker for
// microseconds, often.) The workers are those of the last region this thread ran on the team with
// the same thread count (every OpenMP loop records them); none recorded: unknown, and the loop
// runs on the team, which records them.
constexpr int kMaxProbed = 64;
const clockid_t kNoClock = static_cast<clockid_t>(-1);

// Clock c's time in ns, -1 where it cannot be read (a thread's CPU clock after the thread ended).
int64_t clock_ns(clockid_t c) {
    timespec ts;
    return clock_gettime(c, &ts) != 0 ? -1 : int64_t{ts.tv_sec} * 1000000000 + ts.tv_nsec;
}
struct TeamProbe {
    struct Worker {
        int tid;
        clockid_t clock;     // its CPU-time clock
        int64_t cpu_ns;      // at the last look
        int64_t seen_ns;     // the last look (CLOCK_MONOTONIC)
        int64_t slept;       // voluntary_ctxt_switches at the last look
        int fd;              // its /proc status, -1 where there is none
    };
    int threads = 0;  // the region's thread count the workers were recorded for (0: none)
    int count = 0;
    Worker workers[kMaxProbed];

    enum State { kUnknown, kAsleep, kWoke, kSpinning, kShared };
    // The workers' state now: kWoke when all spin and one of them slept since the last look;
    // kShared when all spin and one of them, awake since the last look, ran less than 3/4 of the
    // time since (its core shared).
    State look(int team_threads) {
        if (threads != team_threads) return kUnknown;
#if defined(__linux__)
        const int64_t now = clock_ns(CLOCK_MONOTONIC);
        State result = count > 0 ? kSpinning : kAsleep;
        for (int i = 0; i < count; ++i) {
            Worker& w = workers[i];
            if (w.fd < 0) return kAsleep;  // no /proc: the pool
            const int64_t cpu = clock_ns(w.clock);
            if (cpu < 0) return kUnknown;  // the worker is gone: record again
            const int64_t ran = cpu - w.cpu_ns, since = now - w.seen_ns;
            w.cpu_ns = cpu;
            w.seen_ns = now;
            if (ran == 0) {  // asleep since the last look
                result = kAsleep;
                continue;
            }
            char buf[2048];
            const ssize_t got = pread(w.fd, buf, sizeof(buf) - 1, 0);
            if (got <= 0) return kUnknown;
            buf[got] = 0;
            const char* st = strstr(buf, "\nState:\t");
            const char* vol = strstr(buf, "\nvoluntary_ctxt_switches:\t");
            if (st == nullptr || vol == nullptr) return kAsleep;
            const int64_t slept = strtoll(vol + 25, nullptr, 10);
            const bool awake_since = slept == w.slept;
            w.slept = slept;
            if (st[8] != 'R') {
                result = kAsleep;
            } else if (!awake_since && result != kAsleep) {
                result = kWoke;  // spinning again after a sleep: woken by a region since (torch's)
            } else if (awake_since && 4 * ran < 3 * since && result == kSpinning) {
                result = kShared;
            }
        }
        return result;
#else
        return kAsleep;
#endif
    }

    // Whether the next loop runs on the team. A pool worker shares a spinning OpenMP worker's core
    // itself, so a shared core counts only when the last loop ran on the team: then another
    // process wants that core, and a region's end waits now and then for a time slice of it
    // (beside a busy process, M = 1: ~3 regions of 0.55 ms, then one of 2-3.4 ms). It sends the
    // next kSkip loops that find the team awake (and not woken again) to the pool: beside a busy
    // process the team's spinning, no longer kept up by its own regions, ends, and its workers
    // sleep (the pool from then on, until a torch op wakes them); after torch ops on a machine
    // without one, a stray shared look costs at most kSkip loops on the pool. Measured with the
    // pool, the caller alone and the team after a shared look (benchmarks/cpu_threads.py, AVX2,
    // two runs each, speedup over 1 thread): after a torch op beside a busy process, M = 16, 0.83x / 0.49-0.52x / -;
    // beside the busy process alone, M = 1, - / - / 0.59-0.95x (the team's own regions keeping
    // its workers spinning on the shared core).
    static constexpr int kSkip = 16;
    bool use_team(int team_threads) {
        const State state = look(team_threads);
        bool team = state != kAsleep;
        if (state == kAsleep || state == kWoke) skip = 0;  // what woke them is news
        if (state == kShared && last_on_team) {
            skip = kSkip;
            team = false;
        } else if (team && skip > 0 && state != kUnknown) {
            --skip;
            team = false;
        }
        last_on_team = team;
        return team;
    }
    bool last_on_team = false;
    int skip = 0;  // loops that find the team spinning still to send to the pool

    void record(int team_threads, const int* tids, const clockid_t* clocks, int n) {
        n = std::min(n, kMaxProbed);
        bool same = team_threads == threads && n == count;
        for (int i = 0; same && i < n; ++i) same = tids[i] == workers[i].tid;
        if (same) return;
        close_all();
        threads = team_threads;
        count = n;
        for (int i = 0; i < n; ++i) {
            Worker& w = workers[i];
            w = Worker{tids[i], clocks[i], -1, 0, -1, -1};
#if defined(__linux__)
            if (clocks[i] == kNoClock) continue;  // fd -1: the pool
            char path[64];
            snprintf(path, sizeof(path), "/proc/self/task/%d/status", tids[i]);
            w.fd = open(path, O_RDONLY | O_CLOEXEC);
#endif
        }
    }
    void close_all() {
#if defined(__linux__)
        for (int i = 0; i < count; ++i)
            if (workers[i].fd >= 0) close(workers[i].fd);
#endif
        count = 0;
        threads = 0;
    }
    ~TeamProbe() { close_all(); }
};
thread_local TeamProbe t_probe;

std::atomic<int64_t> g_loops[3];  // team_loops()

class Pool {
  public:
    void run(int64_t n, int threads, const std::function<void(int64_t)>& fn) {
        std::unique_lock<std::mutex> job(submit_, std::try_to_lock);
        if (!job.owns_lock() || threads <= 1 || n <= 1) {  // busy with another caller's loop: run alone
            g_loops[0].fetch_add(1, std::memory_order_relaxed);
            for (int64_t i = 0; i < n; ++i) fn(i);
            return;
        }
        const Team team = static_cast<Team>(g_team.load(std::memory_order_relaxed));
        OpenMPParallel openmp = team == Team::kPool ? nullptr : torch_openmp();
        if (openmp != nullptr && team == Team::kAuto && !t_probe.use_team(threads)) openmp = nullptr;
        fn_ = &fn;
        done_.store(0, std::memory_order_relaxed);
        const uint64_t epoch = (epoch_ + 1) & 0xFFFF;
        epoch_ = epoch;
        state_.store(pack(epoch, 0, n), std::memory_order_release);
        g_loops[openmp ? 2 : 1].fetch_add(1, std::memory_order_relaxed);
        if (openmp != nullptr) {
            Job loop{this, epoch, current_tid()};
            openmp(
                [](void* p) {
                    Job* j = static_cast<Job*>(p);
                    const int me = current_tid();
                    if (me != j->caller) {
                        const int i = j->seen.fetch_add(1, std::memory_order_relaxed);
                        if (i < kMaxProbed) {
                            j->tids[i] = me;
                            if (pthread_getcpuclockid(pthread_self(), &j->clocks[i]) != 0) j->clocks[i] = kNoClock;
                        }
                    }
                    j->pool->work(j->epoch);
                },
                &loop, static_cast<unsigned>(threads), 0);  // returns when its team is done
            t_probe.record(threads, loop.tids, loop.clocks, loop.seen.load(std::memory_order_relaxed));
            wait_done(n);  // and a pool worker that woke late for the pool's last loop took none or finished
            return;
        }
        pool_loop(n, threads, epoch);
    }

  private:
    struct Job {  // an OpenMP region's loop, and the team's workers it saw (t_probe)
        Pool* pool;
        uint64_t epoch;
        int caller;
        std::atomic<int> seen{0};
        int tids[kMaxProbed]{};
        clockid_t clocks[kMaxProbed]{};
    };

    // The pool's loop: the caller and threads - 1 workers.
    void pool_loop(int64_t n, int threads, uint64_t epoch) {
        ensure_workers(threads - 1);
        wanted_ = threads - 1;
        {
            std::lock_guard<std::mutex> lock(wake_m_);
            published_.store(published_.load(std::memory_order_relaxed) + 1, std::memory_order_release);
        }
        wake_cv_.notify_all();
        work(epoch);
        wait_done(n);
    }

    // Wait for the pieces other threads took (none left to take): spin briefly, then sleep until
    // the thread finishing the last one says so.
    void wait_done(int64_t n) {
        const auto until = Clock::now() + kSpin;
        while (done_.load(std::memory_order_acquire) < n && Clock::now() < until) LK_PAUSE();
        if (done_.load(std::memory_order_acquire) < n) {
            std::unique_lock<std::mutex> lock(done_m_);
            done_cv_.wait(lock, [&] { return done_.load(std::memory_order_acquire) >= n; });
        }
    }

    // Take pieces of loop `epoch` until none is left (or another loop has started).
    void work(uint64_t epoch) {
        for (;;) {
            uint64_t s = state_.load(std::memory_order_acquire);
            const uint64_t next = (s >> kIndexBits) & kIndexMask, count = s & kIndexMask;
            if ((s >> (2 * kIndexBits)) != epoch || next >= count) return;
            if (!state_.compare_exchange_weak(s, pack(epoch, next + 1, count), std::memory_order_acq_rel)) continue;
            (*fn_)(static_cast<int64_t>(next));  // fn_ stays valid: the caller waits for this piece
            if (done_.fetch_add(1, std::memory_order_acq_rel) + 1 == static_cast<int64_t>(count)) {
                std::lock_guard<std::mutex> lock(done_m_);
                done_cv_.notify_one();
            }
        }
    }

    void worker(int index) {
        uint64_t seen = published_.load(std::memory_order_acquire);
        for (;;) {
            const auto until = Clock::now() + kSpin;
            uint64_t now = published_.load(std::memory_order_acquire);
            for (int i = 0; now == seen; ++i) {
                LK_PAUSE();
                if ((i & 63) == 63 && Clock::now() >= until) break;
                now = published_.load(std::memory_order_acquire);
            }
            if (now == seen) {
                std::unique_lock<std::mutex> lock(wake_m_);
                wake_cv_.wait(lock, [&] { return published_.load(std::memory_order_acquire) != seen; });
                now = published_.load(std::memory_order_acquire);
            }
            seen = now;
            const uint64_t s = state_.load(std::memory_order_acquire);
            if (index < wanted_.load(std::memory_order_relaxed)) work(s >> (2 * kIndexBits));
        }
    }

    void ensure_workers(int count) {
        while (static_cast<int>(workers_.size()) < count) {
            const int index = static_cast<int>(workers_.size());
            workers_.emplace_back([this, index] { worker(index); });
            workers_.back().detach();  // the pool lives as long as the process
        }
    }

    std::mutex submit_;  // one loop at a time
    std::vector<std::thread> workers_;
    const std::function<void(int64_t)>* fn_ = nullptr;
    std::atomic<int> wanted_{0};
    uint64_t epoch_ = 0;
    std::atomic<uint64_t> state_{0};
    std::atomic<int64_t> done_{0};
    std::atomic<uint64_t> published_{0};
    std::mutex wake_m_, done_m_;
    std::condition_variable wake_cv_, done_cv_;
};

// Never destroyed (worker threads may still wait on it at exit); a child after fork() starts a
// new one, since the parent's workers do not exist there, and runs no loop on OpenMP.
std::atomic<Pool*> g_pool{nullptr};
// Registered as the library loads, so that the child of a fork before the first loop knows too.
[[maybe_unused]] const int g_atfork = pthread_atfork(nullptr, nullptr, [] {
    g_pool.store(nullptr);
    g_forked.store(true);
});

Pool& pool() {
    Pool* p = g_pool.load(std::memory_order_acquire);
    if (p == nullptr) {
        Pool* fresh = new Pool();
        if (g_pool.compare_exchange_strong(p, fresh)) return *fresh;
        delete fresh;
    }
    return *p;
}

}  // namespace

bool openmp_team_available() { return torch_openmp() != nullptr; }

void use_team(Team team) { g_team.store(static_cast<int>(team), std::memory_order_relaxed); }

void team_loops(int64_t out[3]) {
    for (int i = 0; i < 3; ++i) out[i] = g_loops[i].load(std::memory_order_relaxed);
}

void parallel_for(int64_t n, int threads, const std::function<void(int64_t)>& fn) {
    if (n <= 0) return;
    if (n >= kMaxPieces) {  // more pieces than a claim word counts: hand them out in runs
        const int64_t per = (n + kMaxPieces - 2) / (kMaxPieces - 1);
        parallel_for((n + per - 1) / per, threads, [&](int64_t g) {
            for (int64_t i = g * per, e = std::min(n, i + per); i < e; ++i) fn(i);
        });
        return;
    }
    pool().run(n, threads, fn);
}

}  // namespace cpu
}  // namespace lorakern
