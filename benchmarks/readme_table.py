"""README's performance tables, generated from committed results files (benchmarks/results/*.jsonl).

    python benchmarks/readme_table.py benchmarks/results/<file>.jsonl [...]            # print
    python benchmarks/readme_table.py benchmarks/results/<file>.jsonl --write README.md [--section S]
        # replace the block between <!-- perf:S:begin --> and <!-- perf:S:end --> in README.md
        # (S: the records' device by default; one section per processor measured)

Every number in a table comes from one file, i.e. one run on one machine: times are medians, ratios are
against providers measured in that same run.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict

from lorakern.bench.records import load


def _header(recs: list[dict]) -> str:
    r = recs[0]
    return (f"Measured on {r['device_name']} ({r['device']}, {r['threads']} threads), {r['date'][:10]}, "
            f"torch {r['torch']}, lorakern {r['lorakern']} (commit {r['commit']}).")


def nf4_table(recs: list[dict]) -> str:
    rows = [r for r in recs if r["op"] == "nf4_linear"]
    if not rows:
        return ""
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    base = "bf16" if "bf16" in providers and rows[0]["device"] == "cuda" else "fp32"
    by_key = defaultdict(dict)
    for r in rows:
        by_key[(r["in_features"], r["out_features"], r["M"])][r["provider"]] = r
    head = "| in -> out | M | " + " | ".join(f"{p} ms" for p in providers) + f" | speedup vs {base} |"
    if "bnb" in providers:
        head += " speedup vs bnb |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for (k, n, m), cell in sorted(by_key.items()):
        times = " | ".join(f"{cell[p]['median_ms']:.3f}" if p in cell else "-" for p in providers)
        line = f"| {k} -> {n} | {m} | {times} |"
        nf4 = cell.get("nf4")
        line += f" {cell[base]['median_ms'] / nf4['median_ms']:.2f} |" if nf4 and base in cell else " - |"
        if "bnb" in providers:
            line += f" {cell['bnb']['median_ms'] / nf4['median_ms']:.1f} |" if nf4 and "bnb" in cell else " - |"
        lines.append(line)
    return "\n".join(lines)


def lora_table(recs: list[dict]) -> str:
    rows = [r for r in recs if r["op"] == "lora_linear"]
    if not rows:
        return ""
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    by_key = defaultdict(dict)
    for r in rows:
        by_key[(r["in_features"], r["out_features"], r["r"], r["M"], r["mode"])][r["provider"]] = r
    head = ("| in -> out | r | M | mode | " + " | ".join(f"{p} ms" for p in providers)
            + " | fused / base | fused / unfused |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for (k, n, rank, m, mode), cell in sorted(by_key.items()):
        times = " | ".join(f"{cell[p]['median_ms']:.3f}" if p in cell else "-" for p in providers)
        f = cell.get("fused")
        rb = f"{f['ratio_to_base']:.2f}" if f and f.get("ratio_to_base") else "-"
        ru = f"{f['ratio_to_unfused']:.2f}" if f and f.get("ratio_to_unfused") else "-"
        lines.append(f"| {k} -> {n} | {rank} | {m} | {mode} | {times} | {rb} | {ru} |")
    return "\n".join(lines)


DORA = ("peft-dora", "fused-dora")


def dora_table(recs: list[dict]) -> str:
    """The DoRA suite: fused DoRA against fused plain LoRA and PEFT's DoRA, measured together."""
    groups = defaultdict(dict)
    for r in recs:
        if r["op"] == "lora_linear":
            groups[(r["in_features"], r["out_features"], r["r"], r["M"], r["mode"])][r["provider"]] = r
    groups = {k: g for k, g in groups.items() if any(p in g for p in DORA)}
    if not groups:
        return ""
    head = ("| in -> out | r | M | mode | fused LoRA ms | peft-dora ms | fused-dora ms | fused-dora / fused LoRA "
            "| speedup vs peft-dora |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    order = {"fwd": 0, "fwd+bwd": 1, "bwd": 2, "eval": 3}
    for (k, n, rank, m, mode), g in sorted(groups.items(), key=lambda kv: (*kv[0][:4], order.get(kv[0][4], 9))):
        ms = " | ".join(f"{g[p]['median_ms']:.2f}" if p in g else "-" for p in ("fused", *DORA))
        f = g.get("fused-dora")
        rf = f"{f['ratio_to_fused']:.2f}" if f and f.get("ratio_to_fused") else "-"
        sp = f"{1 / f['ratio_to_peft_dora']:.1f}" if f and f.get("ratio_to_peft_dora") else "-"
        lines.append(f"| {k} -> {n} | {rank} | {m} | {mode} | {ms} | {rf} | {sp} |")
    return "\n".join(lines)


def model_table(recs: list[dict]) -> str:
    """The model suite: tokens/s of whole decoder layers, fused against PEFT on the same base."""
    rows = [r for r in recs if r["op"] == "decoder_layers"]
    if not rows:
        return ""
    head = ("| model | layers | r | dropout | step | tokens | provider | ms | tokens/s | speedup vs PEFT "
            "| saved activations MiB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        step = "training (fwd+bwd)" if r["mode"] == "fwd+bwd" else "decode (eval)"
        sp = f"{1 / r['ratio_to_peft']:.2f}" if r.get("ratio_to_peft") else "-"
        saved = f"{r['saved_bytes'] / 2**20:.1f}" if r.get("saved_bytes") is not None else "-"
        lines.append(f"| {r['model']} | {r['layers']} | {r['r']} | {r['dropout']} | {step} | {r['M']} | "
                     f"{r['provider']} | {r['median_ms']:.1f} | {r['tokens_per_s']:,.0f} | {sp} | {saved} |")
    return "\n".join(lines)


def render(recs: list[dict]) -> str:
    parts = [_header(recs)]
    model = model_table(recs)
    if model:
        parts += ["", "Whole Llama decoder layers, LoRA on all seven projections (`fused` = PEFT's model after "
                      "`fuse`; `peft+bnb` / `fused-nf4`: the projections in bitsandbytes NF4, speedup against "
                      "`peft+bnb`):", "", model]
        recs = [r for r in recs if r["op"] != "decoder_layers"]
    nf4 = nf4_table(recs)
    if nf4:
        parts += ["", "QLoRA layer, eval forward (NF4 base, blocksize 64, r=16 adapter; `nf4-dq`: double "
                      "quantization) against dense `nn.Linear` and bitsandbytes' `Linear4bit`. Speedup = the "
                      "other provider's median time / nf4's (above 1: nf4 is faster):", "", nf4]
    dora = dora_table(recs)
    if dora:
        parts += ["", "DoRA layer (`fused-dora` = `FusedLoRALinear(use_dora=True)`, `peft-dora` = PEFT's DoRA "
                      "`Linear` with its default, uncached norm; in `fwd` and `fwd+bwd` the weight norm is "
                      "computed every step, as after each optimizer step; `eval` may use lorakern's norm cache):",
                  "", dora]
        recs = [r for r in recs if r["provider"] not in DORA and not (r["provider"] == "fused" and "fused-dora" in
                {q["provider"] for q in recs})]
    lora = lora_table(recs)
    if lora:
        parts += ["", "LoRA layer (`fused` = lorakern on this device's automatic backend):", "", lora]
    return "\n".join(parts)


def write(readme: str, section: str, text: str) -> None:
    begin, end = f"<!-- perf:{section}:begin -->", f"<!-- perf:{section}:end -->"
    with open(readme) as f:
        content = f.read()
    if begin not in content or end not in content:
        raise SystemExit(f"{readme}: markers {begin} / {end} not found")
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    content = pattern.sub(lambda _: f"{begin}\n{text}\n{end}", content)
    with open(readme, "w") as f:
        f.write(content)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--write", help="README to update in place")
    parser.add_argument("--section", help="the README block to replace (default: the records' device)")
    args = parser.parse_args(argv)
    for path in args.files:
        recs = load(path)
        text = render(recs)
        if args.write:
            write(args.write, args.section or recs[0]["device"], text)
        else:
            print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
