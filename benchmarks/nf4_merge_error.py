"""What merging a QLoRA adapter into its NF4 base costs: the merged weight re-quantized to NF4
(``FusedLoRALinear.merged_nf4``) against the unmerged QLoRA layer, on random inputs.

    python benchmarks/nf4_merge_error.py [--size 4096] [--rows 256] [--seed 0] [--json OUT]

Weights: W ~ N(0, 0.02^2) (Llama-scale), r=16, alpha=32, A ~ N(0, 1/in), B scaled so that
||s B A|| / ||W|| is each of --update (the size of a trained adapter's update relative to W).
Reported, as relative Frobenius errors of the outputs on x ~ N(0, 1) [rows, in]:
  merge error  = ||y_merged_nf4 - y_qlora|| / ||y_qlora||   (what merging adds)
  base error   = ||x NF4(W)^T - x W^T|| / ||x W^T||          (what quantizing W cost in the first place)
  update share = ||s x A^T B^T|| / ||y_qlora||               (how much of the output the adapter is)
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

import lorakern


def measure(size: int, rows: int, update: float, seed: int, double_quant: bool) -> dict:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(size, size, generator=g) * 0.02
    base = torch.nn.Linear(size, size, bias=False)
    with torch.no_grad():
        base.weight.copy_(W)
    layer = lorakern.FusedLoRALinear.from_linear(base, r=16, lora_alpha=32, base_quant="nf4", blocksize=64,
                                                 double_quant=double_quant)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(16, size, generator=g) / size**0.5)
        layer.lora_B.copy_(torch.randn(size, 16, generator=g))
        layer.lora_B.mul_(update * W.norm() / layer.delta_weight(torch.float32).norm())
    layer.eval()
    x = torch.randn(rows, size, generator=g)
    with torch.no_grad():
        y = layer(x)
        merged = layer.merged_nf4()
        y_merged = lorakern.nf4_matmul(x, merged)
        y_dense = x @ W.t()
        y_base_nf4 = lorakern.nf4_matmul(x, layer.weight_nf4)
        term = (x @ layer.lora_A.t() @ layer.lora_B.t()) * layer.scaling
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    return {"size": size, "rows": rows, "update": update, "double_quant": double_quant, "seed": seed,
            "merge_error": rel(y_merged, y), "base_error": rel(y_base_nf4, y_dense),
            "update_share": float(term.norm() / y.norm())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--update", default="0.01,0.05,0.2")
    parser.add_argument("--json", default=None, help="append one JSON line per measurement")
    args = parser.parse_args(argv)
    out = []
    print("| update ||sBA||/||W|| | double quant | merge error | base NF4 error | merge / base | adapter share of y |")
    print("|---|---|---|---|---|---|")
    for update in (float(u) for u in args.update.split(",")):
        for dq in (False, True):
            r = measure(args.size, args.rows, update, args.seed, dq)
            out.append(r)
            print(f"| {update} | {'yes' if dq else 'no'} | {r['merge_error']:.4f} | {r['base_error']:.4f} | "
                  f"{r['merge_error'] / r['base_error']:.2f} | {r['update_share']:.4f} |", flush=True)
    if args.json:
        with open(args.json, "a") as f:
            for r in out:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
