"""``lorakern-bench``: time LoRA and QLoRA linear providers on the best device present.

    lorakern-bench                       # the headline points of every suite (~2 minutes on 2 CPU cores)
    lorakern-bench --full                # the full grids (Llama-3-8B projections, every M and mode)
    lorakern-bench --quick               # a few small shapes, seconds
    lorakern-bench --suite lora --shapes llama3-8b --providers base,unfused,fused --modes fwd,fwd+bwd
    lorakern-bench --suite nf4 --providers fp32,nf4,bnb
    lorakern-bench --suite model --layers 4
    lorakern-bench --shapes 4096,4096,4096,16 --dtype bf16 --out bench-out

Suites: ``lora`` (providers base, unfused, peft, fused; modes fwd, bwd, fwd+bwd; see
lorakern/bench/lora.py), ``dora`` (the same runner on providers fused, peft-dora, fused-dora; modes
fwd, fwd+bwd, eval; ratios against fused plain LoRA and PEFT's DoRA), ``multi`` (providers fused
with one adapter, peft-multi, fused-multi, and on an NF4 base fused-nf4 / fused-multi-nf4: a batch
whose rows take ``adapters`` adapters in turn; modes eval, fwd+bwd), ``nf4`` (the QLoRA layer's
eval forward against dense fp32 / bf16 and bitsandbytes, plus NF4 dequantize; see
lorakern/bench/nf4.py) and ``model`` (whole Llama decoder layers, LoRA on all seven projections:
tokens/s of a training and a decode step, providers peft, fused, peft+bnb, fused-nf4; see
lorakern/bench/model.py).

Each measurement is appended to ``OUT/results.jsonl`` (schema in lorakern/bench/records.py), each
suite's table is printed as it ends, and one PNG per suite and mode is written to OUT.
"""

from __future__ import annotations

import argparse
import os

import torch

from . import lora, model, nf4, records, report, timing
from .providers import DORA_PROVIDERS, MODES, MULTI_PROVIDERS, available_providers
from .shapes import DTYPES, Shape, parse_shapes

SUITES = ("lora", "dora", "multi", "nf4", "model")
DEFAULT_MODES = {"lora": ("fwd", "bwd", "fwd+bwd"), "dora": ("fwd", "fwd+bwd", "eval"), "multi": ("eval", "fwd+bwd")}
VARIANTS = {"dora": DORA_PROVIDERS, "multi": MULTI_PROVIDERS}


def headline(suite: str, device: torch.device) -> tuple[list[Shape], tuple[str, ...]]:
    """The default run's points of ``suite`` (shapes, modes): the ones README's tables quote, few
    enough that the whole default run takes about 2 minutes on 2 CPU cores. ``--full`` runs the
    grids instead."""
    cuda = device.type == "cuda"
    if suite == "lora":  # Llama-3-8B's q projection (and its MLP up projection on a GPU), r=16
        if cuda:
            return [Shape(M, 4096, n, 16) for n in (4096, 14336) for M in (16, 4096)], ("fwd", "fwd+bwd")
        return [Shape(M, 4096, 4096, 16) for M in (16, 256)], ("fwd+bwd",)
    if suite == "dora":
        return [Shape(4096 if cuda else 16, 4096, 4096, 16)], ("fwd+bwd", "eval")
    if suite == "multi":  # 8 adapters in a decode batch; a training batch of 32 adapters on a GPU
        if cuda:
            return [Shape(8, 4096, 4096, 16, 8), Shape(4096, 4096, 4096, 16, 32)], ("eval", "fwd+bwd")
        return [Shape(M, 4096, 4096, 16, 8) for M in (8, 64)], ("eval",)
    if suite == "nf4":  # decode: one token, and a batch of 16
        return [Shape(M, 4096, n, 16) for n in ((4096, 14336) if cuda else (4096,)) for M in (1, 16)], ()
    raise ValueError(suite)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lorakern-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--suite", default=",".join(SUITES), help=f"comma-separated, from {','.join(SUITES)}")
    parser.add_argument("--shapes", default=None,
                        help="presets (llama3-8b, llama3-70b, tiny, cpu) or M,in,out,r items, ';'-separated "
                             "(the nf4 suite uses r only for its adapter; default: the headline points)")
    parser.add_argument("--providers", default=None,
                        help=f"comma-separated, from {available_providers()} (lora), {nf4.available()} (nf4) "
                             f"and {model.available()} (model)")
    parser.add_argument("--modes", default=None,
                        help="comma-separated, from fwd,bwd,fwd+bwd,eval (default: each suite's own)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers in the model suite (default 2)")
    parser.add_argument("--dropout", type=float, default=None,
                        help="LoRA dropout (default: 0 in the layer suites, 0.05 in the model suite)")
    parser.add_argument("--out", default="bench-out", help="folder for results.jsonl and the plots")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--quick", action="store_true", help="the 'tiny' shapes, short timing runs")
    scope.add_argument("--full", action="store_true", help="the full grids instead of the headline points")
    parser.add_argument("--rounds", type=int, default=timing.DEFAULT_ROUNDS,
                        help="interleaved rounds per comparison (default %(default)s); each round times every "
                             "provider for the same while, so more rounds take longer and give steadier ratios")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds: expected a positive count")
    timing.ROUNDS = args.rounds

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    suites = args.suite.split(",")
    if any(s not in SUITES for s in suites):
        parser.error(f"--suite: expected a comma-separated subset of {SUITES}")
    lora_all, nf4_all, model_all = available_providers(device), nf4.available(), model.available()
    every = list(dict.fromkeys(lora_all + nf4_all + model_all))
    wanted = args.providers.split(",") if args.providers else every
    unknown = [p for p in wanted if p not in every]
    if unknown:
        parser.error(f"--providers: {unknown} not available; choose from {every}")
    modes = args.modes.split(",") if args.modes else None
    if modes is not None and any(m not in MODES for m in modes):
        parser.error(f"--modes: expected a comma-separated subset of {MODES}")
    min_run_time = (0.05 if args.quick else 0.2) * args.rounds / timing.DEFAULT_ROUNDS  # the same time per round
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.jsonl")
    show = not args.no_progress

    recs = []

    def done(suite: str, got: list[dict], text: str) -> None:
        """A suite's records, kept and written at once, and its table printed as it ends."""
        for r in got:
            r["suite"] = suite
        records.append(path, got)
        recs.extend(got)
        print(f"\n== {suite} ==\n{text}", flush=True)

    grid = "tiny" if args.quick else ("llama3-8b" if device.type == "cuda" else "cpu")
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
        suite_modes = DEFAULT_MODES[suite]
        if args.shapes or args.quick or args.full:
            preset = grid
            if suite == "multi" and not args.quick:
                preset = "multi" if device.type == "cuda" else "multi-cpu"
            shapes = parse_shapes(args.shapes or preset, device)
        else:
            shapes, suite_modes = headline(suite, device)
        got = lora.run(shapes, providers, modes or suite_modes, dtype, device, args.dropout or 0.0, min_run_time,
                       progress=show)
        done(suite, got, lora.table(got, suite))
    nf4_providers = [p for p in wanted if p in nf4_all]
    if "nf4" in suites and nf4_providers:
        if args.shapes:
            shapes = parse_shapes(args.shapes, device)
        elif args.quick or args.full:
            shapes = nf4.shapes(device, args.quick)
        else:
            shapes = headline("nf4", device)[0]
        got = nf4.run(shapes, nf4_providers, dtype, device, min_run_time, progress=show)
        done("nf4", got, nf4.table(got))
    model_providers = [p for p in model_all if p in wanted]
    if "model" in suites and model_providers:
        got = model.run(model.shapes(device, args.quick, args.layers), model_providers, modes or model.MODES, dtype,
                        device, min_run_time, progress=show,
                        dropout=model.DROPOUT if args.dropout is None else args.dropout)
        done("model", got, model.table(got))
    pngs = report.plot(recs, args.out)
    print(f"\n{len(recs)} records appended to {path}; plots: {', '.join(pngs)}")
    return 0
