"""Host-memory setting for CPU training runs: keep the memory of freed tensors in the process (glibc only).

A training step on the CPU allocates its activations and gradients (a few MB each for the demo's tiny ViT), frees
them at the end of the step and allocates them again in the next. glibc hands blocks above its mmap threshold
straight back to the kernel and trims the top of its heap when enough of it is free, so every step faults the same
memory back in, page by page. `tests/test_host_memory.py` measures that on the shape of a step that touches 20,480
pages: with glibc's defaults it faulted in about 20,000 of them on one machine and about 4,300 on another, with this
setting about 200; `make demo` without a loader worker ran in 3 min 2 s with it and 3 min 25 s without
(docs/benchmarks.md).

`keep_freed_memory()` raises the mmap threshold to glibc's maximum, 32 MiB, and stops heap trimming, so freed blocks
are reused by the next step. The process then keeps its peak memory until it exits, which suits a script that
trains and ends (`scripts/demo.py`, `scripts/reproduce.py`); it is not called on import. Imports nothing of the
package.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys


# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 * 1024 * 1024
"""glibc's largest mmap threshold on 64-bit machines; blocks above it (rare in CPU training) are still mmapped."""
TOP_PAD = 64 * 1024 * 1024
TRIM_THRESHOLD = 2**31 - 1


def keep_freed_memory() -> bool:
    """Makes glibc keep freed memory for reuse instead of returning it to the kernel (see the module docstring).

    Returns:
        `True` when all three settings were accepted; `False` on a system without glibc's `mallopt` (macOS,
        Windows, musl), where nothing is changed.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # the mmap threshold first: setting it fixes it (glibc stops adapting it), so it must not be left at 128 KiB
    accepted = [
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        mallopt(_M_TOP_PAD, TOP_PAD),
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
    ]
    return all(value == 1 for value in accepted)
