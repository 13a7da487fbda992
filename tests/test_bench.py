"""The benchmark CLI end to end on CPU (no timing thresholds: only that it runs and records)."""

import json

import pytest
import torch

from lorakern.bench import cli, records
from lorakern.bench import nf4 as nf4_suite
from lorakern.bench import shapes as shapes_mod


@pytest.mark.slow
def test_cli_quick_end_to_end(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    rc = cli.main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--no-progress", "--suite", "lora",
                   "--providers", "base,unfused,fused", "--modes", "fwd,fwd+bwd"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "median ms" in out and "fused" in out and "unfused" in out
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 2 * 3  # shapes x modes x providers
    for line in lines:
        rec = json.loads(line)
        records.validate(rec)
        assert rec["median_ms"] > 0 and rec["q20_ms"] <= rec["median_ms"] <= rec["q80_ms"]
        assert rec["device"] == "cpu" and rec["dtype"] == "fp32"
        if rec["provider"] == "base":
            assert rec["ratio_to_base"] == 1.0
    for mode in ("fwd", "fwd_bwd"):
        png = tmp_path / f"lora_lora_linear_{mode}.png"
        assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
@pytest.mark.parametrize("suite", ["dora", "multi"])
def test_cli_variant_suites(tmp_path, capsys, suite):
    """The dora and multi suites: fused plain LoRA measured beside, ratios to it and to PEFT's."""
    pytest.importorskip("peft")
    shapes = "5,32,24,4,3;9,32,24,4,3"  # multi: 3 adapters over 5 and 9 rows
    rc = cli.main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--no-progress", "--suite", suite,
                   "--shapes", shapes])
    assert rc == 0
    recs = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    providers = {"dora": ("fused", "peft-dora", "fused-dora"),
                 "multi": ("fused", "peft-multi", "fused-multi", "fused-nf4", "fused-multi-nf4")}[suite]
    modes = cli.DEFAULT_MODES[suite]
    assert sorted((r["provider"], r["mode"], r["M"]) for r in recs) == sorted(
        (p, m, M) for p in providers for m in modes for M in (5, 9))
    key = {"dora": "ratio_to_peft_dora", "multi": "ratio_to_peft_multi"}[suite]
    for rec in recs:
        records.validate(rec)
        assert rec["ratio_to_fused"] > 0 and rec[key] > 0
        assert rec["adapters"] == 3
        if suite == "multi":
            assert rec["ratio_to_fused_nf4"] > 0
    assert "x fused" in capsys.readouterr().out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nf4_suite_dequantizes_to_its_dtype(dtype):
    """Every dequantize the suite times writes the suite's dtype (bitsandbytes' included: its
    weight is quantized from float32, and its decode follows the quant state's dtype)."""
    pytest.importorskip("bitsandbytes")
    cpu = torch.device("cpu")
    for provider in ("nf4", "bnb"):
        module = nf4_suite.make_linear(provider, 128, 64, dtype, cpu)
        out = nf4_suite.dequantize_step(provider, module, dtype)()
        assert out.dtype == dtype and out.shape == (64, 128), provider
        if provider == "bnb":
            import bitsandbytes.functional as F

            full = F.dequantize_4bit(module.weight.data, module.weight.quant_state)
            assert full.dtype == torch.float32 and torch.equal(out, full.to(dtype))


def test_cli_quick_nf4_suite(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    rc = cli.main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--no-progress", "--suite", "nf4",
                   "--providers", "fp32,nf4,nf4-dq"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "floor ms" in out and "nf4_dequantize" in out
    recs = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    linear = [r for r in recs if r["op"] == "nf4_linear"]
    assert len(linear) == 2 * 3  # quick shapes (M = 1, 16) x providers
    assert len([r for r in recs if r["op"] == "nf4_dequantize"]) == 2  # nf4, nf4-dq
    for rec in recs:
        records.validate(rec)
        assert rec["median_ms"] > 0 and rec["floor_ms"] > 0 and rec["weight_bytes"] > 0
        assert rec["weight_copies"] == nf4_suite.weight_copies(torch.device("cpu"), rec["weight_bytes"]) > 1
    for rec in linear:
        if rec["provider"] == "fp32":
            assert rec["ratio_to_base"] == 1.0
    nf4_bytes = {r["weight_bytes"] for r in linear if r["provider"] == "nf4"}
    fp32_bytes = {r["weight_bytes"] for r in linear if r["provider"] == "fp32"}
    assert max(nf4_bytes) * 7 < min(fp32_bytes)  # 4.5 bits vs 32 per weight
    assert (tmp_path / "nf4_nf4_linear_fwd.png").read_bytes()[:4] == b"\x89PNG"


def test_weights_rotate_past_the_last_level_cache(monkeypatch):
    # Cold weights on CPU: enough copies to hold twice the largest cache, capped; one on CUDA.
    monkeypatch.setattr(nf4_suite, "last_level_cache_bytes", lambda: 100 << 20)
    cpu = torch.device("cpu")
    assert nf4_suite.weight_copies(cpu, 64 << 20) == 4  # 256 MB >= 200 MB
    assert nf4_suite.weight_copies(cpu, 9 << 20) == 23
    assert nf4_suite.weight_copies(cpu, 1 << 30) == 1
    assert nf4_suite.weight_copies(cpu, 1 << 10) == nf4_suite.MAX_COPIES
    assert nf4_suite.weight_copies(torch.device("cuda"), 1 << 10) == 1
    calls = []
    step = nf4_suite.rotating([lambda i=i: calls.append(i) for i in range(3)])
    for _ in range(7):
        step()
    assert sorted(calls[:3]) == [0, 1, 2] and calls[3:6] == calls[:3]  # each copy in turn, cyclically
    monkeypatch.undo()
    assert nf4_suite.last_level_cache_bytes() >= 1 << 20


def test_providers_are_timed_in_interleaved_rounds(monkeypatch):
    order = []

    def fake_measure(step, device, min_run_time):
        order.append(step())
        return {"a": (1.0, 0.5, 2.0), "b": (3.0, 2.0, 4.0)}[order[-1]] if len(order) != 2 else (9.0, 9.0, 9.0)

    from lorakern.bench import timing

    monkeypatch.setattr(timing, "measure", fake_measure)
    got = timing.interleaved({"a": lambda: "a", "b": lambda: "b"}, torch.device("cpu"), 1.0)
    assert order == ["a", "b"] * timing.ROUNDS  # every provider once per round, in turn
    assert got == {"a": (1.0, 0.5, 2.0), "b": (3.0, 2.0, 4.0)}  # per provider, the median over rounds


def test_record_schema_rejects_missing_fields():
    with pytest.raises(ValueError, match="missing fields"):
        records.validate({"op": "lora_linear"})


def test_shape_parsing():
    import torch

    shapes = shapes_mod.parse_shapes("7,33,65,3; tiny", torch.device("cpu"))
    assert shapes[0] == shapes_mod.Shape(7, 33, 65, 3) and len(shapes) == 3
    with pytest.raises(ValueError, match="M,in,out,r"):
        shapes_mod.parse_shapes("1,2,3", torch.device("cpu"))
    assert len(shapes_mod.preset_shapes("llama3-8b", torch.device("cpu"))) == 4 * 5 * 3


def test_flops_formula():
    from lorakern.bench.providers import flops

    s = shapes_mod.Shape(8, 16, 32, 4)
    assert flops("base", "fwd", s) == 2 * 8 * 32 * 16
    assert flops("fused", "fwd", s) == 2 * 8 * 32 * 16 + 2 * 8 * 4 * (16 + 32)


def test_deterministic_provider_steps_run_in_deterministic_mode():
    """fused-det's steps (forward and backward) run under torch.use_deterministic_algorithms, and
    the setting is restored after each; it is offered on CUDA only (on CPU it is fused again)."""
    import torch

    from lorakern.bench import providers

    seen, seen_bwd = [], []

    class Record(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x

        @staticmethod
        def backward(ctx, g):
            seen_bwd.append(torch.are_deterministic_algorithms_enabled())
            return g

    class Probe(torch.nn.Linear):
        def forward(self, x):
            seen.append(torch.are_deterministic_algorithms_enabled())
            return Record.apply(super().forward(x))

    s = shapes_mod.Shape(3, 8, 5, 2)
    before = torch.are_deterministic_algorithms_enabled()
    for mode in providers.MODES:
        step = providers.make_step(providers.Deterministic(Probe(8, 5)), mode, s, torch.float32, "cpu")
        step()
        assert torch.are_deterministic_algorithms_enabled() == before
    assert seen == [True, False, True, True]  # fwd, bwd (its forward ran when the step was made), fwd+bwd, eval
    assert seen_bwd == [True, True]  # bwd, fwd+bwd
    module = providers.make_module("fused-det", s, torch.float32, "cpu", 0.0)
    assert isinstance(module, providers.Deterministic) and module.layer.r == 2
    assert "fused-det" in providers.available_providers("cuda")
    assert "fused-det" not in providers.available_providers("cpu")


def _readme_table_module():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "readme_table.py"
    spec = importlib.util.spec_from_file_location("readme_table", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_table_generated_from_records(tmp_path):
    rt = _readme_table_module()
    env = {"device": "cpu", "device_name": "TestCPU", "threads": 2, "torch": "2.13.0", "lorakern": "0.1.0",
           "commit": "abc1234", "date": "2026-11-23T00:00:00Z"}
    recs = [{**env, "op": "nf4_linear", "provider": p, "in_features": 4096, "out_features": 1024, "M": 1,
             "median_ms": t} for p, t in (("fp32", 2.0), ("nf4", 0.5), ("bnb", 10.0))]
    recs.append({**env, "op": "lora_linear", "provider": "fused", "in_features": 64, "out_features": 64, "r": 8,
                 "M": 16, "mode": "fwd", "median_ms": 0.1, "ratio_to_base": 1.25, "ratio_to_unfused": 0.8})
    text = rt.render(recs)
    assert "TestCPU (cpu, 2 threads), 2026-11-23" in text and "commit abc1234" in text
    assert "| 4096 -> 1024 | 1 | 2.000 | 0.500 | 10.000 | 4.00 | 20.0 |" in text
    assert "| 64 -> 64 | 8 | 16 | fwd | 0.100 | 1.25 | 0.80 |" in text
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- perf:cpu:begin -->\nold\n<!-- perf:cpu:end -->\nb\n")
    rt.write(str(readme), "cpu", text)
    content = readme.read_text()
    assert "old" not in content and "| 4.00 |" in content and content.startswith("a\n") and content.endswith("b\n")


@pytest.mark.slow
def test_gpu_first_contact_script_dry_run(tmp_path):
    """benchmarks/gpu_validate.sh --dry-run: the first-contact script's steps at toy sizes on the
    CPU, so the script itself is tested before a GPU ever runs it."""
    import pathlib

    from helpers import run_process_group

    root = pathlib.Path(__file__).resolve().parents[1]
    proc = run_process_group(["bash", str(root / "benchmarks" / "gpu_validate.sh"), str(tmp_path), "--dry-run"])
    env = (tmp_path / "env.txt").read_text()
    assert proc.returncode == 0, env + proc.stdout[-2000:]
    for step in ("build", "tests_cuda", "tests_triton", "bench_lora", "bench_dropout", "bench_nf4", "bench_model"):
        assert f"{step} rc=0" in env, env
    records = [line for line in (tmp_path / "results.jsonl").read_text().splitlines() if line.strip()]
    assert len(records) >= 4


@pytest.mark.slow
def test_cli_model_suite_quick(tmp_path, capsys):
    """The model suite: whole decoder layers, every provider present, both steps, in the schema."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from lorakern.bench import model

    rc = cli.main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--no-progress", "--suite", "model"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "== model ==" in out and "tokens/s" in out
    recs = records.load(str(tmp_path / "results.jsonl"))
    assert sorted((r["provider"], r["mode"]) for r in recs) == sorted(
        (p, m) for p in model.available() for m in model.MODES)
    for rec in recs:
        records.validate(rec)
        assert rec["suite"] == "model" and rec["op"] == "decoder_layers" and rec["tokens_per_s"] > 0
        assert rec["ratio_to_peft"] > 0 and rec["dropout"] == model.DROPOUT
        if rec["mode"] == "fwd+bwd":
            assert rec["saved_bytes"] > 0
    by = {(r["provider"], r["mode"]): r for r in recs}
    # PEFT keeps each adapter's dropped input for backward; the fused op regenerates the mask.
    assert by[("fused", "fwd+bwd")]["saved_bytes"] < by[("peft", "fwd+bwd")]["saved_bytes"]
    for mode in ("fwd_bwd", "eval"):
        assert (tmp_path / f"model_decoder_layers_{mode}.png").exists()
    text = _readme_table_module().render(recs)
    assert "| tiny | 1 | 8 | 0.05 | training (fwd+bwd) |" in text


def test_default_run_is_the_headline_points():
    """Without --full, --quick or --shapes each suite runs a handful of points (the whole default
    run is meant to take about 2 minutes on 2 CPU cores), on the sizes README quotes."""
    for device in ("cpu", "cuda"):
        total = 0
        for suite in ("lora", "dora", "multi", "nf4"):
            shapes, modes = cli.headline(suite, torch.device(device))
            assert shapes and all(s.in_features == 4096 for s in shapes)
            total += len(shapes) * max(1, len(modes))
        assert total <= (8 if device == "cpu" else 20)


def test_qalora_provider_in_the_lora_suite(tmp_path):
    """QA-LoRA on an INT4 base beside the dense providers: it runs, trains (fwd+bwd) and keeps for
    backward only the pooled input and h (1/64 of x and less)."""
    rc = cli.main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--no-progress", "--suite", "lora",
                   "--providers", "base,fused,fused-qalora", "--modes", "fwd+bwd"])
    assert rc == 0
    recs = {(r["provider"], r["M"]): r for r in records.load(str(tmp_path / "results.jsonl"))}
    for M in (1, 64):
        qa, fused = recs[("fused-qalora", M)], recs[("fused", M)]
        assert qa["median_ms"] > 0 and qa["ratio_to_base"] > 0
        assert qa["saved_bytes"] < fused["saved_bytes"]
