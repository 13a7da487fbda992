"""The benchmark CLI end to end on CPU (no timing thresholds: only that it runs and records)."""

import json

import pytest

from lorakern.bench import cli, records


@pytest.mark.slow
def test_cli_quick_end_to_end(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    rc = cli.main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--no-progress",
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
        png = tmp_path / f"lora_linear_{mode}.png"
        assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"


def test_record_schema_rejects_missing_fields():
    with pytest.raises(ValueError, match="missing fields"):
        records.validate({"op": "lora_linear"})


def test_shape_parsing():
    import torch

    shapes = cli.parse_shapes("7,33,65,3; tiny", torch.device("cpu"))
    assert shapes[0] == cli.Shape(7, 33, 65, 3) and len(shapes) == 3
    with pytest.raises(ValueError, match="M,in,out,r"):
        cli.parse_shapes("1,2,3", torch.device("cpu"))
    assert len(cli.preset_shapes("llama3-8b", torch.device("cpu"))) == 4 * 5 * 3


def test_flops_formula():
    from lorakern.bench.providers import flops

    s = cli.Shape(8, 16, 32, 4)
    assert flops("base", "fwd", s) == 2 * 8 * 32 * 16
    assert flops("fused", "fwd", s) == 2 * 8 * 32 * 16 + 2 * 8 * 4 * (16 + 32)
