"""The cohort's per-case table (`predictions.parquet` for code, `predictions.csv` for people),
and `--flag-worst`: the most uncertain cases first in line for review."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from clinbundle.cohort.atomic import atomic_write

#: Fixed columns; `volume_ml_<label>` columns (one per foreground label) sit after `seconds`,
#: and columns a part adds (e.g. `stored` for PACS) come last.
COLUMNS = (
    "case_id",
    "input",
    "content_hash",
    "shape",
    "spacing",
    "seconds",
    "uncertainty",
    "runtime",
    "model_name",
    "model_version",
    "status",
    "error",
    "output",
    "seg",
    "flagged",
)
VOLUME_PREFIX = "volume_ml_"
TABLE_PARQUET, TABLE_CSV = "predictions.parquet", "predictions.csv"


def columns_of(rows: list[dict]) -> list[str]:
    keys = {k for r in rows for k in r}
    volumes = sorted(k for k in keys if k.startswith(VOLUME_PREFIX))
    fixed = list(COLUMNS)
    at = fixed.index("seconds") + 1
    extra = sorted(keys - set(COLUMNS) - set(volumes))
    return [*fixed[:at], *volumes, *fixed[at:], *extra]


def to_frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame([{c: r.get(c) for c in columns_of(rows)} for r in rows])
    frame = frame.reindex(columns=columns_of(rows))
    if "flagged" in frame:
        frame["flagged"] = frame["flagged"].fillna(False).astype(bool)
    for c in ("error", "seg", "output", "shape", "spacing"):
        frame[c] = frame[c].fillna("").astype(str)
    return frame


def write_table(rows: list[dict], output_dir: Path) -> tuple[Path, Path]:
    """Both tables, each written to a temp file and renamed into place."""
    frame = to_frame(rows)
    out = Path(output_dir)
    parquet, csv = out / TABLE_PARQUET, out / TABLE_CSV
    atomic_write(parquet, lambda p: frame.to_parquet(p, index=False))
    atomic_write(csv, lambda p: frame.to_csv(p, index=False))
    return parquet, csv


def read_table(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path) if Path(path).suffix == ".parquet" else pd.read_csv(path)


def flag_worst(rows: list[dict], n: int) -> list[dict]:
    """Set `flagged` on the n done cases with the highest uncertainty (ties: case_id order);
    every other row is unflagged. Returns the rows (changed in place)."""
    if n < 0:
        raise ValueError(f"--flag-worst must be >= 0, got {n}")
    done = [r for r in rows if r.get("status") == "done"]
    worst = sorted(done, key=lambda r: (-float(r.get("uncertainty") or 0.0), r["case_id"]))[:n]
    chosen = {id(r) for r in worst}
    for r in rows:
        r["flagged"] = id(r) in chosen
    return rows
