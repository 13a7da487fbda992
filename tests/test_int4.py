"""The group-wise INT4 base and QA-LoRA on it: the format against its formula (float64), GPTQ import
against the documented layout packed here element by element, the pooled op and its grads against
float64 autograd (PEFT's convention, checked against PEFT's own QA-LoRA forward), merge into the zero
points, and bad inputs."""

from __future__ import annotations

import types

import pytest
import torch
from helpers import assert_close_like_torch
from torch import nn

from lorakern.dropout import apply_dropout
from lorakern.int4.format import INT4Weight, pack_codes, unpack_codes
from lorakern.int4.qalora import delta_per_group, merge_into, pool, qalora_linear, qalora_linear_reference
from lorakern.nf4 import native


def formula(w: INT4Weight) -> torch.Tensor:
    """W[o, i] = scale[o, i // G] * (q[o, i] - zero[o, i // G]), element by element in float64."""
    q = unpack_codes(w.codes).double()
    g = torch.arange(w.shape[1]) // w.group_size
    return w.scales.double()[:, g] * (q - w.zeros.double()[:, g])


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [False, True])
def test_quantize_dequantize_is_the_formula_and_round_to_nearest(group_size, symmetric):
    W = torch.randn(37, 3 * 128, dtype=torch.float64) * 0.05
    w = INT4Weight.quantize(W, group_size, symmetric=symmetric)
    assert w.codes.shape == (37, 192) and w.scales.shape == (37, 384 // group_size)
    torch.testing.assert_close(w.dequantize(torch.float64), formula(w), rtol=0, atol=0)
    # round to nearest: every weight within half a step of its group's grid (the grid covers the range)
    g = torch.arange(384) // group_size
    err = (w.dequantize(torch.float64) - W).abs()
    assert bool((err <= w.scales.double()[:, g] / 2 * (1 + 1e-6)).all())
    assert w.nbytes() == 37 * 192 + 2 * 4 * w.scales.numel()


def test_pack_unpack_round_trip():
    q = torch.randint(0, 16, (5, 64))
    assert torch.equal(unpack_codes(pack_codes(q)), q)
    assert int(pack_codes(torch.tensor([[3, 12]]))[0, 0]) == (3 << 4) | 12  # column 2j in the high nibble (NF4's)


def gptq_pack(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int, v1: bool):
    """GPTQ's layout written element by element from its description: qweight[k, o] holds input rows
    8k..8k+7 of column o, row 8k+j at bits 4j; qzeros[g, c] output columns 8c..8c+7 the same way;
    v1 stores zero - 1. ``q`` [out, in], ``zeros``/``scales`` [out, groups]."""
    out_features, in_features = q.shape
    qweight = torch.zeros(in_features // 8, out_features, dtype=torch.int64)
    for k in range(in_features // 8):
        for j in range(8):
            qweight[k] |= q[:, 8 * k + j].long() << (4 * j)
    stored = zeros.long() - (1 if v1 else 0)
    qzeros = torch.zeros(in_features // group_size, out_features // 8, dtype=torch.int64)
    for c in range(out_features // 8):
        for j in range(8):
            qzeros[:, c] |= stored[8 * c + j, :] << (4 * j)
    to32 = lambda t: torch.where(t >= 2**31, t - 2**32, t).to(torch.int32)  # noqa: E731
    g_idx = torch.arange(in_features, dtype=torch.int32) // group_size
    return to32(qweight), to32(qzeros), scales.t().half(), g_idx


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_gptq_import_is_exact(fmt):
    out_features, in_features, G = 24, 256, 64
    q = torch.randint(0, 16, (out_features, in_features))
    zeros = torch.randint(1, 16, (out_features, in_features // G)).float()
    scales = (torch.rand(out_features, in_features // G) * 0.01 + 0.001).half().float()
    qweight, qzeros, scales16, g_idx = gptq_pack(q, zeros, scales, G, v1=fmt == "gptq")
    w = INT4Weight.from_gptq(qweight, qzeros, scales16, g_idx, group_size=G, checkpoint_format=fmt)
    g = torch.arange(in_features) // G
    want = scales.double()[:, g] * (q.double() - zeros.double()[:, g])
    assert torch.equal(w.dequantize(torch.float64), want)
    # and back: integer zeros and fp16 scales export without error, to the same tensors
    tensors, error = w.to_gptq(fmt)
    assert error == 0.0
    for name, t in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales16), ("g_idx", g_idx)):
        assert torch.equal(tensors[name], t), name


def test_gptq_import_errors():
    q = torch.randint(0, 16, (16, 128))
    qweight, qzeros, scales, g_idx = gptq_pack(q, torch.full((16, 2), 8.0), torch.ones(16, 2) * 0.01, 64, True)
    with pytest.raises(ValueError, match="qzeros: expected shape \\[2, 2\\]"):
        INT4Weight.from_gptq(qweight, qzeros[:1], scales, group_size=64)
    with pytest.raises(ValueError, match="scales: expected shape \\[2, 16\\]"):
        INT4Weight.from_gptq(qweight, qzeros, scales.t(), group_size=64)
    with pytest.raises(TypeError, match="qweight: expected a 2-D int32"):
        INT4Weight.from_gptq(qweight.long(), qzeros, scales, group_size=64)
    with pytest.raises(NotImplementedError, match="act-order"):
        INT4Weight.from_gptq(qweight, qzeros, scales, g_idx.flip(0), group_size=64)
    with pytest.raises(ValueError, match="group_size 128 does not divide|group_size: expected"):
        INT4Weight.from_gptq(qweight[:4], qzeros[:1], scales[:1], group_size=128)
    with pytest.raises(ValueError, match="bits"):
        INT4Weight.from_gptq(qweight, qzeros, scales, group_size=64, bits=8)


def test_bad_weights_are_refused():
    with pytest.raises(ValueError, match="group_size 64 does not divide in_features 96"):
        INT4Weight.quantize(torch.randn(4, 96), 64)
    with pytest.raises(ValueError, match="group_size: expected one of"):
        INT4Weight.quantize(torch.randn(4, 96), 48)
    with pytest.raises(ValueError, match="weight: every value must be finite"):
        INT4Weight.quantize(torch.full((4, 64), float("nan")), 32)
    w = INT4Weight.quantize(torch.randn(4, 64), 32)
    with pytest.raises(ValueError, match="scales: every scale must be finite and nonzero"):
        INT4Weight(w.codes, torch.zeros_like(w.scales), w.zeros, 32, (4, 64))
    with pytest.raises(ValueError, match="zeros: expected shape \\[4, 2\\]"):
        INT4Weight(w.codes, w.scales, w.zeros.t(), 32, (4, 64))
    with pytest.raises(TypeError, match="codes: expected a uint8"):
        INT4Weight(w.codes.int(), w.scales, w.zeros, 32, (4, 64))


SHAPES = [((7, 192), 64, 37, 1), ((2, 5, 256), 32, 19, 16), ((3, 128), 128, 40, 8)]


@pytest.mark.parametrize("x_shape,G,out_features,r", SHAPES)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_qalora_matches_float64_autograd(x_shape, G, out_features, r, dropout_p):
    in_features = x_shape[-1]
    w = INT4Weight.quantize(torch.randn(out_features, in_features, dtype=torch.float64), G)
    W = w.dequantize(torch.float64)
    A = torch.randn(r, in_features // G, dtype=torch.float64, requires_grad=True)
    B = torch.randn(out_features, r, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(out_features, dtype=torch.float64, requires_grad=True)
    x = torch.randn(*x_shape, dtype=torch.float64)[..., :in_features].requires_grad_(True)
    seed = torch.tensor(11)
    y = qalora_linear(x, w, bias, A, B, 0.7, dropout_p, training=True, seed=seed)
    ref = qalora_linear_reference(x, W, bias, A, B, 0.7, G, dropout_p, seed)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, A, B, bias], dy)
    want = torch.autograd.grad(ref, [x, A, B, bias], dy)
    for name, a, b in zip(("x", "A", "B", "bias"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("x_shape,G,out_features,r", SHAPES)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_qalora_triton_matches_float64(x_shape, G, out_features, r, dropout_p, dtype):
    """The Triton path (the LoRA GEMM on the decoded W with h = pool(x) A^T; dx's rank part through
    A's columns repeated G times; in the interpreter without a GPU): output and every grad within
    2x the error of the same definition run in the dtype, against float64, dropout masks the
    reference's for the same seed, x strided."""
    from lorakern.backend import interpreting

    if not (torch.cuda.is_available() or interpreting()):
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    in_features = x_shape[-1]
    w = INT4Weight.quantize(torch.randn(out_features, in_features) * in_features**-0.5, G)
    g = torch.Generator().manual_seed(5)
    A = torch.randn(r, in_features // G, generator=g) * 0.3
    B = torch.randn(out_features, r, generator=g) * r**-0.5
    bias = torch.randn(out_features, generator=g)
    x = torch.randn(*x_shape[:-1], in_features + 5, generator=g)[..., 5:]
    dy = torch.randn(*x_shape[:-1], out_features, generator=g)
    seed = torch.tensor(11)

    def run(dt, dev, W=None, backend=None):
        leaves = [t.detach().to(dev, dt).requires_grad_() for t in (x, A, B, bias)]
        if W is None:
            y = qalora_linear(leaves[0], w.to(dev), leaves[3], leaves[1], leaves[2], 0.7, dropout_p, training=True,
                              seed=seed.to(dev), backend=backend)
        else:
            y = qalora_linear_reference(leaves[0], W.to(dt), leaves[3], leaves[1], leaves[2], 0.7, G, dropout_p, seed)
        y.backward(dy.to(dev, dt))
        return [y.detach().cpu()] + [t.grad.cpu() for t in leaves]

    got = run(dtype, device, backend="triton")
    ref64 = run(torch.float64, "cpu", W=w.dequantize(torch.float64))
    same = run(dtype, "cpu", W=w.dequantize(dtype))
    for name, a, b, c in zip(("y", "dx", "dA", "dB", "dbias"), got, ref64, same):
        assert_close_like_torch(f"{name} {x_shape} G={G} r={r} p={dropout_p}", a, b, c, dtype)


def test_qalora_triton_decodes_w_per_call_and_saves_no_dense_w(monkeypatch):
    """Training on the Triton path holds no dense W between forward and backward: it is decoded
    in each (two decodes a step) and the saved tensors are the pooled input, h and the adapter."""
    from lorakern.backend import interpreting
    from lorakern.ops import bases

    if not (torch.cuda.is_available() or interpreting()):
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    G = 32
    w = INT4Weight.quantize(torch.randn(48, 128), G).to(device)
    A = torch.randn(4, 4, device=device, requires_grad=True)
    B = torch.randn(48, 4, device=device, requires_grad=True)
    x = torch.randn(20, 128, device=device, requires_grad=True)
    decodes = []
    real = bases.INT4Base.dequantize
    monkeypatch.setattr(bases.INT4Base, "dequantize", lambda self, *a: decodes.append(a) or real(self, *a))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = qalora_linear(x, w, None, A, B, 1.0, 0.2, training=True, backend="triton")
    assert len(decodes) == 1 and not [t for t in saved if t.numel() >= 48 * 128]
    y.sum().backward()
    assert len(decodes) == 2


def test_qalora_backend_requests():
    w = INT4Weight.quantize(torch.randn(8, 64), 32)
    x, A, B = torch.randn(2, 64), torch.randn(2, 2), torch.randn(8, 2)
    with pytest.raises(ValueError, match="backend must be one of .*'triton'"):
        qalora_linear(x, w, None, A, B, 1.0, backend="cuda")
    y = qalora_linear(x, w, None, A, B, 1.0, backend="reference")
    torch.testing.assert_close(y, qalora_linear(x, w, None, A, B, 1.0, backend="native"), rtol=1e-6, atol=1e-6)


def test_qalora_fp32_against_float64_and_non_contiguous_x():
    G = 64
    w = INT4Weight.quantize(torch.randn(33, 256), G)
    A, B = torch.randn(8, 4), torch.randn(33, 8)
    x = torch.randn(9, 300)[:, 20:276]  # rows strided
    y = qalora_linear(x, w, None, A, B, 0.5)
    ref = qalora_linear_reference(x.double(), w.dequantize(torch.float64), None, A.double(), B.double(), 0.5, G)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4)


def test_pooling_is_peft_qalora_convention():
    """The pooled term equals PEFT's ``QALoraLinearVariant.forward`` (group mean times in // G), so
    adapters trained in either move to the other."""
    variants = pytest.importorskip("peft.tuners.lora.variants")
    G, in_features, out_features, r = 32, 128, 12, 4
    A, B = torch.nn.Linear(in_features // G, r, bias=False), torch.nn.Linear(r, out_features, bias=False)
    module = types.SimpleNamespace(lora_A={"a": A}, lora_B={"a": B}, lora_dropout={"a": torch.nn.Identity()},
                                   scaling={"a": 0.25}, qalora_group_size={"a": G}, in_features=in_features,
                                   training=False)
    x = torch.randn(2, 3, in_features)
    peft_delta = variants.QALoraLinearVariant.forward(module, "a", x, torch.zeros(2, 3, out_features))
    w = INT4Weight.quantize(torch.zeros(out_features, in_features), G)  # all-zero base: y is the adapter term
    with torch.no_grad():
        ours = qalora_linear(x, w, None, A.weight, B.weight, 0.25)
    torch.testing.assert_close(ours, peft_delta, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("G", [32, 64, 128])
def test_merge_into_the_zero_points_is_exact_to_fp32(G):
    """Merged (adapter folded into the zeros, still INT4) against unmerged: relative error <= 1e-6
    in fp32 on random inputs, at a real size."""
    torch.manual_seed(1)
    w = INT4Weight.quantize(torch.randn(512, 1024) * 0.02, G)
    A, B = torch.randn(16, 1024 // G) * 0.05, torch.randn(512, 16) * 0.05
    x = torch.randn(64, 1024)
    unmerged = qalora_linear(x, w, None, A, B, 2.0)
    merged = merge_into(w, A, B, 2.0)
    assert torch.equal(merged.codes, w.codes) and torch.equal(merged.scales, w.scales)
    y = x @ merged.dequantize().t()
    rel = ((y - unmerged).norm() / unmerged.norm()).item()
    assert rel <= 1e-6, rel
    # the dense form of the same update, in float64, for the record of what the merge adds
    dense = w.dequantize(torch.float64) + delta_per_group(A.double(), B.double(), 2.0, G).repeat_interleave(G, 1)
    torch.testing.assert_close(merged.dequantize(torch.float64), dense, rtol=0, atol=1e-6)
    # GPTQ's integer zeros round the merged ones: an error the export reports
    _, error = merged.to_gptq()
    assert error > 1e-4


def test_qalora_empty_batch_forward_and_backward():
    w = INT4Weight.quantize(torch.randn(12, 128), 64)
    x = torch.randn(0, 128, requires_grad=True)
    A = torch.randn(3, 2, requires_grad=True)
    y = qalora_linear(x, w, None, A, torch.randn(12, 3), 0.5)
    assert y.shape == (0, 12)
    y.sum().backward()
    assert x.grad.shape == (0, 128) and not A.grad.any()


def test_qalora_bad_inputs():
    w = INT4Weight.quantize(torch.randn(8, 64), 32)
    A, B = torch.randn(2, 2), torch.randn(8, 2)
    x = torch.randn(3, 64)
    cases = [
        ((x, w, None, torch.randn(2, 64), B, 1.0), ValueError,
         r"lora_A: expected shape \[r, 2\] \(r, in_features / group_size\)"),
        ((x, w, None, torch.randn(0, 2), torch.randn(8, 0), 1.0), ValueError, r"lora_A: expected 2-D .* r >= 1"),
        ((x, w, None, A, torch.randn(2, 8), 1.0), ValueError, r"lora_B: expected shape \[8, 2\]"),
        ((x, w, torch.randn(7), A, B, 1.0), ValueError, r"bias: expected shape \[8\]"),
        ((torch.randn(3, 60), w, None, A, B, 1.0), ValueError, "x: expected last dim in_features=64"),
        ((x.double(), w, None, A, B, 1.0), TypeError, "lora_A: expected dtype torch.float64"),
        ((x.long(), w, None, A, B, 1.0), TypeError, "x: expected a floating-point tensor"),
        ((x, torch.randn(8, 64), None, A, B, 1.0), TypeError, "weight: expected an INT4Weight"),
        ((x, w, None, A.tolist(), B, 1.0), TypeError, "lora_A: expected a torch.Tensor, got list"),
        ((x.tolist(), w, None, A, B, 1.0), TypeError, "x: expected a torch.Tensor, got list"),
        ((x, w, None, A, B, float("nan")), ValueError, "scaling: expected a finite number"),
        ((x, w, None, A, B, float("inf")), ValueError, "scaling: expected a finite number"),
        ((x, w, None, A, B, "2"), ValueError, "scaling: expected a finite number"),
        ((x.to("meta"), w, None, A, B, 1.0), ValueError, "weight: expected device meta"),
        ((x, w, None, A.to("meta"), B, 1.0), ValueError, "lora_A: expected device cpu"),
    ]
    for args, error, match in cases:
        with pytest.raises(error, match=match):
            qalora_linear(*args)
    with pytest.raises(ValueError, match="dropout_p"):
        qalora_linear(x, w, None, A, B, 1.0, dropout_p=1.0, training=True)
    with pytest.raises(ValueError, match="seed: expected a 0-d int64 tensor on cpu"):
        qalora_linear(x, w, None, A, B, 1.0, dropout_p=0.1, training=True, seed=torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="seed: expected a torch.Tensor, got int"):
        qalora_linear(x, w, None, A, B, 1.0, dropout_p=0.1, training=True, seed=3)
    with pytest.raises(ValueError, match="dropout_p"):
        qalora_linear(x, w, None, A, B, 1.0, dropout_p=-0.1)  # refused in eval too: it is the layer's setting
    merge_cases = [
        ((w, torch.randn(2, 64), B, 1.0), ValueError, r"lora_A: expected shape \[r, 2\]"),
        ((w, A, torch.randn(7, 2), 1.0), ValueError, r"lora_B: expected shape \[8, 2\]"),
        ((w, A, B, float("nan")), ValueError, "scaling: expected a finite number"),
        ((w, None, B, 1.0), TypeError, "lora_A: expected a torch.Tensor"),
        ((w, A.long(), B, 1.0), TypeError, "lora_A: expected a floating-point tensor"),
        ((w.dequantize(), A, B, 1.0), TypeError, "weight: expected an INT4Weight"),
    ]
    for args, error, match in merge_cases:
        with pytest.raises(error, match=match):
            merge_into(*args)


def test_qalora_under_autocast_runs_in_the_autocast_dtype():
    """As nn.Linear under autocast: fp32 x and adapter, bf16 compute, bf16 out; the adapter's grads
    come back in its own fp32."""
    torch.manual_seed(0)
    w = INT4Weight.quantize(torch.randn(24, 64), 32)
    x = torch.randn(5, 64, requires_grad=True)
    A = torch.randn(3, 2, requires_grad=True)
    B = torch.randn(24, 3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = qalora_linear(x, w, None, A, B, 0.5)
    assert y.dtype == torch.bfloat16
    ref = qalora_linear_reference(x.double(), w.dequantize(torch.float64), None, A.double(), B.double(), 0.5, 32)
    assert torch.allclose(y.double(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    y.float().sum().backward()
    assert A.grad.dtype == torch.float32 and x.grad.dtype == torch.float32


def test_dropout_mask_is_regenerated_not_saved():
    """Backward saves the pooled input and h (1/G of x and less), not x and not a mask."""
    G = 64
    w = INT4Weight.quantize(torch.randn(16, 256), G)
    A, B = torch.randn(4, 4, requires_grad=True), torch.randn(16, 4, requires_grad=True)
    x = torch.randn(32, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        qalora_linear(x, w, None, A, B, 1.0, 0.2, training=True)
    big = [t for t in saved if t.numel() >= x.numel()]
    assert not big, [tuple(t.shape) for t in big]
    assert pool(apply_dropout(x.detach(), 0.0, None), G).shape == (32, 4)


def _qalora_llama(dtype, G=32, seed=0):
    """A tiny Llama whose seven projections are QALoRALinear over INT4 (from one fp32 model)."""
    pytest.importorskip("transformers")
    from helpers import tiny_llama

    from lorakern.int4.layer import QALoRALinear

    model = tiny_llama(seed)
    model.requires_grad_(False)
    torch.manual_seed(seed + 1)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    q = QALoRALinear.from_linear(child, r=4, lora_alpha=8, group_size=G)
                    with torch.no_grad():
                        q.lora_B.normal_(0, 0.1)  # act from step 0
                    setattr(parent, name, q)
    return model.to(dtype)


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_tiny_llama_qalora_trains_as_its_float64_reference_and_merges_exactly(backend):
    """Training target: an INT4-base Llama with QA-LoRA on all seven projections, fp32 (the default
    path, or the Triton kernels: on CUDA, or interpreted) against the same model in float64, losses
    equal step by step (SGD); then merged into the INT4 zero points, the model's loss equals the
    unmerged one's."""
    from lorakern.backend import interpreting
    from lorakern.int4.layer import QALoRALinear

    if backend == "triton" and not (torch.cuda.is_available() or interpreting()):
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    models = {dt: _qalora_llama(dt) for dt in (torch.float32, torch.float64)}
    if backend == "triton":  # on the device the kernels run on (float64 stays on the CPU reference)
        models[torch.float32].to("cuda" if torch.cuda.is_available() else "cpu")
        for m in models[torch.float32].modules():
            if isinstance(m, QALoRALinear):
                m.backend = "triton"
    params = {dt: [p for p in m.parameters() if p.requires_grad] for dt, m in models.items()}
    assert len(params[torch.float32]) == 2 * 7 * 2
    opts = {dt: torch.optim.SGD(ps, lr=0.5) for dt, ps in params.items()}
    g = torch.Generator().manual_seed(3)
    for step in range(4):
        ids = torch.randint(0, 64, (4, 16), generator=g)
        losses = {}
        for dt, m in models.items():
            dev_ids = ids.to(next(m.parameters()).device)
            loss = m(input_ids=dev_ids, labels=dev_ids).loss
            opts[dt].zero_grad()
            loss.backward()
            opts[dt].step()
            losses[dt] = loss.item()
        assert abs(losses[torch.float32] - losses[torch.float64]) <= 1e-5 * losses[torch.float64], (step, losses)
    model = models[torch.float32].eval()
    ids = torch.randint(0, 64, (4, 16), generator=g).to(next(model.parameters()).device)
    with torch.no_grad():
        before = model(input_ids=ids, labels=ids).loss.item()
        for m in model.modules():
            if isinstance(m, QALoRALinear):
                m.merge()
                assert not m.lora_B.any()
        after = model(input_ids=ids, labels=ids).loss.item()
    assert abs(after - before) <= 1e-6 * before, (before, after)


@pytest.mark.parametrize("merged", [False, True])
def test_qalora_layer_saves_and_loads_its_int4_base(merged):
    """The INT4 base is in the state_dict (codes, scales and the float zeros): a merged layer, saved
    and loaded into a fresh layer quantized from the same Linear (or torch.save'd whole), gives the
    output it had; strict loading names the missing base keys, an adapter-only state (strict=False)
    keeps the base, and a base of another shape or group size is refused."""
    import io

    from lorakern.int4.layer import QALoRALinear

    torch.manual_seed(0)
    lin = nn.Linear(128, 64)
    layer = QALoRALinear.from_linear(lin, r=4, group_size=32)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 128)
    with torch.no_grad():
        want = layer(x)
        if merged:
            layer.merge()
        state = layer.state_dict()
        assert {"weight_int4.codes", "weight_int4.scales", "weight_int4.zeros"} <= set(state)
        fresh = QALoRALinear.from_linear(lin, r=4, group_size=32)
        fresh.load_state_dict(state)
        torch.testing.assert_close(fresh(x), want, rtol=1e-5, atol=1e-5)
        assert torch.equal(fresh.weight_int4.zeros, layer.weight_int4.zeros)
        buf = io.BytesIO()
        torch.save(layer, buf)
        buf.seek(0)
        torch.testing.assert_close(torch.load(buf, weights_only=False)(x), want, rtol=1e-5, atol=1e-5)

        adapter_only = {k: v for k, v in state.items() if not k.startswith("weight_int4.")}
        with pytest.raises(RuntimeError, match="Missing key.*weight_int4.codes"):
            QALoRALinear.from_linear(lin, r=4, group_size=32).load_state_dict(adapter_only)
        kept = QALoRALinear.from_linear(lin, r=4, group_size=32)
        base = kept.weight_int4
        kept.load_state_dict(adapter_only, strict=False)
        assert kept.weight_int4 is base
        for bad, match in [
            ({**state, "weight_int4.codes": state["weight_int4.codes"][:10]}, "weight_int4"),
            (QALoRALinear.from_linear(nn.Linear(128, 64), r=4, group_size=64).state_dict(), "group_size 64"),
            ({**state, "weight_int4.scales": state["weight_int4.scales"][:, :3]}, "weight_int4.scales"),
        ]:
            with pytest.raises(RuntimeError, match=match):
                QALoRALinear.from_linear(lin, r=4, group_size=32).load_state_dict(bad)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_hqq_export_of_a_merged_layer(compute_dtype):
    """A merged QA-LoRA layer exported to HQQ (float zero points) and loaded by HQQ's own
    HQQLinear on the CPU: in float32 its dequantized W is the merged INT4 weight bit for bit and its
    output the merged layer's; in 16 bits the reported error is the one HQQ's dequantize makes."""
    hqq = pytest.importorskip("hqq.core.quantize")
    from lorakern.int4.layer import QALoRALinear

    torch.manual_seed(0)
    layer = QALoRALinear.from_linear(nn.Linear(256, 48), r=4, group_size=64)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 256)
    with torch.no_grad():
        want = layer(x)
        layer.merge()
        state, err = layer.weight_int4.to_hqq(compute_dtype, bias=layer.bias)
        loaded = hqq.HQQLinear(None, quant_config=None, initialize=False, compute_dtype=compute_dtype, device="cpu")
        loaded.load_state_dict(state)
        w = loaded.dequantize()
        own = layer.weight_int4.dequantize(torch.float32).double()
        assert abs(float((w.double() - own).norm() / own.norm()) - err) <= 1e-12
        if compute_dtype == torch.float32:
            assert err == 0.0 and torch.equal(w, layer.weight_int4.dequantize(torch.float32))
            torch.testing.assert_close(loaded(x), want, rtol=1e-5, atol=1e-5)
        else:
            assert 0.0 < err < 1e-2
    w4 = INT4Weight.quantize(torch.randn(3, 64), 64)
    with pytest.raises(ValueError, match="3 groups .* is odd"):
        w4.to_hqq()
    with pytest.raises(ValueError, match=r"bias: expected a tensor of shape \[48\]"):
        layer.weight_int4.to_hqq(bias=torch.zeros(47))
    with pytest.raises(ValueError, match="compute_dtype"):
        layer.weight_int4.to_hqq(torch.float64)


def test_int4_base_tiles_never_hold_the_whole_weight(monkeypatch):
    """INT4Base decodes W a row tile at a time: with tiles of 3 rows (37 rows: 13 tiles, the last
    short) the products and the QA-LoRA op are the untiled ones."""
    from lorakern.ops import bases

    w = INT4Weight.quantize(torch.randn(37, 128, dtype=torch.float64), 64)
    x, dy = torch.randn(5, 128, dtype=torch.float64), torch.randn(5, 37, dtype=torch.float64)
    W = w.dequantize(torch.float64)
    monkeypatch.setattr(bases, "TILE_ELEMENTS", 3 * 128)
    base = bases.INT4Base(w)
    assert len(list(bases.row_tiles(*base.shape))) == 13
    torch.testing.assert_close(base.linear(x, None), x @ W.t(), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(base.grad_input(dy), dy @ W, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(base.row_norms().double(), W.norm(dim=1), rtol=1e-6, atol=0)
    A = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    B = torch.randn(37, 2, dtype=torch.float64, requires_grad=True)
    xr = x.clone().requires_grad_(True)
    y = qalora_linear(xr, w, None, A, B, 0.3)
    ref = qalora_linear_reference(xr, W, None, A, B, 0.3, 64)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    g1 = torch.autograd.grad(y, [xr, A, B], dy)
    g2 = torch.autograd.grad(ref, [xr, A, B], dy)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# (out, in, G): odd out; weight rows in pairs with 1, 2 and 4 steps per group; in = 4096.
NATIVE_SHAPES = [(37, 192, 64), (16, 128, 32), (23, 384, 128), (9, 4096, 64)]


@pytest.mark.parametrize("out_features,in_features,G", NATIVE_SHAPES)
@pytest.mark.parametrize("M", [1, 2, 5, 16])
def test_native_int4_matmul_on_every_isa(isa, out_features, in_features, G, M):
    """The NF4 kernels with the table 0..15 plus the zero points' shift: both products against
    float64, on every CPU path; the automatic choice is the native one here."""
    from lorakern.ops.bases import INT4Base

    w = INT4Weight.quantize(torch.randn(out_features, in_features) * 0.05, G)
    base = INT4Base(w)
    W = w.dequantize(torch.float64)
    x = torch.randn(M, in_features + 3)[:, 3:]  # strided rows
    dy = torch.randn(M, out_features)
    assert base.native_serves(x)
    y = base.matmul(x, False, "native")
    dx = base.matmul(dy, True, "native")
    ref_y, ref_dx = x.double() @ W.t(), dy.double() @ W
    # fp32 sums of `in` (or `out`) products, each rounded twice (scale * q, then + shift * sum x)
    torch.testing.assert_close(y.double(), ref_y, rtol=1e-5, atol=1e-5 * ref_y.abs().max().item())
    torch.testing.assert_close(dx.double(), ref_dx, rtol=1e-5, atol=1e-5 * ref_dx.abs().max().item())
    torch.testing.assert_close(base.matmul(x, False), y, rtol=0, atol=0)


@pytest.mark.parametrize("out_features,in_features,G", NATIVE_SHAPES)
def test_native_int4_compact_parameters_give_the_pairs_bits(isa, out_features, in_features, G):
    """The CPU kernels read half scales + float32 shifts (6 bytes a group) where every scale is a
    normal half, else float32 (scale, shift) pairs: the same values, so the same bits, for the
    dequantize, both products and the one-call QLoRA forward with its LoRA term and bias, on
    every CPU path; a merged weight (float zeros) included."""
    from lorakern.int4.format import _NativeView

    w = INT4Weight.quantize(torch.randn(out_features, in_features) * 0.05, G)
    w = w.merged(torch.randn(out_features, in_features // G) * 1e-3)
    compact, pairs = _NativeView(w), _NativeView(w, compact=False)
    assert w.native_view().native_half_params is not None and compact.native_half_params is not None
    assert compact.native_half_params.numel() == 6 * w.scales.numel() and pairs.native_half_params is None
    assert w.kernel_nbytes() == w.codes.numel() + 6 * w.scales.numel()
    outs = []
    for view in (compact, pairs):
        got = [native.dequantize_into(view, torch.empty(out_features, in_features))]
        for M in (1, 5, 16):
            got.append(native.cpu_matmul(torch.randn(M, in_features, generator=torch.Generator().manual_seed(M)),
                                         view, False))
            got.append(native.cpu_matmul(torch.randn(M, out_features, generator=torch.Generator().manual_seed(M)),
                                         view, True))
        g = torch.Generator().manual_seed(1)
        x, A = torch.randn(3, in_features, generator=g), torch.randn(4, in_features, generator=g)
        B, bias = torch.randn(out_features, 4, generator=g), torch.randn(out_features, generator=g)
        got.extend(native.cpu_qlora_forward(x, view, bias, A, B, 0.5))
        outs.append(got)
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    torch.testing.assert_close(outs[0][0].double(), w.dequantize(torch.float64), rtol=0,
                               atol=4 * 2**-24 * w.dequantize(torch.float64).abs().max().item())


def test_int4_scales_are_halfs_where_a_half_holds_them():
    """quantize rounds each scale in a normal half's range to half (the compact native layout);
    a group whose scale is below it keeps its float32 scale, and that weight (like one built with
    any float32 scales) is read through float32 pairs, still matching its formula."""
    from lorakern.int4.format import HALF_MIN_NORMAL, _NativeView, half_exact

    W = torch.randn(6, 128) * 0.05
    W[2, :64] *= 1e-5  # a group of range ~1e-5: scale ~1e-6, a subnormal half
    w = INT4Weight.quantize(W, 64)
    normal = w.scales.abs() >= HALF_MIN_NORMAL
    assert not bool(normal[2, 0]) and bool(normal.sum() == normal.numel() - 1)
    assert torch.equal(w.scales[normal].half().float(), w.scales[normal])
    assert w.scales[2, 0] != w.scales[2, 0].half().float()
    assert not half_exact(w.scales) and w.native_view().native_half_params is None
    with pytest.raises(ValueError, match="compact: the scales are not all normal halfs"):
        _NativeView(w, compact=True)
    from lorakern.ops.bases import INT4Base

    x = torch.randn(3, 128)
    ref = x.double() @ w.dequantize(torch.float64).t()
    torch.testing.assert_close(INT4Base(w).matmul(x, False, "native").double(), ref, rtol=1e-5,
                               atol=1e-5 * ref.abs().max().item())
    odd = INT4Weight(w.codes, w.scales * (1 + 2**-20), w.zeros, 64, (6, 128))
    assert odd.native_view().native_half_params is None
    assert odd.kernel_nbytes() == odd.codes.numel() + 8 * odd.scales.numel()


def test_native_view_follows_in_place_edits_and_new_tensors():
    """The kernels' view of the block parameters is derived from scales and zeros: an in-place
    edit (a hand-made merge under no_grad) or a reassigned tensor is seen by the next native call,
    never a stale copy."""
    from lorakern.ops.bases import INT4Base

    w = INT4Weight.quantize(torch.randn(8, 128) * 0.05, 64)
    x = torch.randn(2, 128)
    before = INT4Base(w).matmul(x, False, "native")
    with torch.no_grad():
        w.zeros.sub_(0.5)  # every weight moves by +0.5 scale
    after = INT4Base(w).matmul(x, False, "native")
    ref = x.double() @ w.dequantize(torch.float64).t()
    torch.testing.assert_close(after.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    assert not torch.allclose(before, after)
    w.scales = w.scales * 2  # a new tensor (halfs stay halfs)
    ref = x.double() @ w.dequantize(torch.float64).t()
    torch.testing.assert_close(INT4Base(w).matmul(x, False, "native").double(), ref, rtol=1e-5,
                               atol=1e-5 * ref.abs().max().item())


def test_native_view_of_inference_mode_tensors():
    """Tensors made under torch.inference_mode() have no version counter: the view is built for
    every call there (an in-place edit inside inference_mode is seen), never cached, never an error."""
    from lorakern.ops.bases import INT4Base

    with torch.inference_mode():
        w = INT4Weight.quantize(torch.randn(8, 128) * 0.05, 64)
        x = torch.randn(2, 128)
        y = INT4Base(w).matmul(x, False, "native")
        ref = x.double() @ w.dequantize(torch.float64).t()
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
        w.zeros.sub_(0.5)
        ref = x.double() @ w.dequantize(torch.float64).t()
        after = INT4Base(w).matmul(x, False, "native")
        torch.testing.assert_close(after.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
        assert not torch.allclose(y, after)
        A, B = torch.randn(4, 2), torch.randn(8, 4)
        out = qalora_linear(x, w, None, A, B, 1.0, training=False)
        assert out.shape == (2, 8) and torch.isfinite(out).all()


def test_native_half_params_need_the_int4_shift():
    """The extension refuses compact INT4 parameters without the shift they carry (a caller bug,
    named), rather than reading them as NF4 scales."""
    w = INT4Weight.quantize(torch.randn(4, 64), 32)
    view = w.native_view()
    args = list(native.weight_args(view, 4, 64))
    args[9] = 0  # no shift
    x, y = torch.randn(1, 64), torch.empty(1, 4)
    with pytest.raises(ValueError, match="half_params need a shift"):
        native.extension().cpu_matmul(tuple(args), x.data_ptr(), 1, y.data_ptr(), False, "scalar", 1)


def test_native_int4_backend_refuses_what_it_cannot_serve():
    from lorakern.ops.bases import INT4Base

    base = INT4Base(INT4Weight.quantize(torch.randn(8, 64), 32))
    with pytest.raises(RuntimeError, match="backend='native' serves 1 to 16 rows of float32 .*17 rows"):
        base.matmul(torch.randn(17, 64), False, "native")
    with pytest.raises(RuntimeError, match="torch.float64"):
        base.matmul(torch.randn(2, 64, dtype=torch.float64), False, "native")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_native_int4_dequantize_on_every_isa(isa, dtype):
    """The native dequantize of an INT4 base (``q * scale``, then ``+ shift``, each rounded in
    fp32, then the dtype's rounding): the same bits on every CPU path, a weight view whose bytes
    start at an odd offset included, and within two fp32 roundings of the float64 formula."""
    from lorakern.ops.bases import INT4Base

    w = INT4Weight.quantize(torch.randn(37, 192) * 0.05, 64)
    got = INT4Base(w).dequantize(dtype, "native")
    scale_q = (unpack_codes(w.codes).float().reshape(37, 3, 64) * w.scales[..., None])
    expected = (scale_q + (-(w.scales * w.zeros))[..., None]).reshape(37, 192).to(dtype)
    assert torch.equal(got, expected)
    ref = w.dequantize(torch.float64)
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=4 * 2**-24 * ref.abs().max().item()
                               if dtype == torch.float32 else 2 ** -7 * ref.abs().max().item())
    odd = INT4Weight(torch.cat([torch.zeros(1, dtype=torch.uint8), w.codes.reshape(-1)])[1:].view(37, 96),
                     w.scales, w.zeros, 64, (37, 192))
    assert odd.codes.data_ptr() % 2 == 1
    assert torch.equal(INT4Base(odd).dequantize(dtype, "native"), got)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cuda_int4_gemv_and_dequantize(dtype):
    """The CUDA kernels with the INT4 table: the dequantize gives the CPU native dequantize's bits,
    the GEMV (M <= 16) and the dequantize-then-cuBLAS path (M > 16, and x W for the backward)
    against float64, a weight whose bytes start at an odd offset (the element-wise walk) included."""
    from lorakern.ops.bases import INT4Base

    if native.unavailable_reason(torch.device("cuda")) is not None:
        pytest.fail(native.unavailable_reason(torch.device("cuda")))
    for out_f, in_f, G in NATIVE_SHAPES:
        w = INT4Weight.quantize(torch.randn(out_f, in_f) * 0.05, G)
        raw = torch.cat([torch.zeros(1, dtype=torch.uint8), w.codes.reshape(-1)])
        odd = INT4Weight(raw[1:].view_as(w.codes), w.scales, w.zeros, G, (out_f, in_f))
        for cpu_w in (w, odd):
            wc = cpu_w.to("cuda")
            base = INT4Base(wc)
            assert torch.equal(base.dequantize(dtype, "native").cpu(), INT4Base(cpu_w).dequantize(dtype, "native"))
            w64 = wc.dequantize(torch.float64)
            for M in (1, 3, 8, 9, 16, 17, 64):
                for transpose in (False, True):
                    x = torch.randn(M, out_f if transpose else in_f, dtype=dtype, device="cuda")
                    ref = x.double() @ (w64 if transpose else w64.t())
                    wd = wc.dequantize(dtype)
                    same = x @ (wd if transpose else wd.t())
                    got = base.matmul(x, transpose, "auto")
                    assert_close_like_torch(f"cuda INT4 {(out_f, in_f, G)} M={M} T={transpose}", got, ref, same, dtype)


@pytest.mark.gpu
def test_qalora_on_cuda_matches_float64():
    """QA-LoRA forward and backward on CUDA (the INT4 GEMV at M <= 16, the decoded weight above)."""
    G = 64
    w = INT4Weight.quantize(torch.randn(37, 256) * 0.05, G)
    for M in (3, 40):
        x = torch.randn(M, 256, dtype=torch.float64)
        A, B, bias = torch.randn(8, 4) * 0.1, torch.randn(37, 8) * 0.1, torch.randn(37)
        dy = torch.randn(M, 37)
        leaves = [t.float().cuda().requires_grad_() for t in (x, A, B)]
        y = qalora_linear(leaves[0], w.to("cuda"), bias.cuda(), leaves[1], leaves[2], 0.5)
        y.backward(dy.cuda())
        ref_leaves = [t.double().requires_grad_() for t in (x, A, B)]
        ref = qalora_linear_reference(ref_leaves[0], w.dequantize(torch.float64), bias.double(), ref_leaves[1],
                                      ref_leaves[2], 0.5, G)
        ref.backward(dy.double())
        scale = ref.abs().max().item()
        torch.testing.assert_close(y.detach().cpu().double(), ref.detach(), rtol=1e-5, atol=1e-5 * scale)
        for got, want in zip(leaves, ref_leaves):
            torch.testing.assert_close(got.grad.cpu().double(), want.grad, rtol=1e-5,
                                       atol=1e-5 * want.grad.abs().max().item())


@pytest.mark.parametrize("M", [1, 3, 16, 17, 40])
def test_native_qalora_inference_is_one_call_and_matches_float64(isa, M, monkeypatch):
    """Under no_grad on the CPU the whole QA-LoRA layer is one native call (the pooled adapter term
    inside the kernel): against float64, on every CPU path, and no autograd Function runs. Above 16
    rows too where the native kernel takes x W^T (AVX2 / AVX-512, in_features % 32 == 0; the term
    then follows each chunk's base in column blocks); the plain C++ build keeps the tiles there."""
    from lorakern.int4 import qalora

    G = 64
    w = INT4Weight.quantize(torch.randn(37, 256) * 0.05, G)
    A, B, bias = torch.randn(8, 4) * 0.1, torch.randn(37, 8) * 0.1, torch.randn(37)
    x = torch.randn(M, 256)
    calls, real = [], qalora._QALoRA.apply
    monkeypatch.setattr(qalora._QALoRA, "apply", lambda *a: calls.append(a) or real(*a))
    with torch.no_grad():
        y = qalora_linear(x, w, bias, A, B, 0.5)
    assert len(calls) == (M > 16 and isa == "scalar")
    ref = qalora_linear_reference(x.double(), w.dequantize(torch.float64), bias.double(), A.double(), B.double(),
                                  0.5, G)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_native_int4_tiles_for_large_m(isa, monkeypatch):
    """M > 16: row tiles decoded by the native dequantize (table walk with the shift) and a BLAS
    matmul each, 4 rows a tile here (37 rows: 10 tiles, the last short)."""
    from lorakern.ops import bases

    w = INT4Weight.quantize(torch.randn(37, 192) * 0.05, 64)
    W = w.dequantize(torch.float64)
    monkeypatch.setattr(bases, "TILE_ELEMENTS", 4 * 192)
    base = bases.INT4Base(w)
    x, dy = torch.randn(40, 192), torch.randn(40, 37)
    torch.testing.assert_close(base.linear(x, None).double(), x.double() @ W.t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(base.grad_input(dy).double(), dy.double() @ W, rtol=1e-5, atol=1e-5)


def _autogptq_quant_linear():
    """AutoGPTQ's reference packer (``qlinear_cuda_old.QuantLinear.pack``, pure torch/numpy on the
    CPU), loaded from its file alone: the package's ``__init__`` does not import beside
    transformers 5. None where it is not found. Not a test dependency: the auto-gptq 0.7.1 wheel
    also installs a top-level ``tests`` package that shadows this suite's ``tests.helpers``. To run
    this oracle: ``pip install --no-deps --target DIR auto-gptq==0.7.1`` and set
    ``LORAKERN_AUTOGPTQ_DIR=DIR``."""
    import importlib.util
    import os

    root = os.environ.get("LORAKERN_AUTOGPTQ_DIR")
    if root is None:
        try:
            spec = importlib.util.find_spec("auto_gptq")
        except (ImportError, ValueError):
            return None
        if spec is None or not spec.submodule_search_locations:
            return None
        package = spec.submodule_search_locations[0]
    else:
        package = os.path.join(root, "auto_gptq")
    path = os.path.join(package, "nn_modules", "qlinear", "qlinear_cuda_old.py")
    if not os.path.exists(path):
        return None
    mod_spec = importlib.util.spec_from_file_location("_autogptq_qlinear_cuda_old", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod.QuantLinear


def test_gptq_import_matches_autogptq_packer():
    """A layer packed by AutoGPTQ's own packer (v1 checkpoint: zeros stored minus one) reads back
    exactly: our dequantize equals scale * (q - zero) of the q AutoGPTQ packed."""
    QuantLinear = _autogptq_quant_linear()
    if QuantLinear is None:
        pytest.skip("auto-gptq is not installed (see _autogptq_quant_linear for how to run this oracle)")
    torch.manual_seed(0)
    out_features, in_features, G = 64, 256, 64
    lin = nn.Linear(in_features, out_features, bias=False).half()
    groups = in_features // G
    scales = (torch.rand(out_features, groups) * 0.01 + 0.002).half().float()
    zeros = torch.randint(1, 16, (out_features, groups)).float()
    q = torch.randint(0, 16, (out_features, in_features)).float()
    g = torch.arange(in_features) // G
    with torch.no_grad():  # a weight exactly on the grid, so packing rounds nothing
        lin.weight.copy_((scales[:, g] * (q - zeros[:, g])).half())
    W = lin.weight.float()
    packer = QuantLinear(4, G, in_features, out_features, False)
    packer.pack(lin.float(), scales, zeros.clone(), g)
    w = INT4Weight.from_gptq(packer.qweight, packer.qzeros, packer.scales, packer.g_idx, group_size=G,
                             checkpoint_format="gptq")
    assert torch.equal(unpack_codes(w.codes), q.long())
    assert torch.equal(w.zeros, zeros)
    torch.testing.assert_close(w.dequantize(torch.float32), W, rtol=0, atol=1e-3 * W.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_qalora_half_inference_is_the_float32_call_rounded(isa, dtype):
    """QA-LoRA in bfloat16 / float16 on the CPU at 1 to 16 rows: the one native call computes in
    float32 and rounds y once, so it gives the float32 layer's bits on the same values, rounded
    (a strided bias included, float32 too: the call reads a contiguous copy)."""
    w = INT4Weight.quantize(torch.randn(37, 192) * 0.05, 64)
    for M in (1, 7, 16):
        x = torch.randn(M, 192).to(dtype)
        A, B = torch.randn(5, 3).to(dtype), torch.randn(37, 5).to(dtype)
        bias = torch.randn(37, 2).to(dtype)[:, 1]  # strided
        with torch.no_grad():
            got = qalora_linear(x, w, bias, A, B, 0.7, training=False)
            want = qalora_linear(x.float(), w, bias.float(), A.float(), B.float(), 0.7, training=False)
            strided32 = torch.stack([bias.float(), bias.float()], 1)[:, 0]
            got32 = qalora_linear(x.float(), w, strided32, A.float(), B.float(), 0.7, training=False)
        assert got.dtype == dtype and torch.equal(got, want.to(dtype)), (isa, M)
        assert torch.equal(got32, want), (isa, M)
