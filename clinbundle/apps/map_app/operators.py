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

    def __init__(self, fragment: Fragment, *args, files: list[Path], **kwargs) -> None:
        self.files = list(files)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.output("volumes")

    def compute(self, op_input, op_output, context) -> None:
        volumes = []
        for path in self.files:
            img = nib.load(str(path))
            array = np.asarray(img.dataobj, dtype=np.float32)
            if array.ndim == 4:
                array = array[..., 0]
            volumes.append(NiftiVolume(nifti_stem(path), array, img.affine, img.header))
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
    """Writes each label volume as `<name>_seg.nii.gz` with the source's affine (qform/sform).

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
            nib.save(img, str(self.output_folder / f"{v.name}_seg.nii.gz"))
