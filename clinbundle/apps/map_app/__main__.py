"""Entry point of the MAP (`python /opt/holoscan/app`) and of `python -m clinbundle.apps.map_app`.

Exit codes: 0 done, 2 bad input (message on stderr, nothing written), 1 any other failure
(nothing written either: outputs are renamed out of the staging folder only on success).
"""

from __future__ import annotations

import logging
import shutil
import sys

from clinbundle.apps.map_app.app import SegmentationApp
from clinbundle.apps.map_app.inputs import MapInputError


def main() -> int:
    app = SegmentationApp()
    try:
        app.run()
        published = []
        if app.staging is not None:
            for f in sorted(p for p in app.staging.rglob("*") if p.is_file()):
                rel = f.relative_to(app.staging)
                if rel.as_posix() == ".lock":
                    continue
                dest = app.staging.parent / rel  # sub-folders of NIfTI inputs are kept
                dest.parent.mkdir(parents=True, exist_ok=True)
                f.replace(dest)
                published.append(rel.as_posix())
        if not published:
            raise RuntimeError("the application wrote no output")
        logging.getLogger("clinbundle.map_app").info("wrote %s", ", ".join(published))
        return 0
    except MapInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        print(f"error: the application failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        if app.staging is not None:
            shutil.rmtree(app.staging, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
