#include "thread_pool.h"

#include <pthread.h>

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

class Pool {
  public:
    void run(int64_t n, int threads, const std::function<void(int64_t)>& fn) {
        std::unique_lock<std::mutex> job(submit_, std::try_to_lock);
        if (!job.owns_lock() || threads <= 1 || n <= 1) {  // busy with another caller's loop: run alone
            for (int64_t i = 0; i < n; ++i) fn(i);
            return;
        }
        ensure_workers(threads - 1);
        fn_ = &fn;
        wanted_ = threads - 1;
        done_.store(0, std::memory_order_relaxed);
        const uint64_t epoch = (epoch_ + 1) & 0xFFFF;
        epoch_ = epoch;
        state_.store(pack(epoch, 0, n), std::memory_order_release);
        {
            std::lock_guard<std::mutex> lock(wake_m_);
            published_.store(published_.load(std::memory_order_relaxed) + 1, std::memory_order_release);
        }
        wake_cv_.notify_all();
        work(epoch);
        // Wait for the pieces workers took (none left to take): spin briefly, then sleep until the
        // worker finishing the last one says so.
        const auto until = std::chrono::steady_clock::now() + kSpin;
        while (done_.load(std::memory_order_acquire) < n && std::chrono::steady_clock::now() < until) LK_PAUSE();
        if (done_.load(std::memory_order_acquire) < n) {
            std::unique_lock<std::mutex> lock(done_m_);
            done_cv_.wait(lock, [&] { return done_.load(std::memory_order_acquire) >= n; });
        }
    }

  private:
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
            const auto until = std::chrono::steady_clock::now() + kSpin;
            uint64_t now = published_.load(std::memory_order_acquire);
            for (int i = 0; now == seen; ++i) {
                LK_PAUSE();
                if ((i & 63) == 63 && std::chrono::steady_clock::now() >= until) break;
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
// new one, since the parent's workers do not exist there.
std::atomic<Pool*> g_pool{nullptr};
std::once_flag g_atfork;

Pool& pool() {
    std::call_once(g_atfork, [] { pthread_atfork(nullptr, nullptr, [] { g_pool.store(nullptr); }); });
    Pool* p = g_pool.load(std::memory_order_acquire);
    if (p == nullptr) {
        Pool* fresh = new Pool();
        if (g_pool.compare_exchange_strong(p, fresh)) return *fresh;
        delete fresh;
    }
    return *p;
}

}  // namespace

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
