"""``lorakern-bench``: time LoRA and QLoRA linear providers on the best device present.

    lorakern-bench                       # default suites (CUDA if present, else CPU-sized ones)
    lorakern-bench --quick               # a few small shapes, seconds
    lorakern-bench --suite lora --shapes llama3-8b --providers base,unfused,fused --modes fwd,fwd+bwd
    lorakern-bench --suite nf4 --providers fp32,nf4,bnb
    lorakern-bench --shapes 4096,4096,4096,16 --dtype bf16 --out bench-out

Suites: ``lora`` (providers base, unfused, peft, fused; modes fwd, bwd, fwd+bwd) and ``nf4`` (the
QLoRA layer's eval forward against dense fp32 / bf16 and bitsandbytes, plus NF4 dequantize; see
lorakern/bench/nf4.py).

Each measurement is appended to ``OUT/results.jsonl`` (schema in lorakern/bench/records.py), a
table is printed, and one PNG per mode is written to OUT.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from . import nf4 as nf4_suite
from . import records
from .providers import MODES, Shape, available_providers, flops, make_module, make_step, saved_activation_bytes
from .shapes import parse_shapes
from .timing import measure, peak_memory

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

def run(shapes, providers, modes, dtype, device, dropout, min_run_time, progress=True) -> list[dict]:
    env = records.environment(device)
    dtype_name = next(k for k, v in DTYPES.items() if v == dtype)
    try:
        from tqdm import tqdm

        total = len(shapes) * len(modes) * len(providers)
        bar = tqdm(total=total, disable=not progress, file=sys.stderr, desc="lorakern-bench")
    except ImportError:
        bar = None
    out = []
    for s in shapes:
        for mode in modes:
            group = []
            for provider in providers:  # providers of one shape and mode run back to back
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
                if bar is not None:
                    bar.update(1)
            times = {r["provider"]: r["median_ms"] for r in group}
            for r in group:
                r["ratio_to_base"] = r["median_ms"] / times["base"] if "base" in times else None
                r["ratio_to_unfused"] = r["median_ms"] / times["unfused"] if "unfused" in times else None
            out.extend(group)
    if bar is not None:
        bar.close()
    return out


def run_nf4(shapes, providers, compute_dtype, device, min_run_time, progress=True) -> list[dict]:
    """The 4-bit suite: every provider on every shape (modules built once per weight shape), the
    providers of one shape timed in interleaved rounds (see ``nf4_suite.interleaved``)."""
    env = records.environment(device)
    bandwidth = nf4_suite.copy_bandwidth(device)
    base_name = "bf16" if compute_dtype == torch.bfloat16 else "fp32"
    by_weight: dict[tuple[int, int], list[Shape]] = {}
    for s in shapes:
        by_weight.setdefault((s.in_features, s.out_features), []).append(s)
    try:
        from tqdm import tqdm

        bar = tqdm(total=len(shapes) * len(providers), disable=not progress, file=sys.stderr, desc="lorakern-bench nf4")
    except ImportError:
        bar = None
    name_of = {v: k for k, v in DTYPES.items()}
    out = []
    for (k, n), group_shapes in by_weight.items():
        group = []
        built = {}  # provider -> (modules, common record fields)
        for provider in providers:
            torch.manual_seed(0)
            first = nf4_suite.make_linear(provider, k, n, compute_dtype, device)
            wbytes = nf4_suite.weight_bytes(provider, first)
            copies = nf4_suite.weight_copies(device, wbytes)
            modules = [first] + [nf4_suite.make_linear(provider, k, n, compute_dtype, device)
                                 for _ in range(copies - 1)]
            xdtype = nf4_suite.input_dtype(provider, compute_dtype)
            built[provider] = (modules, {
                "provider": provider, "in_features": k, "out_features": n, "dropout": 0.0,
                "dtype": name_of[xdtype], "weight_bytes": wbytes, "weight_copies": copies,
                "ratio_to_unfused": None, "saved_bytes": None, **env})

        def forward(module, x):
            def call():
                with torch.no_grad():
                    return module(x)
            return call

        for s in group_shapes:
            x = torch.randn(s.M, k, device=device)
            steps = {}
            for provider, (modules, common) in built.items():
                xp = x.to(DTYPES[common["dtype"]])
                steps[provider] = nf4_suite.rotating([forward(m, xp) for m in modules])
            for provider, (med, q20, q80) in nf4_suite.interleaved(steps, device, min_run_time).items():
                common = built[provider][1]
                wbytes = common["weight_bytes"]
                group.append({**common, "op": "nf4_linear", "mode": "fwd", "M": s.M,
                              "r": s.r if provider.startswith("nf4") else 0,
                              "median_ms": med, "q20_ms": q20, "q80_ms": q80,
                              "tflops": 2.0 * s.M * n * k / (med * 1e-3) / 1e12,
                              "gbps": wbytes / (med * 1e-3) / 1e9, "floor_ms": wbytes / bandwidth * 1e3,
                              "peak_mem_bytes": peak_memory(steps[provider], device)})
                if bar is not None:
                    bar.update(1)
        deqs = {}
        for provider, (modules, _) in built.items():
            parts = [nf4_suite.dequantize_step(provider, m, compute_dtype) for m in modules]
            if parts[0] is not None:
                deqs[provider] = nf4_suite.rotating(parts)
        for provider, (med, q20, q80) in nf4_suite.interleaved(deqs, device, min_run_time).items():
            common = built[provider][1]
            moved = common["weight_bytes"] + n * k * torch.tensor([], dtype=compute_dtype).element_size()
            group.append({**common, "op": "nf4_dequantize", "mode": "fwd", "M": 0, "r": 0,
                          "dtype": name_of[compute_dtype], "median_ms": med, "q20_ms": q20, "q80_ms": q80,
                          "tflops": 0.0, "gbps": moved / (med * 1e-3) / 1e9, "floor_ms": moved / bandwidth * 1e3,
                          "peak_mem_bytes": peak_memory(deqs[provider], device)})
        del built, deqs
        for rec in group:
            peers = {r["provider"]: r["median_ms"] for r in group if r["op"] == rec["op"] and r["M"] == rec["M"]}
            rec["ratio_to_base"] = rec["median_ms"] / peers[base_name] if base_name in peers else None
            rec["ratio_to_bnb"] = rec["median_ms"] / peers["bnb"] if "bnb" in peers else None
        out.extend(group)
    if bar is not None:
        bar.close()
    return out


def nf4_table(recs: list[dict]) -> str:
    head = (f"{'op':>14} {'M':>5} {'in':>6} {'out':>6} {'provider':>8} {'median ms':>10} {'floor ms':>9} "
            f"{'x floor':>7} {'GB/s':>7} {'x base':>7} {'x bnb':>7}")
    lines = [head, "-" * len(head)]
    fmt = lambda v, spec: format(v, spec) if v is not None else "-"
    for r in recs:
        lines.append(
            f"{r['op']:>14} {r['M']:>5} {r['in_features']:>6} {r['out_features']:>6} {r['provider']:>8} "
            f"{r['median_ms']:>10.4f} {r['floor_ms']:>9.4f} {r['median_ms'] / r['floor_ms']:>7.2f} {r['gbps']:>7.1f} "
            f"{fmt(r['ratio_to_base'], '>7.3f')} {fmt(r['ratio_to_bnb'], '>7.3f')}"
        )
    return "\n".join(lines)


def table(recs: list[dict]) -> str:
    head = (f"{'M':>6} {'in':>6} {'out':>6} {'r':>4} {'mode':>8} {'provider':>8} {'median ms':>10} "
            f"{'TFLOP/s':>8} {'x base':>7} {'x unfused':>9} {'saved MiB':>9}")
    lines = [head, "-" * len(head)]
    for r in recs:
        fmt = lambda v, spec: format(v, spec) if v is not None else "-"
        saved = r["saved_bytes"] / 2**20 if r["saved_bytes"] is not None else None
        lines.append(
            f"{r['M']:>6} {r['in_features']:>6} {r['out_features']:>6} {r['r']:>4} {r['mode']:>8} {r['provider']:>8} "
            f"{r['median_ms']:>10.4f} {r['tflops']:>8.3f} {fmt(r['ratio_to_base'], '>7.2f')} "
            f"{fmt(r['ratio_to_unfused'], '>9.2f')} {fmt(saved, '>9.2f')}"
        )
    return "\n".join(lines)


def plot(recs: list[dict], out_dir: str) -> list[str]:
    """One PNG per mode: time relative to the base matmul, per shape and provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for op, mode in sorted({(r["op"], r["mode"]) for r in recs}):
        rows = [r for r in recs if r["op"] == op and r["mode"] == mode and r["ratio_to_base"] is not None]
        if not rows:
            continue
        # Dense and 4-bit providers of one weight shape share a label (their r differs).
        key = (lambda r: (r["M"], r["in_features"], r["out_features"], 0)) if op.startswith("nf4") else \
            (lambda r: (r["M"], r["in_features"], r["out_features"], r["r"]))
        labels = sorted({key(r) for r in rows})
        providers = list(dict.fromkeys(r["provider"] for r in rows))
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels) * len(providers) / 2), 4))
        width = 0.8 / len(providers)
        for i, p in enumerate(providers):
            vals = {key(r): r["ratio_to_base"] for r in rows if r["provider"] == p}
            ax.bar([j + i * width for j in range(len(labels))], [vals.get(lab, 0) for lab in labels], width, label=p)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))])
        ax.set_xticklabels([f"M={m}\n{k}->{n}" + (f"\nr={r}" if r else "") for m, k, n, r in labels], fontsize=7)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_ylabel("time / dense matmul" if op.startswith("nf4") else "time / base matmul")
        env = rows[0]
        ax.set_title(f"{op}, {mode}, {env['device_name']} ({env['date'][:10]})", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{op}_{mode.replace('+', '_')}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


SUITES = ("lora", "nf4")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lorakern-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--suite", default=",".join(SUITES), help="comma-separated, from lora,nf4")
    parser.add_argument("--shapes", default=None,
                        help="presets (llama3-8b, llama3-70b, tiny, cpu) or M,in,out,r items, ';'-separated "
                             "(the nf4 suite uses r only for its adapter; default: Llama-3-8B projections)")
    parser.add_argument("--providers", default=None,
                        help=f"comma-separated, from {available_providers()} (lora) and {nf4_suite.available()} (nf4)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated, from fwd,bwd,fwd+bwd (lora suite)")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--out", default="bench-out", help="folder for results.jsonl and the plots")
    parser.add_argument("--quick", action="store_true", help="the 'tiny' shapes, short timing runs")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    suites = args.suite.split(",")
    if any(s not in SUITES for s in suites):
        parser.error(f"--suite: expected a comma-separated subset of {SUITES}")
    lora_all, nf4_all = available_providers(device), nf4_suite.available()
    wanted = args.providers.split(",") if args.providers else lora_all + nf4_all
    unknown = [p for p in wanted if p not in lora_all + nf4_all]
    if unknown:
        parser.error(f"--providers: {unknown} not available; choose from {lora_all + nf4_all}")
    modes = args.modes.split(",")
    if any(m not in MODES for m in modes):
        parser.error(f"--modes: expected a comma-separated subset of {MODES}")
    min_run_time = 0.05 if args.quick else 0.2

    recs, text = [], []
    lora_providers = [p for p in wanted if p in lora_all]
    if "lora" in suites and lora_providers:
        default_shapes = "tiny" if args.quick else ("llama3-8b" if device.type == "cuda" else "cpu")
        shapes = parse_shapes(args.shapes or default_shapes, device)
        lora = run(shapes, lora_providers, modes, dtype, device, args.dropout, min_run_time,
                   progress=not args.no_progress)
        recs += lora
        text.append(table(lora))
    nf4_providers = [p for p in wanted if p in nf4_all]
    if "nf4" in suites and nf4_providers:
        shapes = parse_shapes(args.shapes, device) if args.shapes else nf4_suite.shapes(device, args.quick)
        nf4 = run_nf4(shapes, nf4_providers, dtype, device, min_run_time, progress=not args.no_progress)
        recs += nf4
        text.append(nf4_table(nf4))
    print("\n\n".join(text))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.jsonl")
    records.append(path, recs)
    pngs = plot(recs, args.out)
    print(f"\n{len(recs)} records appended to {path}; plots: {', '.join(pngs)}")
    return 0
