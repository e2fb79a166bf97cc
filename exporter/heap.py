"""What glibc's allocator keeps after a scan, given back to the system.

A scan allocates and frees tens of MB at a million flows: the expired records, the IPFIX
messages (one small block each), the numpy arrays of the slower paths. Two settings keep the
process's resident size at what it holds between scans rather than at its largest scan:

- a fixed mmap threshold (`release_large_arrays_to_the_os`): glibc serves blocks above it with
  mmap and returns them on free, but raises the threshold (up to 32 MB) each time such a block is
  freed; after one scan every later array of a few MB would come from the heap, whose top stays
  mapped. A fixed threshold turns that adjustment off.
- `trim()` after each scan (malloc_trim): the messages are ~1.4 KB blocks from the heap; freed
  they leave holes between live blocks that the heap's top trimming never reaches, and malloc_trim
  hands the free pages inside the heap back as well (a few ms at a million flows).

Both are no-ops (False) where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter

def _load() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_LIBC = _load()


def _glibc() -> Any:
    return _LIBC


def release_large_arrays_to_the_os(threshold: int = 1 << 20) -> bool:
    """Fix glibc's mmap threshold at `threshold` bytes (see the module docstring)."""
    libc = _glibc()
    try:
        return bool(libc and libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except AttributeError:
        return False


def trim() -> bool:
    """Give the heap's free pages back (malloc_trim(0)); True if any were."""
    libc = _glibc()
    try:
        return bool(libc and libc.malloc_trim(0))
    except AttributeError:
        return False
