"""Which DICOM series of a study the app segments, and whether its slices form one volume.

Selection rules come from the contract's modality (`series_rules`): the app's default config
and the MAP's app.yaml (`clinbundle.packaging.map_bundle.app_config`) both use them, so a model
trained on CT selects CT and a model with no modality selects any image series. A study as it
arrives holds more than the one series the model wants (localizers, other reconstructions, an
earlier SEG): `choose_series` applies the rules, skips what is not a volume candidate and picks
one deterministically, saying why each other series was skipped. `check_volume_geometry` then
refuses a series whose slices do not form a regular volume (a missing slice, uneven spacing, a
tilted gantry, fewer than 2 slices) before the graph runs.

This module imports no SDK code (the packaging side imports `series_rules`); it works on the
SDK's DICOMSeries objects by duck typing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clinbundle.apps.map_app.inputs import MapInputError

#: Modalities of DICOM objects that are not images a model can segment.
NON_IMAGE_MODALITIES = (
    "SEG",
    "SR",
    "RTSTRUCT",
    "RTPLAN",
    "RTDOSE",
    "RTRECORD",
    "RWV",
    "PR",
    "KO",
    "REG",
    "DOC",
    "PLAN",
    "FID",
    "AU",
    "ECG",
)
#: ImageType values that mark a series as no diagnostic volume.
NON_VOLUME_IMAGE_TYPES = ("LOCALIZER", "SCOUT", "PROJECTION IMAGE")

#: Relative tolerance on slice spacing (uniformity, gaps) and on the gantry-tilt offset.
SPACING_RTOL = 0.01
TILT_TOL_MM = 0.01  # in-plane drift allowed per mm along the normal (about 0.6 degrees)


def series_rules(modality: str | None) -> dict[str, Any]:
    """DICOMSeriesSelectorOperator rules for a model of `modality` (None: any image series)."""
    if modality:
        name = f"{modality.upper()} volume"
        pattern = f"(?i)^{re.escape(modality)}$"
    else:
        name = "image volume"
        pattern = f"(?i)^(?!(?:{'|'.join(NON_IMAGE_MODALITIES)})$).+$"
    return {"selections": [{"name": name, "conditions": {"Modality": pattern}}]}


def only_series_rules(series_uid: str, name: str) -> dict[str, Any]:
    """Rules that select exactly one series, for the graph's selector once the choice is made."""
    return {
        "selections": [
            {"name": name, "conditions": {"SeriesInstanceUID": f"^{re.escape(series_uid)}$"}}
        ]
    }


def _instances(series) -> list:
    return [i.get_native_sop_instance() for i in series.get_sop_instances()]


def describe_series(series) -> str:
    """One line per DICOM series for logs and error messages."""
    return (
        f"series {getattr(series, 'SeriesNumber', '?')} {series.SeriesInstanceUID} "
        f"({getattr(series, 'Modality', '?')}, '{getattr(series, 'SeriesDescription', '') or ''}'"
        f", {len(series.get_sop_instances())} instances)"
    )


def _series_number(series) -> int:
    try:
        return int(series.SeriesNumber)
    except (TypeError, ValueError):
        return 2**31  # no SeriesNumber: after every numbered series


@dataclass
class SeriesChoice:
    series: Any  # the SDK's DICOMSeries
    skipped: list[tuple[Any, str]] = field(default_factory=list)

    def log_lines(self) -> list[str]:
        return [f"segmenting {describe_series(self.series)}"] + [
            f"skipped {describe_series(s)}: {why}" for s, why in self.skipped
        ]


def _not_a_volume_reason(series) -> str | None:
    first = _instances(series)[0]
    if "PixelData" not in first or "Rows" not in first:
        return "no image pixel data"
    image_type = [str(v).upper() for v in (first.get("ImageType") or [])]
    flagged = [t for t in NON_VOLUME_IMAGE_TYPES if t in image_type]
    if flagged:
        shown = "\\".join(image_type)
        return f"ImageType {shown} marks a {flagged[0].lower()}, not a volume"
    if "ImageOrientationPatient" not in first or "ImagePositionPatient" not in first:
        return "no ImageOrientationPatient/ImagePositionPatient: not a volume"
    return None


def choose_series(studies: list, matched: list, rules: dict, strict: bool = False) -> SeriesChoice:
    """The one series to segment among `studies`, given what the selector `matched`.

    Candidates are the series the rules match that are images with a patient geometry and not
    localizers. Of several, the one with the most slices wins, then the lowest SeriesNumber,
    then the lowest SeriesInstanceUID; with `strict` several candidates are an error.
    """
    available = [se for st in studies for se in st.get_all_series()]
    chosen_uids = {s.series.SeriesInstanceUID for st in matched for s in st.selected_series}
    skipped: list[tuple[Any, str]] = []
    candidates = []
    for series in available:
        if series.SeriesInstanceUID not in chosen_uids:
            skipped.append(
                (series, f"Modality {getattr(series, 'Modality', '?')} does not match the rules")
            )
            continue
        reason = _not_a_volume_reason(series)
        if reason:
            skipped.append((series, reason))
        else:
            candidates.append(series)
    if not candidates:
        raise MapInputError(
            f"no DICOM series matches the app's series selection rules ({rules}) and is an image "
            "volume; found: " + "; ".join(f"{describe_series(s)}: {why}" for s, why in skipped)
        )
    if strict and len(candidates) > 1:
        raise MapInputError(
            f"{len(candidates)} DICOM series match the selection rules and the app config asks "
            "for exactly one (series-strict: true): "
            + "; ".join(describe_series(s) for s in candidates)
        )
    candidates.sort(
        key=lambda s: (-len(s.get_sop_instances()), _series_number(s), str(s.SeriesInstanceUID))
    )
    chosen, others = candidates[0], candidates[1:]
    for series in others:
        skipped.append(
            (
                series,
                f"another candidate; {describe_series(chosen)} has more slices or, with as many, "
                "the lower SeriesNumber",
            )
        )
    return SeriesChoice(chosen, skipped)


def check_volume_geometry(series) -> None:
    """Refuse a series whose slices are not one regular volume; the message names the series.

    Checks: at least 2 slices; one size and ImageOrientationPatient; every slice position on
    the line along the slice normal (a tilted gantry shifts it in-plane); no two slices at one
    position; spacing uniform, and a gap of a whole number of spacings reported as missing
    slices.
    """
    instances = _instances(series)
    what = describe_series(series)
    if len(instances) < 2:
        raise MapInputError(f"{what}: {len(instances)} slice(s); a volume needs at least 2")
    keys = {
        (
            int(ds.Rows),
            int(ds.Columns),
            tuple(np.round(np.asarray(ds.ImageOrientationPatient, float), 4)),
        )
        for ds in instances
    }
    if len(keys) != 1:
        raise MapInputError(
            f"{what} is not one volume: its slices differ in rows, columns or "
            f"ImageOrientationPatient ({sorted(keys)})"
        )
    iop = np.asarray(instances[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    if not np.isfinite(normal).all() or abs(np.linalg.norm(normal) - 1) > 1e-3:
        raise MapInputError(f"{what}: ImageOrientationPatient {list(iop)} is not orthonormal")
    positions = np.asarray([ds.ImagePositionPatient for ds in instances], float)
    along = positions @ normal
    order = np.argsort(along)
    positions, along = positions[order], along[order]
    steps = np.diff(along)
    if (steps < 1e-3).any():
        k = int(np.argmax(steps < 1e-3))
        raise MapInputError(
            f"{what}: two slices at the same position ({along[k]:.3f} mm along the slice normal)"
        )
    # in-plane drift of the slice origins: zero for slices stacked along the normal
    offsets = positions - positions[0] - np.outer(along - along[0], normal)
    drift = np.linalg.norm(offsets, axis=1)
    if (drift > TILT_TOL_MM * (along - along[0]) + 1e-3).any():
        angle = np.degrees(np.arctan2(drift[-1], along[-1] - along[0]))
        raise MapInputError(
            f"{what}: slice positions are not along the normal of ImageOrientationPatient "
            f"(tilted gantry or sheared stack, about {angle:.1f} degrees); resample it to an "
            "untilted volume first"
        )
    spacing = float(np.median(steps))
    if (np.abs(steps - spacing) <= SPACING_RTOL * spacing).all():
        return
    ratios = steps / spacing
    whole = np.abs(ratios - np.round(ratios)) <= SPACING_RTOL * np.round(ratios)
    if whole.all():
        gaps = [
            f"{int(np.rint(r)) - 1} missing between {along[k]:.2f} and {along[k + 1]:.2f} mm"
            for k, r in enumerate(ratios)
            if np.rint(r) > 1
        ]
        raise MapInputError(
            f"{what}: missing slice(s) (spacing {spacing:.3f} mm; {'; '.join(gaps)} along the "
            "slice normal); send the complete series"
        )
    raise MapInputError(
        f"{what}: slice spacing is not uniform ({np.round(np.unique(np.round(steps, 3)), 3)} mm "
        "along the slice normal)"
    )
