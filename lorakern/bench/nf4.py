"""The 4-bit suite: a QLoRA layer's forward (eval, the decode/serving case) against dense and
bitsandbytes baselines, and NF4 dequantize alone.

Providers (op ``nf4_linear``, mode ``fwd``):
- fp32, bf16: ``nn.Linear`` with a dense weight in that dtype (x in the same dtype);
- nf4, nf4-dq: ``FusedLoRALinear(base_quant="nf4")`` (double quantization for nf4-dq), r=16
  adapter, eval mode, computing in the suite's dtype (fp32 on CPU, bf16 on CUDA);
- bnb: bitsandbytes' ``Linear4bit`` (NF4), same compute dtype, when installed.
Op ``nf4_dequantize``: the NF4 weight decoded to the suite dtype, provider ``nf4`` (and ``bnb``).

The floor of a memory-bound call is the bytes it must read (the weight as stored) divided by the
device's copy bandwidth measured in the same run; records carry ``weight_bytes`` and ``floor_ms``.

Weights are timed cold, as a model's layers are in a decode loop (a 7B-70B model is GBs of
weights, so each layer's weight comes from DRAM): on CUDA triton's ``do_bench`` flushes L2
between calls; on the CPU each provider rotates through ``weight_copies`` independent modules
holding more than twice the last-level cache. Timed hot, a 4096 x 4096 fp32 weight (64 MB) sits in
a 260 MB L3 and reads at L3 speed: 1.3 ms instead of 2.2 ms at M = 1 (2 threads, Xeon).
"""

from __future__ import annotations

import glob

import torch
from torch import nn

import lorakern

from . import records, report
from .shapes import DTYPE_NAMES, DTYPES, LLAMA3_8B, Shape
from .timing import interleaved, measure, peak_memory, round_ratio

NF4_PROVIDERS = ("fp32", "bf16", "nf4", "nf4-dq", "int4", "bnb")
INT4_GROUP = 64
ADAPTER_R = 16


def available() -> list[str]:
    names = list(NF4_PROVIDERS)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        names.remove("bnb")
    return names


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large device-to-device copy (read + write counted), best of five."""
    n = (256 << 20) // 4
    src = torch.empty(n, device=device, dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    med, q20, _ = measure(lambda: dst.copy_(src), device, 0.2)
    return 2 * src.numel() * 4 / (q20 * 1e-3)


def last_level_cache_bytes() -> int:
    """The largest CPU cache's size from sysfs (Linux), else 64 MB."""
    best = 0
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            text = open(path).read().strip().upper()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            best = max(best, int(digits) * mult)
    return best or 64 << 20


MAX_COPIES = 64  # small weights (the --quick shapes): enough rotation, bounded build time


def weight_copies(device: torch.device, weight_bytes_each: int) -> int:
    """How many copies of a module to rotate through so its weights come from memory, not cache:
    1 on CUDA (do_bench flushes L2), else enough to hold twice the last-level cache."""
    if device.type == "cuda":
        return 1
    return max(1, min(MAX_COPIES, -(-2 * last_level_cache_bytes() // max(1, weight_bytes_each))))


def rotating(steps):
    """One step that calls ``steps`` in turn."""
    if len(steps) == 1:
        return steps[0]
    state = [0]

    def step():
        state[0] = (state[0] + 1) % len(steps)
        return steps[state[0]]()

    return step


def make_linear(provider: str, in_f: int, out_f: int, compute_dtype, device) -> nn.Module:
    """The module for ``provider`` (weights random; deterministic in the global torch seed)."""
    dense = nn.Linear(in_f, out_f, bias=False, device=device, dtype=torch.float32)
    dense.weight.requires_grad_(False)
    if provider in ("fp32", "bf16"):
        return dense.to({"fp32": torch.float32, "bf16": torch.bfloat16}[provider]).eval()
    if provider in ("nf4", "nf4-dq"):
        layer = lorakern.FusedLoRALinear.from_linear(
            dense.to(compute_dtype), r=ADAPTER_R, lora_alpha=2 * ADAPTER_R, base_quant="nf4",
            double_quant=provider == "nf4-dq", init_lora_weights=False)
        return layer.eval()
    if provider == "int4":  # QA-LoRA over group-wise INT4 (G = 64), r = 16
        from ..int4.layer import QALoRALinear

        layer = QALoRALinear.from_linear(dense.to(compute_dtype), r=ADAPTER_R, lora_alpha=2 * ADAPTER_R,
                                         group_size=INT4_GROUP)
        with torch.no_grad():
            layer.lora_B.normal_(std=0.02)
        return layer.eval()
    if provider == "bnb":
        import bitsandbytes as bnb

        q = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=compute_dtype, quant_type="nf4")
        q.load_state_dict(dense.to(compute_dtype).state_dict())
        return q.to(device).eval()
    raise ValueError(f"unknown NF4-suite provider {provider!r}; choose from {available()}")


def weight_bytes(provider: str, module: nn.Module) -> int:
    if provider in ("fp32", "bf16"):
        return module.weight.numel() * module.weight.element_size()
    if provider in ("nf4", "nf4-dq"):
        return module.weight_nf4.nbytes()
    if provider == "int4":  # codes, scales, and the zero points' shift the kernel reads
        return module.weight_int4.kernel_nbytes()
    qs = module.weight.quant_state  # bnb
    return module.weight.numel() + qs.absmax.numel() * qs.absmax.element_size()


def input_dtype(provider: str, compute_dtype):
    return {"fp32": torch.float32, "bf16": torch.bfloat16}.get(provider, compute_dtype)


def shapes(device: torch.device, quick: bool) -> list[Shape]:
    if quick:
        return [Shape(M, 512, 256, ADAPTER_R) for M in (1, 16)]
    Ms = (1, 4, 16, 256, 4096) if device.type == "cuda" else (1, 4, 16, 256)
    return [Shape(M, k, n, ADAPTER_R) for (k, n) in LLAMA3_8B for M in Ms]


def dequantize_step(provider: str, module: nn.Module, compute_dtype):
    if provider in ("nf4", "nf4-dq"):
        w = module.weight_nf4
        return lambda: w.dequantize(compute_dtype)
    if provider == "bnb":
        import copy

        import bitsandbytes.functional as F

        # Its decode writes the quant state's dtype: the float32 the weight was quantized from
        # (load_state_dict copies into Linear4bit's float32 parameter), so a state naming the
        # suite's dtype, as the layer's bfloat16 compute uses, makes it write that directly.
        data, qs = module.weight.data, copy.copy(module.weight.quant_state)
        qs.dtype = compute_dtype
        return lambda: F.dequantize_4bit(data, qs)
    return None


def run(shapes, providers, compute_dtype, device, min_run_time, progress=True) -> list[dict]:
    """The 4-bit suite: every provider on every shape (modules built once per weight shape), the
    providers of one shape timed in interleaved rounds (see ``interleaved``)."""
    env = records.environment(device)
    bandwidth = copy_bandwidth(device)
    base_name = "bf16" if compute_dtype == torch.bfloat16 else "fp32"
    by_weight: dict[tuple[int, int], list[Shape]] = {}
    for s in shapes:
        by_weight.setdefault((s.in_features, s.out_features), []).append(s)
    bar = report.progress(len(shapes) * len(providers), "lorakern-bench nf4", progress)
    out = []
    for (k, n), group_shapes in by_weight.items():
        group, rounds_of = [], {}
        built = {}  # provider -> (modules, common record fields)
        for provider in providers:
            torch.manual_seed(0)
            first = make_linear(provider, k, n, compute_dtype, device)
            wbytes = weight_bytes(provider, first)
            copies = weight_copies(device, wbytes)
            modules = [first] + [make_linear(provider, k, n, compute_dtype, device)
                                 for _ in range(copies - 1)]
            xdtype = input_dtype(provider, compute_dtype)
            built[provider] = (modules, {
                "provider": provider, "in_features": k, "out_features": n, "dropout": 0.0,
                "dtype": DTYPE_NAMES[xdtype], "weight_bytes": wbytes, "weight_copies": copies,
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
                steps[provider] = rotating([forward(m, xp) for m in modules])
            rounds = rounds_of.setdefault(("nf4_linear", s.M), {})
            for provider, (med, q20, q80) in interleaved(steps, device, min_run_time, rounds).items():
                common = built[provider][1]
                wbytes = common["weight_bytes"]
                group.append({**common, "op": "nf4_linear", "mode": "fwd", "M": s.M,
                              "r": s.r if provider.startswith(("nf4", "int4")) else 0,
                              "median_ms": med, "q20_ms": q20, "q80_ms": q80,
                              "tflops": 2.0 * s.M * n * k / (med * 1e-3) / 1e12,
                              "gbps": wbytes / (med * 1e-3) / 1e9, "floor_ms": wbytes / bandwidth * 1e3,
                              "peak_mem_bytes": peak_memory(steps[provider], device)})
                bar.update(1)
        deqs = {}
        for provider, (modules, _) in built.items():
            if provider == "bnb":
                # bitsandbytes regroups a Linear4bit for its CPU GEMV at the first eval forward on a
                # CPU with AVX512-BF16, its absmax rounded to bfloat16, and from then on decodes it
                # to bfloat16 only (half the bytes of a float32 decode): its decode is timed on
                # copies that have run no forward, so that every provider writes the suite's dtype.
                modules = [make_linear(provider, k, n, compute_dtype, device) for _ in modules]
            parts = [dequantize_step(provider, m, compute_dtype) for m in modules]
            if parts[0] is None:
                continue
            got = parts[0]().dtype
            if got != compute_dtype:
                raise RuntimeError(f"nf4 suite: {provider}'s dequantize wrote {got}, not the suite's {compute_dtype}")
            deqs[provider] = rotating(parts)
        rounds = rounds_of.setdefault(("nf4_dequantize", 0), {})
        for provider, (med, q20, q80) in interleaved(deqs, device, min_run_time, rounds).items():
            common = built[provider][1]
            moved = common["weight_bytes"] + n * k * torch.tensor([], dtype=compute_dtype).element_size()
            group.append({**common, "op": "nf4_dequantize", "mode": "fwd", "M": 0, "r": 0,
                          "dtype": DTYPE_NAMES[compute_dtype], "median_ms": med, "q20_ms": q20, "q80_ms": q80,
                          "tflops": 0.0, "gbps": moved / (med * 1e-3) / 1e9, "floor_ms": moved / bandwidth * 1e3,
                          "peak_mem_bytes": peak_memory(deqs[provider], device)})
        del built, deqs
        for rec in group:
            rounds = rounds_of[(rec["op"], rec["M"])]
            rec["ratio_to_base"] = round_ratio(rounds, rec["provider"], base_name)
            rec["ratio_to_bnb"] = round_ratio(rounds, rec["provider"], "bnb")
        out.extend(group)
    bar.close()
    return out

COLUMNS = (
    ("op", "s", lambda r: r["op"]), ("M", "d", lambda r: r["M"]), ("in", "d", lambda r: r["in_features"]),
    ("out", "d", lambda r: r["out_features"]), ("provider", "s", lambda r: r["provider"]),
    ("median ms", ".4f", lambda r: r["median_ms"]), ("floor ms", ".4f", lambda r: r["floor_ms"]),
    ("x floor", ".2f", lambda r: r["median_ms"] / r["floor_ms"]), ("GB/s", ".1f", lambda r: r["gbps"]),
    ("x base", ".3f", lambda r: r["ratio_to_base"]), ("x bnb", ".3f", lambda r: r["ratio_to_bnb"]),
)


def table(recs: list[dict]) -> str:
    return report.table(COLUMNS, recs)
