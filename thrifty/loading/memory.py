"""Give freed heap memory back to the OS while a model loads, so it does not stay in the peak RSS.

Loading frees a float temporary per tensor (dequantized blocks, packing scratch) and the
uninitialised float parameters that packed weights replace. glibc keeps those chunks, already
touched, inside its heap: without trimming, a 135M-parameter model ends its load with a few
hundred MB of free but resident heap. `malloc_trim` hands whole free pages back (cheap: a few
microseconds when there is nothing to release). Elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # musl and others have no malloc_trim
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_memory() -> None:
    """Return the allocator's free pages to the OS (glibc); a no-op where that is not possible."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
