"""The DICOM SEG that every DICOM path writes: the MAP's writer operator and `clinbundle predict`.

Built with highdicom directly rather than the MONAI Deploy SDK's DICOMSegmentationWriterOperator
(see `DicomSegWriterOperator` in `apps/map_app/operators.py` for what is wrong with that one),
and kept free of SDK/holoscan imports so the batch path (`clinbundle.cohort`) writes the very same
object without the SDK: one place decides segment coding, equipment and frame order.

- segments: one per foreground label, coded from the contract (`label_codes`, else SCT 91723000
  "Anatomical Structure", never guessed from the label's text), algorithm = the registered model
  name and version;
- equipment: clinbundle / model name / model version, and a Contributing Equipment item (DCM
  109102 "Processing Equipment") naming the model;
- patient and study identity: highdicom copies them from the source images;
- frames: one per source slice and segment (empty frames kept), source datasets sorted along the
  slice normal, the order in which a reader stacks the volume.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from clinbundle.runtime.contract import CodedConcept, InferenceContract

log = logging.getLogger("clinbundle.dicom_seg")

#: SEG coding of a label the contract gives no code for: a generic anatomical structure
#: (never guessed from the label's text).
GENERIC_STRUCTURE = CodedConcept(scheme="SCT", value="91723000", meaning="Anatomical Structure")
#: Segmented property category of every segment (CID 7150).
STRUCTURE_CATEGORY = CodedConcept(scheme="SCT", value="123037004", meaning="Anatomical Structure")
#: SeriesNumber of every SEG (fixed: two runs on one input give the same number).
SEG_SERIES_NUMBER = 900
SERIES_DESCRIPTION = "AI segmentation, not for clinical use"


def _code(concept: CodedConcept):
    import highdicom as hd

    return hd.sr.CodedConcept(concept.value, concept.scheme, concept.meaning[:64])


def segment_descriptions(contract: InferenceContract, model_name: str, model_version: str) -> list:
    """One highdicom segment per foreground label of the contract."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(
        name=str(model_name)[:64],
        family=codes.DCM.ArtificialIntelligence,
        version=str(model_version)[:64],
        source="clinbundle",
    )
    descriptions = []
    for value in range(1, contract.num_classes):
        label = contract.labels[str(value)]
        code = contract.label_codes.get(str(value))
        if code is None:
            log.info(
                "label %d (%s) has no code in the contract: coded as %s",
                value,
                label,
                GENERIC_STRUCTURE.meaning,
            )
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=value,
                segment_label=label[:64],
                segmented_property_category=_code(STRUCTURE_CATEGORY),
                segmented_property_type=_code(code or GENERIC_STRUCTURE),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
            )
        )
    return descriptions


def slice_normal(datasets: list) -> np.ndarray:
    iop = np.asarray(datasets[0].ImageOrientationPatient, float)
    return np.cross(iop[:3], iop[3:])


def sorted_sources(datasets: list) -> list:
    """Source datasets in the volume's slice order: ascending along the slice normal."""
    normal = slice_normal(datasets)
    return sorted(datasets, key=lambda ds: float(np.dot(ds.ImagePositionPatient, normal)))


def build_seg(
    labels_kji: np.ndarray,
    datasets: list,
    descriptions: list,
    model_name: str,
    model_version: str,
    device_serial_number: str,
    series_description: str = SERIES_DESCRIPTION,
):
    """The highdicom Segmentation of uint8 `labels_kji` ([slice, row, column], slices in
    `sorted_sources` order) over the source series `datasets` (any order)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    sources = sorted_sources(datasets)
    if labels_kji.shape != (len(sources), int(sources[0].Rows), int(sources[0].Columns)):
        raise ValueError(
            f"labels {labels_kji.shape} do not match the source series "
            f"({len(sources)} x {sources[0].Rows} x {sources[0].Columns})"
        )
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=np.ascontiguousarray(labels_kji, dtype=np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="clinbundle",
        manufacturer_model_name=model_name[:64],
        software_versions=model_version[:64],
        device_serial_number=device_serial_number[:64],
        content_label="AI_SEGMENTATION",
        content_description=f"{model_name} v{model_version}"[:64],
        omit_empty_frames=False,  # one frame per source slice: geometry stays checkable
        contributing_equipment=[
            hd.ContributingEquipment(
                manufacturer="clinbundle",
                purpose_of_reference=codes.DCM.ProcessingEquipment,
                manufacturer_model_name=model_name[:64],
                software_versions=model_version[:64],
                contribution_description="AI segmentation model",
            )
        ],
    )
    seg.SeriesDescription = series_description[:64]
    return seg


def save_atomic(seg, path: Path) -> Path:
    """Write `seg` to a temp file beside `path`, then rename: a reader never sees half a SEG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        seg.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
