"""The app's own operators: ONNX-bundle inference and NIfTI in/out.

Why not the SDK's: `MonaiSegInferenceOperator` loads TorchScript only and re-implements the
sliding window from its own arguments; `NiftiDataLoader` needs SimpleITK and drops the affine.
These operators run the champion's ONNX bundle through clinbundle's one sliding-window path
(`load_bundle(...).predict`), so the MAP gives the answer every other format gives.

Axis order, the one thing a DICOM app most often gets wrong: the model was trained on nibabel
arrays, indexed ``[i, j, k]``. The SDK's `DICOMSeriesToVolumeOperator` stacks slices into
``[slice, row, column]`` = ``[k, j, i]`` (slices sorted along the slice normal), so the
inference operator transposes it to ``[i, j, k]`` (column, row, slice: ITK's index order, the
order the SDK's own MonaiSegInferenceOperator also feeds its models) and the labels back to
``[k, j, i]`` for the DICOM SEG writer, whose frames follow the source slices.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.deploy.core import ConditionType, Fragment, Image, Operator, OperatorSpec
from monai.deploy.operators.dicom_series_to_volume_operator import DICOMSeriesToVolumeOperator

from clinbundle.apps.dicom_seg import SERIES_DESCRIPTION, build_seg, save_atomic
from clinbundle.apps.map_app.inputs import nifti_stem
from clinbundle.runtime.bundle_reader import OnnxBundle

log = logging.getLogger("clinbundle.map_app")


@dataclass
class NiftiVolume:
    """One NIfTI file on its way through the graph: data in nibabel's [i, j, k] order."""

    name: str
    array: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header


class NiftiLoaderOperator(Operator):
    """Loads every NIfTI file of the input folder (already checked) with nibabel.

    Named output: `volumes` (list[NiftiVolume]).
    """

    def __init__(
        self, fragment: Fragment, *args, files: list[Path], root: Path | None = None, **kwargs
    ) -> None:
        self.files = list(files)
        self.root = Path(root) if root is not None else None
        super().__init__(fragment, *args, **kwargs)

    def name_of(self, path: Path) -> str:
        """The output name: the path under the input folder without its suffix, so that
        `a/scan.nii.gz` and `b/scan.nii.gz` give `a/scan` and `b/scan` (never one file)."""
        rel = path.relative_to(self.root) if self.root is not None else Path(path.name)
        return (rel.parent / nifti_stem(rel)).as_posix()

    def setup(self, spec: OperatorSpec) -> None:
        spec.output("volumes")

    def compute(self, op_input, op_output, context) -> None:
        volumes = []
        for path in self.files:
            img = nib.load(str(path))
            array = np.asarray(img.dataobj, dtype=np.float32)
            if array.ndim == 4:
                array = array[..., 0]
            volumes.append(NiftiVolume(self.name_of(path), array, img.affine, img.header))
        op_output.emit(volumes, "volumes")


class BundleSegOperator(Operator):
    """Segments with the champion's ONNX bundle through the shared sliding-window path.

    Named input `image`: an SDK `Image` from DICOMSeriesToVolumeOperator ([k, j, i]) or a
    list of `NiftiVolume` ([i, j, k]). Named output `seg_image`: uint8 labels in the layout
    that came in (numpy [k, j, i] for the DICOM SEG writer, or a list of NiftiVolume).
    """

    def __init__(self, fragment: Fragment, *args, bundle: OnnxBundle, **kwargs) -> None:
        self.bundle = bundle
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("image")
        spec.output("seg_image").condition(ConditionType.NONE)

    def segment(self, volume_ijk: np.ndarray, affine: np.ndarray) -> np.ndarray:
        """[i, j, k] raw intensities and their RAS affine -> [i, j, k] uint8 labels on the same
        grid (the one inference path resamples to the contract's grid and back)."""
        volume = np.ascontiguousarray(volume_ijk, dtype=np.float32)[None, None]
        return self.bundle.predict(volume, affine, output="labels")[0]

    def compute(self, op_input, op_output, context) -> None:
        image = op_input.receive("image")
        if isinstance(image, Image):
            kji = image.asnumpy()
            log.info("DICOM volume [slice, row, column] %s -> model sees [i, j, k]", kji.shape)
            # the SDK's RAS affine of the [i, j, k] array (DICOMSeriesToVolumeOperator)
            affine = np.asarray(image.metadata()["affine"], dtype=np.float64)
            labels = self.segment(np.transpose(kji, (2, 1, 0)), affine).transpose(2, 1, 0)
            op_output.emit(np.ascontiguousarray(labels), "seg_image")
        else:
            out = []
            for v in image:
                log.info("NIfTI %s %s", v.name, v.array.shape)
                labels = self.segment(v.array, v.affine)
                out.append(NiftiVolume(v.name, labels, v.affine, v.header))
            op_output.emit(out, "seg_image")


class NiftiWriterOperator(Operator):
    """Writes each label volume as `<name>_seg.nii.gz` with the source's affine (qform/sform);
    a name with sub-folders (`a/scan`) keeps them (`a/scan_seg.nii.gz`).

    Named input: `seg_image` (list[NiftiVolume]).
    """

    def __init__(self, fragment: Fragment, *args, output_folder: Path, **kwargs) -> None:
        self.output_folder = Path(output_folder)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("seg_image")

    def compute(self, op_input, op_output, context) -> None:
        self.output_folder.mkdir(parents=True, exist_ok=True)
        for v in op_input.receive("seg_image"):
            img = nib.Nifti1Image(v.array, v.affine)
            img.set_qform(v.header.get_qform(), int(v.header["qform_code"]))
            img.set_sform(v.header.get_sform(), int(v.header["sform_code"]))
            img.set_data_dtype(np.uint8)
            path = self.output_folder / f"{v.name}_seg.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(img, str(path))


class HUSeriesToVolumeOperator(DICOMSeriesToVolumeOperator):
    """The SDK's series-to-volume operator with every slice rescaled to float32 (HU for CT).

    The SDK applies RescaleSlope/RescaleIntercept (or a Modality LUT) per slice, but sizes the
    volume's dtype from the first slice alone: a first slice whose values are all positive
    integers makes the volume uint16, and every later negative HU wraps round (-1000 ->
    64536); a first slice in whole HU makes it int16 and later fractional values (slope 0.5)
    are cut off. Here every slice goes through pydicom's modality transform and presentation
    LUT (as in the SDK) into one float32 volume, which holds any rescaled 16-bit value exactly.
    Geometry, slice order and metadata stay the SDK's.
    """

    def compute_affine_transform(self, s_1, s_n, n, series) -> None:
        """The SDK's affine with the in-plane spacings where DICOM puts them.

        DICOM's PixelSpacing is (spacing between rows, spacing between columns) (PS3.3
        C.7.6.2.1.1), so the row direction (along which the column index grows) is scaled by
        the second value and the column direction by the first. The SDK 4.0.0 scales them the
        other way round, which is invisible for square pixels and puts every non-square-pixel
        series on a wrong grid once the affine is used (the MAP parity's oblique 0.8 x 0.7 mm
        series caught it).
        """
        super().compute_affine_transform(s_1, s_n, n, series)
        vr, vc = (float(x) for x in s_1[0x0028, 0x0030].value)
        for name in (self.ATTRIBUTE_DICOM_AFFINE, self.ATTRIBUTE_NIFTI_AFFINE):
            m = np.array(getattr(series, name), dtype=np.float64)
            m[:3, 0] *= vc / vr
            m[:3, 1] *= vr / vc
            setattr(series, name, m)

    def generate_voxel_data(self, series) -> np.ndarray:
        from pydicom.pixels import apply_modality_lut, apply_presentation_lut

        slices = series.get_sop_instances()
        if not slices:
            return np.array([], dtype=np.float32)
        volume = None
        for n, sop in enumerate(slices):
            ds = sop.get_native_sop_instance()
            values = apply_modality_lut(sop.get_pixel_array(), ds)
            values = apply_presentation_lut(values, ds)
            if volume is None:
                volume = np.empty((len(slices), *values.shape), dtype=np.float32)
            volume[n] = values
        return volume


class DicomSegWriterOperator(Operator):
    """Writes the labels as one DICOM SEG (highdicom) that references the source series.

    Why not the SDK's DICOMSegmentationWriterOperator (4.0.0): its SEG passes dciodvfy without
    errors too (checked on pydicom's CT5N series), but with warnings: its Contributing
    Equipment item, coded with the IHE placeholder (Newcode1, 99IHE), carries a Device UID the
    SEG IOD does not define, which makes the object a "Standard Extended SOP Class". It also
    names the SEG's equipment "The MONAI Consortium" / "MONAI Deploy App SDK" (not the model),
    draws a random SeriesNumber (two runs on one input differ), takes segment codes only as
    pydicom `Code`s, and relies on the slice order of a series object it shares with another
    operator. Here the SEG is written with highdicom directly (dciodvfy: no errors, no
    warnings) by `clinbundle.apps.dicom_seg.build_seg`, which `clinbundle predict` shares.

    Named inputs: `seg_image` (numpy uint8 labels [slice, row, column]) and
    `study_selected_series_list` (the selector's output: the source series).
    """

    def __init__(
        self,
        fragment: Fragment,
        *args,
        segment_descriptions: list,
        model_name: str,
        model_version: str,
        device_serial_number: str,
        output_folder: Path,
        series_description: str = SERIES_DESCRIPTION,
        **kwargs,
    ) -> None:
        self.segment_descriptions = list(segment_descriptions)
        self.model_name = model_name
        self.model_version = model_version
        self.device_serial_number = device_serial_number
        self.output_folder = Path(output_folder)
        self.series_description = series_description
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("seg_image")
        spec.input("study_selected_series_list")

    def write(self, labels: np.ndarray, datasets: list) -> Path:
        """The SEG of `labels` ([slice, row, column]) over `datasets`, in the output folder."""
        seg = build_seg(
            labels,
            datasets,
            self.segment_descriptions,
            self.model_name,
            self.model_version,
            self.device_serial_number,
            self.series_description,
        )
        return save_atomic(seg, self.output_folder / f"{seg.SOPInstanceUID}.dcm")

    def compute(self, op_input, op_output, context) -> None:
        labels = op_input.receive("seg_image")
        selected = op_input.receive("study_selected_series_list")
        series = selected[0].selected_series[0].series
        datasets = [i.get_native_sop_instance() for i in series.get_sop_instances()]
        path = self.write(np.asarray(labels), datasets)
        log.info("DICOM SEG %s for %s", path.name, series.SeriesInstanceUID)
