"""Where users train: transformers' ``Trainer`` and TRL's ``SFTTrainer`` on a tiny Llama (built from
a ``LlamaConfig``, no download), fused against the same run left to PEFT.

Equal step by step: same init (``init_lora_weights=False``, so B is random and the adapters act
from step 0), same batches, plain SGD. SGD, not AdamW: Adam divides each gradient by its own root
mean square, so an element whose gradient is rounding noise takes a full learning-rate step in a
random direction and the runs part at ~1e-4 after two steps, whatever the op; with SGD a rounding
difference stays a rounding difference, and a real one (a wrong grad, a missed layer) still shows.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import helpers  # noqa: E402
import peft  # noqa: E402
from transformers import LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

from lorakern.integrations.peft import fuse, is_fused  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB, PAD, EOS = 64, 60, 61
# fp32 runs differ by summation order only: ~1e-7 per step, a few 1e-6 after four steps.
FP32_RTOL = 1e-5


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    return helpers.tiny_llama(seed, vocab_size=VOCAB, pad_token_id=PAD, eos_token_id=EOS)


def lora_config(**kw) -> peft.LoraConfig:
    return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights=False, **kw)


def peft_model(base=None, seed: int = 0, **kw):
    base = base if base is not None else tiny_llama(seed)
    torch.manual_seed(seed + 1)  # the adapters' init
    return peft.get_peft_model(base, lora_config(**kw))


def token_rows(n: int = 32, seq: int = 24, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, PAD, (n, seq), generator=g)
    return [{"input_ids": row, "labels": row} for row in ids]


def recording(cls):
    """``cls`` (a Trainer class) that keeps each training step's loss at full precision (the
    trainer's own log rounds it to 4 digits)."""

    class Recording(cls):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.losses = []

        def compute_loss(self, model, inputs, *a, **kw):
            out = super().compute_loss(model, inputs, *a, **kw)
            if model.training:
                self.losses.append((out[0] if isinstance(out, tuple) else out).item())
            return out

    return Recording


def arguments(out, cls=TrainingArguments, **kw):
    base = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=4, learning_rate=0.5, optim="sgd",
                lr_scheduler_type="constant", logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                disable_tqdm=True, seed=0, dataloader_num_workers=0)
    base.update(kw)
    return cls(**base)


def train(model, out, rows=None, fused=False, resume=None, **kw):
    if fused:
        assert fuse(model) > 0
    trainer = recording(Trainer)(model=model, args=arguments(out, **kw), train_dataset=rows or token_rows())
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_runs_equal(a, b, rtol=FP32_RTOL):
    assert len(a.losses) == len(b.losses) > 0
    for step, (x, y) in enumerate(zip(a.losses, b.losses)):
        assert abs(x - y) <= rtol * abs(x), f"step {step}: PEFT {x:.7f} vs fused {y:.7f}"
    pa, pb = trainable(a.model), trainable(b.model)
    assert pa.keys() == pb.keys()
    for name in pa:
        scale = pa[name].abs().max()
        assert (pa[name] - pb[name]).abs().max() <= rtol * scale, name


def assert_no_further_from_exact(ref, got, exact, factor=2.0):
    """``got`` (fused, fp32) is no further from the float64 run ``exact`` than ``ref`` (PEFT, fp32) is,
    times ``factor``, plus one fp32 rounding of the value: losses step by step and the final weights."""
    eps = torch.finfo(torch.float32).eps
    assert len(ref.losses) == len(got.losses) == len(exact.losses) > 0
    for step, (r, g, e) in enumerate(zip(ref.losses, got.losses, exact.losses)):
        assert abs(g - e) <= factor * abs(r - e) + eps * abs(e), f"step {step}: PEFT {r}, fused {g}, float64 {e}"
    pr, pg, pe = trainable(ref.model), trainable(got.model), trainable(exact.model)
    assert pr.keys() == pg.keys() == pe.keys()
    for name in pe:
        err_ref = (pr[name].double() - pe[name]).abs().max()
        err_got = (pg[name].double() - pe[name]).abs().max()
        assert err_got <= factor * err_ref + eps * pe[name].abs().max(), (name, err_got.item(), err_ref.item())


def fused_layer_count(model) -> int:
    from peft.tuners.lora.layer import LoraLayer

    return sum(is_fused(m) for m in model.modules() if isinstance(m, LoraLayer))


CASES = {
    "plain": ({}, {}),
    "gradient-checkpointing": ({}, {"gradient_checkpointing": True,
                                    "gradient_checkpointing_kwargs": {"use_reentrant": False}}),
    "modules-to-save": ({"modules_to_save": ["lm_head"]}, {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_trainer_fused_equals_peft_step_by_step(tmp_path, case):
    lora_kw, args_kw = CASES[case]
    ref = train(peft_model(**lora_kw), tmp_path / "peft", **args_kw)
    got = train(peft_model(**lora_kw), tmp_path / "fused", fused=True, **args_kw)
    assert fused_layer_count(got.model) == 2 * len(TARGETS)
    assert_runs_equal(ref, got)
    if case == "modules-to-save":  # the trained copy of lm_head moved, and equally
        names = [n for n in trainable(got.model) if "modules_to_save" in n]
        assert names, "modules_to_save made no trainable copy"


def test_trainer_bf16_autocast_is_as_close_to_fp32_as_peft(tmp_path):
    """``bf16=True`` runs the steps under CPU autocast: both runs round to bf16 in different
    places, so "equal" is measured against the fp32 run: the fused run's losses are no further from
    it than PEFT's own bf16 run's (a factor 2 and one bf16 ulp of slack)."""
    exact = train(peft_model(), tmp_path / "fp32")
    ref = train(peft_model(), tmp_path / "peft", bf16=True)
    got = train(peft_model(), tmp_path / "fused", fused=True, bf16=True)
    for step, (e, r, g) in enumerate(zip(exact.losses, ref.losses, got.losses)):
        assert abs(g - e) <= 2 * abs(r - e) + 2**-8 * abs(e), f"step {step}: fp32 {e:.5f} PEFT {r:.5f} fused {g:.5f}"


def test_trainer_resumes_a_checkpoint_into_a_fused_model_and_plain_peft_loads_it(tmp_path):
    whole = train(peft_model(), tmp_path / "whole", fused=True)
    first = train(peft_model(), tmp_path / "run", fused=True, max_steps=2, save_strategy="steps", save_steps=2)
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").exists()
    # A fresh fused model resumes from the trainer's checkpoint: steps 3 and 4 equal the run that
    # never stopped (same optimizer state, same data order).
    resumed = train(peft_model(), tmp_path / "run", fused=True, resume=str(checkpoint))
    assert resumed.losses == pytest.approx(whole.losses[2:], rel=FP32_RTOL)
    assert first.losses == pytest.approx(whole.losses[:2], rel=FP32_RTOL)
    # The checkpoint is plain PEFT: it loads into an unfused model that computes the fused one's output.
    plain = peft.PeftModel.from_pretrained(tiny_llama(), str(checkpoint))
    x = token_rows(2)[0]["input_ids"][None]
    first.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=x).logits, first.model(input_ids=x).logits)


def test_trainer_evaluate_under_no_grad(tmp_path):
    rows = token_rows(8, seed=5)
    ref, got = peft_model(), peft_model()
    fuse(got)
    losses = []
    for model in (ref, got):
        trainer = Trainer(model=model, args=arguments(tmp_path, per_device_eval_batch_size=4), eval_dataset=rows)
        losses.append(trainer.evaluate()["eval_loss"])
    assert losses[1] == pytest.approx(losses[0], rel=FP32_RTOL)


def test_trainer_on_a_4bit_base_through_prepare_model_for_kbit_training(tmp_path):
    """bitsandbytes' NF4 ``Linear4bit`` base (its CPU backend), prepared as QLoRA recipes do:
    ``prepare_model_for_kbit_training`` (fp32 norms, input grads, reentrant gradient checkpointing)."""
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    folder = tmp_path / "base"
    tiny_llama().save_pretrained(folder)

    def model():
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_compute_dtype=torch.float32)
        base = LlamaForCausalLM.from_pretrained(folder, quantization_config=quant, device_map="cpu")
        base = peft.prepare_model_for_kbit_training(base, use_gradient_checkpointing=True)
        return peft_model(base)

    ref = train(model(), tmp_path / "peft", gradient_checkpointing=True)
    got = train(model(), tmp_path / "fused", fused=True, gradient_checkpointing=True)
    assert type(got.model.base_model.model.model.layers[0].mlp.up_proj.base_layer).__name__ == "Linear4bit"
    assert fused_layer_count(got.model) == 2 * len(TARGETS)
    assert_runs_equal(ref, got)


# -- TRL --------------------------------------------------------------------------------------------


def char_tokenizer():
    """A word-level tokenizer over VOCAB ids, built in memory (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(PAD)} | {"<pad>": PAD, "<eos>": EOS}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def sft_train(out, callback: bool, resume=None, model=None, **kw):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from lorakern.integrations.trainer import FuseCallback

    rows = datasets.Dataset.from_dict({"input_ids": [r["input_ids"].tolist() for r in token_rows()]})
    callbacks = [FuseCallback()] if callback else []
    # SFTConfig's own defaults are bf16=True and gradient_checkpointing=True: keep the second, and
    # compare in fp32 (bf16 autocast has its own test above).
    kw.setdefault("bf16", False)
    # SFTTrainer builds the PEFT model itself from peft_config: no user code runs before step 1.
    trainer = recording(trl.SFTTrainer)(model=model or tiny_llama(), args=arguments(out, cls=trl.SFTConfig, **kw),
                                        train_dataset=rows, processing_class=char_tokenizer(),
                                        peft_config=lora_config(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_sft_trainer_with_fuse_callback_equals_peft(tmp_path):
    ref = sft_train(tmp_path / "peft", callback=False)
    got = sft_train(tmp_path / "fused", callback=True)
    assert fused_layer_count(ref.model) == 0
    assert fused_layer_count(got.model) == 2 * len(TARGETS)
    # Here the two fp32 runs round apart further than in the Trainer tests above: 2.8e-5 of the
    # largest weight after 4 SGD steps at lr 0.5 on an AVX2 EPYC Zen 3, with or without gradient
    # checkpointing, while PEFT's own fp32 run is 4.4e-5 from the float64 one. So each is held
    # against the same run in float64, fused no further from it than PEFT's fp32 run (times 2, the
    # kernels' rule), plus one fp32 rounding of the values.
    exact = sft_train(tmp_path / "exact", callback=False, model=tiny_llama().double())
    assert_no_further_from_exact(ref, got, exact)


def test_sft_trainer_resume_keeps_the_model_fused(tmp_path):
    whole = sft_train(tmp_path / "whole", callback=True)
    sft_train(tmp_path / "run", callback=True, max_steps=2, save_strategy="steps", save_steps=2)
    resumed = sft_train(tmp_path / "run", callback=True, resume=str(tmp_path / "run" / "checkpoint-2"))
    assert fused_layer_count(resumed.model) == 2 * len(TARGETS)
    assert resumed.losses == pytest.approx(whole.losses[2:], rel=FP32_RTOL)


@pytest.mark.slow
def test_trainer_torch_compile_equals_eager_peft(tmp_path):
    """``TrainingArguments(torch_compile=True)``: the trainer compiles the fused model (inductor on
    CPU); its losses equal eager PEFT's (inductor reorders fp32 sums: ~1e-7 here)."""
    ref = train(peft_model(), tmp_path / "peft")
    got = train(peft_model(), tmp_path / "fused", fused=True, torch_compile=True)
    assert fused_layer_count(got.model) == 2 * len(TARGETS)
    assert_runs_equal(ref, got)
