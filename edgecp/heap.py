"""The C heap handed back to the operating system (glibc's `malloc_trim` and `mallopt`), torch-free.

Freed memory stays in glibc's heap until the heap is trimmed: a dropped onnxruntime session's weights, or torch's
freed blocks, would otherwise keep counting in the process's RSS while the next model loads. This is the one place
that talks to libc for it; the device runtime (`edgecp.export.ort_runner`) and the training side
(`edgecp.memory`) both use it. Everything here is a no-op where there is no glibc (macOS, Windows, musl).
"""

from __future__ import annotations

import ctypes
import functools

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter: allocations from this size get their own mapping


@functools.lru_cache(maxsize=1)
def libc() -> ctypes.CDLL | None:
    """glibc, or None where the process has none."""
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def trim_heap() -> None:
    """Hand freed heap pages back to the OS (`malloc_trim(0)`)."""
    lib = libc()
    try:
        if lib is not None:
            lib.malloc_trim(0)
    except AttributeError:  # a libc.so.6 that is not glibc
        pass


def set_mmap_threshold(nbytes: int) -> None:
    """Allocations of `nbytes` or more get their own mapping, so freeing them returns them to the OS at once."""
    lib = libc()
    try:
        if lib is not None:
            lib.mallopt(M_MMAP_THRESHOLD, nbytes)
    except AttributeError:  # a libc.so.6 that is not glibc
        pass
