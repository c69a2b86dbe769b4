"""A synthetic CT series from a volume, with real geometry, for MAP parity and tests.

No maintained library writes a DICOM series from a numpy array without SimpleITK/ITK (which the
MAP does not need otherwise), so this writes the CT Image IOD with pydicom: one single-frame
instance per slice, with PixelSpacing, ImageOrientationPatient, ImagePositionPatient,
SliceThickness and rescale attributes a DICOM reader (the SDK's DICOMSeriesToVolumeOperator,
highdicom) uses to rebuild the volume.

Axis convention (the one the MAP app documents): the volume is indexed like a nibabel array,
``volume[i, j, k]`` with ``i`` the column index, ``j`` the row index and ``k`` the slice index,
so slice ``k`` is stored as ``volume[:, :, k].T`` (rows x columns).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

#: Stored values are uint16 = HU + 1024, as most CT scanners store them.
RESCALE_INTERCEPT = -1024.0


@dataclass
class SeriesGeometry:
    """Where the voxels are in patient space (LPS, mm)."""

    spacing: tuple[float, float, float] = (0.8, 0.7, 1.5)  # along i (columns), j (rows), k
    row_direction: tuple[float, float, float] = (1.0, 0.0, 0.0)  # direction of increasing i
    column_direction: tuple[float, float, float] = (0.0, 1.0, 0.0)  # direction of increasing j
    origin: tuple[float, float, float] = (-20.0, -15.0, 30.0)  # centre of voxel (0, 0, 0)

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_direction, self.column_direction)

    def affine_ras(self) -> np.ndarray:
        """The nibabel (RAS) affine of `volume[i, j, k]`: what a reader of the series rebuilds."""
        lps = np.eye(4)
        lps[:3, 0] = np.asarray(self.row_direction) * self.spacing[0]
        lps[:3, 1] = np.asarray(self.column_direction) * self.spacing[1]
        lps[:3, 2] = self.normal * self.spacing[2]
        lps[:3, 3] = self.origin
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps

    def position(self, k: int) -> list[float]:
        """ImagePositionPatient of slice k."""
        return [float(x) for x in np.asarray(self.origin) + k * self.spacing[2] * self.normal]


def oblique(degrees: float = 12.0, **kw) -> SeriesGeometry:
    """An axial geometry rotated about the patient's z axis: catches swapped or flipped axes."""
    a = np.deg2rad(degrees)
    return SeriesGeometry(
        row_direction=(float(np.cos(a)), float(np.sin(a)), 0.0),
        column_direction=(float(-np.sin(a)), float(np.cos(a)), 0.0),
        **kw,
    )


def quantize_hu(
    volume: np.ndarray, slope: float = 1.0, intercept: float = RESCALE_INTERCEPT
) -> np.ndarray:
    """The float32 volume a reader gets back from the stored integers (whole multiples of
    `slope` above `intercept`, in the uint16 range)."""
    stored = np.clip(np.round((volume - intercept) / slope), 0, 65535)
    return (stored * slope + intercept).astype(np.float32)


@dataclass
class SeriesInfo:
    study_uid: str = field(default_factory=generate_uid)
    series_uid: str = field(default_factory=generate_uid)
    modality: str = "CT"
    series_description: str = "synthetic CT"
    series_number: int = 1
    patient_id: str = "SYNTH001"
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL")  # LOCALIZER: a scout


def write_ct_series(
    volume: np.ndarray,
    folder: Path,
    geometry: SeriesGeometry | None = None,
    info: SeriesInfo | None = None,
    slices: Sequence[int] | None = None,
    rescale: tuple[float, float] = (1.0, RESCALE_INTERCEPT),
    positions: Sequence[Sequence[float]] | None = None,
) -> list[Path]:
    """Write `volume` (i, j, k) in HU as one DICOM file per slice; returns the paths by slice.

    Stored values are (HU - intercept) / slope for `rescale` = (RescaleSlope,
    RescaleIntercept), rounded into uint16 (`quantize_hu` gives what a reader gets back).
    `slices` writes only those slice indices (e.g. with one left out); `positions` overrides
    ImagePositionPatient per written slice (e.g. a tilted gantry or uneven spacing).

    Files are named in reverse slice order on purpose, so a reader that trusts file order
    instead of ImagePositionPatient gets the volume upside down.
    """
    if volume.ndim != 3:
        raise ValueError(f"expected a 3-D volume (i, j, k), got shape {volume.shape}")
    geometry = geometry or SeriesGeometry()
    info = info or SeriesInfo()
    folder.mkdir(parents=True, exist_ok=True)
    slope, intercept = rescale
    stored = np.round((quantize_hu(volume, slope, intercept) - intercept) / slope).astype(np.uint16)
    n = volume.shape[2]
    frame_of_reference = generate_uid()
    paths = []
    ks = list(slices) if slices is not None else list(range(n))
    if positions is not None and len(positions) != len(ks):
        raise ValueError(f"{len(positions)} positions for {len(ks)} slices")
    for index, k in enumerate(ks):
        position = [float(x) for x in positions[index]] if positions else geometry.position(k)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = info.study_uid
        ds.SeriesInstanceUID = info.series_uid
        ds.FrameOfReferenceUID = frame_of_reference
        ds.Modality = info.modality
        ds.SeriesDescription = info.series_description
        ds.StudyDescription = "clinbundle MAP parity"
        ds.SeriesNumber = info.series_number
        ds.InstanceNumber = k + 1
        ds.PatientName = "Synthetic^Volume"
        ds.PatientID = info.patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.StudyID = "1"
        ds.PatientPosition = "HFS"
        ds.Laterality = ""
        ds.AcquisitionNumber = 1
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.Manufacturer = "clinbundle"
        ds.ImageType = list(info.image_type)
        ds.PositionReferenceIndicator = ""
        ds.ImageOrientationPatient = [*geometry.row_direction, *geometry.column_direction]
        ds.ImagePositionPatient = position
        # PixelSpacing is (between rows, between columns) = (along j, along i)
        ds.PixelSpacing = [geometry.spacing[1], geometry.spacing[0]]
        ds.SliceThickness = geometry.spacing[2]
        ds.SpacingBetweenSlices = geometry.spacing[2]
        ds.SliceLocation = float(np.dot(position, geometry.normal))
        ds.KVP = 120
        ds.RescaleIntercept = intercept
        ds.RescaleSlope = slope
        ds.RescaleType = "HU"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        path = folder / f"slice_{n - k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
