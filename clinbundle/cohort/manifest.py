"""The cohort's memory between runs: `<output_dir>/manifest.jsonl`, one JSON line per finished
case, appended and fsynced as each lands, so a killed job loses at most the case in flight.

A row's key is (content_hash, model_version, runtime): the same bytes through the same model and
runtime are the same answer. The last line of a key wins (a redone case appends a new line).
A torn last line (the process died mid-write) is ignored, not fatal.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger("clinbundle.cohort")

MANIFEST = "manifest.jsonl"
Key = tuple[str, str, str]


def key_of(row: dict) -> Key:
    return (str(row["content_hash"]), str(row["model_version"]), str(row["runtime"]))


def read_manifest(output_dir: Path, by_case: bool = False) -> dict:
    """The last row of every key; unparsable lines are logged and skipped. `by_case`: of every
    (key, case_id), so two cases with the same bytes keep a row each."""
    path = Path(output_dir) / MANIFEST
    rows: dict[Key, dict] = {}
    if not path.is_file():
        return rows
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows[(key_of(row), row["case_id"]) if by_case else key_of(row)] = row
        except (json.JSONDecodeError, KeyError, TypeError):
            log.warning("%s line %d is not a manifest row; ignored", path, n)
    return rows


def append_row(output_dir: Path, row: dict) -> None:
    """One line, written in one call and fsynced before the next case is counted as done."""
    path = Path(output_dir) / MANIFEST
    line = json.dumps(row, sort_keys=True, default=str) + "\n"
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if os.fstat(fd).st_size and not _ends_with_newline(fd):
            line = "\n" + line  # a torn line of a killed run stays on a line of its own
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _ends_with_newline(fd: int) -> bool:
    size = os.fstat(fd).st_size
    return os.pread(fd, 1, size - 1) == b"\n"


def outputs_present(row: dict, output_dir: Path) -> bool:
    """A done row still counts only while every output it names is on disk."""
    files = [row.get("output"), row.get("seg")]
    return all((Path(output_dir) / f).is_file() for f in files if f)


def is_done(row: dict | None, output_dir: Path) -> bool:
    return bool(row) and row.get("status") == "done" and outputs_present(row, output_dir)


def is_final(row: dict | None, output_dir: Path, retry_failed: bool = False) -> bool:
    """Whether a re-run keeps this row instead of running the case again.

    Done with its outputs on disk: kept. Failed because of the input itself (error_kind
    "input": unreadable, not a volume, too large...): kept too, since the same bytes through the
    same model fail the same way; a changed file has a new hash and runs. Failed for any other
    reason (the runtime, memory, a lost worker): run again. `retry_failed` runs every failed
    case again (e.g. after raising CLINBUNDLE_MAX_VOXELS).
    """
    if is_done(row, output_dir):
        return True
    return bool(row) and row.get("error_kind") == "input" and not retry_failed
