"""glibc's allocator told to keep large freed buffers in inference processes.

Each sliding-window pass allocates and frees buffers of tens to hundreds of MB (patch batches,
activations, the output map). glibc serves blocks above its mmap threshold (at most 32 MB) with
a fresh `mmap` and gives them back with `munmap`, and trims the heap's top: so every window the
kernel hands out and zero-fills new pages again. Measured on this kind of machine (2 cores, a
128^3 volume, `benchmarks/runtimes*.json`): the default DynUNet in eager PyTorch 11.3 -> 7.5 s,
AOTInductor 9.9 -> 6.4 s with mapping and trimming off (as fast as `GLIBC_TUNABLES=
glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=...`); ONNX Runtime and OpenVINO (their
own arenas) within noise.

The price: a process keeps its peak heap after a large request (RSS does not fall back; peak
3.4 GB instead of 2.4-2.8 GB in that benchmark). A serving process will see the next volume, so
that is the point; a process that opens no runtime (training, most CLI commands) is untouched.

Set in-process with `mallopt` (ctypes, glibc only) when the first runtime opens, because the
tunables and a preloaded allocator (jemalloc, tcmalloc) are read only at process start, which a
library cannot arrange in bento workers, the MAP, the demo or a Ray actor. The packaging
process opens its candidates through the same call, so the times recorded in a bundle are
taken under the setting its runtimes will serve with. `CLINBUNDLE_MALLOC=default` leaves glibc
as it is; a `GLIBC_TUNABLES` of the user's own that names malloc is left alone too.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger("clinbundle.runtime")

MALLOC_ENV = "CLINBUNDLE_MALLOC"
KEEP, DEFAULT = "keep", "default"
#: mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
#: Largest trim threshold mallopt takes (a C int): the heap top is kept up to 2 GiB.
_TRIM_THRESHOLD = 2**31 - 1

_setting: str | None = None


def tune_allocator() -> str:
    """Apply the setting once per process (logged); the words that say what it is."""
    global _setting
    if _setting is None:
        _setting = _apply()
        log.info("allocator: %s", _setting)
    return _setting


def _apply() -> str:
    choice = os.environ.get(MALLOC_ENV, KEEP).strip().lower() or KEEP
    if choice not in (KEEP, DEFAULT):
        raise ValueError(f"{MALLOC_ENV}={choice!r}: give '{KEEP}' or '{DEFAULT}'")
    if choice == DEFAULT:
        return f"glibc default ({MALLOC_ENV}=default)"
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES of the environment (left as set)"
    if platform.libc_ver()[0] != "glibc":
        return "the platform's own (not glibc: unchanged)"
    libc = ctypes.CDLL(None)
    if not (libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)):
        return "glibc default (mallopt refused the setting)"
    return (
        "glibc, large blocks kept in the heap (mallopt mmap_max=0, trim_threshold=2 GiB; "
        f"{MALLOC_ENV}=default turns it off)"
    )
