"""The MAP application: the champion's ONNX bundle on a DICOM series or NIfTI files.

    DICOM: loader -> series selector (rules from the contract's modality, or app.yaml; one
           series chosen up front, see selection.py) -> series to volume (float32, rescaled)
           -> ONNX bundle -> DICOM SEG writer (highdicom; segments coded from the contract,
              model name and version in the algorithm identification and the equipment)
    NIfTI: NIfTI loader -> ONNX bundle -> NIfTI label writer (same affine)

Which path runs is decided by what the input folder holds; it is checked before the graph runs
(`inputs.py`), and every writer writes into a hidden staging folder (unique per run, `.partial-XXXX`)
that `__main__` moves into the output folder only after the whole graph succeeded.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml
from monai.deploy.conditions import CountCondition
from monai.deploy.core import Application
from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator
from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator

import clinbundle
from clinbundle.apps import dicom_seg
from clinbundle.apps.map_app.inputs import MapInputError, scan_input
from clinbundle.apps.map_app.operators import (
    BundleSegOperator,
    DicomSegWriterOperator,
    HUSeriesToVolumeOperator,
    NiftiLoaderOperator,
    NiftiWriterOperator,
)
from clinbundle.apps.map_app.selection import (
    check_volume_geometry,
    choose_series,
    only_series_rules,
    series_rules,
)
from clinbundle.runtime.bundle_reader import OnnxBundle, load_bundle

log = logging.getLogger("clinbundle.map_app")

#: Used when no app.yaml is given (HOLOSCAN_CONFIG_PATH unset), and for keys it leaves out.
DEFAULT_CONFIG: dict[str, Any] = {
    "model": None,  # the one bundle under the model path
    "device": "auto",
    # a runtime the bundle ships; None: CLINBUNDLE_RUNTIME, else the bundle's measured default
    "runtime": None,
    # DICOMSeriesSelectorOperator rules; None = series_rules(the contract's modality)
    "series-selection": None,
    # true: several candidate series are an error instead of a deterministic choice
    "series-strict": False,
    # a public key PEM the bundle must be signed with (relative to the app config); None:
    # CLINBUNDLE_TRUSTED_KEY if set, else any bundle loads and its signature state is logged
    "trusted-key": None,
}

STAGING_PREFIX = ".partial-"


def app_config() -> dict[str, Any]:
    """The `clinbundle` section of the app config (HOLOSCAN_CONFIG_PATH, as in the MAP); a
    relative `trusted-key` is resolved against the config file's folder."""
    path = os.environ.get("HOLOSCAN_CONFIG_PATH")
    if not path:
        return dict(DEFAULT_CONFIG)
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise MapInputError(f"app config {path} cannot be read ({e})") from None
    config = DEFAULT_CONFIG | (data.get("clinbundle") or {})
    if config["trusted-key"]:
        config["trusted-key"] = Path(path).resolve().parent / Path(config["trusted-key"])
    return config


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


def segment_descriptions(bundle: OnnxBundle) -> list:
    """One highdicom segment per foreground label of the bundle's contract, its algorithm the
    registered model's name and version (manifest)."""
    model = bundle.manifest["model"]
    return dicom_seg.segment_descriptions(
        bundle.contract, str(model["name"]), str(model["version"])
    )


def remove_stale_staging(output_path: Path) -> None:
    """Delete staging folders of earlier runs that were killed (their lock is free)."""
    for folder in output_path.glob(f"{STAGING_PREFIX}*"):
        if not folder.is_dir():
            continue
        lock = folder / ".lock"
        try:
            fd = os.open(lock, os.O_RDONLY)
        except FileNotFoundError:
            fd = None  # killed between mkdtemp and taking the lock
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a run in progress holds it
        finally:
            if fd is not None:
                os.close(fd)
        log.warning("removing %s, left by an earlier run that did not finish", folder.name)
        shutil.rmtree(folder, ignore_errors=True)


class SegmentationApp(Application):
    """Segments one DICOM CT series (-> DICOM SEG) or NIfTI volumes (-> NIfTI labels).

    The model is the champion's ONNX bundle under the model path (MAP: /opt/holoscan/models);
    roi, overlap, normalisation and labels come from its contract, the model name and version
    from its manifest: nothing is re-typed here.
    """

    def __init__(self, *args, **kwargs) -> None:
        self.staging: Path | None = None
        self._lock_fd: int | None = None
        super().__init__(*args, **kwargs)

    def make_staging(self, output_path: Path) -> Path:
        """A staging folder of this run's own (the app is PID 1 in every container, so no
        PID names it), locked while the run lives; earlier runs' leftovers are removed."""
        output_path.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(output_path)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=output_path))
        self._lock_fd = os.open(staging / ".lock", os.O_CREAT | os.O_WRONLY, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        return staging

    def compose(self) -> None:
        context = Application.init_app_context(self.argv)
        input_path, output_path = Path(context.input_path), Path(context.output_path)
        config = app_config()
        scan = scan_input(input_path)
        bundle = load_bundle(
            find_bundle(Path(context.model_path), config["model"]),
            config["device"],
            trusted_key=config["trusted-key"],
            runtime=config["runtime"],
        )
        log.info("clinbundle %s from %s", clinbundle.__version__, Path(clinbundle.__file__).parent)
        log.info("bundle %s: signature %s", bundle.path, bundle.signature)
        log.info(
            "runtime %s (%s): %s",
            bundle.runtime_name,
            bundle.runtime_reason,
            bundle.runtime.description,
        )

        self.staging = self.make_staging(output_path)

        seg_op = BundleSegOperator(self, bundle=bundle, name="seg_op")
        if scan.kind == "nifti":
            nifti_loader_op = NiftiLoaderOperator(
                self,
                CountCondition(self, 1),
                files=scan.files,
                root=input_path,
                name="nifti_loader_op",
            )
            nifti_writer_op = NiftiWriterOperator(
                self, output_folder=self.staging, name="nifti_writer_op"
            )
            self.add_flow(nifti_loader_op, seg_op, {("volumes", "image")})
            self.add_flow(seg_op, nifti_writer_op, {("seg_image", "seg_image")})
            return

        rules = config["series-selection"] or series_rules(bundle.contract.modality)
        study_loader_op = DICOMDataLoaderOperator(
            self, CountCondition(self, 1), input_folder=input_path, name="study_loader_op"
        )
        # The SDK's own loader and selector decide up front what the graph will see; the
        # choice among several matching series is ours (deterministic, logged), and the
        # graph's selector is then narrowed to exactly that series.
        studies = study_loader_op.load_data_to_studies(input_path)
        probe = DICOMSeriesSelectorOperator(self, rules=json.dumps(rules), name="series_probe")
        choice = choose_series(
            studies,
            probe.filter(rules, studies, all_matched=True),
            rules,
            strict=bool(config["series-strict"]),
        )
        for line in choice.log_lines():
            log.info("%s", line)
        check_volume_geometry(choice.series)

        selection_name = rules["selections"][0].get("name", "series")
        series_selector_op = DICOMSeriesSelectorOperator(
            self,
            rules=json.dumps(only_series_rules(choice.series.SeriesInstanceUID, selection_name)),
            name="series_selector_op",
        )
        series_to_vol_op = HUSeriesToVolumeOperator(self, name="series_to_vol_op")
        model = bundle.manifest["model"]
        dicom_seg_writer = DicomSegWriterOperator(
            self,
            segment_descriptions=segment_descriptions(bundle),
            model_name=str(model["name"]),
            model_version=str(model["version"]),
            device_serial_number=str(model.get("run_id") or "0"),
            output_folder=self.staging,
            name="dicom_seg_writer",
        )

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
