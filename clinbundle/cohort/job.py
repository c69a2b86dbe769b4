"""One case through the model, and a cohort of them: resumable, one bad case never stops it.

case -> read (header checked first) -> probabilities on the input's grid (the one path)
-> labels (argmax + the contract's post-processing, as every format) -> outputs (atomic)
-> one row: label volumes in mL, uncertainty, timing, status
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.stats import entropy

from clinbundle.cohort.atomic import atomic_write, exclusive, remove_stale_temps
from clinbundle.cohort.cases import Case, CaseVolume, read_case
from clinbundle.cohort.manifest import append_row, is_final, key_of, read_manifest
from clinbundle.cohort.model import CohortModel, ModelSpec, open_model
from clinbundle.cohort.table import VOLUME_PREFIX
from clinbundle.runtime.contract import InferenceContract
from clinbundle.runtime.errors import ClinbundleError
from clinbundle.runtime.labels import labels_from_probabilities

log = logging.getLogger("clinbundle.cohort")

ENGINES = ("local", "ray")


def output_stem(case: Case) -> str:
    """The case_id made safe as a file name (a DICOM UID from a hostile file could hold '/')."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", case.case_id).lstrip(".")
    return stem or "case"


def seg_name(case: Case) -> str:
    return f"{output_stem(case)}_seg.nii.gz"


def uncertainty(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean voxel entropy (nats) of the softmax over predicted-foreground voxels; 0 without
    foreground. High where the model hesitates between classes at the voxels it segments."""
    fg = labels > 0
    if not fg.any():
        return 0.0
    return float(entropy(probabilities[:, fg], axis=0).mean())


def label_volumes(labels: np.ndarray, affine: np.ndarray, contract: InferenceContract) -> dict:
    """mL of each foreground label of the contract, from the input's voxel volume."""
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    counts = np.bincount(labels.ravel(), minlength=len(contract.labels))
    return {
        f"{VOLUME_PREFIX}{name}": float(counts[int(k)] * voxel_ml)
        for k, name in sorted(contract.labels.items(), key=lambda kv: int(kv[0]))
        if int(k) > 0
    }


def atomic_nifti(labels: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """uint8 labels with the input's affine (as scanner coordinates), written whole or not."""
    img = nib.Nifti1Image(labels.astype(np.uint8), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    atomic_write(path, lambda tmp: nib.save(img, tmp), suffix=".nii.gz")


def write_outputs(
    case: Case, volume: CaseVolume, labels: np.ndarray, model: CohortModel, output_dir: Path
) -> dict:
    """The NIfTI labels for every case, and a DICOM SEG for a DICOM case; the row's paths."""
    out = {"output": seg_name(case), "seg": ""}
    atomic_nifti(labels, volume.affine, output_dir / out["output"])
    if case.kind == "dicom":
        from clinbundle.cohort.dicom_cases import write_dicom_seg

        out["seg"] = f"{output_stem(case)}_seg.dcm"
        write_dicom_seg(case, volume, labels, model, output_dir / out["seg"])
    return out


def _row(case: Case, model: CohortModel) -> dict:
    return {
        "case_id": case.case_id,
        "input": case.input,
        "content_hash": case.content_hash,
        "shape": "",
        "spacing": "",
        "seconds": 0.0,
        "uncertainty": None,
        "runtime": model.runtime,
        "model_name": model.name,
        "model_version": model.version,
        "status": "failed",
        "error": "",
        "error_kind": "",
        "output": "",
        "seg": "",
        "flagged": False,
    }


def predict_case(model: CohortModel, case: Case, output_dir: Path) -> dict:
    """One table row. Never raises for a bad case: the row says "failed" and why."""
    row, t0 = _row(case, model), time.perf_counter()
    try:
        volume = read_case(case, modality=model.contract.modality)
        row["shape"] = "x".join(map(str, volume.image.shape))
        spacing = np.sqrt((volume.affine[:3, :3] ** 2).sum(axis=0))
        row["spacing"] = " x ".join(f"{s:.4g}" for s in spacing)
        probs = model.probabilities(volume.image[None, None], volume.affine)[0]
        labels = labels_from_probabilities(probs, model.contract.postprocessing)
        row |= label_volumes(labels, volume.affine, model.contract)
        row["uncertainty"] = uncertainty(probs, labels)
        del probs
        row |= write_outputs(case, volume, labels, model, Path(output_dir))
        row["status"] = "done"
    except ClinbundleError as e:  # the input's own fault: final for these bytes
        row["error"], row["error_kind"] = str(e), "input"
    except KeyboardInterrupt:
        raise
    except Exception as e:  # a runtime that chokes on one case must not stop the cohort
        log.exception("%s failed", case.case_id)
        row["error"], row["error_kind"] = f"{type(e).__name__}: {e}", "runtime"
    row["seconds"] = round(time.perf_counter() - t0, 3)
    if row["status"] == "failed":
        log.warning("%s failed: %s", case.case_id, row["error"])
    return row


def run_cohort(
    cases: list[Case],
    spec: ModelSpec,
    output_dir: Path,
    engine: str = "local",
    address: str | None = None,
    model: CohortModel | None = None,
    progress: bool = True,
    retry_failed: bool = False,
) -> list[dict]:
    """Every case's row, in the order of `cases`: cases the manifest holds as final (done with
    outputs on disk, or failed on their own input; `manifest.is_final`) are not run again, the
    rest run on `engine` and are appended to the manifest as they land. One job per folder.

    `model`: an already opened model (opened from `spec` otherwise)."""
    run_engine = engine_runner(engine)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with exclusive(output_dir):
        remove_stale_temps(output_dir)
        model = model or open_model(spec)
        rows, todo = _plan(cases, model, output_dir, retry_failed)
        log.info("%d case(s): %d kept from before, %d to run", len(cases), len(rows), len(todo))
        for row in run_engine(todo, spec, output_dir, address, model, progress):
            rows[row["case_id"]] = row  # the last answer wins, as in the manifest
    return [rows[c.case_id] for c in cases if c.case_id in rows]


def _plan(
    cases: list[Case], model: CohortModel, output_dir: Path, retry_failed: bool
) -> tuple[dict[str, dict], list[Case]]:
    """(rows kept from the manifest by case_id, cases to run)."""
    known = read_manifest(output_dir, by_case=True)
    kept, todo = {}, []
    for case in cases:
        row = known.get(((case.content_hash, model.version, model.runtime), case.case_id))
        if is_final(row, output_dir, retry_failed):
            kept[case.case_id] = {**row, "input": case.input}
        else:
            todo.append(case)
    return kept, todo


#: (cases to run, spec, output_dir, address, opened model, progress bar?) -> rows as they land
EngineRunner = Callable[
    [list[Case], ModelSpec, Path, "str | None", CohortModel, bool], Iterator[dict]
]


def engine_runner(engine: str) -> EngineRunner:
    """The engine's runner; fails before any work when the engine is unknown or missing."""
    if engine not in ENGINES:
        raise ClinbundleError(f"unknown engine '{engine}': use {' or '.join(ENGINES)}")
    if engine == "local":
        return _run_local
    try:
        from clinbundle.cohort.ray_engine import run_on_ray
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("clinbundle.cohort.ray_engine"):
            raise ClinbundleError("the Ray engine is not installed") from None
        if e.name and e.name.split(".")[0] == "ray":
            raise ClinbundleError(
                f"the Ray engine needs Ray ({e.name} is not installed): pip install 'ray[data]'"
            ) from None
        raise

    def ray(todo, spec, output_dir, address, model, progress):
        if not todo:  # nothing to run: no cluster to start
            return
        for row in run_on_ray(todo, spec, output_dir, address):
            append_row(output_dir, row)
            yield row

    return ray


def _run_local(todo, spec, output_dir, address, model, progress) -> Iterator[dict]:
    from tqdm import tqdm

    for case in tqdm(todo, desc="cases", unit="case", disable=not progress or None):
        row = predict_case(model, case, output_dir)
        append_row(output_dir, row)
        yield row


__all__ = ["ENGINES", "engine_runner", "key_of", "predict_case", "run_cohort"]
