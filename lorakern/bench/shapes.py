"""What the suites are run on: the ``Shape`` of a measurement, the dtypes by name, the shape
presets (Llama-3 projections) and the ``--shapes`` parser."""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class Shape:
    M: int
    in_features: int
    out_features: int
    r: int
    adapters: int = 1  # the multi suite: adapters in the batch, its rows handed out in turn


LLAMA3_8B = ((4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096))
LLAMA3_70B = ((8192, 8192), (8192, 1024), (8192, 28672), (28672, 8192))


def preset_shapes(name: str, device: torch.device) -> list[Shape]:
    if name == "llama3-8b":
        return [Shape(M, k, n, r) for (k, n) in LLAMA3_8B for M in (1, 16, 512, 4096, 8192) for r in (8, 16, 64)]
    if name == "llama3-70b":
        return [Shape(M, k, n, r) for (k, n) in LLAMA3_70B for M in (1, 16, 512, 4096) for r in (16,)]
    if name == "tiny":
        return [Shape(M, 256, 256, 8) for M in (1, 64)]
    if name == "cpu":  # Llama-3-8B's q and k/v projections at sizes two cores finish in ~1 minute
        return [Shape(M, k, n, 16) for (k, n) in LLAMA3_8B[:2] for M in (1, 16, 256)]
    if name == "multi":  # several adapters in one batch
        return [Shape(M, 4096, 4096, 16, n) for n in (1, 4, 16, 64) for M in (8, 64, 512, 4096)]
    if name == "multi-cpu":
        return [Shape(M, 4096, 4096, 16, n) for n in (1, 8) for M in (8, 64, 512)]
    raise ValueError(f"unknown shape preset {name!r}")


def parse_shapes(text: str, device: torch.device) -> list[Shape]:
    shapes = []
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        if part[0].isdigit():
            nums = [int(v) for v in part.split(",")]
            if len(nums) not in (4, 5):
                raise ValueError(f"--shapes: expected M,in,out,r (or M,in,out,r,adapters), got {part!r}")
            shapes.append(Shape(*nums))
        else:
            shapes.extend(preset_shapes(part, device))
    return shapes
