"""Process-wide allocator settings that keep `weightlens compare`'s memory flat in model size.

Two caches outlive every layer unless told otherwise:

- glibc raises its mmap threshold each time a large mmapped block is freed (up to 32 MiB), so
  after the first layers the layer-sized temporaries (megabytes) come from the heap; the small
  records kept per layer (statistics, spectra) then pin the heap between them and freed memory
  is not given back. `bound_allocator` fixes the threshold, so every block of 256 KiB or more
  has its own mapping, returned to the system on free. Measured (bench/compare_sd15.py, full
  analysis, 2 workers): SD1.5 186 -> 182 MiB peak RssAnon, a 2.1x deeper SD1.5 204 -> 191 MiB.
- MKL's fast memory manager keeps the buffers of every eigensolve and Gram product, per thread,
  for the life of the process (SD1.5: 224 -> 187 MiB without it). MKL reads
  MKL_DISABLE_FAST_MM once, when torch loads it: `disable_mkl_buffer_cache` only works before
  torch is imported, which is why importing weightlens calls it first.

`compare()` also trims the heap after every layer (`heap_trimmer`), for CLI and API alike.
None of these changes a result. The CLI applies all three; a notebook user can call
`bound_allocator()`.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["MMAP_THRESHOLD", "bound_allocator", "disable_mkl_buffer_cache", "heap_trimmer"]

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # mallopt parameter number, from glibc's malloc.h
MMAP_THRESHOLD = 1 << 18  # bytes: 256 KiB


def _libc(name: str) -> Any | None:
    """The C library function `name` of this process (None off Linux, or where it lacks one, as musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None), name)  # the C library this process already uses
    except (OSError, AttributeError):
        return None


def bound_allocator(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at `threshold` bytes for this process.

    Returns:
        True if the setting was applied; False where it does not apply (not Linux, or a C
        library without `mallopt`, such as musl), which is harmless.
    """
    mallopt = _libc("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    applied = bool(mallopt(M_MMAP_THRESHOLD, threshold))
    log.debug("mallopt(M_MMAP_THRESHOLD, %d): %s", threshold, "applied" if applied else "refused")
    return applied


def heap_trimmer() -> Callable[[], object]:
    """glibc's `malloc_trim(0)`, or a no-op where the C library has none (macOS, musl).

    `compare()` calls it after every layer: glibc raises its mmap threshold after the first
    large free, so later Gram-sized buffers come from the heap, and the small objects a layer
    leaves behind (its results) pin the holes they leave; resident memory then creeps up with
    the number of layers (+55 MiB over SD1.5's 282). Trimming returns the free pages.
    """
    trim = _libc("malloc_trim")
    if trim is None:
        return lambda: None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


def disable_mkl_buffer_cache() -> bool:
    """Set MKL_DISABLE_FAST_MM=1 unless torch is already loaded or the user set it.

    Returns:
        True if the variable is 1 and torch is not loaded yet (so MKL will honour it).
    """
    if "torch" in sys.modules:
        return False
    os.environ.setdefault("MKL_DISABLE_FAST_MM", "1")
    return os.environ["MKL_DISABLE_FAST_MM"] == "1"
