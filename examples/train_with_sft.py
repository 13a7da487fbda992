"""Fine-tune a small Llama with TRL's ``SFTTrainer``, which builds the PEFT model itself from
``peft_config``: the one line is ``callbacks=[FuseCallback()]``. Runs the same training with and
without it and compares the losses.

    python examples/train_with_sft.py                 # both, 100 steps, CPU: about a minute
    python examples/train_with_sft.py --mode fused --steps 30

The dataset is text (examples/data/corpus.txt cut into lines), tokenized by SFTTrainer with a
character tokenizer built in memory; the model comes from a ``LlamaConfig`` (no download).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from finetune_tiny_llama import CORPUS, TARGETS, report  # same folder


def char_tokenizer(text: str):
    """One token per character of ``text``, plus pad and eos (BPE with no merges: a character split)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(set(text)))}
    vocab |= {"<pad>": len(vocab), "<eos>": len(vocab) + 1}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def train(mode: str, steps: int = 100, batch: int = 16, lr: float = 3e-3, out: str = "sft-out", seed: int = 0) -> dict:
    """One run ("peft" or "fused"); returns the logged losses and tokens per second."""
    import datasets
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    from lorakern.integrations.trainer import FuseCallback

    text = Path(CORPUS).read_text()
    tokenizer = char_tokenizer(text)
    lines = [line for line in text.splitlines() if len(line) > 8]
    dataset = datasets.Dataset.from_dict({"text": lines})
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    args = SFTConfig(output_dir=f"{out}/{mode}", max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr,
                     logging_steps=max(1, steps // 10), save_steps=steps, report_to="none",
                     use_cpu=not torch.cuda.is_available(), bf16=torch.cuda.is_available(), seed=seed,
                     disable_tqdm=True, max_length=128)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS),
                         callbacks=[FuseCallback()] if mode == "fused" else [])   # the one line
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    tokens = trainer.state.num_input_tokens_seen or sum(len(x) for x in lines) * steps * batch / len(lines)
    return {"losses": losses, "tokens_per_s": tokens / seconds, "seconds": seconds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["both", "peft", "fused"], default="both")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", default="sft-out")
    args = parser.parse_args(argv)
    modes = ["peft", "fused"] if args.mode == "both" else [args.mode]
    results = {m: train(m, args.steps, args.batch, args.lr, args.out) for m in modes}
    report(results, "logged")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
