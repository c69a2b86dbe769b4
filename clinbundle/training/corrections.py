"""`clinbundle data add-corrections`: reviewed labels of flagged cases into a training set.

The last step of the review loop (predict -> flag -> review -> correct -> retrain). A corrected
label file `<case_id>.nii[.gz]` for a case the predictions table flagged goes into an MSD folder
with its image (copied from the table's input, checked against the content hash the prediction
was made from), so the next `clinbundle train` on that folder includes it.

All or nothing: every correction is validated as training data is (`validate_dataset`:
readable, 3-D, label on the image's grid and affine, integer labels in the data set's classes)
and checked against the model's classes before anything moves; a case not flagged, a bad label
or a name clash refuses the whole call with every reason. Files are staged in the data folder,
renamed into place, and dataset.json is replaced last, so a killed run leaves at most unlisted
files that the next run recognises. The same correction again changes nothing; a new label for
a case already added replaces the old one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from clinbundle.review_table import (
    FlaggedCase,
    check_unchanged,
    foreground_labels,
    read_flagged,
)
from clinbundle.runtime.errors import DataError, InputError
from clinbundle.training.checkpoint import atomic_write_bytes
from clinbundle.training.data import Dataset, read_dataset, validate_dataset

NIFTI_SUFFIXES = (".nii.gz", ".nii")

DATASET_JSON = "dataset.json"


@dataclass
class Correction:
    case: FlaggedCase
    label: Path  # the reviewer's file
    image_name: str  # file names inside imagesTr / labelsTr
    label_name: str
    state: str = "added"  # "added" | "replaced" | "unchanged"


@dataclass
class CorrectionReport:
    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    def summary(self, root: Path) -> str:
        parts = [f"{len(v)} {k} ({', '.join(v)})" for k, v in vars(self).items() if v]
        return f"corrections for {root}: " + "; ".join(parts)


def _suffix(name: str) -> str | None:
    return next((s for s in NIFTI_SUFFIXES if name.endswith(s)), None)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _match_labels(labels_dir: Path, flagged: dict[str, FlaggedCase], problems: list[str]):
    """Each label file to its flagged case; names that fit no flagged case are problems."""
    if not labels_dir.is_dir():
        raise InputError(f"{labels_dir}: no such folder of corrected labels")
    files = sorted(p for p in labels_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        problems.append(f"{labels_dir}: no label files (name them <case_id>.nii.gz)")
    found = []
    for path in files:
        suffix = _suffix(path.name)
        case_id = path.name[: -len(suffix)] if suffix else None
        if case_id is None:
            problems.append(f"{path.name}: not a NIfTI label file (<case_id>.nii or .nii.gz)")
        elif case_id not in flagged:
            problems.append(
                f"{path.name}: case {case_id!r} is not flagged in the table (flagged: "
                f"{', '.join(sorted(flagged))}); only flagged cases take corrections"
            )
        else:
            case = flagged[case_id]
            image_name = case_id + (_suffix(case.input.name) or ".nii.gz")
            found.append(Correction(case, path, image_name, case_id + suffix))
    ids = [c.case.case_id for c in found]
    problems += [f"two label files for case {i!r}" for i in sorted(set(ids)) if ids.count(i) > 1]
    return found


def _check_labels_match(table: Path, ds: Dataset, problems: list[str]) -> None:
    """The model's foreground classes (the table's volume columns) are the data set's."""
    model = foreground_labels(table)
    data = [
        name for key, name in sorted(ds.labels.items(), key=lambda kv: int(kv[0])) if key != "0"
    ]
    if model and model != data:
        problems.append(
            f"the table's model segments {model}, the data set {ds.root} labels {data}: "
            "corrections would train other classes"
        )


def _place(c: Correction, ds: Dataset, problems: list[str]) -> None:
    """Whether the case is new, already there (same image), or clashes with another case."""
    cid = c.case.case_id
    if any(item["case"] == cid for item in ds.test):
        problems.append(f"case {cid!r} is a held-out case of {ds.root}: it must not be trained on")
        return
    image = ds.root / "imagesTr" / c.image_name
    listed = any(item["case"] == cid for item in ds.training)
    if not image.exists() and not listed:
        return
    if not image.is_file() or _sha(image) != c.case.content_hash:
        problems.append(f"{ds.root} already has a different case named {cid!r}")
        return
    label = ds.root / "labelsTr" / c.label_name
    same = listed and label.is_file() and _sha(label) == _sha(c.label)
    c.state = "unchanged" if same else ("replaced" if listed else "added")


def _stage(todo: list[Correction], stage: Path) -> list[dict]:
    """Copies under their final names in a staging folder, as items `validate_dataset` reads."""
    items = []
    for c in todo:
        for sub, src, name in (
            ("imagesTr", c.case.input, c.image_name),
            ("labelsTr", c.label, c.label_name),
        ):
            (stage / sub).mkdir(exist_ok=True)
            shutil.copyfile(src, stage / sub / name)
        image, label = stage / "imagesTr" / c.image_name, stage / "labelsTr" / c.label_name
        items.append({"image": str(image), "label": str(label), "case": c.case.case_id})
    return items


def _entry(c: Correction) -> dict:
    return {
        "image": f"./imagesTr/{c.image_name}",
        "label": f"./labelsTr/{c.label_name}",
        "correction": {
            "table": str(c.case.table),
            "model": c.case.model,
            "content_hash": c.case.content_hash,
            "added": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    }


def _commit(todo: list[Correction], stage: Path, root: Path) -> None:
    """Rename the staged files into place, then replace dataset.json (last, atomically)."""
    for c in todo:
        for sub, name in (("imagesTr", c.image_name), ("labelsTr", c.label_name)):
            (root / sub).mkdir(exist_ok=True)
            (stage / sub / name).replace(root / sub / name)
    meta_path = root / DATASET_JSON
    meta = json.loads(meta_path.read_text())
    names = {c.image_name for c in todo}
    kept = [e for e in meta["training"] if Path(str(e.get("image", ""))).name not in names]
    meta["training"] = kept + [_entry(c) for c in todo]
    meta["numTraining"] = len(meta["training"])
    atomic_write_bytes((json.dumps(meta, indent=2) + "\n").encode(), meta_path)


def add_corrections(table: Path, labels_dir: Path, data_root: Path) -> CorrectionReport:
    """Validate every correction, then add them all (or, with any problem, none); one run per
    data folder at a time (a second one is refused: each rewrites dataset.json)."""
    from clinbundle.cohort.atomic import exclusive

    meta = Path(data_root) / DATASET_JSON
    if not meta.is_file():  # nothing to lock: reading the folder says what is wrong
        return _add_corrections(table, labels_dir, Path(data_root))
    busy = "another `clinbundle data add-corrections` is adding to {folder}; wait for it"
    # the lock is dataset.json's own: no new file in the user's folder, even on a refusal
    with exclusive(meta.parent, busy, DATASET_JSON):
        return _add_corrections(table, labels_dir, data_root)


def _add_corrections(table: Path, labels_dir: Path, data_root: Path) -> CorrectionReport:
    flagged = {c.case_id: c for c in read_flagged(table)}
    ds = read_dataset(data_root)
    problems: list[str] = []
    _check_labels_match(Path(table), ds, problems)
    found = _match_labels(Path(labels_dir), flagged, problems)
    for c in found:
        try:
            check_unchanged(c.case)
        except InputError as e:
            problems.append(str(e))
            continue
        _place(c, ds, problems)
    if problems:
        raise DataError(
            problems, "Nothing was added. Fix the label files or the table, then rerun."
        )
    todo = [c for c in found if c.state != "unchanged"]
    if todo:
        with tempfile.TemporaryDirectory(dir=ds.root, prefix=".add-corrections-") as tmp:
            items = _stage(todo, Path(tmp))
            try:
                validate_dataset(Dataset(ds.root, ds.labels, [], []), items)
            except DataError as e:
                raise DataError(e.problems, "Nothing was added. Fix the label files.") from None
            _commit(todo, Path(tmp), ds.root)
    report = CorrectionReport()
    for c in found:
        getattr(report, c.state).append(c.case.case_id)
    return report
