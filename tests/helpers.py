"""Shared test helpers: random LoRA inputs and error checks against a float64 reference."""

from __future__ import annotations

import torch

# Smallest relative error floor per dtype (a few units in the last place of its mantissa), used
# when torch's own error in that dtype happens to be tiny; the main bound is 2x torch's error.
FLOOR = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def lora_inputs(M, K, N, r, dtype, device="cpu", bias=True, lead=()):
    """Fresh random x [*lead, M, K], W [N, K], bias [N], A [r, K], B [N, r] (B non-zero)."""
    g = dict(dtype=dtype, device=device)
    x = torch.randn(*lead, M, K, **g)
    w = torch.randn(N, K, **g) / K**0.5
    b = torch.randn(N, **g) if bias else None
    a = torch.randn(r, K, **g) / K**0.5
    bb = torch.randn(N, r, **g) / r**0.5
    return x, w, b, a, bb


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref| (both in float64)."""
    got, ref = got.double(), ref.double()
    scale = ref.abs().max().clamp_min(1e-30)
    return ((got - ref).abs().max() / scale).item()


def assert_close_like_torch(name, got, ref64, torch_same_dtype, dtype):
    """``got`` must be within 2x the error that plain torch in ``dtype`` makes against float64
    (or the dtype's floor, if torch happens to be closer)."""
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = rel_err(got, ref64)
    bound = max(2.0 * rel_err(torch_same_dtype, ref64), FLOOR[dtype])
    assert err <= bound, f"{name} ({dtype}): relative error {err:.3e} > bound {bound:.3e}"


def assert_same_as_op(run, inputs, grad_out, p: float, seed: int = 7):
    """``run(via_op, leaves, seed)`` -> y, once through the public function and once through its
    custom op with the op's autograd (``seed``: the dropout seed the function draws after
    ``torch.manual_seed``, or None). Output and the grads of ``inputs`` must be bitwise equal."""
    from lorakern.dropout import draw_seed

    results = []
    for via_op in (False, True):
        leaves = [t.clone().requires_grad_() for t in inputs]
        torch.manual_seed(seed)
        drawn = draw_seed(inputs[0].device) if via_op and p > 0 else None
        y = run(via_op, leaves, drawn)
        y.backward(grad_out)
        results.append([y.detach()] + [t.grad for t in leaves])
    for got, want in zip(*results):
        assert torch.equal(got, want)
    return results[1][0]


# A limit long enough to mean "hung", never "slow": the default AOT sweep takes ~7 min cold on a
# quiet 2-core machine and ~3x that with other jobs beside it.
HUNG_S = 3 * 3600


def run_process_group(cmd, env=None, timeout=HUNG_S):
    """Run ``cmd`` in a process group of its own and return its CompletedProcess. Past ``timeout``
    the whole group is killed (the compiler workers a tool started, not only the tool), then
    TimeoutExpired is raised."""
    import os
    import signal
    import subprocess

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


LAYOUTS = ("strided", "transposed", "expanded")


def layout_leaf(layout: str, t: torch.Tensor) -> torch.Tensor:
    """The values a view in ``layout`` is built from: ``t`` itself, or for "expanded" its first
    row (2-D) or first element (1-D), repeated by a stride-0 view."""
    return t[:1] if layout == "expanded" else t


def layout_view(layout: str, leaf: torch.Tensor, shape) -> torch.Tensor:
    """``leaf`` seen through ``layout`` (differentiable): a slice with stride 2 of a larger tensor,
    a transposed copy's transpose (2-D), or a stride-0 expansion to ``shape``."""
    if layout == "strided":
        return torch.stack([torch.zeros_like(leaf), leaf], dim=-1).flatten(-2)[..., 1::2]
    if layout == "transposed":
        return leaf.t().contiguous().t() if leaf.dim() == 2 else leaf
    return leaf.expand(shape)


class PeftBlock(torch.nn.Module):
    """A small residual MLP whose three Linears (q, up, down) PEFT's tests target."""

    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(48, 48, bias=False)
        self.up = torch.nn.Linear(48, 72)
        self.down = torch.nn.Linear(72, 48)

    def forward(self, x):
        return self.down(torch.relu(self.up(self.q(x)))) + x


def tiny_llama(seed: int = 0, **config):
    """A 2-layer Llama (hidden 64, MLP 128, 4 heads, 2 KV heads, 64 tokens of vocab and of
    context) from a ``LlamaConfig``, no download; ``config`` overrides or adds fields."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    fields = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64) | config
    return LlamaForCausalLM(LlamaConfig(**fields))
