"""Where a thing came from: source commit, library versions, file hashes."""

from __future__ import annotations

import importlib.metadata as md
import subprocess
from pathlib import Path

import clinbundle
from clinbundle.runtime.ort_build import distribution

#: Libraries whose versions decide a model's numbers; recorded in every bundle's manifest.
RUNTIME_LIBRARIES = ("clinbundle", "torch", "monai", "numpy", "onnx", "onnxruntime", "mlflow")


def _git(*args: str) -> str:
    """A git command's output in the clinbundle source tree, or 'unknown' outside a checkout."""
    try:
        out = subprocess.run(
            ["git", *args],
            cwd=Path(clinbundle.__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def git_commit() -> str:
    """The commit of the clinbundle source tree, or 'unknown' outside a git checkout."""
    return _git("rev-parse", "HEAD")


def git_state() -> dict[str, str]:
    """Branch and whether the tree had uncommitted changes: a run's numbers come from the
    commit only when `git_dirty` is false."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    dirty = "unknown" if status == "unknown" else str(bool(status)).lower()
    return {"git_branch": _git("rev-parse", "--abbrev-ref", "HEAD"), "git_dirty": dirty}


def library_versions(names: tuple[str, ...] = RUNTIME_LIBRARIES) -> dict[str, str]:
    """name -> version; `onnxruntime` is reported under the build installed (onnxruntime-gpu on
    a CUDA host)."""
    versions = {}
    for name in map(distribution, names):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
