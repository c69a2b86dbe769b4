"""Outputs appear whole or not at all: each is written to a temp file in its own folder and
renamed into place (os.replace is atomic on one file system). A job killed mid-write leaves only
a temp file, which the next job in that folder removes."""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from clinbundle.runtime.errors import ClinbundleError

log = logging.getLogger("clinbundle.cohort")

TEMP_PREFIX = ".tmp-"
LOCK_FILE = ".predict.lock"


def atomic_write(path: Path, write: Callable[[str], None], suffix: str = "") -> Path:
    """`write(temp_path)` then rename to `path`; `suffix` keeps a writer's format detection
    (nibabel picks gzip from `.nii.gz`). The temp file is removed if `write` fails."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}-", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def remove_stale_temps(folder: Path) -> int:
    """Temp files a killed job left in `folder` (call only while holding its lock)."""
    stale = [p for p in Path(folder).glob(f"{TEMP_PREFIX}*") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    if stale:
        log.info("%s: removed %d temp file(s) of an interrupted job", folder, len(stale))
    return len(stale)


#: What a second `predict` on the same output folder is told.
PREDICT_BUSY = (
    "another `clinbundle predict` is writing to {folder}; wait for it or use another --output"
)


@contextmanager
def exclusive(folder: Path, busy: str = PREDICT_BUSY, lock_file: str = LOCK_FILE) -> Iterator[None]:
    """One job per folder: a second `predict` would redo the same cases and interleave the
    manifest, a second `add-corrections` would lose one dataset.json. The lock is the kernel's
    (flock), so a killed job never leaves it held; `busy` (with {folder}) is the refusal."""
    path = Path(folder) / lock_file
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)  # flock needs no write access
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ClinbundleError(busy.format(folder=folder)) from None
        yield
    finally:
        os.close(fd)
