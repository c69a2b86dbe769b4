"""The MAP application: the champion's ONNX bundle on a DICOM series or NIfTI files.

    DICOM: loader -> series selector (rules: app.yaml) -> series to volume -> ONNX bundle
           -> DICOM SEG writer (highdicom; segments named by the contract, model name and
              version in the SegmentDescription algorithm and the Contributing Equipment)
    NIfTI: NIfTI loader -> ONNX bundle -> NIfTI label writer (same affine)

Which path runs is decided by what the input folder holds; it is checked before the graph runs
(`inputs.py`), and every writer writes into a hidden staging folder that `__main__` renames
into the output folder only after the whole graph succeeded.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import yaml
from monai.deploy.conditions import CountCondition
from monai.deploy.core import Application
from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator
from monai.deploy.operators.dicom_seg_writer_operator import (
    DICOMSegmentationWriterOperator,
    SegmentDescription,
)
from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator
from monai.deploy.operators.dicom_series_to_volume_operator import DICOMSeriesToVolumeOperator
from monai.deploy.operators.dicom_utils import ModelInfo
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

import clinbundle
from clinbundle.apps.map_app.inputs import MapInputError, check_selection, scan_input
from clinbundle.apps.map_app.operators import (
    BundleSegOperator,
    NiftiLoaderOperator,
    NiftiWriterOperator,
)
from clinbundle.runtime.bundle_reader import OnnxBundle, load_bundle

log = logging.getLogger("clinbundle.map_app")

#: Used when no app.yaml is given (HOLOSCAN_CONFIG_PATH unset): any CT series.
DEFAULT_CONFIG: dict[str, Any] = {
    "model": None,  # the one bundle under the model path
    "device": "auto",
    "series-selection": {
        "selections": [{"name": "CT volume", "conditions": {"Modality": "(?i)CT"}}]
    },
}


def app_config() -> dict[str, Any]:
    """The `clinbundle` section of the app config (HOLOSCAN_CONFIG_PATH, as in the MAP)."""
    path = os.environ.get("HOLOSCAN_CONFIG_PATH")
    if not path:
        return dict(DEFAULT_CONFIG)
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise MapInputError(f"app config {path} cannot be read ({e})") from None
    return DEFAULT_CONFIG | (data.get("clinbundle") or {})


def find_bundle(model_path: Path, name: str | None) -> Path:
    """The ONNX bundle folder: the model path itself, models/<name>, or its only bundle."""
    if (model_path / "manifest.json").is_file():
        return model_path
    if name:
        if not (model_path / name / "manifest.json").is_file():
            raise MapInputError(f"no ONNX bundle '{name}' under the model path {model_path}")
        return model_path / name
    found = sorted(p.parent for p in model_path.glob("*/manifest.json"))
    if len(found) != 1:
        raise MapInputError(
            f"expected one ONNX bundle under the model path {model_path}, found {len(found)}; "
            "name one in app.yaml (clinbundle: model: NAME)"
        )
    return found[0]


def segment_descriptions(bundle: OnnxBundle) -> list[SegmentDescription]:
    """One segment per foreground label of the contract; algorithm = the registered model."""
    model = bundle.manifest["model"]
    descriptions = []
    for value in range(1, bundle.contract.num_classes):
        label = bundle.contract.labels[str(value)]
        concept = "".join(w.capitalize() for w in label.replace("_", " ").split())
        descriptions.append(
            SegmentDescription(
                segment_label=label[:64],
                segmented_property_category=codes.SCT.AnatomicalStructure,
                segmented_property_type=getattr(codes.SCT, concept, None)
                or getattr(codes.SCT, f"Blood{concept}", None)
                or codes.SCT.AnatomicalStructure,
                algorithm_name=str(model["name"])[:64],
                algorithm_family=codes.DCM.ArtificialIntelligence,
                algorithm_version=str(model["version"])[:64],
            )
        )
    return descriptions


class SegmentationApp(Application):
    """Segments one DICOM CT series (-> DICOM SEG) or NIfTI volumes (-> NIfTI labels).

    The model is the champion's ONNX bundle under the model path (MAP: /opt/holoscan/models);
    roi, overlap, normalisation and labels come from its contract, the model name and version
    from its manifest: nothing is re-typed here.
    """

    def __init__(self, *args, **kwargs) -> None:
        self.staging: Path | None = None
        super().__init__(*args, **kwargs)

    def compose(self) -> None:
        context = Application.init_app_context(self.argv)
        input_path, output_path = Path(context.input_path), Path(context.output_path)
        config = app_config()
        scan = scan_input(input_path)
        bundle = load_bundle(
            find_bundle(Path(context.model_path), config["model"]), config["device"]
        )
        log.info("clinbundle %s from %s", clinbundle.__version__, Path(clinbundle.__file__).parent)
        output_path.mkdir(parents=True, exist_ok=True)
        self.staging = output_path / f".partial-{os.getpid()}"
        self.staging.mkdir()

        seg_op = BundleSegOperator(self, bundle=bundle, name="seg_op")
        if scan.kind == "nifti":
            nifti_loader_op = NiftiLoaderOperator(
                self, CountCondition(self, 1), files=scan.files, name="nifti_loader_op"
            )
            nifti_writer_op = NiftiWriterOperator(
                self, output_folder=self.staging, name="nifti_writer_op"
            )
            self.add_flow(nifti_loader_op, seg_op, {("volumes", "image")})
            self.add_flow(seg_op, nifti_writer_op, {("seg_image", "seg_image")})
            return

        rules = config["series-selection"]
        study_loader_op = DICOMDataLoaderOperator(
            self, CountCondition(self, 1), input_folder=input_path, name="study_loader_op"
        )
        series_selector_op = DICOMSeriesSelectorOperator(
            self, rules=json.dumps(rules), name="series_selector_op"
        )
        series_to_vol_op = DICOMSeriesToVolumeOperator(self, name="series_to_vol_op")
        model = bundle.manifest["model"]
        dicom_seg_writer = DICOMSegmentationWriterOperator(
            self,
            segment_descriptions=segment_descriptions(bundle),
            model_info=ModelInfo(
                creator="clinbundle",
                name=str(model["name"]),
                version=str(model["version"]),
                uid=generate_uid(entropy_srcs=[str(model["run_id"]), str(model["version"])]),
            ),
            custom_tags={"SeriesDescription": "AI segmentation, not for clinical use"},
            omit_empty_frames=False,  # one frame per source slice: geometry stays checkable
            output_folder=self.staging,
            name="dicom_seg_writer",
        )
        # The same loader and selector decide up front what the graph will select.
        studies = study_loader_op.load_data_to_studies(input_path)
        check_selection(studies, series_selector_op.filter(rules, studies, all_matched=True), rules)

        self.add_flow(
            study_loader_op, series_selector_op, {("dicom_study_list", "dicom_study_list")}
        )
        self.add_flow(
            series_selector_op,
            series_to_vol_op,
            {("study_selected_series_list", "study_selected_series_list")},
        )
        self.add_flow(series_to_vol_op, seg_op, {("image", "image")})
        self.add_flow(
            series_selector_op,
            dicom_seg_writer,
            {("study_selected_series_list", "study_selected_series_list")},
        )
        self.add_flow(seg_op, dicom_seg_writer, {("seg_image", "seg_image")})
