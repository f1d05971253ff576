"""Session memory onto transparent huge pages (runtime/hugepages.py)."""

from __future__ import annotations

import mmap
import sys

import numpy as np
import pytest

from moechat.runtime import hugepages
from moechat.runtime.model import load_model

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux THP only")


def _anon_huge_kib(start: int, end: int) -> int:
    """AnonHugePages of the mappings overlapping [start, end) (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                inside = lo < end and hi > start
            elif inside and fields[0] == "AnonHugePages:":
                total += int(fields[1])
    return total


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("MOECHAT_HUGEPAGES", "0")
    assert not hugepages.enabled()
    assert hugepages.create_on_huge_pages(lambda: "session") == ("session", 0)


def test_only_the_added_address_ranges_count():
    before = [(0, 10), (20, 30)]
    after = [(0, 15), (18, 35), (40, 50)]  # grown, merged with a neighbour, new
    assert list(hugepages._added(before, after)) == [(10, 15), (18, 20), (30, 35), (40, 50)]


@linux_only
def test_touched_memory_is_collapsed_and_reservations_are_not(monkeypatch):
    monkeypatch.delenv("MOECHAT_HUGEPAGES", raising=False)
    if not hugepages.enabled():
        pytest.skip("transparent huge pages are off on this kernel")
    before = hugepages.writable_private_regions()
    # Fresh anonymous mappings (malloc could reuse memory mapped before the snapshot).
    private = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    touched_map = mmap.mmap(-1, 16 << 20, flags=private)
    reserved_map = mmap.mmap(-1, 64 << 20, flags=private)
    touched = np.frombuffer(touched_map, dtype=np.uint8)
    reserved = np.frombuffer(reserved_map, dtype=np.uint8)
    touched[:] = 1  # every page written; ``reserved`` is never written
    moved = hugepages.collapse_new_memory(before)
    if moved == 0:
        pytest.skip("this kernel refused MADV_COLLAPSE (needs Linux 6.1+)")
    addr = touched.ctypes.data
    assert _anon_huge_kib(addr, addr + touched.nbytes) >= 8 << 10
    # Untouched reservations are left alone: collapsing them would commit their memory.
    assert moved <= touched.nbytes + (8 << 20)
    raddr = reserved.ctypes.data
    assert _anon_huge_kib(raddr, raddr + reserved.nbytes) == 0
    assert int(touched.sum()) == touched.nbytes  # the data survived the move
    del touched, reserved
    touched_map.close()
    reserved_map.close()


@linux_only
def test_collapsed_session_computes_the_same_logits(tiny_package, monkeypatch):
    ids = [1, 5, 9, 2, 7, 3]
    monkeypatch.setenv("MOECHAT_HUGEPAGES", "0")
    plain = load_model(tiny_package, "cpu")
    assert plain.huge_page_bytes == 0
    monkeypatch.delenv("MOECHAT_HUGEPAGES")
    moved = load_model(tiny_package, "cpu")
    assert moved.huge_page_bytes % hugepages.HUGE_PAGE == 0
    np.testing.assert_array_equal(
        plain.decoder.forward(ids, logits_for="all"), moved.decoder.forward(ids, logits_for="all")
    )
