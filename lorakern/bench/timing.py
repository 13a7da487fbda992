"""Timing: CUDA with triton's do_bench (events, L2 flushed), CPU with torch.utils.benchmark, and
the providers of one comparison interleaved (round after round, each provider once a round), so
that a noisy machine slows every provider of a ratio alike."""

from __future__ import annotations

import statistics

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



DEFAULT_ROUNDS = 5
ROUNDS = DEFAULT_ROUNDS  # set by the CLI's --rounds


def interleaved(steps: dict, device: torch.device, min_run_time: float, rounds: dict | None = None) -> dict:
    """``{name: (median, q20, q80)}`` in ms for each step of ``steps``, timed in ``ROUNDS`` rounds
    that take every step in turn (``min_run_time / ROUNDS`` each), so slow drifts of the machine
    (clock, other load; ~10% on a shared 2-core VM) fall on all providers alike; per name, the
    median of its rounds' figures. ``rounds``, when given, gets each name's per-round medians (for
    :func:`round_ratio`)."""
    runs: dict = {name: [] for name in steps}
    for _ in range(ROUNDS):
        for name, step in steps.items():
            runs[name].append(measure(step, device, min_run_time / ROUNDS))
    if rounds is not None:
        rounds.update({name: [r[0] for r in rs] for name, rs in runs.items()})
    return {name: tuple(statistics.median(r[i] for r in rs) for i in range(3)) for name, rs in runs.items()}


def round_ratio(rounds: dict, name, ref) -> float | None:
    """The median over rounds of ``name``'s time over ``ref``'s in the same round (None when
    either is missing). Two providers of one round ran within a fraction of a second of each
    other, so a slow spell of a shared machine (seen: one provider 2x slower for a second or two)
    moves both; the ratio of the two overall medians can take its numerator and denominator from
    different spells (seen: 1.21 against 1.08 per round in one run)."""
    if name not in rounds or ref not in rounds:
        return None
    return statistics.median(a / b for a, b in zip(rounds[name], rounds[ref]))
