"""A CycloneDX SBOM (JSON) of the Python environment a bundle was parity-checked in.

`cyclonedx-py environment` (cyclonedx-bom) reads the installed distributions of this
interpreter: offline, a few seconds. Schema validation is skipped (it takes the better part of a
minute); the generator writes valid CycloneDX 1.6 of its own.

The tool may live in a Python of its own (`CLINBUNDLE_SBOM_PYTHON`; `make` sets up
`.venv-sbom`), as the Dockerfiles do: cyclonedx-bom pulls jsonschema's format extras, whose
rfc3987-syntax builds a grammar whenever jsonschema is imported, and MONAI imports jsonschema,
so installed beside clinbundle it adds ~3 s to every command. Else this interpreter's own
(`pip install 'clinbundle[package]'`).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from clinbundle.runtime.errors import BundleError

SBOM_FILE = "sbom.cdx.json"
SBOM_TIMEOUT_S = 300


def write_sbom(dest: Path, python: str = sys.executable) -> Path:
    """Write the SBOM of `python`'s environment (default: this one) to `dest`."""
    tool = os.environ.get("CLINBUNDLE_SBOM_PYTHON") or sys.executable
    if tool == sys.executable and importlib.util.find_spec("cyclonedx_py") is None:
        raise BundleError(
            "cyclonedx-bom is not installed, so no SBOM can be written into the bundle: "
            "pip install 'clinbundle[package]', or set CLINBUNDLE_SBOM_PYTHON to a Python "
            "that has it (`make install` makes .venv-sbom)"
        )
    cmd = [tool, "-m", "cyclonedx_py", "environment", "--of", "JSON"]
    cmd += ["--no-validate", "--output-reproducible", "-o", str(dest), python]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=SBOM_TIMEOUT_S, check=False)
    if proc.returncode != 0 or not Path(dest).is_file():
        raise BundleError(f"cyclonedx-py failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return Path(dest)
