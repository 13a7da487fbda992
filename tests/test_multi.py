"""multi_lora_linear (an adapter per row: mixed batches, several adapters trained in one batch)
against a float64 per-row loop of the definition, the single-adapter op, and PEFT's mixed batch."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import PeftBlock, assert_close_like_torch

import lorakern
from lorakern import NF4Weight, multi_lora_linear
from lorakern.dropout import draw_seed
from lorakern.reference import multi_lora_linear_reference

RANKS = (1, 8, 16, 64)


def _triton_device():
    """Where the Triton kernels run: CUDA when present, else the interpreter on CPU tensors."""
    from lorakern.backend import interpreting

    if torch.cuda.is_available():
        return "cuda"
    if not interpreting():
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    return "cpu"


# Every correctness case runs on both paths: the pure-torch one and the Triton kernels.
BACKENDS = ["reference", "triton"]


def inputs(lead, K, N, ranks, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, K, generator=g).to(dtype)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(dtype)
    b = torch.randn(N, generator=g).to(dtype)
    As = [(torch.randn(r, K, generator=g) / K**0.5).to(dtype) for r in ranks]
    Bs = [(torch.randn(N, r, generator=g) / r**0.5).to(dtype) for r in ranks]
    return x, w, b, As, Bs


def run(x, w, b, As, Bs, scalings, index, ps, seed_value=3, device="cpu", **kw):
    """y and the grads of (x, bias, every A, every B) through multi_lora_linear on ``device``, and
    its seed (as drawn on the CPU, where the reference runs: the same draw on every device)."""
    leaves = [t.clone().to(device).requires_grad_() for t in (x, b, *As, *Bs)]
    n = len(As)
    w = w.to(device)  # a dense weight or an NF4Weight
    torch.manual_seed(seed_value)
    if device != "cpu":
        torch.cuda.manual_seed(seed_value)
    y = multi_lora_linear(leaves[0], w, leaves[1], leaves[2:2 + n], leaves[2 + n:], scalings, index.to(device), ps,
                          **kw)
    torch.manual_seed(seed_value)
    if device != "cpu":
        torch.cuda.manual_seed(seed_value)
    seed = draw_seed(torch.device(device)).cpu() if any(p > 0 for p in ps) else None
    return y, leaves, seed


def _reference(x, w, b, As, Bs, scalings, index, ps, seed, dtype):
    leaves = [t.to(dtype).detach().requires_grad_() for t in (x, b, *As, *Bs)]
    n = len(As)
    y = multi_lora_linear_reference(leaves[0], w.to(dtype), leaves[1], leaves[2:2 + n], leaves[2 + n:], scalings,
                                    index, ps, seed)
    return y, leaves


def check(lead, K, N, ranks, index, dtype=torch.float32, ps=None, nf4=False, backend="reference"):
    """Output and every grad within 2x the error of the same definition run in ``dtype``, against
    float64; an adapter without rows gets an exactly zero grad."""
    x, w, b, As, Bs = inputs(lead, K, N, ranks, dtype)
    n = len(ranks)
    ps = ps or [0.0] * n
    scalings = [0.5 + i for i in range(n)]
    weight = NF4Weight.quantize(w, 64) if nf4 else w
    w_ref = weight.dequantize(dtype) if nf4 else w
    device = _triton_device() if backend == "triton" else "cpu"
    y, leaves, seed = run(x, weight, b, As, Bs, scalings, index, ps, device=device, backend=backend)
    y64, l64 = _reference(x, w_ref, b, As, Bs, scalings, index, ps, seed, torch.float64)
    y16, l16 = _reference(x, w_ref, b, As, Bs, scalings, index, ps, seed, dtype)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(11)).to(dtype)
    for out, d in ((y, dy.to(device)), (y64, dy.double()), (y16, dy)):
        out.backward(d)
    y, grads = y.detach().cpu(), [None if t.grad is None else t.grad.cpu() for t in leaves]
    used = set(index.reshape(-1).tolist())
    if y.numel() == 0:
        assert y.shape == y64.shape and all(g is not None and not g.any() for g in grads)
        return
    assert_close_like_torch("y", y, y64, y16, dtype)
    for i, (got, g64, g16) in enumerate(zip(grads, l64, l16)):
        if i >= 2 and (i - 2) % n not in used:
            assert got is not None and not got.any(), "an adapter without rows gets a zero grad"
            continue
        assert_close_like_torch(f"grad {i}", got, g64.grad, g16.grad, dtype)


@pytest.mark.parametrize("M", [0, 1, 7, 37])
@pytest.mark.parametrize("backend", BACKENDS)
def test_random_indices_mixed_ranks(M, backend):
    g = torch.Generator().manual_seed(M)
    index = torch.randint(-1, 4, (M,), generator=g)
    check((M,), 45, 53, RANKS, index, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_3d_x_index_per_row_and_adapters_without_rows(backend):
    index = torch.tensor([[0, 0, -1, 3, 3], [3, -1, -1, 0, 0], [0, 3, 3, 3, -1]])  # adapters 1 and 2: no rows
    check((3, 5), 30, 20, RANKS, index, backend=backend)
    check((3, 5), 30, 20, RANKS, index.reshape(-1), backend=backend)  # the flat index too


@pytest.mark.parametrize("case", ["all -1", "one adapter"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_degenerate_batches(case, backend):
    index = torch.full((9,), -1) if case == "all -1" else torch.zeros(9, dtype=torch.long)
    check((9,), 16, 12, (8, 4), index, backend=backend)


# (M, K, N): 33 rows sorted into mixed tiles with unaligned K; 5 rows of aligned K and N, the
# decode tile whose rows each gather their own adapter's B (forward) and A (dx).
@pytest.mark.parametrize("M,K,N", [(33, 40, 24), (5, 48, 32)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_16_bit(M, K, N, dtype, backend):
    index = torch.randint(-1, 3, (M,), generator=torch.Generator().manual_seed(1))
    check((M,), K, N, (8, 16, 24), index, dtype, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_per_adapter_and_masks_as_the_single_adapter_op(backend):
    """Each adapter's own dropout probability; with every row on one adapter, the output and grads
    are the single-adapter op's for the same seed."""
    index = torch.randint(-1, 3, (40,), generator=torch.Generator().manual_seed(2))
    check((40,), 24, 16, (8, 4, 16), index, ps=[0.0, 0.3, 0.6], backend=backend)
    device = _triton_device() if backend == "triton" else "cpu"
    x, w, b, As, Bs = inputs((40,), 24, 16, (8,), torch.float32)
    y, *_ = run(x, w, b, As, Bs, [1.5], torch.zeros(40, dtype=torch.long), [0.3], device=device, backend=backend)
    torch.manual_seed(3)
    single = lorakern.lora_linear(x, w, b, As[0], Bs[0], 1.5, 0.3, backend="reference")
    torch.testing.assert_close(y.cpu(), single)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M", [6, 70])  # decode (rows as they come) and sorted tiles, several of them
def test_stacked_ranks_strided_x_and_rank_256(M, backend):
    """Stacked adapters [n, r_max, ...] with their own ranks (up to 256, the kernels' maximum), x a
    transposed view and bias expanded, the index repeating adapters in separate runs: y and every
    grad against float64, the stacks' grads zero beyond each adapter's rank."""
    device = _triton_device() if backend == "triton" else "cpu"
    K, N, ranks = 37, 29, [256, 1, 8, 16]
    g = torch.Generator().manual_seed(M)
    x = torch.randn(K, M, generator=g).t()  # non-contiguous
    w = torch.randn(N, K, generator=g) / K**0.5
    bias = torch.randn(1, generator=g).expand(N)
    A = torch.randn(4, 256, K, generator=g) / K**0.5
    B = torch.randn(4, N, 256, generator=g) / 16
    index = torch.tensor([0, 1, 0, 1, -1, 3] * (M // 6 + 1))[:M]
    index[-1] = 2
    scalings = [0.25, 2.0, 1.0, 0.5]
    dy = torch.randn(M, N, generator=g)
    leaves = [t.clone().to(device).requires_grad_() for t in (x, A, B)]
    y = multi_lora_linear(leaves[0], w.to(device), bias.to(device), leaves[1], leaves[2], scalings, index.to(device),
                          ranks=ranks, backend=backend)
    y.backward(dy.to(device))
    ref = [t.double().requires_grad_() for t in (x, A, B)]
    y64 = multi_lora_linear_reference(ref[0], w.double(), bias.double(), [ref[1][a, :r] for a, r in enumerate(ranks)],
                                      [ref[2][a, :, :r] for a, r in enumerate(ranks)], scalings, index)
    y64.backward(dy.double())
    torch.testing.assert_close(y.detach().cpu().double(), y64, rtol=2e-5, atol=2e-5)
    for name, got, want in zip(("dx", "dA", "dB"), leaves, ref):
        torch.testing.assert_close(got.grad.cpu().double(), want.grad, rtol=2e-5, atol=2e-5, msg=name)
    for a, r in enumerate(ranks):
        assert not leaves[1].grad[a, r:].any() and not leaves[2].grad[a, :, r:].any()


@pytest.mark.parametrize("M", [5, 40])  # the native decode kernel for the base, the tiled decode
@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
def test_nf4_base(M, backend):
    """"triton" decodes W to x's dtype for the kernels, in forward and again in backward."""
    check((M,), 128, 24, (8, 16), torch.randint(-1, 2, (M,), generator=torch.Generator().manual_seed(M)), nf4=True,
          backend=backend)


def test_nf4_base_triton_saves_no_decoded_weight():
    """The decoded W is a temporary of the forward (and again of the backward), never saved: the
    saved tensors are x's rows, the adapters, h and the index (4-bit bytes stay the base's)."""
    device = _triton_device()
    x, w, b, As, Bs = inputs((40,), 128, 24, (8, 16), torch.float32)
    weight = NF4Weight.quantize(w, 64).to(device)
    saved = []
    leaves = [t.to(device).requires_grad_() for t in (x, *As, *Bs)]
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        y = multi_lora_linear(leaves[0], weight, b.to(device), leaves[1:3], leaves[3:], 1.0,
                              torch.randint(-1, 2, (40,)).to(device), backend="triton")
    y.sum().backward()
    assert saved and (24, 128) not in saved and (128, 24) not in saved, saved
    assert all(t.grad is not None for t in leaves)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_nf4_base_16_bit_triton(dtype):
    check((37,), 64, 40, (1, 16, 8), torch.randint(-1, 3, (37,), generator=torch.Generator().manual_seed(5)), dtype,
          ps=[0.0, 0.2, 0.0], nf4=True, backend="triton")


def test_bad_inputs_get_clear_errors():
    x, w, b, As, Bs = inputs((6,), 16, 12, (4, 8), torch.float32)
    idx = torch.tensor([0, 1, -1, 0, 1, 1])
    for kwargs, exc, match in [
        (dict(adapter_index=torch.tensor([0, 1, 2, 0, 0, 0])), ValueError,
         r"adapter_index: expected values in \[-1, 1\]"),
        (dict(adapter_index=torch.tensor([0, -2, 0, 0, 0, 0])), ValueError, "adapter_index: expected values"),
        (dict(adapter_index=idx.float()), TypeError, "adapter_index: expected an integer tensor"),
        (dict(adapter_index=idx.to("meta")), ValueError, "adapter_index: expected device cpu"),
        (dict(adapter_index=idx[:5]), ValueError, r"adapter_index: expected shape \[6\]"),
        (dict(lora_B=Bs[:1]), ValueError, "lora_A, lora_B: expected two sequences"),
        (dict(lora_A=torch.stack([As[1], As[1]])), TypeError, "lora_B: expected a stacked tensor"),
        (dict(lora_A=As[1], lora_B=Bs[1]), ValueError, r"lora_A, lora_B: expected stacked \[n, r_max, in\]"),
        (dict(lora_A=torch.stack(As[1:] * 2), lora_B=torch.randn(3, 12, 8)), ValueError,
         r"lora_B: expected shape \[2, out, 8\]"),
        (dict(lora_A=torch.stack(As[1:] * 2), lora_B=torch.stack(Bs[1:] * 2), ranks=[4, 9]), ValueError,
         r"ranks: expected 2 ints in \[1, 8\]"),
        (dict(lora_A=torch.stack(As[1:] * 2), lora_B=torch.stack(Bs[1:] * 2), ranks=[4]), ValueError, "ranks:"),
        (dict(lora_A=torch.stack(As[1:] * 2), lora_B=torch.stack(Bs[1:] * 2, 1)), ValueError,
         r"lora_B: expected shape \[2, out, 8\]"),
        (dict(ranks=[4, 8]), ValueError, "ranks: only with stacked lora_A"),
        (dict(lora_B=[Bs[0], torch.randn(12, 5)]), ValueError, r"adapter 1: lora_B: expected shape \[12, 8\]"),
        (dict(lora_A=[As[0], As[1].double()]), TypeError, "adapter 1: lora_A: expected dtype torch.float32"),
        (dict(scaling=[1.0]), ValueError, "scaling: expected a number or a sequence of 2"),
        (dict(dropout_p=[0.1, 1.0]), ValueError, r"adapter 1: dropout_p: expected a probability in \[0, 1\)"),
        (dict(backend="cuda"), ValueError, "backend must be one of .'auto', 'reference', 'native', 'triton'"),
        (dict(weight=NF4Weight.quantize(w, 64), backend="cuda"), ValueError,
         "backend must be one of .'auto', 'reference', 'native', 'triton'"),
    ]:
        args = dict(x=x, weight=w, bias=b, lora_A=As, lora_B=Bs, scaling=1.0, adapter_index=idx)
        args.update(kwargs)
        with pytest.raises(exc, match=match):
            multi_lora_linear(**args)


# -- PEFT's mixed batch ---------------------------------------------------------------------------

def _peft_model():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = peft.get_peft_model(PeftBlock(), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q", "up", "down"],
                                                         init_lora_weights=False))
    model.add_adapter("b", peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q", "up", "down"],
                                           init_lora_weights=False))
    model.add_adapter("c", peft.LoraConfig(r=16, lora_alpha=4, target_modules=["q", "up"], init_lora_weights=False,
                                           use_rslora=True))
    return peft, model.eval()


def test_fuse_serves_peft_mixed_batches(monkeypatch):
    """model(x, adapter_names=[...]) on a fused model: PEFT's output, served by multi_lora_linear on
    every layer (an adapter a layer lacks, and "__base__", give the base alone)."""
    import lorakern.integrations.peft as integration

    _, model = _peft_model()
    x = torch.randn(5, 7, 48)
    names = ["default", "b", "__base__", "c", "b"]
    with torch.no_grad():
        want = model(x, adapter_names=names)
        integration.fuse(model)
        calls = []
        real = integration.multi_lora_linear
        monkeypatch.setattr(integration, "multi_lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
        with warnings.catch_warnings():
            warnings.filterwarnings("error", "lorakern.integrations.peft")  # no fallback to PEFT
            got = model(x, adapter_names=names)
    assert len(calls) == 3
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_stacked_adapters_are_kept_while_no_adapter_changes():
    """On CUDA a fused mixed batch passes the adapters stacked: for serving, one stack per layer is
    kept until an adapter changes (in place, by load_state_dict, or replaced); training stacks per
    call with the grads flowing back. The stacks serve PEFT's mixed batch output (Triton kernels)."""
    from lorakern.integrations.peft import stacked_adapters

    _, model = _peft_model()
    layer = model.base_model.model.up  # adapters default (r=8), b (r=4), c (r=16)
    names = ["b", "default", "c"]
    x = torch.randn(6, 48)
    with torch.no_grad():
        A, B, ranks = stacked_adapters(layer, names, x)
        assert ranks == [4, 8, 16] and A.shape == (3, 16, 48) and B.shape == (3, 72, 16)
        for a, n in enumerate(names):
            r = ranks[a]
            assert torch.equal(A[a, :r], layer.lora_A[n].weight) and not A[a, r:].any()
            assert torch.equal(B[a, :, :r], layer.lora_B[n].weight) and not B[a, :, r:].any()
        again = stacked_adapters(layer, names, x)
        assert again[0] is A and again[1] is B, "unchanged adapters: the kept stacks"
        assert stacked_adapters(layer, names, x.double())[0].dtype == torch.float64
        layer.lora_A["b"].weight.add_(1.0)  # an in-place write (an optimizer step)
        A2 = stacked_adapters(layer, names, x)[0]
        assert torch.equal(A2[0, :4], layer.lora_A["b"].weight)
        state = {k: v + 1 for k, v in model.state_dict().items() if "lora_B.c" in k}
        model.load_state_dict(state, strict=False)
        B3 = stacked_adapters(layer, names, x)[1]
        assert torch.equal(B3[2], layer.lora_B["c"].weight)
        layer.lora_A["default"].weight = torch.nn.Parameter(torch.randn(8, 48))  # replaced
        A4 = stacked_adapters(layer, names, x)[0]
        assert torch.equal(A4[1, :8], layer.lora_A["default"].weight)
        index = torch.tensor([0, 2, -1, 1, 1, 0])
        want = layer(x, adapter_names=[(names + ["__base__"])[i] for i in index.tolist()])
        device = _triton_device()
        got = multi_lora_linear(x.to(device), layer.base_layer.weight.to(device), layer.base_layer.bias.to(device),
                                A4.to(device), B3.to(device), [layer.scaling[n] for n in names], index.to(device),
                                ranks=ranks, backend="triton")
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
    for p in layer.parameters():
        p.requires_grad_(False)
    for n in names:
        layer.lora_A[n].weight.requires_grad_(True)
        layer.lora_B[n].weight.requires_grad_(True)
    A5, B5, _ = stacked_adapters(layer, names, x)  # training: stacked per call, grads flow back
    assert A5 is not stacked_adapters(layer, names, x)[0]
    (A5.sum() + B5.sum()).backward()
    assert all(layer.lora_A[n].weight.grad is not None and layer.lora_B[n].weight.grad is not None for n in names)


def test_peft_mixed_batch_errors_are_peft_s():
    """What PEFT refuses in a mixed batch (a wrong number of names, DoRA) it still refuses fused."""
    peft, model = _peft_model()
    import lorakern.integrations.peft as integration

    model.add_adapter("d", peft.LoraConfig(r=4, target_modules=["q"], use_dora=True))
    integration.fuse(model)
    x = torch.randn(3, 48)
    with pytest.raises(ValueError, match="Length of `adapter_names`"):
        model(x, adapter_names=["default", "b"])
    with pytest.raises(ValueError, match="DoRA"):
        model(x, adapter_names=["default", "d", "b"])


def _native_or_skip():
    from lorakern.nf4 import native

    if native.unavailable_reason(torch.device("cpu")) is not None:
        pytest.skip("lorakern._C not built")
    return native


def _isas():
    from lorakern.nf4 import native

    return native.extension().available_isas() if native.unavailable_reason(torch.device("cpu")) is None else []


def _count_calls(monkeypatch, module, name: str) -> list:
    """A list that gets an entry per call of ``module.name`` (which still runs)."""
    calls = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("M", [1, 5, 12, 16])
def test_nf4_serving_in_the_native_kernel(M, double_quant, isa, monkeypatch):
    """Inference on an NF4 base at M <= 16 on the CPU, every CPU path forced: each row's adapter
    term is added inside the native decode kernel (ranks 1 to 64 mixed, -1 rows, no bias, adapters
    not stacked), against the float64 definition on the dequantized weight, within 2x fp32 torch's
    error."""
    native = _native_or_skip()
    x, w, b, As, Bs = inputs((M,), 128, 40, RANKS, torch.float32, seed=M)
    weight = NF4Weight.quantize(w, 64, double_quant=double_quant)
    index = torch.tensor([3, -1, 0, 2, 1] * 4)[:M]
    scalings = [0.5, 2.0, 1.0, 0.25]
    calls = _count_calls(monkeypatch, native, "cpu_multi_forward")
    for bias in (b, None):
        with torch.no_grad():
            y = multi_lora_linear(x, weight, bias, As, Bs, scalings, index, backend="native")
        assert calls.pop() == 1 and not calls
        w_ref = weight.dequantize(torch.float32)
        y64 = multi_lora_linear_reference(x.double(), w_ref.double(), None if bias is None else bias.double(),
                                          [A.double() for A in As], [B.double() for B in Bs], scalings, index)
        y32 = multi_lora_linear_reference(x, w_ref, bias, As, Bs, scalings, index)
        assert_close_like_torch("y", y, y64, y32, torch.float32)


@pytest.mark.parametrize("M", [17, 40])
def test_nf4_serving_above_16_rows_adds_the_native_terms(M, monkeypatch):
    """Inference on an NF4 base above 16 rows on the CPU: the tiled decode for the base, then one
    native call for every row's adapter term (not the torch loop), against the float64 definition
    on the dequantized weight."""
    native = _native_or_skip()
    x, w, b, As, Bs = inputs((M,), 128, 40, RANKS, torch.float32, seed=M)
    weight = NF4Weight.quantize(w, 64, double_quant=True)
    index = torch.randint(-1, 4, (M,), generator=torch.Generator().manual_seed(M))
    scalings = [0.5, 2.0, 1.0, 0.25]
    calls = _count_calls(monkeypatch, native, "cpu_lora_terms")
    with torch.no_grad():
        y = multi_lora_linear(x, weight, b, As, Bs, scalings, index)
    assert calls == [1]
    w_ref = weight.dequantize(torch.float32)
    y64 = multi_lora_linear_reference(x.double(), w_ref.double(), b.double(), [A.double() for A in As],
                                      [B.double() for B in Bs], scalings, index)
    y32 = multi_lora_linear_reference(x, w_ref, b, As, Bs, scalings, index)
    assert_close_like_torch("y", y, y64, y32, torch.float32)


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("M,K,N,ranks", [
    (0, 48, 40, (8,)),
    (1, 33, 70, (1, 8)),
    (37, 100, 130, RANKS),        # K and N off every vector and block size, ranks 1 to 64 mixed
    (70, 128, 128, (16, 3, 64)),  # > 16 rows per adapter (several h pieces), whole 64-column blocks
    (9, 64, 200, (256, 2)),       # rank 256
])
def test_dense_serving_in_the_native_terms(isa, M, K, N, ranks, monkeypatch):
    """Inference on a dense base on the CPU: the base by torch, every row's adapter term by one
    native call (each ISA forced), against the float64 definition within 2x fp32 torch's error;
    -1 rows, adapters without rows, bias or none."""
    native = _native_or_skip()
    monkeypatch.setattr(native, "cpu_isa", lambda: isa)
    x, w, b, As, Bs = inputs((M,), K, N, ranks, torch.float32, seed=M + K)
    n = len(ranks)
    index = torch.randint(-1, n, (M,), generator=torch.Generator().manual_seed(M))
    if M > 1:
        index[index == n - 1] = 0  # the last adapter has no rows
    scalings = [0.5 + i for i in range(n)]
    calls = _count_calls(monkeypatch, native, "cpu_lora_terms")
    for bias in (b, None):
        with torch.no_grad():
            y = multi_lora_linear(x, w, bias, As, Bs, scalings, index, backend="native")
        assert calls.pop() == 1 and not calls
        bias64 = None if bias is None else bias.double()
        y64 = multi_lora_linear_reference(x.double(), w.double(), bias64, [A.double() for A in As],
                                          [B.double() for B in Bs], scalings, index)
        y32 = multi_lora_linear_reference(x, w, bias, As, Bs, scalings, index)
        assert y.shape == (M, N)
        if M:
            assert_close_like_torch("y", y, y64, y32, torch.float32)


def test_dense_native_terms_strided_x_3d_and_threads(monkeypatch):
    """x as rows of a wider tensor, x broadcast over its rows (row stride 0), a 3-D x with a 2-D
    index, stacked adapters with ranks: the native terms read x in place and equal the reference;
    1, 2 and 3 threads give the same bits."""
    native = _native_or_skip()
    x, w, b, As, Bs = inputs((40,), 96, 72, (16, 8, 4), torch.float32, seed=4)
    index = torch.randint(-1, 3, (40,), generator=torch.Generator().manual_seed(2))
    scalings = [1.5, 0.5, 2.0]
    wide = torch.randn(40, 150)
    wide[:, 7:103] = x
    cases = [(wide[:, 7:103], index), (x[3].expand(40, 96), index), (x.view(5, 8, 96), index.view(5, 8))]
    for xs, idx in cases:
        with torch.no_grad():
            y = multi_lora_linear(xs, w, b, As, Bs, scalings, idx, backend="native")
        x2d = xs.reshape(-1, 96).double()
        y64 = multi_lora_linear_reference(x2d, w.double(), b.double(), [A.double() for A in As],
                                          [B.double() for B in Bs], scalings, idx.reshape(-1))
        y32 = multi_lora_linear_reference(xs.reshape(-1, 96).contiguous(), w, b, As, Bs, scalings, idx.reshape(-1))
        assert_close_like_torch("y", y.reshape(-1, 72), y64, y32, torch.float32)
    stacked_A = torch.stack([torch.nn.functional.pad(A, (0, 0, 0, 16 - A.shape[0])) for A in As])
    stacked_B = torch.stack([torch.nn.functional.pad(B, (0, 16 - B.shape[1])) for B in Bs])
    with torch.no_grad():
        y_list = multi_lora_linear(x, w, b, As, Bs, scalings, index, backend="native")
        y_stacked = multi_lora_linear(x, w, b, stacked_A, stacked_B, scalings, index, backend="native",
                                      ranks=[16, 8, 4])
    assert torch.equal(y_list, y_stacked)
    threads = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            with torch.no_grad():
                outs.append(native.cpu_lora_terms(torch.zeros(40, 72), x, As, Bs, scalings, index))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_dense_native_terms_serve_inference_only(monkeypatch):
    """"auto" takes the native terms for inference on the CPU and torch autograd for training
    (saying why once); an explicit "native" that cannot serve the call raises with the reason."""
    _native_or_skip()
    x, w, b, As, Bs = inputs((6,), 16, 12, (4, 8), torch.float32)
    index = torch.tensor([0, 1, -1, 0, 1, 1])
    with torch.no_grad():
        y_auto = multi_lora_linear(x, w, b, As, Bs, 1.0, index)
        y_native = multi_lora_linear(x, w, b, As, Bs, 1.0, index, backend="native")
    assert torch.equal(y_auto, y_native)
    leaves = [A.clone().requires_grad_() for A in As]
    for kwargs, match in [
        (dict(lora_A=leaves), "a tensor requires grad"),
        (dict(dropout_p=0.1), "dropout in training"),
        (dict(x=x.bfloat16(), weight=w.bfloat16(), bias=b.bfloat16(), lora_A=[A.bfloat16() for A in As],
              lora_B=[B.bfloat16() for B in Bs]), "x is torch.bfloat16"),
        (dict(lora_B=[Bs[0], Bs[1].t().contiguous().t()]), r"lora_B\[1\]'s columns are strided"),
        (dict(x=torch.randn(16, 6).t()), "x's columns are strided"),
    ]:
        args = dict(x=x, weight=w, bias=b, lora_A=As, lora_B=Bs, scaling=1.0, adapter_index=index)
        args.update(kwargs)
        with pytest.raises(RuntimeError, match="backend='native' cannot serve cpu tensors: " + match):
            multi_lora_linear(**args, backend="native")
    monkeypatch.setattr(lorakern.backend, "_warned", set())
    with pytest.warns(UserWarning, match="uses the pure-torch reference path .a tensor requires grad"):
        y = multi_lora_linear(x, w, b, leaves, Bs, 1.0, index)
    y.sum().backward()
    assert torch.allclose(y.detach(), y_native, atol=1e-5) and all(A.grad is not None for A in leaves)


def test_native_adapter_tables_follow_scalings_ranks_and_addresses():
    """The native calls' adapter tables (addresses, ranks, scalings) are kept between calls: a new
    scaling, a new rank at the same address (stacked views), another
    adapter's tensor reusing a freed address, each gives the definition's output."""
    native = _native_or_skip()
    x, w, b, As, Bs = inputs((9,), 64, 40, (4, 8), torch.float32, seed=4)
    index = torch.tensor([0, 1, -1, 1, 0, 0, 1, 1, 0])
    weight = NF4Weight.quantize(w, 64)
    w_nf4 = weight.dequantize(torch.float32)

    def expect(y, base, As, Bs, scalings):
        y64 = multi_lora_linear_reference(x.double(), base.double(), b.double(), [A.double() for A in As],
                                          [B.double() for B in Bs], scalings, index)
        assert_close_like_torch("y", y, y64, multi_lora_linear_reference(x, base, b, As, Bs, scalings, index),
                                torch.float32)

    with torch.no_grad():
        for scalings in ([0.5, 2.0], [0.5, -1.0], [0.0, 2.0], [-0.0, 2.0], [0.5, 2.0]):
            for base in (w, weight):  # the dense base's terms, the NF4 decode kernel's (M <= 16)
                y = multi_lora_linear(x, base, b, As, Bs, scalings, index, backend="native")
                expect(y, w_nf4 if base is weight else w, As, Bs, scalings)
        stacked_A = torch.stack([torch.nn.functional.pad(A, (0, 0, 0, 8 - A.shape[0])) for A in As])
        stacked_B = torch.stack([torch.nn.functional.pad(B, (0, 8 - B.shape[1])) for B in Bs])
        stacked_A[0, 4:] = torch.randn(4, 64)  # rows past rank 4: used once adapter 0's rank is 8
        stacked_B[0, :, 4:] = torch.randn(40, 4)
        for ranks in ([4, 8], [8, 8], [4, 8], [8, 2]):
            y = multi_lora_linear(x, w, b, stacked_A, stacked_B, 1.5, index, ranks=ranks, backend="native")
            expect(y, w, [stacked_A[a, :r] for a, r in enumerate(ranks)],
                   [stacked_B[a, :, :r] for a, r in enumerate(ranks)], [1.5, 1.5])
        for seed in range(3):  # fresh adapters each time: the allocator may hand back the last ones' addresses
            fresh = inputs((9,), 64, 40, (4, 8), torch.float32, seed=10 + seed)
            y = multi_lora_linear(x, weight, b, fresh[3], fresh[4], 1.0, index, backend="native")
            expect(y, w_nf4, fresh[3], fresh[4], [1.0, 1.0])
    assert len(native._TABLES) <= native._TABLES_MAX


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_index_strided_narrow_or_expanded(nf4):
    """The index as a strided view, as int8, and expanded from one entry (stride 0): every path
    that serves the call on the CPU reads it as the contiguous int64 index it equals."""
    _native_or_skip()
    x, w, b, As, Bs = inputs((6,), 64, 40, (4, 8), torch.float32, seed=7)
    weight = NF4Weight.quantize(w, 64) if nf4 else w
    w_ref = weight.dequantize(torch.float32) if nf4 else w
    wide = torch.tensor([0, 9, 1, 9, -1, 9, 1, 9, 0, 9, 1, 9])
    for index in (wide[::2], wide[::2].to(torch.int8), torch.tensor([1]).expand(6)):
        flat = index.long().contiguous()
        y64 = multi_lora_linear_reference(x.double(), w_ref.double(), b.double(), [A.double() for A in As],
                                          [B.double() for B in Bs], [0.5, 2.0], flat)
        y32 = multi_lora_linear_reference(x, w_ref, b, As, Bs, [0.5, 2.0], flat)
        for backend in ("native", "reference"):
            with torch.no_grad():
                y = multi_lora_linear(x, weight, b, As, Bs, [0.5, 2.0], index, backend=backend)
            assert_close_like_torch("y", y, y64, y32, torch.float32)


def test_stacked_adapters_follow_writes_no_version_counter_sees():
    """fuse's stacks for the Triton kernels are written on every call: an in-place edit of an
    adapter made under torch.inference_mode() (no version counter), or one through ``.data`` (a
    counter of its own: PEFT's hotswap_adapter writes so), is in the next stack."""
    from lorakern.integrations.peft import stacked_adapters

    class Layer:  # what stacked_adapters reads of a PEFT layer
        pass

    with torch.inference_mode():
        layer = Layer()
        layer.lora_A = {n: torch.nn.Linear(16, r, bias=False) for n, r in (("a", 2), ("b", 4))}
        layer.lora_B = {n: torch.nn.Linear(r, 12, bias=False) for n, r in (("a", 2), ("b", 4))}
        x = torch.randn(3, 16)
        A, B, ranks = stacked_adapters(layer, ["a", "b"], x)
        assert ranks == [2, 4] and torch.equal(A[0, :2], layer.lora_A["a"].weight)
        before = A[0, :2].clone()
        layer.lora_A["a"].weight.mul_(2)
        A2, _, _ = stacked_adapters(layer, ["a", "b"], x)
        assert torch.equal(A2[0, :2], layer.lora_A["a"].weight) and not torch.equal(A2[0, :2], before)
    plain = Layer()
    plain.lora_A = {n: torch.nn.Linear(16, r, bias=False) for n, r in (("a", 2), ("b", 4))}
    plain.lora_B = {n: torch.nn.Linear(r, 12, bias=False) for n, r in (("a", 2), ("b", 4))}
    with torch.no_grad():
        _, B, _ = stacked_adapters(plain, ["a", "b"], x)
        before = B[1].clone()
        plain.lora_B["b"].weight.data.copy_(torch.randn(12, 4))
        _, B2, _ = stacked_adapters(plain, ["a", "b"], x)
    assert torch.equal(B2[1], plain.lora_B["b"].weight) and not torch.equal(B2[1], before)
    assert not B2[0, :, 2:].any()


def test_every_adapter_is_checked():
    """Each adapter after the first gets the checks the first gets (a quick test passes the
    common case; a failing one gets the whole check's message, naming the adapter), on a dense
    and an NF4 base; an index of many rows out of range is caught as a short one is."""
    x, w, b, As, Bs = inputs((6,), 16, 12, (4, 8, 2), torch.float32)
    idx = torch.tensor([0, 1, -1, 0, 2, 1])
    cases = [
        (dict(lora_A=[As[0], As[1], As[2].to("meta")]), ValueError, "adapter 2: lora_A: expected device cpu"),
        (dict(lora_B=[Bs[0], Bs[1], Bs[2].tolist()]), TypeError, "adapter 2: lora_B: expected a torch.Tensor"),
        (dict(lora_A=[As[0], torch.randn(8, 15), As[2]]), ValueError, r"adapter 1: lora_A: expected shape \[r, 16\]"),
        (dict(lora_A=[As[0], torch.randn(16), As[2]]), ValueError, "adapter 1: lora_A: expected 2-D"),
        (dict(lora_A=[As[0], torch.randn(0, 16), As[2]], lora_B=[Bs[0], torch.randn(12, 0), Bs[2]]), ValueError,
         "adapter 1: lora_A: expected 2-D .* with r >= 1"),
        (dict(lora_B=[Bs[0], Bs[1], torch.randn(12, 3)]), ValueError, r"adapter 2: lora_B: expected shape \[12, 2\]"),
        (dict(lora_B=[Bs[0], Bs[1], Bs[2].half()]), TypeError, "adapter 2: lora_B: expected dtype torch.float32"),
        (dict(scaling=[1.0, 2.0, float("inf")]), ValueError, "adapter 2: scaling: expected a finite number"),
        (dict(scaling=[1.0, float("nan"), 1.0]), ValueError, "adapter 1: scaling: expected a finite number"),
        (dict(dropout_p=[0.0, 0.0, -0.1]), ValueError, r"adapter 2: dropout_p: expected a probability in \[0, 1\)"),
    ]
    for weight in (w, NF4Weight.quantize(w, 32)):
        for kwargs, exc, match in cases:
            args = dict(x=x, weight=weight, bias=b, lora_A=As, lora_B=Bs, scaling=1.0, adapter_index=idx)
            args.update(kwargs)
            with pytest.raises(exc, match=match):
                multi_lora_linear(**args)
    # an NF4 base takes fp16, bf16 and fp32 only (the dense base any floating dtype)
    with pytest.raises(TypeError, match="adapter 0: x: expected float16, bfloat16 or float32"):
        multi_lora_linear(x.double(), NF4Weight.quantize(w, 32), None, [A.double() for A in As],
                          [B.double() for B in Bs], 1.0, idx)
    for M in (6, 300):  # a short index is checked from a list, a long one by one reduction
        xs = torch.randn(M, 16)
        for bad, shown in ((3, r"\[0, 3\]"), (-2, r"\[-2, 2\]")):
            index = torch.arange(M) % 3
            index[M // 2] = bad
            with pytest.raises(ValueError, match=r"adapter_index: expected values in \[-1, 2\] .* got " + shown):
                multi_lora_linear(xs, w, b, As, Bs, 1.0, index)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("M", [1, 5, 9, 16])
def test_nf4_serving_in_the_cuda_gemv(M, dtype, monkeypatch):
    """The same on CUDA: the NF4 GEMV adds each row's adapter term and the bias (h from one small
    kernel first), in x's dtype; ranks 1 to 64 mixed (rank 64: two passes of a warp's lanes), -1
    rows, M over one 8-row tile; against float64, within 2x torch's error in the dtype."""
    from lorakern.nf4 import native

    if native.unavailable_reason(torch.device("cuda")) is not None:
        pytest.fail(native.unavailable_reason(torch.device("cuda")))
    x, w, b, As, Bs = inputs((M,), 128, 40, RANKS, dtype, seed=M)
    weight = NF4Weight.quantize(w.float(), 64).to("cuda")
    index = torch.tensor([3, -1, 0, 2, 1] * 4)[:M]
    scalings = [0.5, 2.0, 1.0, 0.25]
    calls = _count_calls(monkeypatch, native, "cuda_multi_forward")
    w_ref = weight.dequantize(dtype).cpu()
    for bias in (b, None):
        with torch.no_grad():
            y = multi_lora_linear(x.cuda(), weight, None if bias is None else bias.cuda(), [A.cuda() for A in As],
                                  [B.cuda() for B in Bs], scalings, index.cuda())
        assert calls.pop() == 1 and not calls
        y64 = multi_lora_linear_reference(x.double(), w_ref.double(), None if bias is None else bias.double(),
                                          [A.double() for A in As], [B.double() for B in Bs], scalings, index)
        same = multi_lora_linear_reference(x, w_ref, bias, As, Bs, scalings, index)
        assert_close_like_torch(f"y M={M}", y.cpu(), y64, same, dtype)
