"""What is compared. Each provider turns a shape into a callable for one mode.

- base:    the frozen matmul alone, ``F.linear(x, W, bias)``: the floor a fused layer is held to.
- unfused: the plain torch sequence PEFT runs: base, dropout, x A^T, (.) B^T, scale, add.
- peft:    PEFT's own LoRA ``Linear`` (when peft is installed).
- fused:   ``lorakern.FusedLoRALinear`` on its automatic backend (Triton on CUDA, reference on CPU).
- fused-det: the same layer under ``torch.use_deterministic_algorithms(True)``: its Triton backward
           then reads dY twice instead of adding dB into L2 with atomics (CUDA only; on CPU the
           two are the same reference path).
- peft-dora: PEFT's DoRA ``Linear`` (``use_dora=True``; PEFT's default, no DoRA caching).
- fused-dora: ``FusedLoRALinear(use_dora=True)``.
- peft-multi: PEFT's LoRA ``Linear`` with ``shape.adapters`` adapters, called with ``adapter_names``
           (one per row, handed out in turn): its mixed-batch loop.
- fused-multi: ``lorakern.multi_lora_linear`` on the same adapters and rows.
- fused-nf4: ``lorakern.qlora_linear`` with one adapter on the base quantized to NF4 (blocks of 64),
           the single-adapter QLoRA the NF4 variant of fused-multi is held to.
- fused-multi-nf4: ``lorakern.multi_lora_linear`` on that NF4 base (many users' adapters over one
           4-bit base: QLoRA serving).
- fused-qalora: ``lorakern.int4.layer.QALoRALinear``: QA-LoRA (A sees x pooled over groups of 64)
           on the base quantized to group-wise INT4; in_features must be a multiple of 64.

Modes: ``fwd`` (a training-mode forward without grad), ``bwd``, ``fwd+bwd`` (a training step) and
``eval`` (``module.eval()`` under no_grad: inference). In the training modes a DoRA layer's
weight norm is computed every step, as after every optimizer step (its cache is invalidated by
an in-place no-op on lora_A); in ``eval`` lorakern may serve it from its cache.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

import lorakern

from .shapes import Shape

MODES = ("fwd", "bwd", "fwd+bwd", "eval")
DORA_PROVIDERS = ("peft-dora", "fused-dora")
MULTI_PROVIDERS = ("peft-multi", "fused-multi", "fused-nf4", "fused-multi-nf4")



def flops(provider: str, mode: str, s: Shape) -> float:
    """Useful FLOPs of one call. Forward: the base GEMM 2*M*N*K, plus 2*M*r*(K + N) for LoRA.
    Backward (W frozen): dx = dY W is 2*M*N*K; dh, dB, dA and dx's LoRA part are 2*M*r*(2N + 2K)."""
    M, K, N, r = s.M, s.in_features, s.out_features, s.r
    base = 2.0 * M * N * K
    lora = 0.0 if provider == "base" else 1.0
    fwd = base + lora * 2.0 * M * r * (K + N)
    bwd = base + lora * 4.0 * M * r * (K + N)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd, "eval": fwd}[mode]


class UnfusedLoRA(nn.Module):
    """The sequence of separate torch ops a LoRA layer costs without fusion (PEFT's order)."""

    def __init__(self, fused: lorakern.FusedLoRALinear):
        super().__init__()
        self.f = fused

    def forward(self, x):
        f = self.f
        result = F.linear(x, f.weight, f.bias)
        h = F.dropout(x, f.lora_dropout, self.training) @ f.lora_A.t()
        return result + (h @ f.lora_B.t()) * f.scaling


class MultiAdapter(nn.Module):
    """``s.adapters`` adapters over one base, row m taking adapter ``m % n``: through
    :func:`lorakern.multi_lora_linear`, or PEFT's layer called with ``adapter_names``."""

    def __init__(self, fused: lorakern.FusedLoRALinear, n: int, peft_layer=None, nf4: bool = False):
        super().__init__()
        self.n, self.peft = n, peft_layer
        self.weight = lorakern.NF4Weight.quantize(fused.weight.detach(), 64) if nf4 else None
        if peft_layer is not None:  # PEFT's layer holds its own copies: fused is not a submodule then
            object.__setattr__(self, "f", fused)
        else:
            self.f = fused
            self.lora_A = nn.ParameterList([fused.lora_A] + [nn.Parameter(fused.lora_A.detach() + 0.01 * i)
                                                             for i in range(1, n)])
            self.lora_B = nn.ParameterList([fused.lora_B] + [nn.Parameter(fused.lora_B.detach() * (1 + i))
                                                             for i in range(1, n)])

    def forward(self, x):
        # The rows' adapters (names, or an index and the adapter lists) are made once per batch
        # size, as a server routes requests before the layers run: the harness's own Python
        # between calls (~0.2 ms right after a 4096 x 4096 decode, its caches cold) is not the op's.
        rows = x.shape[0]
        if self.peft is not None:
            names = self._routing(rows, lambda: [self.peft.adapter_names[m % self.n] for m in range(rows)])
            return self.peft.layer(x, adapter_names=names)
        index, As, Bs = self._routing(rows, lambda: (torch.arange(rows, device=x.device) % self.n, list(self.lora_A),
                                                     list(self.lora_B)))
        f = self.f
        weight = f.weight if self.weight is None else self.weight
        return lorakern.multi_lora_linear(x, weight, f.bias, As, Bs, f.scaling, index, f.lora_dropout,
                                          training=self.training)

    def _routing(self, rows: int, make):
        cache = self.__dict__.setdefault("_routes", {})
        if rows not in cache:
            cache[rows] = make()
        return cache[rows]


class NF4Adapter(nn.Module):
    """One adapter over the NF4-quantized base: :func:`lorakern.qlora_linear`."""

    def __init__(self, fused: lorakern.FusedLoRALinear):
        super().__init__()
        self.f = fused
        self.weight = lorakern.NF4Weight.quantize(fused.weight.detach(), 64)

    def forward(self, x):
        f = self.f
        return lorakern.qlora_linear(x, self.weight, f.bias, f.lora_A, f.lora_B, f.scaling, f.lora_dropout,
                                     training=self.training)


def _peft_multi(fused: lorakern.FusedLoRALinear, n: int):
    import peft

    layer = _peft_layer(fused)
    model = layer._peft_model
    cfg = peft.LoraConfig(r=fused.r, lora_alpha=fused.lora_alpha, lora_dropout=fused.lora_dropout,
                          target_modules=["proj"], init_lora_weights=False)
    names = ["default"] + [f"a{i}" for i in range(1, n)]
    for name in names[1:]:
        model.add_adapter(name, cfg)
    for p_name, p in layer.named_parameters():
        p.requires_grad_("lora_" in p_name)
    holder = nn.Module()
    holder.layer, holder.adapter_names = layer, names
    return MultiAdapter(fused, n, peft_layer=holder)


def _peft_layer(fused: lorakern.FusedLoRALinear, use_dora: bool = False):
    import peft

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(fused.in_features, fused.out_features, bias=fused.bias is not None,
                                  device=fused.weight.device, dtype=fused.weight.dtype)

    cfg = peft.LoraConfig(r=fused.r, lora_alpha=fused.lora_alpha, lora_dropout=fused.lora_dropout,
                          target_modules=["proj"], use_dora=use_dora)
    model = peft.get_peft_model(Wrap(), cfg, autocast_adapter_dtype=False)
    layer = model.base_model.model.proj
    object.__setattr__(layer, "_peft_model", model)  # not a submodule: for add_adapter
    return layer


def available_providers(device=None) -> list[str]:
    """The lora suite's providers for ``device`` (None: every one that could run somewhere)."""
    names = ["base", "unfused", "fused"]
    try:
        import peft  # noqa: F401

        names.insert(2, "peft")
        names += ["peft-dora", "peft-multi"]
    except ImportError:
        pass
    names += ["fused-dora", "fused-multi", "fused-nf4", "fused-multi-nf4", "fused-qalora"]
    if device is None or torch.device(device).type == "cuda":
        names.append("fused-det")
    return names


class Deterministic(nn.Module):
    """Marks a layer whose steps run under ``torch.use_deterministic_algorithms(True)``."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


@contextlib.contextmanager
def _deterministic(on: bool):
    if not on:
        yield
        return
    previous = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=warn_only)


def make_module(provider: str, s: Shape, dtype, device, dropout: float) -> nn.Module:
    fused = lorakern.FusedLoRALinear(s.in_features, s.out_features, r=s.r, lora_alpha=2 * s.r, lora_dropout=dropout,
                                     device=device, dtype=dtype, use_dora=provider == "fused-dora")
    with torch.no_grad():
        fused.lora_B.normal_(std=0.02)
    if provider in ("fused", "fused-dora"):
        return fused
    if provider == "peft-dora":
        return _peft_layer(fused, use_dora=True)
    if provider in ("fused-multi", "fused-multi-nf4"):
        return MultiAdapter(fused, s.adapters, nf4=provider == "fused-multi-nf4")
    if provider == "fused-nf4":
        return NF4Adapter(fused)
    if provider == "peft-multi":
        return _peft_multi(fused, s.adapters)
    if provider == "fused-det":
        return Deterministic(fused)
    if provider == "fused-qalora":  # QA-LoRA over the base quantized to group-wise INT4 (G = 64)
        from ..int4.layer import QALoRALinear

        lin = nn.Linear(s.in_features, s.out_features, device=device, dtype=dtype)
        layer = QALoRALinear.from_linear(lin, r=s.r, lora_alpha=2 * s.r, group_size=64, lora_dropout=dropout)
        with torch.no_grad():
            layer.lora_B.normal_(std=0.02)
        return layer
    if provider == "unfused":
        return UnfusedLoRA(fused)
    if provider == "peft":
        return _peft_layer(fused)
    if provider == "base":
        lin = nn.Linear(s.in_features, s.out_features, device=device, dtype=dtype)
        lin.weight.requires_grad_(False)
        return lin
    raise ValueError(f"unknown provider {provider!r}; choose from {available_providers()}")


def _lora_A(module: nn.Module):
    """The adapter's A of a DoRA provider (bumped each training step: see the module docstring)."""
    if isinstance(module, lorakern.FusedLoRALinear):
        return module.lora_A if module.use_dora else None
    if isinstance(getattr(module, "lora_magnitude_vector", None), nn.ModuleDict) and module.lora_magnitude_vector:
        return module.lora_A["default"].weight  # PEFT's DoRA layer
    return None


def make_step(module: nn.Module, mode: str, s: Shape, dtype, device):
    """A zero-argument callable running one ``mode`` step, and the input it uses."""
    x = torch.randn(s.M, s.in_features, device=device, dtype=dtype, requires_grad=True)
    params = [p for p in module.parameters() if p.requires_grad]
    inputs = [x] + params
    det = isinstance(module, Deterministic)
    if mode == "eval":
        module.eval()

        def step():
            with torch.no_grad(), _deterministic(det):
                return module(x)
        return step
    lora_A = _lora_A(module)

    def touch():  # a new A, as after an optimizer step: the DoRA norm is computed again
        if lora_A is not None:
            with torch.no_grad():
                lora_A.add_(0.0)

    if mode == "fwd":
        def step():
            touch()
            with torch.no_grad(), _deterministic(det):
                return module(x)
        return step
    dy = torch.randn(s.M, s.out_features, device=device, dtype=dtype)
    if mode == "bwd":
        y = module(x)

        def step():
            with _deterministic(det):
                return torch.autograd.grad(y, inputs, dy, retain_graph=True, allow_unused=True)
        return step

    def step():
        touch()
        with _deterministic(det):
            return torch.autograd.grad(module(x), inputs, dy, allow_unused=True)  # PEFT: adapters without rows
    return step


def saved_activation_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes ``module(x)`` keeps for backward, parameters excluded (each storage counted once; x
    itself counts when it is kept)."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(seen.values())
