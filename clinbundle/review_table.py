"""A predictions table read back for review: the flagged cases of `clinbundle predict`.

`clinbundle demo --queue` shows them one after another and `clinbundle data add-corrections`
takes in their corrected labels. Both trust nothing in the file: a table is an outside input
(hand-edited, from another machine, half-copied), so every column used is checked, case ids
must be safe file names (they become file names in a training set), and a case's input is
checked against the content hash its prediction was made from before anyone reviews or trains
on it. pandas reads the file (Parquet through pyarrow, or the CSV twin `predict` writes).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from clinbundle.cohort.table import VOLUME_PREFIX
from clinbundle.runtime.errors import InputError

#: The columns of clinbundle.cohort.table.COLUMNS this module reads.
NEEDED = (
    "case_id",
    "input",
    "content_hash",
    "uncertainty",
    "model_name",
    "model_version",
    "runtime",
    "status",
    "output",
    "flagged",
)
SAFE_CASE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class FlaggedCase:
    """One flagged row, with its files resolved and checked to exist."""

    case_id: str
    input: Path
    content_hash: str
    uncertainty: float
    output: Path  # the stored prediction (labels on the input's grid)
    model_name: str
    model_version: str
    runtime: str
    table: Path

    @property
    def model(self) -> str:
        return f"{self.model_name} v{self.model_version}"


def _read_frame(table: Path):
    import pandas as pd

    if not table.is_file():
        raise InputError(
            f"{table}: no such predictions table (give the predictions.parquet of a run)"
        )
    try:
        if table.suffix == ".csv":
            return pd.read_csv(table, dtype=str, keep_default_na=False)
        return pd.read_parquet(table)
    except Exception as e:  # pyarrow and pandas raise many types for a foreign file
        what = "CSV" if table.suffix == ".csv" else "Parquet"
        raise InputError(
            f"{table}: not a readable {what} table ({type(e).__name__}: {e})"
        ) from None


def _flag(value: object) -> bool:
    """True / False from Parquet booleans or the CSV's words; anything else is a bad table."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", ""):
        return False
    raise ValueError(f"flagged={value!r} is not true/false")


def _beside(table: Path, value: str) -> Path:
    """A path from the table: absolute as written, relative to the table's folder first."""
    path = Path(value)
    if path.is_absolute():
        return path
    return table.parent / path if (table.parent / path).exists() else path


def _row(table: Path, row: dict) -> tuple[FlaggedCase | None, list[str]]:
    case_id = str(row["case_id"])
    where = f"{table.name}: case {case_id!r}"
    problems = []
    if not SAFE_CASE_ID.fullmatch(case_id):
        return None, [f"{where}: case_id must be letters, digits, '.', '_', '-' (a file name)"]
    if str(row["status"]) != "done":
        problems.append(f"{where}: flagged but its status is {row['status']!r}, not 'done'")
    if not SHA256_HEX.fullmatch(str(row["content_hash"])):
        problems.append(f"{where}: content_hash is not a sha256 hex digest")
    try:
        uncertainty = float(row["uncertainty"])
        if not math.isfinite(uncertainty):
            raise ValueError
    except (TypeError, ValueError):
        problems.append(f"{where}: uncertainty {row['uncertainty']!r} is not a finite number")
        uncertainty = math.nan
    image, output = _beside(table, str(row["input"])), _beside(table, str(row["output"]))
    if not image.is_file():
        problems.append(
            f"{where}: its input {image} is not a file here (the queue and corrections take "
            "NIfTI cases; a DICOM study's files are not named in the table)"
        )
    if not str(row["output"]) or not output.is_file():
        problems.append(f"{where}: its stored prediction {output} is missing")
    if problems:
        return None, problems
    case = FlaggedCase(
        case_id=case_id,
        input=image,
        content_hash=str(row["content_hash"]),
        uncertainty=uncertainty,
        output=output,
        model_name=str(row["model_name"]),
        model_version=str(row["model_version"]),
        runtime=str(row["runtime"]),
        table=table,
    )
    return case, []


def read_flagged(table: Path | str) -> list[FlaggedCase]:
    """The flagged cases of a predictions table, most uncertain first (ties by case id).

    All problems are reported at once; a table with no flagged case, or flagged cases of more
    than one model version, is refused: a review is stored on one model version.
    """
    table = Path(table).resolve()
    frame = _read_frame(table)
    missing = [c for c in NEEDED if c not in frame.columns]
    if missing:
        raise InputError(
            f"{table}: not a predictions table of `clinbundle predict` (missing columns: "
            f"{', '.join(missing)})"
        )
    rows = frame[list(NEEDED)].to_dict("records")
    try:
        rows = [r for r in rows if _flag(r["flagged"])]
    except ValueError as e:
        raise InputError(f"{table}: {e}") from None
    if not rows:
        raise InputError(
            f"{table}: no flagged case; run `clinbundle predict ... --flag-worst N` to flag some"
        )
    cases, problems = [], []
    for row in rows:
        case, found = _row(table, row)
        problems += found
        cases += [case] if case else []
    ids = [c.case_id for c in cases]
    problems += [
        f"{table.name}: case {i!r} appears twice" for i in sorted(set(ids)) if ids.count(i) > 1
    ]
    models = sorted({c.model for c in cases})
    if len(models) > 1:
        problems.append(
            f"{table.name}: flagged cases of {len(models)} models ({', '.join(models)})"
        )
    if problems:
        raise InputError("the review queue cannot open:\n  - " + "\n  - ".join(problems))
    return sorted(cases, key=lambda c: (-c.uncertainty, c.case_id))


def check_unchanged(case: FlaggedCase) -> None:
    """The input still holds the bytes the prediction was made from (its content hash)."""
    from clinbundle.cohort.cases import files_sha256

    digest = files_sha256([case.input])
    if digest != case.content_hash:
        raise InputError(
            f"case {case.case_id!r}: {case.input} changed since it was predicted (sha256 "
            f"{digest[:12]}..., the table says {case.content_hash[:12]}...)"
        )


def foreground_labels(table: Path | str) -> list[str]:
    """The foreground label names of the model that made the table (its volume columns)."""
    frame = _read_frame(Path(table).resolve())
    return [c.removeprefix(VOLUME_PREFIX) for c in frame.columns if c.startswith(VOLUME_PREFIX)]
