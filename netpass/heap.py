"""The process's C heap (glibc malloc): the only module that tunes it.

The agent receives a session's frames as batches of up to 16 MiB, keeps
them until the VM has read them, then frees them, hundreds of times a
second.  glibc's defaults hand such blocks back to the kernel (``munmap``,
or trimming the heap's top) and take them again for the next batch, so
every new batch's pages fault in afresh, zeroed by the kernel: in the
bench's receiver that was ~12% of its CPU at 1500-byte frames (``perf``:
``exc_page_fault``, ``clear_page_erms``, ``unmap_page_range``).  While a
session runs, netpass has the heap keep what it freed; when none runs, it
gives the free memory back (``malloc_trim``), so an idle agent does not
hold a finished migration's cache.

Another C library than glibc: nothing is tuned (the functions say so).
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap, not from mmap: a batch is at
# most 16 MiB; glibc accepts at most 32 MiB here (HEAP_MAX_SIZE / 2).
MMAP_THRESHOLD = 32 << 20
# Free memory the heap keeps at its top before it trims.
TRIM_THRESHOLD = 256 << 20


def _find_libc() -> ctypes.CDLL | None:
    libc = ctypes.CDLL(None)  # the C library this process runs on
    if not (hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")):
        return None
    return libc


_LIBC = _find_libc()


def keep_freed() -> bool:
    """Have the heap keep freed blocks for reuse; False if it cannot
    (not glibc, or glibc refused a setting)."""
    if _LIBC is None:
        log.debug("not glibc: the heap is left as it is")
        return False
    ok = bool(_LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
        bool(_LIBC.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not ok:
        log.debug("glibc refused a heap setting: the heap is left as it is")
    return ok


def give_back() -> bool:
    """Return the heap's free memory to the kernel; whether any was."""
    return bool(_LIBC.malloc_trim(0)) if _LIBC is not None else False
