"""``lorakern-bench``: time LoRA and QLoRA linear providers on the best device present.

    lorakern-bench                       # default suites (CUDA if present, else CPU-sized ones)
    lorakern-bench --quick               # a few small shapes, seconds
    lorakern-bench --suite lora --shapes llama3-8b --providers base,unfused,fused --modes fwd,fwd+bwd
    lorakern-bench --suite nf4 --providers fp32,nf4,bnb
    lorakern-bench --shapes 4096,4096,4096,16 --dtype bf16 --out bench-out

Suites: ``lora`` (providers base, unfused, peft, fused; modes fwd, bwd, fwd+bwd; see
lorakern/bench/lora.py), ``dora`` (the same runner on providers fused, peft-dora, fused-dora; modes
fwd, fwd+bwd, eval; ratios against fused plain LoRA and PEFT's DoRA), ``multi`` (providers fused
with one adapter, peft-multi, fused-multi, and on an NF4 base fused-nf4 / fused-multi-nf4: a batch
whose rows take ``adapters`` adapters in turn;
modes eval, fwd+bwd) and ``nf4`` (the QLoRA
layer's eval forward against dense fp32 / bf16 and bitsandbytes, plus NF4 dequantize; see
lorakern/bench/nf4.py).

Each measurement is appended to ``OUT/results.jsonl`` (schema in lorakern/bench/records.py), a
table is printed, and one PNG per mode is written to OUT.
"""

from __future__ import annotations

import argparse
import os

import torch

from . import lora, nf4, records, report
from .providers import DORA_PROVIDERS, MODES, MULTI_PROVIDERS, available_providers
from .shapes import DTYPES, parse_shapes

SUITES = ("lora", "dora", "multi", "nf4")
DEFAULT_MODES = {"lora": ("fwd", "bwd", "fwd+bwd"), "dora": ("fwd", "fwd+bwd", "eval"), "multi": ("eval", "fwd+bwd")}
VARIANTS = {"dora": DORA_PROVIDERS, "multi": MULTI_PROVIDERS}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lorakern-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--suite", default=",".join(SUITES), help="comma-separated, from lora,dora,multi,nf4")
    parser.add_argument("--shapes", default=None,
                        help="presets (llama3-8b, llama3-70b, tiny, cpu) or M,in,out,r items, ';'-separated "
                             "(the nf4 suite uses r only for its adapter; default: Llama-3-8B projections)")
    parser.add_argument("--providers", default=None,
                        help=f"comma-separated, from {available_providers()} (lora) and {nf4.available()} (nf4)")
    parser.add_argument("--modes", default=None,
                        help="comma-separated, from fwd,bwd,fwd+bwd,eval (default: fwd,bwd,fwd+bwd for lora, "
                             "fwd,fwd+bwd,eval for dora)")
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
    lora_all, nf4_all = available_providers(device), nf4.available()
    wanted = args.providers.split(",") if args.providers else lora_all + nf4_all
    unknown = [p for p in wanted if p not in lora_all + nf4_all]
    if unknown:
        parser.error(f"--providers: {unknown} not available; choose from {lora_all + nf4_all}")
    modes = args.modes.split(",") if args.modes else None
    if modes is not None and any(m not in MODES for m in modes):
        parser.error(f"--modes: expected a comma-separated subset of {MODES}")
    min_run_time = 0.05 if args.quick else 0.2

    recs, text = [], []
    default_shapes = "tiny" if args.quick else ("llama3-8b" if device.type == "cuda" else "cpu")
    variant_providers = DORA_PROVIDERS + MULTI_PROVIDERS
    for suite in ("lora", "dora", "multi"):
        if suite == "lora":
            providers = [p for p in wanted if p in lora_all and p not in variant_providers]
        else:  # against fused plain LoRA (one adapter), always measured beside
            own = VARIANTS[suite]
            providers = [p for p in ("fused", *own) if p in lora_all and (p in wanted or p == "fused")]
            providers = providers if any(p in own for p in providers) else []
        if suite not in suites or not providers:
            continue
        preset = default_shapes
        if suite == "multi" and not args.quick:
            preset = "multi" if device.type == "cuda" else "multi-cpu"
        shapes = parse_shapes(args.shapes or preset, device)
        got = lora.run(shapes, providers, modes or DEFAULT_MODES[suite], dtype, device, args.dropout, min_run_time,
                       progress=not args.no_progress)
        recs += got
        text.append(lora.table(got, suite))
    nf4_providers = [p for p in wanted if p in nf4_all]
    if "nf4" in suites and nf4_providers:
        shapes = parse_shapes(args.shapes, device) if args.shapes else nf4.shapes(device, args.quick)
        got = nf4.run(shapes, nf4_providers, dtype, device, min_run_time, progress=not args.no_progress)
        recs += got
        text.append(nf4.table(got))
    print("\n\n".join(text))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.jsonl")
    records.append(path, recs)
    pngs = report.plot(recs, args.out)
    print(f"\n{len(recs)} records appended to {path}; plots: {', '.join(pngs)}")
    return 0
