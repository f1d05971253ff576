"""Move the memory a new onnxruntime session allocated onto transparent huge pages.

Decoding reads every weight once per token, well over the CPU caches' size, so each
step walks tens of thousands of 4 KiB pages; on 2 MiB pages the TLB misses all but
disappear (SmolLM2 int8 decodes about 5% faster, docs/decisions/0005-*). onnxruntime
allocates its prepacked weights with plain malloc, and Linux's usual THP mode
(``madvise``) gives huge pages only to memory that asks for them, so after a session
is created we ask for the regions it added: ``MADV_HUGEPAGE`` marks them,
``MADV_COLLAPSE`` (Linux 6.1+) moves their pages now rather than whenever khugepaged
gets there. Only 2 MiB-aligned stretches whose pages all hold data are collapsed, so
nothing reserved but untouched gets committed and resident memory does not grow.
Best effort by design: the kernel may refuse (old kernel, THP off, no free huge
pages) and the session then simply runs on small pages; :func:`collapse_new_memory`
returns how much it moved, which ``moechat bench`` reports. ``MOECHAT_HUGEPAGES=0``
turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Callable, Iterator
from typing import TypeVar

HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14
_MADV_COLLAPSE = 25
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"

Region = tuple[int, int]
T = TypeVar("T")


def enabled() -> bool:
    """Linux with THP not switched off, and not disabled by ``MOECHAT_HUGEPAGES=0``."""
    if not sys.platform.startswith("linux") or os.environ.get("MOECHAT_HUGEPAGES") == "0":
        return False
    try:
        with open(_THP_MODE) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def writable_private_regions() -> list[Region]:
    """Address ranges of this process's anonymous read-write mappings (and the heap)."""
    regions = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            path = fields[5] if len(fields) > 5 else ""
            if fields[1].startswith("rw") and path in ("", "[heap]"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                regions.append((start, end))
    return sorted(regions)


def _added(before: list[Region], after: list[Region]) -> Iterator[Region]:
    """The parts of ``after`` not covered by ``before`` (both sorted): a mapping that grew
    or merged with a new neighbour contributes only its new part."""
    for start, end in after:
        for old_start, old_end in before:
            if old_end <= start or old_start >= end:
                continue
            if old_start > start:
                yield start, old_start
            start = max(start, old_end)
            if start >= end:
                break
        if start < end:
            yield start, end


def _resident_huge_page_spans(regions: Iterator[Region]) -> Iterator[int]:
    """Start addresses of aligned 2 MiB spans inside ``regions`` whose pages are all
    resident (``mincore``): collapsing them moves data without committing anything new."""
    mincore = _libc().mincore
    vec = (ctypes.c_ubyte * (HUGE_PAGE // os.sysconf("SC_PAGE_SIZE")))()
    for start, end in regions:
        addr = (start + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1)
        while addr + HUGE_PAGE <= end:
            if mincore(addr, HUGE_PAGE, vec) == 0 and all(v & 1 for v in vec):
                yield addr
            addr += HUGE_PAGE


_LIBC: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    global _LIBC
    if _LIBC is None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        _LIBC = libc
    return _LIBC


def collapse_new_memory(before: list[Region]) -> int:
    """Collapse the memory mapped since ``before`` (a :func:`writable_private_regions`
    snapshot) onto huge pages; return the bytes now on huge pages (0 when refused)."""
    libc = _libc()
    moved = 0
    for addr in _resident_huge_page_spans(_added(before, writable_private_regions())):
        libc.madvise(addr, HUGE_PAGE, _MADV_HUGEPAGE)
        if libc.madvise(addr, HUGE_PAGE, _MADV_COLLAPSE) == 0:
            moved += HUGE_PAGE
    return moved


def create_on_huge_pages(create: Callable[[], T]) -> tuple[T, int]:
    """``create()``, then the memory it mapped moved onto huge pages where
    :func:`enabled`; returns (its result, bytes moved). A process whose /proc cannot be
    read just keeps its small pages."""
    if not enabled():
        return create(), 0
    try:
        before = writable_private_regions()
    except OSError:
        return create(), 0
    result = create()
    try:
        return result, collapse_new_memory(before)
    except OSError:
        return result, 0
