"""Timing: CUDA with triton's do_bench (events, L2 flushed), CPU with torch.utils.benchmark, and
a group of providers interleaved on the CPU (round after round, each provider once a round), so
that a noisy machine slows every provider of a ratio alike."""

from __future__ import annotations

import statistics
import time

import torch


def measure(step, device: torch.device, min_run_time: float = 0.2) -> tuple[float, float, float]:
    """(median, 20%, 80%) time of ``step()`` in milliseconds."""
    if device.type == "cuda":
        from triton.testing import do_bench

        q = do_bench(step, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=100)
        return float(q[0]), float(q[1]), float(q[2])
    from torch.utils import benchmark

    step()  # warm up (first call allocates, loads libraries)
    m = benchmark.Timer(stmt="step()", globals={"step": step}, num_threads=torch.get_num_threads())
    times = m.blocked_autorange(min_run_time=min_run_time).times
    if len(times) < 3:
        times = times + m.timeit(3).times
    q = statistics.quantiles(times, n=5)  # 20/40/60/80% cut points
    return statistics.median(times) * 1e3, q[0] * 1e3, q[3] * 1e3


def peak_memory(step, device: torch.device) -> int | None:
    """Peak bytes allocated during one ``step()`` on CUDA (None elsewhere)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def measure_group(steps: list, device: torch.device, min_run_time: float = 0.2) -> list[tuple[float, float, float]]:
    """``measure`` for each of ``steps``; on the CPU interleaved: every round runs each step once
    (a block of calls of about 1 ms for fast ones), until each step has run ``min_run_time`` and
    at least 7 rounds. Returns (median, 20%, 80%) in milliseconds per step."""
    if device.type == "cuda":
        return [measure(step, device, min_run_time) for step in steps]
    calls = []
    for step in steps:  # warm up, and size each step's block of calls to ~1 ms
        step()
        t0 = time.perf_counter()
        step()
        calls.append(max(1, int(1e-3 / max(time.perf_counter() - t0, 1e-7))))
    samples = [[] for _ in steps]
    spent = [0.0] * len(steps)
    while len(samples[0]) < 7 or min(spent) < min_run_time:
        for i, step in enumerate(steps):
            t0 = time.perf_counter()
            for _ in range(calls[i]):
                step()
            dt = time.perf_counter() - t0
            spent[i] += dt
            samples[i].append(dt / calls[i])
    out = []
    for times in samples:
        q = statistics.quantiles(times, n=5)
        out.append((statistics.median(times) * 1e3, q[0] * 1e3, q[3] * 1e3))
    return out
