"""What every suite reports through: the progress bar, the console table and the plots."""

from __future__ import annotations

import os
import sys


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress(total: int, desc: str, enabled: bool = True):
    """A tqdm bar on stderr (``update`` / ``close``), or one that shows nothing when disabled or
    when tqdm is not installed."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, file=sys.stderr, desc=desc)


def table(columns, recs: list[dict]) -> str:
    """A fixed-width console table: ``columns`` are ``(header, format spec, value(rec))``; a value of
    None prints "-". Each column is as wide as its header or its widest cell."""
    cells = [[("-" if (v := get(r)) is None else format(v, spec)) for _, spec, get in columns] for r in recs]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, (h, _, _) in enumerate(columns)]
    head = " ".join(h.rjust(w) for (h, _, _), w in zip(columns, widths))
    lines = [head, "-" * len(head)]
    lines += [" ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


# Per suite: the provider every bar is a speedup over (its time / the bar's time, measured in the
# same run), and a record's key for it. The lora suite's baseline is the unfused torch sequence
# (PEFT's arithmetic); the 4-bit suite's the dense matmul; the variants' PEFT's own layer.
BASELINES = {
    "lora": ("unfused", lambda r: r.get("ratio_to_unfused")),
    "dora": ("peft-dora", lambda r: r.get("ratio_to_peft_dora")),
    "multi": ("peft-multi", lambda r: r.get("ratio_to_peft_multi")),
    "nf4": ("dense", lambda r: r.get("ratio_to_base")),
    "model": ("peft (4-bit: peft+bnb)", lambda r: r.get("ratio_to_peft")),
}


def _panel_key(r: dict) -> tuple:
    """Records drawn in one panel share a weight shape (and rank and adapters, where they vary)."""
    if r["op"].startswith("nf4"):
        return (r["in_features"], r["out_features"])
    if r["op"] == "decoder_layers":
        return (r.get("model") or "", r["layers"], r["r"])
    return (r["in_features"], r["out_features"], r["r"], r.get("adapters", 1))


def _panel_title(op: str, key: tuple) -> str:
    if op.startswith("nf4"):
        return f"{key[0]} -> {key[1]}"
    if op == "decoder_layers":
        return f"{key[0]}, {key[1]} layer(s), r={key[2]}"
    return f"{key[0]} -> {key[1]}, r={key[2]}" + (f", {key[3]} adapters" if key[3] != 1 else "")


def plot(recs: list[dict], out_dir: str) -> list[str]:
    """One PNG per suite, op and mode: a panel per weight shape, the tokens M on the x-axis, one bar
    per provider with its speedup over the suite's baseline (above 1: faster), the machine and
    date in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for suite, op, mode in sorted({(r.get("suite", "lora"), r["op"], r["mode"]) for r in recs}):
        name, ratio = BASELINES.get(suite, BASELINES["lora"])
        rows = [r for r in recs if r.get("suite", "lora") == suite and r["op"] == op and r["mode"] == mode
                and ratio(r)]
        if not rows:
            continue
        panels = sorted({_panel_key(r) for r in rows})
        providers = list(dict.fromkeys(r["provider"] for r in rows))
        cols = min(3, len(panels))
        nrows = -(-len(panels) // cols)
        ncol = min(len(providers), 3 * cols)  # legend entries a row: ~2.3 inches each
        legend_rows = -(-len(providers) // ncol)
        height = 3.2 * nrows + 0.7 + 0.25 * legend_rows
        fig, axes = plt.subplots(nrows, cols, figsize=(max(7.0, 4.2 * cols), height), squeeze=False)
        width = 0.8 / len(providers)
        for ax, key in zip(axes.flat, panels):
            mine = [r for r in rows if _panel_key(r) == key]
            Ms = sorted({r["M"] for r in mine})
            for i, p in enumerate(providers):
                vals = {r["M"]: 1.0 / ratio(r) for r in mine if r["provider"] == p}
                xs = [j + (i - (len(providers) - 1) / 2) * width for j in range(len(Ms))]
                bars = ax.bar(xs, [vals.get(M, 0.0) for M in Ms], width, label=p, color=f"C{i}")
                ax.bar_label(bars, labels=[f"{vals[M]:.2g}" if M in vals else "" for M in Ms], fontsize=6)
            ax.set_xticks(range(len(Ms)))
            ax.set_xticklabels([f"{M} tokens" if op == "decoder_layers" else f"M={M}" for M in Ms], fontsize=8)
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_title(_panel_title(op, key), fontsize=9)
            ax.set_ylabel(f"speedup over {name}", fontsize=8)
            ax.tick_params(axis="y", labelsize=8)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
        env = rows[0]
        fig.suptitle(f"{suite} suite: {op}, {mode}, {env['dtype']}\n{env['device_name']}, {env['date'][:10]}",
                     fontsize=10)
        fig.tight_layout(rect=(0, (0.3 * legend_rows + 0.1) / height, 1, 1))
        path = os.path.join(out_dir, f"{suite}_{op}_{mode.replace('+', '_')}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
