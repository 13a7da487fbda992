"""The model suite: whole Llama decoder layers (attention and MLP, LoRA on all seven projections),
one number per model as users compare libraries: tokens per second of a training step and of a
decode step, and the memory a training step holds.

Providers (op ``decoder_layers``):
- peft:      transformers' ``LlamaDecoderLayer`` stack with PEFT's LoRA layers;
- fused:     the same model after ``lorakern.integrations.peft.fuse``;
- peft+bnb:  the base projections as bitsandbytes NF4 ``Linear4bit`` (blocks of 64), PEFT's LoRA
             over them (QLoRA as PEFT runs it), when bitsandbytes is installed;
- fused-nf4: that model fused (its NF4 base through lorakern's kernels).

Modes: ``fwd+bwd`` (a training step: forward over ``batch x seq`` tokens, backward of a scalar
loss into the adapters and the input) and ``eval`` (a decode step: ``batch`` sequences, one new
token each, under no_grad; no KV cache, so attention sees one token: at batch 8 and a 512-token
context Llama-3-8B's cache is ~2 MB a layer beside its 436 MB of bf16 weights, so the projections
are the step's cost either way).

Shapes (``ModelShape``): Llama-3-8B (hidden 4096, MLP 14336, 32 heads, 8 KV heads) on CUDA; on the
CPU a quarter of every width (1024, 3584, 8 heads, 2 KV heads: head_dim 128 as in the real model)
so that two cores finish the suite in about a minute. Records carry ``tokens_per_s`` and, for the
training step, ``peak_mem_bytes`` (CUDA) and ``saved_bytes`` (the activations the forward keeps
for backward, parameters excluded), in the results file's schema; ``ratio_to_peft`` is the time
over PEFT's of the same base kind (dense or NF4) in the same run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import records, report
from .providers import saved_activation_bytes
from .shapes import DTYPE_NAMES
from .timing import interleaved, peak_memory, round_ratio

MODEL_PROVIDERS = ("peft", "fused", "peft+bnb", "fused-nf4")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODES = ("fwd+bwd", "eval")
# LoRA dropout of the suite's adapters: 0.05, the common recipe value (QLoRA's paper, TRL's and
# PEFT's Llama examples), since it is what a user trains with and what decides the memory: PEFT
# keeps each adapter's dropped input for backward, lorakern regenerates the mask.
DROPOUT = 0.05


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    layers: int
    r: int
    batch: int        # sequences
    seq: int          # tokens per sequence in the training step (decode: 1)
    name: str = ""


LLAMA3_8B = dict(hidden=4096, intermediate=14336, heads=32, kv_heads=8)
CPU_SCALED = dict(hidden=1024, intermediate=3584, heads=8, kv_heads=2)    # Llama-3-8B / 4
TINY = dict(hidden=128, intermediate=448, heads=4, kv_heads=2)


def shapes(device: torch.device, quick: bool = False, layers: int | None = None) -> list[ModelShape]:
    if quick:
        return [ModelShape(**TINY, layers=layers or 1, r=8, batch=2, seq=16, name="tiny")]
    if device.type == "cuda":
        return [ModelShape(**LLAMA3_8B, layers=layers or 2, r=16, batch=4, seq=1024, name="llama3-8b")]
    return [ModelShape(**CPU_SCALED, layers=layers or 2, r=16, batch=2, seq=64, name="llama3-8b/4")]


def available() -> list[str]:
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return []
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return ["peft", "fused"]
    return list(MODEL_PROVIDERS)


class DecoderStack(nn.Module):
    """``layers`` Llama decoder layers (transformers' ``LlamaModel``, its 16-token embedding unused)
    on hidden states [B, T, hidden]: causal attention (sdpa), rotary embedding, final norm."""

    def __init__(self, s: ModelShape, dtype, device):
        super().__init__()
        from transformers import LlamaConfig, LlamaModel

        config = LlamaConfig(hidden_size=s.hidden, intermediate_size=s.intermediate, num_attention_heads=s.heads,
                             num_key_value_heads=s.kv_heads, num_hidden_layers=s.layers,
                             max_position_embeddings=max(s.seq, 16), vocab_size=16, attn_implementation="sdpa")
        self.model = LlamaModel(config).to(device, dtype)

    def forward(self, h):
        return self.model(inputs_embeds=h, use_cache=False).last_hidden_state


def _to_nf4(model: nn.Module, dtype) -> None:
    """Replace every projection ``nn.Linear`` with bitsandbytes' NF4 ``Linear4bit`` of its weight."""
    import bitsandbytes as bnb

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and name in TARGETS:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=dtype, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4", blocksize=64)
                setattr(parent, name, q.to(child.weight.device))


def make_model(provider: str, s: ModelShape, dtype, device, dropout: float = DROPOUT) -> nn.Module:
    import peft

    from ..integrations.peft import fuse

    torch.manual_seed(0)
    model = DecoderStack(s, dtype, device)
    model.requires_grad_(False)
    if provider in ("peft+bnb", "fused-nf4"):
        _to_nf4(model, dtype)
    config = peft.LoraConfig(r=s.r, lora_alpha=2 * s.r, lora_dropout=dropout, target_modules=TARGETS,
                             init_lora_weights=False)
    model = peft.get_peft_model(model, config, autocast_adapter_dtype=False)
    if provider in ("fused", "fused-nf4"):
        assert fuse(model) == len(TARGETS) * s.layers, "every projection should be fused"
    elif provider not in ("peft", "peft+bnb"):
        raise ValueError(f"unknown model provider {provider!r}; choose from {MODEL_PROVIDERS}")
    return model


def make_step(model: nn.Module, mode: str, s: ModelShape, dtype, device):
    if mode == "eval":
        model.eval()
        h = torch.randn(s.batch, 1, s.hidden, device=device, dtype=dtype)

        def step():
            with torch.no_grad():
                return model(h)
        return step, h
    model.train()
    h = torch.randn(s.batch, s.seq, s.hidden, device=device, dtype=dtype, requires_grad=True)
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        loss = model(h).float().square().mean()
        return torch.autograd.grad(loss, [h] + params)
    return step, h


def tokens(mode: str, s: ModelShape) -> int:
    return s.batch * (1 if mode == "eval" else s.seq)


def run(shape_list, providers, modes, dtype, device, min_run_time, progress=True,
        dropout: float = DROPOUT) -> list[dict]:
    env = records.environment(device)
    bar = report.progress(len(shape_list) * len(modes) * len(providers), "lorakern-bench model", progress)
    out = []
    for s in shape_list:
        models = {p: make_model(p, s, dtype, device, dropout) for p in providers}  # once for every mode
        for mode in modes:
            steps = {p: make_step(m, mode, s, dtype, device) for p, m in models.items()}
            rounds: dict = {}
            timed = interleaved({p: st for p, (st, _) in steps.items()}, device, min_run_time, rounds)
            group = []
            for p in providers:
                med, q20, q80 = timed[p]
                saved = None
                if mode != "eval":
                    saved = saved_activation_bytes(models[p], steps[p][1])
                group.append({
                    "op": "decoder_layers", "provider": p, "mode": mode, "M": tokens(mode, s),
                    "in_features": s.hidden, "out_features": s.intermediate, "r": s.r, "dtype": DTYPE_NAMES[dtype],
                    "dropout": dropout, "median_ms": med, "q20_ms": q20, "q80_ms": q80, "tflops": None,
                    "ratio_to_base": None, "ratio_to_unfused": None, "layers": s.layers, "batch": s.batch,
                    "seq": 1 if mode == "eval" else s.seq, "heads": s.heads, "kv_heads": s.kv_heads,
                    "model": s.name, "tokens_per_s": tokens(mode, s) / (med * 1e-3),
                    "peak_mem_bytes": peak_memory(steps[p][0], device), "saved_bytes": saved, **env,
                })
                bar.update(1)
            for r in group:
                ref = "peft+bnb" if r["provider"] in ("peft+bnb", "fused-nf4") else "peft"
                r["ratio_to_peft"] = round_ratio(rounds, r["provider"], ref)
            out.extend(group)
            del steps
        del models
    bar.close()
    return out


COLUMNS = (
    ("model", "s", lambda r: r["model"]), ("layers", "d", lambda r: r["layers"]), ("r", "d", lambda r: r["r"]),
    ("mode", "s", lambda r: r["mode"]), ("tokens", "d", lambda r: r["M"]), ("provider", "s", lambda r: r["provider"]),
    ("median ms", ".2f", lambda r: r["median_ms"]), ("tokens/s", ",.0f", lambda r: r["tokens_per_s"]),
    ("x peft", ".2f", lambda r: r.get("ratio_to_peft")),
    ("saved MiB", ".1f", lambda r: None if r["saved_bytes"] is None else r["saved_bytes"] / 2**20),
    ("peak MiB", ".1f", lambda r: None if r["peak_mem_bytes"] is None else r["peak_mem_bytes"] / 2**20),
)


def table(recs: list[dict]) -> str:
    return report.table(COLUMNS, recs)
