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


def plot(recs: list[dict], out_dir: str) -> list[str]:
    """One PNG per op and mode: time relative to the base matmul, per shape and provider."""
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
