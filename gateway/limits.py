"""Process limits the daemon raises for itself at start-up."""

from __future__ import annotations

import logging
import resource

log = logging.getLogger("gateway.limits")


def raise_open_files(want: int = 65536) -> int:
    """Raise the soft open-file limit towards the hard one (SMTP sessions are file descriptors)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("event=rlimit_nofile_failed error=%r", str(exc))
    return int(soft)


M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def return_big_buffers(threshold: int = 256 * 1024) -> bool:
    """Let glibc give buffers of `threshold` bytes and more back to the kernel when freed.

    By default glibc raises its mmap threshold to the size of the largest block freed so far (up
    to 32 MiB): after one 10 MiB mail every later big buffer comes from the heap, is copied when
    it grows, and stays resident after use. A fixed threshold keeps big buffers in their own
    mappings (grown by mremap, unmapped when freed), so a large mail costs memory only while it
    is being handled. False where the C library is not glibc.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = bool(mallopt(M_MMAP_THRESHOLD, threshold))
    ok = bool(mallopt(M_TRIM_THRESHOLD, 2 * threshold)) and ok
    return ok
