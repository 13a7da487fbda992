"""The LoRA suite: every provider (base, unfused, peft, fused, ...) in each mode (fwd, bwd,
fwd+bwd) on each shape, providers of one shape and mode run back to back; ratios are against the
base matmul and the unfused LoRA of the same run."""

from __future__ import annotations

from . import records, report
from .providers import flops, make_module, make_step, saved_activation_bytes
from .shapes import DTYPE_NAMES
from .timing import measure, peak_memory


def run(shapes, providers, modes, dtype, device, dropout, min_run_time, progress=True) -> list[dict]:
    env = records.environment(device)
    dtype_name = DTYPE_NAMES[dtype]
    bar = report.progress(len(shapes) * len(modes) * len(providers), "lorakern-bench", progress)
    out = []
    for s in shapes:
        for mode in modes:
            group = []
            for provider in providers:
                module = make_module(provider, s, dtype, device, dropout).train()
                step = make_step(module, mode, s, dtype, device)
                med, q20, q80 = measure(step, device, min_run_time)
                saved = saved_activation_bytes(module, s, dtype, device)
                group.append({
                    "op": "lora_linear", "provider": provider, "mode": mode, "M": s.M,
                    "in_features": s.in_features, "out_features": s.out_features, "r": s.r,
                    "dtype": dtype_name, "dropout": dropout, "median_ms": med, "q20_ms": q20, "q80_ms": q80,
                    "tflops": flops(provider, mode, s) / (med * 1e-3) / 1e12,
                    "peak_mem_bytes": peak_memory(step, device), "saved_bytes": saved, **env,
                })
                del module, step
                bar.update(1)
            times = {r["provider"]: r["median_ms"] for r in group}
            for r in group:
                r["ratio_to_base"] = r["median_ms"] / times["base"] if "base" in times else None
                r["ratio_to_unfused"] = r["median_ms"] / times["unfused"] if "unfused" in times else None
            out.extend(group)
    bar.close()
    return out


COLUMNS = (
    ("M", "d", lambda r: r["M"]), ("in", "d", lambda r: r["in_features"]), ("out", "d", lambda r: r["out_features"]),
    ("r", "d", lambda r: r["r"]), ("mode", "s", lambda r: r["mode"]), ("provider", "s", lambda r: r["provider"]),
    ("median ms", ".4f", lambda r: r["median_ms"]), ("TFLOP/s", ".3f", lambda r: r["tflops"]),
    ("x base", ".2f", lambda r: r["ratio_to_base"]), ("x unfused", ".2f", lambda r: r["ratio_to_unfused"]),
    ("saved MiB", ".2f", lambda r: None if r["saved_bytes"] is None else r["saved_bytes"] / 2**20),
)


def table(recs: list[dict]) -> str:
    return report.table(COLUMNS, recs)
