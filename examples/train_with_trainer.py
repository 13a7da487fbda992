"""Fine-tune a small Llama with transformers' ``Trainer``: one line, ``fuse(model)``, before the trainer
is built. Runs the same training twice (PEFT's layers, then fused) and compares the losses.

    python examples/train_with_trainer.py                       # both, 200 steps, CPU: about a minute
    python examples/train_with_trainer.py --steps 50 --mode fused --gradient-checkpointing
    python examples/train_with_trainer.py --bf16                # bf16 autocast (TrainingArguments(bf16=True))

The model is built from a ``LlamaConfig`` (no download) and learns examples/data/corpus.txt as a
character-level language model; only the LoRA adapters train. The trainer saves its checkpoints
under --out as plain PEFT adapters.
"""

from __future__ import annotations

import argparse
import time

import torch
from finetune_tiny_llama import build_model, load_corpus, report  # same folder


class Chunks(torch.utils.data.Dataset):
    """Fixed-length windows of the corpus, as ``{"input_ids", "labels"}`` rows."""

    def __init__(self, ids: torch.Tensor, seq: int):
        self.ids, self.seq = ids, seq

    def __len__(self):
        return (self.ids.numel() - 1) // self.seq

    def __getitem__(self, i):
        row = self.ids[i * self.seq:(i + 1) * self.seq]
        return {"input_ids": row, "labels": row}


def train(mode: str, steps: int = 200, batch: int = 16, seq: int = 64, lr: float = 3e-3, out: str = "trainer-out",
          bf16: bool = False, gradient_checkpointing: bool = False, seed: int = 0) -> dict:
    """One run ("peft" or "fused"); returns the logged losses and tokens per second."""
    from transformers import Trainer, TrainingArguments

    import lorakern

    ids, vocab = load_corpus()
    model = build_model(vocab, seed, dropout=0.0)
    if mode == "fused":
        lorakern.integrations.peft.fuse(model)       # the one line
    args = TrainingArguments(
        output_dir=f"{out}/{mode}", max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr,
        logging_steps=max(1, steps // 10), save_steps=steps, report_to="none", use_cpu=not torch.cuda.is_available(),
        bf16=bf16, gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if gradient_checkpointing else None,
        seed=seed, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=Chunks(ids, seq))
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return {"losses": losses, "tokens_per_s": steps * batch * seq / seconds, "seconds": seconds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["both", "peft", "fused"], default="both")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--out", default="trainer-out")
    args = parser.parse_args(argv)
    modes = ["peft", "fused"] if args.mode == "both" else [args.mode]
    results = {m: train(m, args.steps, args.batch, args.seq, args.lr, args.out, args.bf16, args.gradient_checkpointing)
               for m in modes}
    report(results, "logged")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
