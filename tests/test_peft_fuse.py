"""lorakern.integrations.peft.fuse / unfuse on real PEFT models: same outputs, grads, Parameters,
state_dicts and saved adapters as plain PEFT; unsupported layers and calls left to PEFT."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
from lorakern.integrations.peft import fuse, is_fused, unfuse  # noqa: E402


class Block(nn.Module):
    def __init__(self, dim=48, hidden=72):
        super().__init__()
        self.q = nn.Linear(dim, dim, bias=False)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)
        self.emb = nn.Embedding(10, dim)

    def forward(self, x):
        return self.down(torch.relu(self.up(self.q(x)))) + x


def make_model(seed=0, **cfg):
    torch.manual_seed(seed)
    base = Block()
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q", "up", "down"], lora_dropout=0.0,
                             init_lora_weights=False, **cfg)
    return _spread_magnitudes(peft.get_peft_model(base, config))


def _spread_magnitudes(model):
    """DoRA starts at m = ||W + s B A|| (a scale of 1): spread m so that the scale m / n matters."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(torch.rand_like(p) + 0.5)
    return model


def outputs_and_grads(model, x):
    model.zero_grad()
    y = model(x)
    (y.square().mean()).backward()
    return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _served_by_op(monkeypatch, name="lora_linear"):
    """Count the calls the fused op serves (the rest went to PEFT's forward)."""
    import lorakern.integrations.peft as integration

    calls = []
    real = getattr(integration, name)
    monkeypatch.setattr(integration, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("use_dora", [False, True])
def test_fuse_matches_peft_outputs_and_grads(monkeypatch, use_dora):
    calls = _served_by_op(monkeypatch)
    model = make_model(use_dora=use_dora)
    x = torch.randn(3, 5, 48)
    y_ref, g_ref = outputs_and_grads(model, x)
    params_before = {n: p for n, p in model.named_parameters()}
    keys_before = list(model.state_dict())
    assert fuse(model) == 3
    assert all(is_fused(m) for n, m in model.named_modules() if n.endswith((".q", ".up", ".down")))
    y, g = outputs_and_grads(model, x)
    assert len(calls) == 3, "the fused op must serve all three layers"
    torch.testing.assert_close(y, y_ref)
    for n in g_ref:
        torch.testing.assert_close(g[n], g_ref[n], msg=n)
    assert all(p is params_before[n] for n, p in model.named_parameters()), "Parameters must be the same objects"
    assert list(model.state_dict()) == keys_before
    assert unfuse(model) == 3
    torch.testing.assert_close(outputs_and_grads(model, x)[0], y_ref)
    assert len(calls) == 3, "unfused: PEFT's forward again"


@pytest.mark.parametrize("use_dora", [False, True])
def test_optimizer_built_before_fuse_trains_the_same(use_dora):
    x = torch.randn(4, 48)
    losses = []
    for do_fuse in (False, True):
        model = make_model(seed=1, use_dora=use_dora)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        if do_fuse:
            fuse(model)
        run = []
        for _ in range(3):
            opt.zero_grad()
            loss = model(x).square().mean()
            loss.backward()
            opt.step()
            run.append(loss.item())
        losses.append(run)
    assert losses[0][-1] < losses[0][0]
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]))


@pytest.mark.parametrize("use_dora", [False, True])
def test_save_pretrained_round_trips_with_plain_peft(tmp_path, use_dora):
    model = make_model(seed=2, use_dora=use_dora)
    fuse(model)
    x = torch.randn(2, 48)
    with torch.no_grad():
        model.base_model.model.q.lora_B["default"].weight.normal_()
        y_fused = model(x)  # DoRA: with spread magnitudes, which a fresh DoRA init (m = ||W + s B A||) lacks
    model.save_pretrained(tmp_path / "fused")
    torch.manual_seed(2)
    plain = peft.PeftModel.from_pretrained(Block(), tmp_path / "fused")
    with torch.no_grad():
        torch.testing.assert_close(plain(x), y_fused)
    # ...and the other way: plain PEFT's adapter into a fused model.
    plain.save_pretrained(tmp_path / "plain")
    torch.manual_seed(2)
    again = peft.PeftModel.from_pretrained(Block(), tmp_path / "plain")
    fuse(again)
    with torch.no_grad():
        torch.testing.assert_close(again(x), y_fused)


def test_unsupported_layers_and_calls_fall_back_to_peft():
    model = make_model(lora_bias=True)
    with pytest.warns(UserWarning, match="left to PEFT .*lora_bias=True"):
        assert fuse(model) == 0
    # Two adapters active on a layer, one with dropout, in training: PEFT's forward (each adapter
    # draws its own mask there), with a warning, same result as unfused.
    model = make_model()
    model.add_adapter("second", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q"], init_lora_weights=False,
                                                lora_dropout=0.5))
    model.base_model.set_adapter(["default", "second"])
    x = torch.randn(2, 48)
    model.train()
    with torch.no_grad():
        torch.manual_seed(0)
        want = model(x)
        fuse(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.manual_seed(0)
            got = model(x)
    torch.testing.assert_close(got, want)
    assert any("several active adapters with DoRA or with dropout" in str(w.message) for w in caught)
    model.eval()
    # Disabled adapters: the base model, as in PEFT.
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(model(x), model.base_model.model.down(
            torch.relu(model.base_model.model.up.base_layer(model.base_model.model.q.base_layer(x)))) + x)


@pytest.mark.parametrize("use_dora", [False, True])
def test_bnb_linear4bit_base_is_fused(monkeypatch, use_dora):
    bnb = pytest.importorskip("bitsandbytes")
    calls = _served_by_op(monkeypatch, "qlora_linear")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = bnb.nn.Linear4bit(128, 64, compute_dtype=torch.float32, quant_type="nf4")

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(3)
    dense = nn.Linear(128, 64)
    net = Net()
    net.proj.load_state_dict(dense.state_dict())
    net = net.to("cpu")
    model = _spread_magnitudes(peft.get_peft_model(net, peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["proj"], init_lora_weights=False, use_dora=use_dora)))
    x = torch.randn(5, 128)
    y_ref, g_ref = outputs_and_grads(model, x)
    assert fuse(model) == 1
    y, g = outputs_and_grads(model, x)
    assert calls == [1]
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for n in g_ref:
        torch.testing.assert_close(g[n], g_ref[n], rtol=1e-5, atol=1e-5, msg=n)


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_tiny_llama_with_gradient_checkpointing_and_autocast(autocast, use_dora):
    transformers = pytest.importorskip("transformers")

    def build():
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model = transformers.LlamaForCausalLM(cfg)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                               init_lora_weights=False, use_dora=use_dora)
        return _spread_magnitudes(peft.get_peft_model(model, lora)).train()

    ids = torch.randint(0, 50, (2, 24), generator=torch.Generator().manual_seed(5))
    results = []
    for do_fuse in (False, True):
        model = build()
        if do_fuse:
            assert fuse(model) == 8
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()
                                                if p.requires_grad}))
    (l0, g0), (l1, g1) = results
    tol = dict(rtol=2e-2, atol=2e-3) if autocast else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(l1, l0, **tol)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], msg=n, **tol)


@pytest.mark.slow
@pytest.mark.parametrize("use_dora", [False, True])
def test_fused_peft_model_compiles_fullgraph(use_dora):
    model = make_model(seed=4, use_dora=use_dora)
    fuse(model)
    x = torch.randn(2, 3, 48)
    y_eager, g_eager = outputs_and_grads(model, x)
    compiled = torch.compile(model, fullgraph=True)
    model.zero_grad()
    y = compiled(x)
    y.square().mean().backward()
    torch.testing.assert_close(y.detach(), y_eager, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, g_eager[n], rtol=1e-5, atol=1e-5, msg=n)


def _same_as_unfused(model, x, train=False):
    """Output (and with ``train`` the grads) of ``model`` as it is, then with fuse undone."""
    model.train(train)
    got = outputs_and_grads(model, x) if train else (model(x).detach(), {})
    unfuse(model)
    want = outputs_and_grads(model, x) if train else (model(x).detach(), {})
    torch.testing.assert_close(got[0], want[0])
    for n in want[1]:
        torch.testing.assert_close(got[1][n], want[1][n], msg=n)


@pytest.mark.parametrize("variant", [dict(use_dora=True), dict(lora_bias=True)])
def test_adapter_added_after_fuse_is_served_by_peft(monkeypatch, variant):
    """fuse, then add and activate a DoRA / lora_bias adapter: PEFT's math, never plain LoRA's
    (a DoRA adapter is served by the op with its magnitude, a lora_bias one by PEFT)."""
    calls = _served_by_op(monkeypatch)
    model = make_model(seed=5)
    assert fuse(model) == 3
    model.add_adapter("v", peft.LoraConfig(r=4, target_modules=["q", "up", "down"], init_lora_weights=False,
                                           **variant))
    model.base_model.set_adapter("v")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "lora_magnitude" in n:
                p.normal_()
    x = torch.randn(4, 48)
    _same_as_unfused(model, x, train=True)
    if "use_dora" in variant:
        assert calls, "the DoRA adapter is served by the op"
    else:
        assert calls == [], "no layer may serve a variant adapter with the plain LoRA op"


def test_fused_model_pickles_and_torch_saves_whole(tmp_path):
    import copy
    import pickle

    model = make_model(seed=6)
    fuse(model)
    x = torch.randn(2, 48)
    with torch.no_grad():
        want = model(x)
        for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
            layer = clone.base_model.model.q
            assert is_fused(layer) and layer.forward.layer is layer, "the clone's forward must be its own"
            torch.testing.assert_close(clone(x), want)
        torch.save(model, tmp_path / "m.pt")
        loaded = torch.load(tmp_path / "m.pt", weights_only=False)
        torch.testing.assert_close(loaded(x), want)
        assert unfuse(loaded) == 3


def test_calls_the_op_cannot_serve_go_to_peft(monkeypatch):
    """dropout p = 1.0 in training and a base weight that requires grad: PEFT serves them (its
    result, its grads), no error."""
    calls = _served_by_op(monkeypatch)
    model = make_model(seed=7)
    for layer in (model.base_model.model.q, model.base_model.model.up, model.base_model.model.down):
        layer.lora_dropout["default"] = nn.Dropout(1.0)
    fuse(model)
    _same_as_unfused(model, torch.randn(3, 48), train=True)
    assert calls == []
    model = make_model(seed=7)
    model.base_model.model.up.base_layer.weight.requires_grad_(True)
    fuse(model)
    x = torch.randn(3, 48)
    model.zero_grad()
    model(x).sum().backward()
    assert len(calls) == 2, "q and down are served by the op, up (weight requires grad) by PEFT"
    assert model.base_model.model.up.base_layer.weight.grad is not None
    _same_as_unfused(model, x, train=True)


def test_several_active_adapters_are_summed_in_one_fused_call(monkeypatch):
    """set_adapter([a, b]) without dropout in training: one fused call per layer on the adapters
    stacked (rank r_a + r_b, each B scaled by its adapter's scaling); PEFT's output and grads."""
    calls = _served_by_op(monkeypatch)
    model = make_model(seed=8)
    model.add_adapter("second", peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q", "up"],
                                                init_lora_weights=False, use_rslora=True))
    model.base_model.set_adapter(["default", "second"])
    for n, p in model.named_parameters():  # set_adapter freezes the others; train both
        p.requires_grad_("lora_" in n)
    x = torch.randn(3, 48)
    y_ref, g_ref = outputs_and_grads(model, x)
    fuse(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y, g = outputs_and_grads(model, x)
    assert len(calls) == 3
    torch.testing.assert_close(y, y_ref)
    assert set(g) == set(g_ref) and any("second" in n for n in g)
    for n in g_ref:
        torch.testing.assert_close(g[n], g_ref[n], msg=n)


def test_adapter_on_another_device_goes_to_peft(monkeypatch):
    """An adapter (or DoRA magnitude) not on x's device (PEFT's ephemeral GPU offload keeps them on
    the CPU): PEFT's forward, not an error from the op's device check."""
    calls = _served_by_op(monkeypatch)
    model = make_model(seed=6, use_dora=True)
    fuse(model)
    x = torch.randn(2, 48)
    with torch.no_grad():
        want = model(x)
        model.base_model.model.q.lora_magnitude_vector["default"].to("meta")  # a device x is not on
        with pytest.warns(UserWarning, match="another device than x"):
            with pytest.raises((NotImplementedError, RuntimeError)):  # PEFT's forward meets the meta tensor
                model(x)
    assert len(calls) == 3 and want.shape == (2, 48)


def test_dropout_module_mode_decides_as_in_peft():
    model = make_model(seed=8)
    for layer in (model.base_model.model.q, model.base_model.model.up, model.base_model.model.down):
        layer.lora_dropout["default"] = nn.Dropout(0.5)
    fuse(model)
    model.train()
    for layer in (model.base_model.model.q, model.base_model.model.up, model.base_model.model.down):
        layer.lora_dropout["default"].eval()  # the layer trains, its dropout does not: no dropout
    x = torch.randn(3, 48)
    got = model(x).detach()
    unfuse(model)
    torch.testing.assert_close(got, model(x).detach())


def test_only_plain_lora_linear_layers_are_fused():
    """AdaLoRA's SVDLinear is a LoraLayer on an nn.Linear with other math: never fused."""
    torch.manual_seed(9)
    cfg = peft.AdaLoraConfig(r=4, target_modules=["q", "up"], init_lora_weights=False, total_step=10)
    model = peft.get_peft_model(Block(), cfg)
    x = torch.randn(2, 48)
    with torch.no_grad():
        want = model(x)
    with pytest.warns(UserWarning, match="left to PEFT .*layer type"):
        assert fuse(model) == 0
    with torch.no_grad():
        torch.testing.assert_close(model(x), want)


def test_mixed_model_keeps_the_inner_adapter(monkeypatch):
    """A LoRA layer over a LoHa layer (mixed=True): the LoHa term must stay."""
    calls = _served_by_op(monkeypatch)
    torch.manual_seed(10)
    model = peft.get_peft_model(Block(), peft.LoHaConfig(r=4, target_modules=["q", "up"], init_weights=False),
                                adapter_name="loha", mixed=True)
    model.add_adapter("lora", peft.LoraConfig(r=4, target_modules=["q", "up", "down"], init_lora_weights=False))
    model.set_adapter(["loha", "lora"])
    x = torch.randn(2, 48)
    with torch.no_grad():
        want = model(x)
        fuse(model)
        torch.testing.assert_close(model(x), want)
    assert len(calls) == 1, "only down (LoRA on a plain nn.Linear) is served by the op"


def test_a_forward_bound_by_another_library_is_kept():
    """X-LoRA binds its own forward on each LoRA Linear (taking scalings=): fuse leaves it."""
    model = make_model(seed=11)
    layer = model.base_model.model.q
    seen = []

    def xlora_like(x, *args, scalings=None, **kwargs):
        seen.append(scalings)
        return type(layer).forward(layer, x, *args, **kwargs)

    layer.forward = xlora_like
    assert fuse(model) == 2
    assert not is_fused(layer) and layer.forward is xlora_like
    model(torch.randn(2, 48))
    layer(torch.randn(2, 48), scalings=3)
    assert seen == [None, 3]


def test_hooks_on_bypassed_modules_run(monkeypatch):
    """A hook on the base layer (accelerate's offload, a profiler) must run: PEFT's forward."""
    calls = _served_by_op(monkeypatch)
    model = make_model(seed=12)
    fuse(model)
    seen = []
    model.base_model.model.q.base_layer.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = torch.randn(2, 48)
    model(x)
    assert seen == [torch.Size([2, 48])] and len(calls) == 2


def test_fuse_twice_and_after_add_adapter(monkeypatch):
    calls = _served_by_op(monkeypatch)
    model = make_model(seed=13)
    assert fuse(model) == 3
    assert fuse(model) == 3, "fusing again changes nothing"
    layer = model.base_model.model.q
    assert isinstance(layer.forward, type(model.base_model.model.up.forward))
    model.add_adapter("b", peft.LoraConfig(r=2, target_modules=["q"], init_lora_weights=False))
    model.base_model.set_adapter("b")
    x = torch.randn(2, 48)
    _same_as_unfused(model, x, train=True)
    assert len(calls) == 1, "the new plain adapter on q is served by the op (up, down have no 'b')"


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float16])
def test_bnb_compute_dtype_is_followed(monkeypatch, compute_dtype, use_dora):
    """fp32 activations on a Linear4bit with compute_dtype=bf16/fp16 (prepare_model_for_kbit_training
    leaves hidden states in fp32): the base in compute_dtype, the LoRA term in fp32, as PEFT (DoRA:
    the base layer's output less its bias, the norm from W decoded to fp32, as PEFT's DoRA)."""
    bnb = pytest.importorskip("bitsandbytes")
    calls = _served_by_op(monkeypatch, "qlora_linear")
    torch.manual_seed(14)
    dense = nn.Linear(128, 64)
    net = nn.Sequential(bnb.nn.Linear4bit(128, 64, compute_dtype=compute_dtype, quant_type="nf4"))
    net[0].load_state_dict(dense.state_dict())
    net = net.to("cpu")
    model = _spread_magnitudes(peft.get_peft_model(net, peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["0"], init_lora_weights=False, use_dora=use_dora)))
    x = torch.randn(5, 128, requires_grad=True)

    def run():
        model.zero_grad()
        x.grad = None
        y = model(x)
        y.square().mean().backward()
        return y.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    want = run()
    fuse(model)
    got = run()
    assert calls == [1]
    # Both compute the base in compute_dtype with the same rounding: fp32 summation order only.
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-6)
    for n in want[2]:
        torch.testing.assert_close(got[2][n], want[2][n], rtol=1e-5, atol=1e-6, msg=n)


def test_bnb_decode_calls_after_the_first_skip_the_checks(monkeypatch):
    """Serving a fused 4-bit PEFT layer on the CPU (eval, no grad, float32, M <= 16): after one
    checked call the layer's kernel call is kept (lorakern/nf4/plan.py); switching adapters,
    replacing an adapter's tensor or disabling adapters are followed."""
    bnb = pytest.importorskip("bitsandbytes")
    from lorakern import NF4Weight, qlora_linear

    calls = _served_by_op(monkeypatch, "qlora_linear")
    net = nn.Sequential(bnb.nn.Linear4bit(128, 64, compute_dtype=torch.float32, quant_type="nf4"))
    net[0].load_state_dict(nn.Linear(128, 64).state_dict())
    net = net.to("cpu")
    model = peft.get_peft_model(net, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["0"],
                                                     init_lora_weights=False))
    # The same rank and scaling: only the tensors tell the adapters apart.
    model.add_adapter("other", peft.LoraConfig(r=8, lora_alpha=16, target_modules=["0"], init_lora_weights=False))
    fuse(model)
    model.eval()
    layer = model.base_model.model[0]

    def want(x, adapter):
        base = layer.base_layer
        return qlora_linear(x, NF4Weight.from_bnb(base), base.bias, layer.lora_A[adapter].weight,
                            layer.lora_B[adapter].weight, layer.scaling[adapter], training=False)

    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(3, 128)
            assert torch.equal(model(x), want(x, "default"))
        assert len(calls) == 1  # the first call through the op, then the plan
        model.set_adapter("other")
        x = torch.randn(2, 128)
        assert torch.equal(model(x), want(x, "other"))
        model.set_adapter("default")
        old_B = layer.lora_B["default"].weight.data  # kept alive: the new tensor gets another address
        layer.lora_B["default"].weight.data = torch.randn(64, 8)
        x = torch.randn(2, 128)
        assert torch.equal(model(x), want(x, "default"))
        with model.disable_adapter():
            assert torch.equal(model(x), layer.base_layer(x))
    assert old_B.shape == (64, 8)


def test_serial_copies_give_the_whole_copy():
    """The kept casts are written in pieces below torch's grain size (one thread); any size,
    contiguous or not, gives what one copy_ gives."""
    from lorakern.integrations.peft import _copy_serially

    for shape in ((3,), (16, 4096), (4096, 9), (100001,)):
        src = torch.randn(shape)
        dst = torch.empty(shape, dtype=torch.bfloat16)
        _copy_serially(dst, src)
        assert torch.equal(dst, src.to(torch.bfloat16))
    src = torch.randn(9, 4096).t()  # strided: one copy
    dst = torch.empty(4096, 9, dtype=torch.float16)
    _copy_serially(dst, src)
    assert torch.equal(dst, src.to(torch.float16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_hotswap_adapter_on_a_fused_model(tmp_path, dtype):
    """PEFT's ``hotswap_adapter`` writes the new adapter into the old tensors through ``.data``
    (``old.data.copy_(new)``), which leaves their version counters alone. A fused model serves the
    new adapter right after, as PEFT's does: on a 16-bit model (fp32 adapters cast to x's dtype)
    and in fp32, for single-adapter calls and mixed batches."""
    from peft.utils.hotswap import hotswap_adapter

    def model_of(seed):
        torch.manual_seed(seed)
        config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q", "up", "down"], init_lora_weights=False)
        return peft.get_peft_model(Block().to(dtype), config).eval()

    served, other = model_of(0), model_of(1)
    other.save_pretrained(tmp_path / "other")
    assert served.base_model.model.q.lora_A["default"].weight.dtype == torch.float32
    fused = model_of(0)
    fuse(fused)
    x = torch.randn(4, 5, 48).to(dtype)
    names = ["default", "__base__", "default", "default"]
    with torch.no_grad():
        before = fused(x)
        torch.testing.assert_close(fused(x, adapter_names=names)[0], before[0], rtol=2e-2, atol=2e-2)
        for m in (served, fused):
            hotswap_adapter(m, str(tmp_path / "other"), adapter_name="default")
        want, got = served(x), fused(x)
        assert not torch.allclose(want, before, rtol=0.1, atol=0.1)  # the swap changed PEFT's output
        tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, want, **tol)
        torch.testing.assert_close(fused(x, adapter_names=names), served(x, adapter_names=names), **tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", ["float32", "x", None])
def test_bnb_decode_in_half_reads_the_float32_adapter(monkeypatch, dtype, bias):
    """A half x (bfloat16, float16) on float32 adapters (PEFT's default on a 16-bit model) and a
    bias of either dtype (bitsandbytes keeps it in the base's original dtype), served on the CPU:
    one native call reads them as they are (no cast): y is the float32 layer's output rounded
    once, bit for bit; the first call is kept and serves the rest (lorakern/nf4/plan.py);
    in-place changes, also through ``.data`` (which leaves the version counter alone), are
    followed; with grads the checked op runs on per-call casts and the float32 adapters get their
    grads."""
    bnb = pytest.importorskip("bitsandbytes")
    from lorakern import NF4Weight, qlora_linear
    from lorakern.nf4 import native, plan

    calls = _served_by_op(monkeypatch, "qlora_linear")
    first = []
    real = plan.serve_mixed
    monkeypatch.setattr(plan, "serve_mixed", lambda *a: first.append(1) or real(*a))
    net = nn.Sequential(bnb.nn.Linear4bit(128, 64, bias=bias is not None, compute_dtype=dtype, quant_type="nf4"))
    net[0].load_state_dict(nn.Linear(128, 64, bias=bias is not None).to(dtype).state_dict())
    net = net.to("cpu")
    if bias == "x":
        net[0].bias.data = net[0].bias.data.to(dtype)
    model = peft.get_peft_model(net, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["0"],
                                                     init_lora_weights=False))
    fuse(model)
    model.eval()
    layer = model.base_model.model[0]
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert A.dtype == B.dtype == torch.float32
    assert bias is None or layer.base_layer.bias.dtype == (dtype if bias == "x" else torch.float32)

    def want(x):  # the float32 layer (the same native kernel at these rows), rounded once
        base = layer.base_layer
        b = None if base.bias is None else base.bias.float()
        w = NF4Weight.from_bnb(base)
        rows = x.reshape(-1, 128)
        if x.dtype == torch.bfloat16 and native.cpu_isa() == "avx512-bf16" and rows.shape[0] <= 16:
            # this CPU's bfloat16 dot products (tests/test_nf4_bf16.py; 1 to 16 rows of this
            # 128-column weight): the base on bfloat16 weights; the float32 adapter and bias still
            # read as they are, in the one call
            y, _ = native.cpu_qlora_forward(rows, w, b, A, B, layer.scaling["default"])
            return y.reshape(*x.shape[:-1], 64)
        return qlora_linear(x.float(), w, b, A, B, layer.scaling["default"], training=False).to(x.dtype)

    with torch.no_grad():
        for shape in ((3, 128), (2, 5, 128), (1, 128)):
            x = torch.randn(shape).to(dtype)
            assert torch.equal(model(x), want(x))
        assert len(first) == 1 and not calls  # the first call, then the plan; never a cast
        B.mul_(2)  # in place, as an optimizer step or load_state_dict writes
        x = torch.randn(2, 128).to(dtype)
        assert torch.equal(model(x), want(x))
        if bias is not None:
            layer.base_layer.bias.add_(1.0)
        x = torch.randn(2, 128).to(dtype)
        assert torch.equal(model(x), want(x))
        A.data.copy_(A.flip(1))  # as PEFT's hotswap_adapter writes: no version counter bump
        x = torch.randn(2, 128).to(dtype)
        assert torch.equal(model(x), want(x))
        assert len(first) == 1 and not calls
        wide = torch.randn(3, 256).to(dtype)
        # A strided x: a contiguous copy through the same call (not the plan, which reads x in place).
        assert torch.equal(model(wide[:, ::2]), want(wide[:, ::2].contiguous())) and len(first) == 2
        mixed = model(x, adapter_names=["default", "default"])  # the mixed batch: its own path, in bf16
        torch.testing.assert_close(mixed, want(x), rtol=1.6e-2, atol=1e-2)
        assert torch.equal(model(x), want(x))
        empty = model(torch.randn(2, 0, 128).to(dtype))  # served by the op (bitsandbytes' own GEMV ends the process)
        assert empty.shape == (2, 0, 64) and empty.dtype == dtype
        x = torch.randn(2, 64).to(dtype)  # the wrong width: the checked op says so
        with pytest.raises(ValueError, match="x"):
            model(x)
    x = torch.randn(2, 128).to(dtype)
    model(x).float().sum().backward()
    assert A.grad is not None and B.grad is not None and A.grad.dtype == torch.float32
    assert len(first) == 2
