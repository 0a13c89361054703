"""Host memory the process frees is kept for its next allocations instead of going back to the OS.

By default glibc's malloc maps every allocation above a threshold (128 KiB, growing to 32 MiB) afresh and
unmaps it when freed, and gives the heap's free top back above another: a CPU training step allocates and
frees the same large tensors (activations, logit tiles, the [vocabulary, hidden] gradients) over and over,
and each fresh mapping pays a page fault per 4 KiB page when first written. `keep_freed_memory` serves the main
arena's allocations from its heap and gives back the heap's free top only above 2 GiB, so freed memory is reused
warm. It lasts for the process: free memory below a live block stays with it, so the process's memory stays
near its peak (other threads' arenas still map allocations of about 64 MiB and more)."""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger("rlcore")

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1
"""Bytes of free heap top kept before glibc gives any back (mallopt takes an int: 2 GiB is its largest)."""

_kept = False


def _glibc() -> ctypes.CDLL | None:
    """The process's C library where it is glibc (the only one whose mallopt this knows), else None."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        return libc
    except (OSError, AttributeError, TypeError):  # no C library by that name, or not glibc
        return None


def keep_freed_memory() -> bool:
    """Make glibc's malloc serve the main arena's allocations from its heap (no mmap per large tensor) and trim
    the heap only above `TRIM_THRESHOLD` free; once per process. False where the C library is not glibc or
    refused."""
    global _kept
    if _kept:
        return True
    libc = _glibc()
    if libc is None:
        log.info("host memory: not glibc, freed memory is handled by the C library's defaults")
        return False
    # the threshold first: where only it takes, allocations still map afresh and nothing is held back
    _kept = bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(libc.mallopt(M_MMAP_MAX, 0))
    if _kept:
        log.info("host memory: freed memory kept for reuse (glibc malloc: no mmap per allocation, the heap "
                 "trimmed above 2 GiB free; trainer.keep_freed_memory=false for glibc's defaults)")
    return _kept
