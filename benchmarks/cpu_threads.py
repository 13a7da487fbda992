"""Thread scaling of the native CPU NF4 matmul: quiet, beside one busy process, after a torch op.

    python benchmarks/cpu_threads.py [--isa avx2|avx2-vpshufb|avx2-vpermps|avx512|scalar] [--out results.jsonl]

For M = 1 and 16 (4096 x 4096, cold weights: 8 copies rotate past the L3) and 1 and 2 threads,
the median time of ``lorakern.nf4_matmul``: alone; with a Python spin loop running in another
process (as a data loader or tokenizer would); each call after an RMSNorm-like torch op on x, as
inside a model (torch runs it on its OpenMP threads from 32768 elements, M >= 8 here, and those
threads spin for a few ms after it on the cores the native kernel wants); and both, the op and
the busy process. With 2 threads, each team that can run the kernel's pieces beside the caller
($LORAKERN_CPU_TEAM: lorakern's own pool, torch's OpenMP team, and ``auto``, the default, which
picks per loop); beside them, fp32 ``F.linear`` on 8 dense copies with 2 threads under the same
load (after the same op). A call's time includes the op's. All are timed in turn, round after
round, each from rest (50 ms apart), and the speedups are medians of the rounds' ratios. Prints a
table; with ``--out`` appends one JSON line per measurement (processor and ISA path included).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

SPIN = "import time\nt = time.time()\nwhile time.time() - t < 600: pass\n"


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


LOADS = ("quiet", "one busy process", "after a torch op", "after a torch op, one busy process")


def mean_ms(fn, calls: int) -> float:
    t = time.perf_counter()
    for i in range(calls):
        fn(i)
    return (time.perf_counter() - t) / calls * 1e3


ROUNDS = 7
TEAMS = ("pool", "openmp", "auto")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--isa", default=None, help="force a CPU path (LORAKERN_CPU_ISA)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.isa:
        os.environ["LORAKERN_CPU_ISA"] = args.isa
    import lorakern
    from lorakern.bench.records import environment
    from lorakern.nf4 import native

    if not native.extension().openmp_team_available():
        raise SystemExit("torch's OpenMP runtime was not found in this process: only the pool can be measured")

    torch.manual_seed(0)
    weights = [lorakern.NF4Weight.quantize(torch.randn(4096, 4096) / 64, 64) for _ in range(8)]
    dense = [torch.randn(4096, 4096) / 64 for _ in range(8)]
    env = environment(torch.device("cpu"))
    previous, recs = torch.get_num_threads(), []
    try:
        for load in LOADS:
            spinner = subprocess.Popen([sys.executable, "-c", SPIN]) if "busy" in load else None
            try:
                time.sleep(0.2)
                for M in (1, 16):
                    # The timings of a round back to back, ROUNDS rounds: a slow spell of the
                    # machine falls on all of them, and each ratio is the median of the rounds' ratios.
                    x = torch.randn(M, 4096)
                    pre = rms_norm if load.startswith("after a torch op") else (lambda t: t)
                    def nf4(i, x=x, pre=pre):
                        return lorakern.nf4_matmul(pre(x), weights[i % 8])

                    steps = {(1, "nf4_matmul", "pool"): nf4, **{(2, "nf4_matmul", team): nf4 for team in TEAMS},
                             (2, "fp32_linear", None): lambda i, x=x, pre=pre: torch.nn.functional.linear(
                                 pre(x), dense[i % 8])}
                    calls = {"nf4_matmul": 60 if M == 1 else 15, "fp32_linear": 20 if M == 1 else 8}
                    times: dict = {key: [] for key in steps}
                    for _ in range(ROUNDS):
                        for (threads, op, team), step in steps.items():
                            torch.set_num_threads(threads)
                            os.environ[native.TEAM_ENV] = team or "pool"
                            step(0)
                            times[(threads, op, team)].append(mean_ms(step, calls[op]))
                            # OpenMP workers (torch's, or the kernels' on the openmp team) spin for
                            # a few ms after a call: each step starts with them asleep, not in the
                            # state the step before left them in
                            time.sleep(0.05)
                    one, fp32 = times[(1, "nf4_matmul", "pool")], times[(2, "fp32_linear", None)]
                    for (threads, op, team), ts in times.items():
                        rec = {"op": op, "M": M, "in_features": 4096, "out_features": 4096, "threads": threads,
                               "load": load, "median_ms": statistics.median(ts), "device_name": env["device_name"],
                               "date": env["date"], "commit": env["commit"], "torch": env["torch"]}
                        if op == "nf4_matmul":
                            rec["team"] = team
                        if (threads, op) == (2, "nf4_matmul"):
                            rec["speedup_vs_1_thread"] = statistics.median(a / b for a, b in zip(one, ts))
                            rec["fp32_over_nf4"] = statistics.median(a / b for a, b in zip(fp32, ts))
                        recs.append(rec)
            finally:
                if spinner is not None:
                    spinner.kill()
                    spinner.wait()
    finally:
        torch.set_num_threads(previous)
        os.environ.pop(native.TEAM_ENV, None)
    print(f"{env['device_name']}, {env['date'][:10]}, commit {env['commit']}")
    print(f"{'load':>34} {'M':>3} {'1 thread ms':>12}" + "".join(f" {'2t ' + t:>10} {'x':>5}" for t in TEAMS)
          + f" {'fp32 2t ms':>11} {'fp32/' + native.DEFAULT_TEAM:>10}"
          + "   (x: speedup over 1 thread; ratios: medians over rounds)")
    for load in LOADS:
        for M in (1, 16):
            def find(threads, op, team=None, load=load, M=M):
                return next(r for r in recs if r["load"] == load and r["M"] == M and r["threads"] == threads
                            and r["op"] == op and r.get("team") == team)

            one, fp32, default = (find(1, "nf4_matmul", "pool"), find(2, "fp32_linear"),
                                  find(2, "nf4_matmul", native.DEFAULT_TEAM))
            cols = "".join(f" {r['median_ms']:>10.3f} {r['speedup_vs_1_thread']:>5.2f}"
                           for r in (find(2, "nf4_matmul", t) for t in TEAMS))
            print(f"{load:>34} {M:>3} {one['median_ms']:>12.3f}{cols} {fp32['median_ms']:>11.3f} "
                  f"{default['fp32_over_nf4']:>10.2f}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "a") as f:
            for r in recs:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
