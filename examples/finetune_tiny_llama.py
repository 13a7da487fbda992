"""Fine-tune a small Llama with LoRA: PEFT's layers against the same model after
``lorakern.integrations.peft.fuse``, from the same initial weights and batches.

    python examples/finetune_tiny_llama.py                 # both, 300 steps, prints loss and tokens/s
    python examples/finetune_tiny_llama.py --steps 50 --mode fused
    python examples/finetune_tiny_llama.py --dora           # DoRA adapters (LoraConfig(use_dora=True))

The model is built from a ``LlamaConfig`` (no download) and trained as a character-level language
model on examples/data/corpus.txt; the base weights stay frozen and random, only the adapters learn.
With ``--dropout 0`` the two runs compute the same function, so their losses agree step by step
(up to float rounding); with dropout they draw different masks (PEFT uses torch's dropout).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

CORPUS = Path(__file__).resolve().parent / "data" / "corpus.txt"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_corpus() -> tuple[torch.Tensor, int]:
    text = CORPUS.read_text()
    vocab = sorted(set(text))
    ids = torch.tensor([vocab.index(c) for c in text], dtype=torch.long)
    return ids, len(vocab)


def build_model(vocab: int, seed: int, dropout: float, r: int = 8, use_dora: bool = False):
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(config)
    lora = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=TARGETS,
                           init_lora_weights=True, use_dora=use_dora)
    return peft.get_peft_model(model, lora)


def batches(ids: torch.Tensor, steps: int, batch: int, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(0, ids.numel() - seq - 1, (batch,), generator=g)
        yield torch.stack([ids[s:s + seq] for s in start.tolist()])


def train(mode: str, steps: int = 300, batch: int = 16, seq: int = 64, lr: float = 3e-3, dropout: float = 0.0,
          seed: int = 0, log_every: int = 0, use_dora: bool = False) -> dict:
    """Train one model ("peft" or "fused"); returns its per-step losses and tokens per second."""
    import lorakern

    ids, vocab = load_corpus()
    model = build_model(vocab, seed, dropout, use_dora=use_dora)
    if mode == "fused":
        lorakern.integrations.peft.fuse(model)
    elif mode != "peft":
        raise ValueError(f"mode: expected 'peft' or 'fused', got {mode!r}")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    t0 = time.perf_counter()
    for step, x in enumerate(batches(ids, steps, batch, seq, seed + 1)):
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"  {mode:>5} step {step:4d}  loss {loss.item():.4f}")
    seconds = time.perf_counter() - t0
    return {"losses": losses, "tokens_per_s": steps * batch * seq / seconds, "seconds": seconds}


def report(results: dict, what: str = "per-step") -> None:
    """Each run's first and last loss and speed, and the largest loss difference of the two runs."""
    for mode, r in results.items():
        print(f"{mode:>5}: loss {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}, {r['tokens_per_s']:,.0f} tokens/s "
              f"({r['seconds']:.1f} s)")
    if len(results) == 2:
        diff = max(abs(a - b) for a, b in zip(results["peft"]["losses"], results["fused"]["losses"]))
        print(f"largest {what} loss difference, fused vs PEFT: {diff:.2e}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["both", "peft", "fused"], default="both")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dora", action="store_true", help="DoRA adapters (use_dora=True)")
    args = parser.parse_args(argv)
    modes = ["peft", "fused"] if args.mode == "both" else [args.mode]
    results = {}
    for mode in modes:
        print(f"{mode}: training {args.steps} steps (batch {args.batch} x {args.seq} tokens)")
        results[mode] = train(mode, args.steps, args.batch, args.seq, args.lr, args.dropout, args.seed,
                              log_every=max(1, args.steps // 6), use_dora=args.dora)
    print()
    report(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
