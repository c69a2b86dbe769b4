"""What every bundle format shares: atomic output folders, manifests and hash checks.

A bundle is built in a hidden temporary folder next to its destination and renamed into place
only after parity passed, so a failed or interrupted build never leaves a half-written bundle
that looks like a real one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from clinbundle.provenance import git_commit, library_versions
from clinbundle.runtime.bundle_reader import MANIFEST
from clinbundle.runtime.errors import BundleError
from clinbundle.runtime.hashing import tree_hashes
from clinbundle.runtime.signature import SIGNATURE_FILE

if TYPE_CHECKING:  # serving imports this module without MLflow installed
    from clinbundle.packaging.model_source import ResolvedModel
    from clinbundle.packaging.parity import ParityReport
log = logging.getLogger("clinbundle.bundle")

BUNDLE_VERSION = 1


@contextlib.contextmanager
def staged_folder(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temp folder; on success it becomes `out`, on any error it disappears."""
    out = out.resolve()
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not force:
        raise BundleError(f"{out} already exists and is not empty; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would make a shipped bundle unreadable to others
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.with_name(f".{out.name}.old-{time.time_ns()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    log.info("wrote %s", out)


def build_manifest(
    folder: Path, fmt: str, model: ResolvedModel, report: ParityReport, extra: dict
) -> dict:
    """Provenance, contract, parity summary and the sha256 of every file but itself (and the
    signature, which is made after the manifest and covers it: clinbundle.runtime.signature)."""
    import mlflow

    tracking = mlflow.get_tracking_uri()
    return {
        "format": fmt,
        "bundle_version": BUNDLE_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {
            "uri": model.uri,
            "name": model.name,
            "version": model.version,
            "run_id": model.run_id,
            "tracking_uri": tracking.split("@")[-1] if "@" in tracking else tracking,
        },
        "provenance": {
            "training_commit": model.run_tags.get("git_commit", "unknown"),
            "packaging_commit": git_commit(),
            "dataset_sha256": model.metadata.get("dataset_sha256"),
            "training_metrics": model.metadata.get("best", {}),
            "held_out": {
                k.removeprefix("promotion_"): v
                for k, v in model.version_tags.items()
                if k in ("promotion_metric", "promotion_mean", "promotion_ci95")
            },
        },
        "libraries": library_versions(),
        "contract": model.contract.model_dump(mode="json"),
        "parity": {
            "passed": report.passed,
            "summary": report.summary(),
            "tolerances": report.to_dict()["tolerances"],
            "reference": report.reference,
            "candidate": report.candidate,
        },
        **extra,
        "files": tree_hashes(folder, exclude=(MANIFEST, SIGNATURE_FILE)),
    }


def write_manifest(folder: Path, manifest: dict) -> Path:
    path = folder / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return path
