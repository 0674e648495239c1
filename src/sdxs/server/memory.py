"""Give freed memory back to the OS after each job, so the server's RSS does not ratchet up to its largest job.

The cause (docs/reliability.md, "Memory after mixed image work"): torch's CPU tensors come from glibc `malloc`.
glibc serves a block over its mmap threshold (128 KB) with its own `mmap` and unmaps it on `free`, but the first
time such a block is freed it raises the threshold to that block's size (up to 32 MB). From then on the job's
activations come from the heap, and what a job frees there stays mapped: the free space is scattered between
live blocks, and glibc only trims a heap from its top. So RSS stayed at the high-water mark of every size and
kind of job seen so far: on the shipped model, 576 MB at start, 1,065 MB after mixed image work, flat when the
same work repeated, with 444 MB of it free inside malloc's heaps. `MALLOC_ARENA_MAX=1` did not help (274 MB still
held); a fixed threshold (`MALLOC_MMAP_THRESHOLD_=131072`, which turns the raising off) did, from the environment
only. `malloc_trim(0)` after each job returns every free page of every heap to the OS (`madvise`): 17-30 ms on
average (at most 145 ms) on 2 busy cores, run on the device thread after the answer has gone, before the next job.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    """glibc's `malloc_trim`, or None (musl, macOS, Windows: nothing to call, and nothing is done)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Return the C heap's free pages to the OS; True when glibc's `malloc_trim` was there to do it."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
