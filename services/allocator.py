"""glibc malloc settings for a server that decodes large images: freed pixels go back to the OS.

Pillow stores an image in blocks of up to 16 MiB, allocated with ``malloc``. glibc serves an
allocation over its mmap threshold with its own mapping, unmapped on ``free``, but the threshold
is dynamic: the first free of such a mapping raises it to that size (up to 32 MiB), so every
later image block comes from the per-thread heaps instead, and a heap only shrinks from its top.
The gateway decodes on several threads, so after a burst of 10,000 x 10,000 images each heap
kept its peak: the soak's RSS ratcheted up by gigabytes while the decoded-image budget held
(bench/soak.py). Fixing the threshold (``mallopt(M_MMAP_THRESHOLD)``, which also turns the
dynamic adjustment off) keeps every block of 1 MiB or more in its own mapping, returned on free.

Python objects are far below the threshold (pymalloc's arenas are 1 MiB and mmapped by CPython
anyway), so only large buffers change path. Set once, at server start, before any image work;
``MALLOC_MMAP_THRESHOLD_`` in the environment does the same for a process started with it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
from typing import Any

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
MMAP_THRESHOLD_BYTES = 1024 * 1024
"""Allocations from this size up get their own mapping (glibc's default starts at 128 KiB and
rises to 32 MiB; 1 MiB keeps gRPC's and protobuf's medium buffers on the heaps)."""


def _glibc(name: str) -> Any:
    """A glibc function by name; None where the C library is not glibc (musl has no ``mallopt``
    or ``malloc_trim``) or the platform is not Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def return_large_frees_to_os(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes; False where that is not glibc."""
    mallopt = _glibc("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = mallopt(M_MMAP_THRESHOLD, threshold) == 1
    if not done:
        log.warning("mallopt(M_MMAP_THRESHOLD, %d) failed: freed image memory may stay resident", threshold)
    return done


def trim_heap() -> None:
    """Hand the heaps' free pages back to the OS (glibc ``malloc_trim``). The mmap threshold
    above covers blocks of 1 MiB and more; a refused large gRPC message leaves many small receive
    slices free but resident in the heaps, which only a trim returns."""
    trim = _glibc("malloc_trim")
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
        trim(0)
