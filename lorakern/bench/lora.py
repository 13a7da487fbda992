"""The LoRA and DoRA suites: every provider (base, unfused, peft, fused, peft-dora, fused-dora, ...)
in each mode on each shape, the providers of one shape and mode timed together (interleaved on the
CPU); ratios are against the base matmul, the unfused LoRA, fused LoRA and PEFT's DoRA of the same
run."""

from __future__ import annotations

import torch

from . import records, report
from .providers import flops, make_module, make_step, saved_activation_bytes
from .shapes import DTYPE_NAMES
from .timing import interleaved, peak_memory, round_ratio


def run(shapes, providers, modes, dtype, device, dropout, min_run_time, progress=True) -> list[dict]:
    env = records.environment(device)
    dtype_name = DTYPE_NAMES[dtype]
    bar = report.progress(len(shapes) * len(modes) * len(providers), "lorakern-bench", progress)
    out = []
    for s in shapes:
        for mode in modes:
            modules = [make_module(provider, s, dtype, device, dropout).train() for provider in providers]
            steps = [make_step(module, mode, s, dtype, device) for module in modules]
            rounds: dict = {}
            timed = interleaved(dict(zip(providers, steps)), device, min_run_time, rounds)
            timings = [timed[p] for p in providers]
            group = []
            for provider, module, step, (med, q20, q80) in zip(providers, modules, steps, timings):
                group.append({
                    "op": "lora_linear", "provider": provider, "mode": mode, "M": s.M, "adapters": s.adapters,
                    "in_features": s.in_features, "out_features": s.out_features, "r": s.r,
                    "dtype": dtype_name, "dropout": dropout, "median_ms": med, "q20_ms": q20, "q80_ms": q80,
                    "tflops": flops(provider, mode, s) / (med * 1e-3) / 1e12,
                    "peak_mem_bytes": peak_memory(step, device),
                    "saved_bytes": saved_activation_bytes(module, torch.randn(s.M, s.in_features, device=device,
                                                                               dtype=dtype, requires_grad=True)),
                    **env,
                })
                bar.update(1)
            del modules, steps
            for r in group:
                for key, name in RATIOS:
                    r[key] = round_ratio(rounds, r["provider"], name)
            out.extend(group)
    bar.close()
    return out


# Each record's time over another provider's of the same shape and mode, measured in the same run.
RATIOS = (("ratio_to_base", "base"), ("ratio_to_unfused", "unfused"), ("ratio_to_fused", "fused"),
          ("ratio_to_peft_dora", "peft-dora"), ("ratio_to_peft_multi", "peft-multi"),
          ("ratio_to_fused_nf4", "fused-nf4"))
DORA_COLUMNS = (
    ("M", "d", lambda r: r["M"]), ("in", "d", lambda r: r["in_features"]), ("out", "d", lambda r: r["out_features"]),
    ("r", "d", lambda r: r["r"]), ("mode", "s", lambda r: r["mode"]), ("provider", "s", lambda r: r["provider"]),
    ("median ms", ".4f", lambda r: r["median_ms"]), ("x fused LoRA", ".2f", lambda r: r.get("ratio_to_fused")),
    ("x peft-dora", ".3f", lambda r: r.get("ratio_to_peft_dora")),
    ("saved MiB", ".2f", lambda r: None if r["saved_bytes"] is None else r["saved_bytes"] / 2**20),
)
COLUMNS = (
    ("M", "d", lambda r: r["M"]), ("in", "d", lambda r: r["in_features"]), ("out", "d", lambda r: r["out_features"]),
    ("r", "d", lambda r: r["r"]), ("mode", "s", lambda r: r["mode"]), ("provider", "s", lambda r: r["provider"]),
    ("median ms", ".4f", lambda r: r["median_ms"]), ("TFLOP/s", ".3f", lambda r: r["tflops"]),
    ("x base", ".2f", lambda r: r["ratio_to_base"]), ("x unfused", ".2f", lambda r: r["ratio_to_unfused"]),
    ("saved MiB", ".2f", lambda r: None if r["saved_bytes"] is None else r["saved_bytes"] / 2**20),
)


MULTI_COLUMNS = (
    ("M", "d", lambda r: r["M"]), ("adapters", "d", lambda r: r["adapters"]), ("in", "d", lambda r: r["in_features"]),
    ("out", "d", lambda r: r["out_features"]), ("r", "d", lambda r: r["r"]), ("mode", "s", lambda r: r["mode"]),
    ("provider", "s", lambda r: r["provider"]), ("median ms", ".4f", lambda r: r["median_ms"]),
    ("x fused 1 adapter", ".2f", lambda r: r.get("ratio_to_fused")),
    ("x peft-multi", ".3f", lambda r: r.get("ratio_to_peft_multi")),
    ("x fused-nf4 1 adapter", ".2f", lambda r: r.get("ratio_to_fused_nf4")),
)


def table(recs: list[dict], suite: str = "lora") -> str:
    return report.table({"dora": DORA_COLUMNS, "multi": MULTI_COLUMNS}.get(suite, COLUMNS), recs)
