"""What a shipped format carries of clinbundle: the runtime core, plus the app it runs.

The pyfunc vendors the runtime core; the bento adds its request handling (`apps/http_io.py`);
the MAP adds its app (`apps/map_app`). None carries build or training code, so serving never
imports it (`tests/test_layout.py`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import clinbundle

#: The package marker and the runtime core.
VENDORED = ("__init__.py", "runtime")


def vendor_runtime(dest: Path, extra: tuple[str, ...] = ()) -> Path:
    """Copy the runtime core (and `extra` paths of clinbundle, e.g. the app a format runs) into
    `dest/clinbundle`: the only clinbundle code a pyfunc, a bento or a MAP carries."""
    src, out = Path(clinbundle.__file__).parent, dest / "clinbundle"
    for rel in (*VENDORED, *extra):
        if (src / rel).is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
            shutil.copytree(src / rel, out / rel, ignore=ignore, dirs_exist_ok=True)
        else:
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, out / rel)
    return out
