"""Build step of Dockerfile.serve: a bento folder -> the image's BentoML store + pinned packages.

    python -m clinbundle.packaging.bento_image BENTO_DIR REQUIREMENTS_OUT

Imports the one `.bento` archive of BENTO_DIR into $BENTOML_HOME, keeps a copy of the archive in
$BENTOML_HOME/archive/ (what `clinbundle serve` is pointed at), and writes the bento's exact
`name==version` pins to REQUIREMENTS_OUT so the image runs the versions the bento's HTTP parity
check ran on. Anything else in the bento's requirements is logged and left out, and so is a pin
of the other ONNX Runtime build than the image's (a bento packaged on a CPU host served from a
CUDA image keeps the image's onnxruntime-gpu).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import tarfile
from pathlib import Path

from clinbundle.packaging.bento import ensure_imported
from clinbundle.runtime.errors import BundleError
from clinbundle.runtime.ort_build import ORT_BUILDS, ort_extra

log = logging.getLogger("clinbundle.bento_image")
PIN = re.compile(r"^[A-Za-z0-9._-]+(\[[A-Za-z0-9,._-]+\])?==[A-Za-z0-9.+!_-]+$")


def find_archive(folder: Path) -> Path:
    archives = sorted(folder.glob("*.bento")) if folder.is_dir() else [folder]
    if len(archives) != 1 or not archives[0].is_file():
        raise BundleError(f"{folder} must hold exactly one .bento archive, found {len(archives)}")
    return archives[0]


def bento_pins(archive: Path) -> list[str]:
    """The `name==version` lines of the bento's env/python/requirements.txt."""
    with tarfile.open(archive) as tar:
        member = next(
            (m for m in tar.getmembers() if m.name.endswith("env/python/requirements.txt")), None
        )
        if member is None:
            raise BundleError(f"{archive} has no env/python/requirements.txt")
        text = tar.extractfile(member).read().decode()  # type: ignore[union-attr]
    pins = []
    for line in (raw.split("#")[0].strip() for raw in text.splitlines()):
        if not line:
            continue
        if PIN.match(line):
            if line not in pins:
                pins.append(line)
        else:
            log.info("requirement %r is not an exact pin: left to the image's own install", line)
    return pins


def image_pins(pins: list[str], image_extra: str) -> list[str]:
    """The bento's pins less any ONNX Runtime build other than the image's (`cpu` or `gpu`)."""
    other = {d for e, d in ORT_BUILDS.items() if e != image_extra}
    kept = [p for p in pins if p.split("==")[0].lower() not in other]
    for pin in sorted(set(pins) - set(kept)):
        log.info(
            "%s left out: this image has ONNX Runtime's %s build (%s); the bento's parity "
            "check ran on the other one",
            pin,
            image_extra,
            ORT_BUILDS[image_extra],
        )
    return kept


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    archive = find_archive(Path(argv[0]))
    home = Path(os.environ.get("BENTOML_HOME", "bentoml"))
    tag = ensure_imported(archive)
    (home / "archive").mkdir(parents=True, exist_ok=True)
    shutil.copy(archive, home / "archive" / archive.name)
    pins = image_pins(bento_pins(archive), ort_extra())
    Path(argv[1]).write_text("".join(p + "\n" for p in pins))
    log.info("bento %s in %s; %d pinned packages: %s", tag, home, len(pins), " ".join(pins))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
