"""A CPU weight's 4-bit bytes moved onto huge pages (2 MiB on x86-64) in place
(lorakern.nf4.native.back_with_huge_pages)."""

from __future__ import annotations

import errno
import os
import platform
import sys

import pytest
import torch

from lorakern import NF4Weight, nf4_matmul
from lorakern.int4.format import INT4Weight
from lorakern.nf4 import native


def _huge_page_bytes() -> int:
    try:  # the kernel's huge page (the extension reads the same file)
        with open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 21


HUGE = _huge_page_bytes()

pytestmark = pytest.mark.skipif(native.extension() is None, reason="lorakern._C is not built")


def huge_bytes(t: torch.Tensor) -> int:
    """Bytes of t's range that /proc/self/smaps shows on huge pages (AnonHugePages of the mappings
    over it; a mapping of the advised range alone, since madvise splits it off)."""
    lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(v, 16) for v in head.split("-"))
                inside = start < hi and lo < end
            elif inside and head == "AnonHugePages:":
                total += int(line.split()[1]) * 1024
    return total


def kernel_collapses() -> bool:
    """Linux 6.1+ (MADV_COLLAPSE) with transparent huge pages not switched off."""
    if not sys.platform.startswith("linux"):
        return False
    version = tuple(int(p) for p in platform.release().split("-")[0].split(".")[:2] if p.isdigit())
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            enabled = f.read()
    except OSError:
        return False
    return version >= (6, 1) and "[never]" not in enabled


def moved_or_skip(result, nbytes: int) -> int:
    """The expected result of moving a fresh range of nbytes: its whole aligned 2 MiB pages, or a
    skip where this kernel cannot (no MADV_COLLAPSE, THP off) or has no free huge page now."""
    if HUGE != 1 << 21:
        pytest.skip(f"huge pages of {HUGE} bytes here: the weights below are sized for 2 MiB ones")
    if result is not None and result < 0:
        if not kernel_collapses() or -result in (errno.EAGAIN, errno.ENOMEM):
            pytest.skip(f"the kernel did not move the range: {os.strerror(-result)}")
    assert result is not None and result > 0, result
    assert result % HUGE == 0 and nbytes - 2 * HUGE < result <= nbytes
    return result


def fresh_bytes(n: int) -> torch.Tensor:
    return torch.randint(0, 256, (n,), dtype=torch.uint8)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps: Linux")
def test_nf4_weight_bytes_move_onto_huge_pages_in_place(monkeypatch):
    monkeypatch.delenv(native.HUGE_PAGES_ENV, raising=False)
    out_f, in_f, bs = 2051, 4096, 64  # 4.0 MiB + 2 KiB of codes: one or two whole 2 MiB pages inside
    packed = fresh_bytes(out_f * in_f // 2)
    before, address = packed.clone(), packed.data_ptr()
    absmax = torch.rand(out_f * in_f // bs) + 0.5
    w = NF4Weight(packed, absmax, (out_f, in_f), torch.float32, bs)
    on_huge = huge_bytes(w.packed)  # what the constructor did
    moved = moved_or_skip(native.back_with_huge_pages(w.packed), packed.numel())  # its recorded result
    assert w.packed.data_ptr() == address and torch.equal(w.packed, before)  # same place, same bytes
    assert on_huge >= moved
    # The kernels read it as before: the same bits as a copy of the same bytes on 4 KiB pages.
    monkeypatch.setenv(native.HUGE_PAGES_ENV, "0")
    plain = NF4Weight(before, absmax, (out_f, in_f), torch.float32, bs)
    assert huge_bytes(before) == 0
    for M in (1, 5, 40):
        x = torch.randn(M, in_f)
        assert torch.equal(nf4_matmul(x, w, backend="native"), nf4_matmul(x, plain, backend="native"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps: Linux")
def test_quantized_and_int4_weights_move_too(monkeypatch):
    monkeypatch.delenv(native.HUGE_PAGES_ENV, raising=False)
    w = NF4Weight.quantize(torch.randn(1100, 8192), 64)  # 4.3 MiB of codes
    on_huge = huge_bytes(w.packed)
    assert on_huge >= moved_or_skip(native.back_with_huge_pages(w.packed), w.packed.numel())
    q = INT4Weight.quantize(torch.randn(1100, 8192), 64)
    on_huge = huge_bytes(q.codes)
    assert on_huge >= moved_or_skip(native.back_with_huge_pages(q.codes), q.codes.numel())


def test_not_tried_when_switched_off_small_or_not_on_the_cpu(monkeypatch):
    monkeypatch.setenv(native.HUGE_PAGES_ENV, "0")
    t = fresh_bytes(5 * HUGE)
    assert native.back_with_huge_pages(t) is None and t.untyped_storage() not in native._backed
    monkeypatch.delenv(native.HUGE_PAGES_ENV)
    assert native.back_with_huge_pages(fresh_bytes(HUGE - 1)) is None
    assert native.back_with_huge_pages(torch.empty(5 * HUGE, dtype=torch.uint8, device="meta")) is None
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():  # a CPU tensor without data (torch.export's, a model built to trace)
        fake = torch.empty(5 * HUGE, dtype=torch.uint8)
    assert fake.is_cpu and native.back_with_huge_pages(fake) is None
    # An extension built before the call existed (an editable install not rebuilt): nothing, no error.
    monkeypatch.setattr(native, "extension", lambda: object())
    assert native.back_with_huge_pages(fresh_bytes(5 * HUGE)) is None
    monkeypatch.undo()
    # A range holding no whole aligned huge page: nothing to move (the native call itself).
    t = fresh_bytes(3 * HUGE)
    first = -t.data_ptr() % HUGE  # bytes up to t's first huge-page boundary
    assert native.extension().back_with_huge_pages(t.data_ptr() + first + 1, HUGE - 1) == 0
    assert native.extension().back_with_huge_pages(t.data_ptr(), 0) == 0


def test_once_per_storage_address_and_size(monkeypatch):
    monkeypatch.delenv(native.HUGE_PAGES_ENV, raising=False)
    calls = []

    class Counting:
        def back_with_huge_pages(self, ptr, n):
            calls.append((ptr, n))
            return 0

    monkeypatch.setattr(native, "extension", lambda: Counting())
    t = fresh_bytes(3 * HUGE)
    for _ in range(3):
        assert native.back_with_huge_pages(t) == 0
    assert native.back_with_huge_pages(t[: 2 * HUGE]) == 0  # another size at the same address
    assert calls == [(t.data_ptr(), 3 * HUGE), (t.data_ptr(), 2 * HUGE)]
    # Another storage at the same address (a weight freed, a new one where it was): moved again.
    buf = bytearray(3 * HUGE)
    first = torch.frombuffer(buf, dtype=torch.uint8)
    native.back_with_huge_pages(first)
    del first
    second = torch.frombuffer(buf, dtype=torch.uint8)
    native.back_with_huge_pages(second)
    assert calls[2:] == [(second.data_ptr(), 3 * HUGE)] * 2
