"""A PEFT model on bitsandbytes NF4 layers, served on the CPU: PEFT's own forward against the same
model after ``lorakern.integrations.peft.fuse``.

    python benchmarks/fuse_bnb.py [--dtype bf16|fp16|fp32] [--layers 8] [--size 4096] [--rank 16]
                                  [--out results.jsonl]

``--layers`` ``Linear4bit`` layers of ``size x size`` (compute dtype and input in ``--dtype``;
PEFT keeps its adapters in float32, its default on a 16-bit model), eval, no grad, torch's
thread count. For M = 1 and 16 rows the two models run in turn,
round after round, each call over every layer (with 8 layers of 4096 x 4096 the NF4 weights,
75 MB, pass the L3 of most CPUs, as in a decode loop); prints the median time per layer and the
median of the rounds' fused / PEFT ratios (with ``--out``, one JSON line per M appended: the
processor, ISA path, versions and commit beside the numbers). The outputs are checked against
each other first.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import torch
from torch import nn

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build(n_layers: int, size: int, rank: int, dtype: torch.dtype):
    import bitsandbytes as bnb
    import peft

    net = nn.Sequential(*[bnb.nn.Linear4bit(size, size, compute_dtype=dtype, quant_type="nf4")
                          for _ in range(n_layers)])
    for layer in net:
        layer.load_state_dict(nn.Linear(size, size).to(dtype).state_dict())
    net = net.to("cpu")  # quantizes
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=[str(i) for i in range(n_layers)],
                             init_lora_weights=False)
    return peft.get_peft_model(net, config).eval()


def main() -> None:
    from lorakern.integrations.peft import fuse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    plain = build(args.layers, args.size, args.rank, dtype)
    fused = copy.deepcopy(plain)
    fuse(fused)
    layers = {"peft": [plain.base_model.model[i] for i in range(args.layers)],
              "fused": [fused.base_model.model[i] for i in range(args.layers)]}
    print(f"{args.layers} x Linear4bit {args.size}x{args.size}, r={args.rank}, x {args.dtype}, "
          f"{torch.get_num_threads()} threads")
    with torch.no_grad():
        for M in (1, 16):
            x = torch.randn(M, args.size).to(dtype)
            for a, b in zip(layers["peft"], layers["fused"]):
                torch.testing.assert_close(b(x), a(x), rtol=3e-2, atol=3e-2)
            times: dict[str, list[float]] = {"peft": [], "fused": []}
            for r in range(args.rounds):
                for name in (("peft", "fused") if r % 2 == 0 else ("fused", "peft")):
                    for layer in layers[name]:
                        layer(x)
                    start = time.perf_counter()
                    for _ in range(5):
                        for layer in layers[name]:
                            layer(x)
                    times[name].append((time.perf_counter() - start) / (5 * args.layers))
            ratio = statistics.median(f / p for f, p in zip(times["fused"], times["peft"]))
            peft_ms, fused_ms = (statistics.median(times[k]) * 1e3 for k in ("peft", "fused"))
            print(f"M={M:>2}: PEFT+bitsandbytes {peft_ms:.3f} ms a layer, fused {fused_ms:.3f} ms, "
                  f"fused / PEFT {ratio:.2f}")
            if args.out:
                from lorakern.bench.records import environment

                record = dict(op="fuse_bnb", M=M, in_features=args.size, out_features=args.size, r=args.rank,
                              dtype=args.dtype, layers=args.layers, peft_ms=peft_ms, fused_ms=fused_ms,
                              fused_over_peft=ratio, **environment(torch.device("cpu")))
                os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
                with open(args.out, "a") as f:
                    f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
