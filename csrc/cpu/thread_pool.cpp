#include "thread_pool.h"

#include <pthread.h>
#include <string.h>
#if defined(__linux__)
#include <dlfcn.h>
#include <link.h>
#endif

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

// Set by use_openmp_team() (the Python side, from $LORAKERN_CPU_TEAM): no getenv on the loop's
// path, where another thread's setenv could race with it.
std::atomic<bool> g_openmp_requested{false};

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
        const OpenMPParallel openmp = g_openmp_requested.load(std::memory_order_relaxed) ? torch_openmp() : nullptr;
        fn_ = &fn;
        done_.store(0, std::memory_order_relaxed);
        const uint64_t epoch = (epoch_ + 1) & 0xFFFF;
        epoch_ = epoch;
        state_.store(pack(epoch, 0, n), std::memory_order_release);
        g_loops[openmp ? 2 : 1].fetch_add(1, std::memory_order_relaxed);
        if (openmp != nullptr) {
            Job loop{this, epoch};
            openmp([](void* j) { static_cast<Job*>(j)->pool->work(static_cast<Job*>(j)->epoch); }, &loop,
                   static_cast<unsigned>(threads), 0);  // returns when its team is done
            wait_done(n);  // and a pool worker that woke late for the pool's last loop took none or finished
            return;
        }
        pool_loop(n, threads, epoch);
    }

  private:
    struct Job {
        Pool* pool;
        uint64_t epoch;
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

void use_openmp_team(bool on) { g_openmp_requested.store(on, std::memory_order_relaxed); }

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
