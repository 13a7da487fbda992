"""The results file: one JSON object per line, one line per measurement."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess

import torch

import lorakern

FIELDS = (
    "op", "provider", "mode", "M", "in_features", "out_features", "r", "dtype", "dropout",
    "median_ms", "q20_ms", "q80_ms", "tflops", "ratio_to_base", "ratio_to_unfused", "peak_mem_bytes",
    "saved_bytes", "device", "device_name", "threads", "torch", "triton", "lorakern", "commit", "date",
)


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_name()
    return {
        "device": device.type, "device_name": name, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "triton": triton_version, "lorakern": lorakern.__version__, "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo on Linux) and the NF4 kernel path lorakern picks on it."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        from ..nf4 import native

        if native.extension() is not None:
            name += f" [{native.cpu_isa()}]"
    except Exception:  # noqa: BLE001 - a name is best effort
        pass
    return name


def validate(record: dict) -> None:
    """Raise if a record lacks a field of the schema."""
    missing = [f for f in FIELDS if f not in record]
    if missing:
        raise ValueError(f"benchmark record is missing fields {missing}")


def append(path: str, records: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        for rec in records:
            validate(rec)
            f.write(json.dumps(rec) + "\n")


def load(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
