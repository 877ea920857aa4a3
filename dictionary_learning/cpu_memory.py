"""Keep freed memory in the process instead of returning it to the OS (glibc, CPU only).

glibc serves every allocation above its mmap threshold (at most 32 MB) with a fresh
``mmap`` and returns it with ``munmap`` when freed. A training step allocates several
``[B, m]`` tensors (134 MB each at B=4096, m=8192), so every step page-faults and zeroes
them again: measured on 2 cores, that is 10-20 % of a dense CPU step. After
:func:`keep_freed_memory`, freed blocks stay on the heap and are reused. The cost: the
process keeps its peak heap (memory still does not grow with the number of steps).

It changes the allocator of the whole process, so the library never calls it on import:
the command-line entry points do, and scripts may.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # from glibc's malloc.h


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to serve large blocks from the heap and not to trim it.

    Returns whether it took effect (False on non-glibc platforms, where it does nothing).
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        logger.debug("no glibc mallopt here: allocator left as it is")
        return False
    ok = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    logger.debug("glibc malloc keeps freed memory: %s", ok)
    return ok
