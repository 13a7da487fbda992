"""transformers' ``Trainer`` and TRL's ``SFTTrainer`` in one line: :class:`FuseCallback`.

    from lorakern.integrations.trainer import FuseCallback

    trainer = SFTTrainer(model=base, peft_config=LoraConfig(...), train_dataset=ds, callbacks=[FuseCallback()])
    trainer = Trainer(model=peft_model, args=args, train_dataset=ds, callbacks=[FuseCallback()])

With ``Trainer`` on a PEFT model you build yourself, ``lorakern.integrations.peft.fuse(model)``
before the trainer is built does the same; the callback is for trainers that build the PEFT model
inside (TRL's ``SFTTrainer``, ``DPOTrainer``, ... given a ``peft_config``), where no user code runs
between ``get_peft_model`` and the first step.

Why a callback, and when it fuses: ``on_init_end`` (the end of the trainer's constructor: the model
is the one it will train, after TRL wrapped it, so ``trainer.evaluate()`` before training is fused
too), and again ``on_train_begin`` (after ``train(resume_from_checkpoint=...)`` has loaded the
checkpoint: adapters added to the model in between are fused too). Fusing only replaces each LoRA
layer's ``forward``; parameters, state_dict keys and the saved adapter files stay PEFT's, so a
checkpoint resumes into the fused layers in place and loads into plain PEFT, and ``fuse`` being
idempotent makes the second call a walk over the modules. Not covered: ``model_init`` (a
hyperparameter search builds a new model that transformers does not hand to callbacks); fuse
inside your ``model_init`` instead.
"""

from __future__ import annotations

from torch import nn
from transformers import TrainerCallback

from .peft import fuse


def _peft_model(model: nn.Module | None) -> nn.Module | None:
    """The module to fuse: the trainer's model, unwrapped from DDP / accelerate's wrappers."""
    while model is not None and hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


class FuseCallback(TrainerCallback):
    """Fuse every PEFT LoRA linear of the trainer's model with :func:`lorakern.integrations.peft.fuse`
    at the end of the trainer's constructor and at the start of training. ``fused`` holds the
    number of layers fused at the last call."""

    def __init__(self):
        self.fused = 0

    def _fuse(self, model):
        model = _peft_model(model)
        if model is not None:
            self.fused = fuse(model)

    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._fuse(model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._fuse(model)
