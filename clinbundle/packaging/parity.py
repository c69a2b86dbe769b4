"""The parity harness: does a deployment format give the PyTorch answer on whole volumes?

MONAI's export check compares one random patch and the Model Zoo only checks that export runs;
neither catches a format whose windowing, padding or blending differs, or a model that drifts
only on shapes that are not multiples of the roi. Here both sides run the full sliding-window
inference on a suite of awkward shapes and the run's own validation volumes, and the report says
per volume: max and p99.9 absolute difference of probabilities, the fraction of voxels whose
label flips, Dice per label between the two masks, and the time of each side.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.metrics import compute_dice
from tqdm import tqdm

from clinbundle.packaging.parity_plots import diff_histogram, flip_projection, write_parity_plots
from clinbundle.runtime.contract import InferenceContract
from clinbundle.runtime.labels import labels_from_probabilities
from clinbundle.runtime.runners import Runtime

log = logging.getLogger("clinbundle.parity")


@dataclass(frozen=True)
class Tolerances:
    """Pass criteria; `None` means "reported, not gated"."""

    max_abs: float | None = 1e-4
    max_flip_fraction: float | None = 1e-4
    min_dice: float | None = None

    @classmethod
    def for_precision(cls, precision: str) -> Tolerances:
        """fp32: probabilities within 1e-4 and at most 1e-4 flipped voxels; fp16 and bf16 (a
        few bits of mantissa move probabilities by ~1e-2): Dice >= 0.995."""
        if precision in ("fp16", "bf16"):
            return cls(max_abs=None, max_flip_fraction=None, min_dice=0.995)
        return cls()


@dataclass
class ParityCase:
    name: str
    volume: np.ndarray  # raw float32 (N, C, D, H, W)
    why: str = ""
    affine: np.ndarray | None = None  # voxel -> RAS mm; None: on the contract's grid


@dataclass
class CaseResult:
    name: str
    shape: list[int]
    why: str
    max_abs: float | None
    p999_abs: float | None
    flips: int
    voxels: int
    flip_fraction: float
    dice: dict[str, float]
    time_reference_s: float
    time_candidate_s: float
    failures: list[str] = field(default_factory=list)
    diff_histogram: list[int] = field(default_factory=list)  # parity_plots.DIFF_BINS
    flip_map: np.ndarray | None = field(default=None, repr=False, compare=False)  # not in JSON

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass
class ParityReport:
    format: str
    reference: str
    candidate: str
    tolerances: Tolerances
    cases: list[CaseResult]
    model: dict = field(default_factory=dict)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    @property
    def passed(self) -> bool:
        return bool(self.cases) and all(c.passed for c in self.cases)

    def overall(self) -> dict:
        prob = [c.max_abs for c in self.cases if c.max_abs is not None]
        p999 = [c.p999_abs for c in self.cases if c.p999_abs is not None]
        flips, voxels = sum(c.flips for c in self.cases), sum(c.voxels for c in self.cases)
        labels = sorted({k for c in self.cases for k in c.dice})
        return {
            "passed": self.passed,
            "cases": len(self.cases),
            "failed_cases": [c.name for c in self.cases if not c.passed],
            "max_abs": max(prob) if prob else None,
            "p999_abs": max(p999) if p999 else None,
            "flips": flips,
            "voxels": voxels,
            "flip_fraction": flips / voxels if voxels else 0.0,
            "min_dice": {k: min(c.dice[k] for c in self.cases if k in c.dice) for k in labels},
            "time_reference_s": sum(c.time_reference_s for c in self.cases),
            "time_candidate_s": sum(c.time_candidate_s for c in self.cases),
        }

    def summary(self) -> str:
        """One line, used as the `parity_<format>` tag and in logs."""
        o = self.overall()
        mx = "n/a" if o["max_abs"] is None else f"{o['max_abs']:.2e}"
        dice = min(o["min_dice"].values()) if o["min_dice"] else float("nan")
        verdict = "pass" if self.passed else "fail"
        return (
            f"{verdict} max_abs={mx} flip_fraction={o['flip_fraction']:.2e} "
            f"min_dice={dice:.4f} cases={o['cases']}"
        )

    def to_dict(self) -> dict:
        return {
            "format": self.format,
            "passed": self.passed,
            "summary": self.summary(),
            "created": self.created,
            "model": self.model,
            "reference": self.reference,
            "candidate": self.candidate,
            "tolerances": asdict(self.tolerances),
            "overall": self.overall(),
            "cases": [
                {k: v for k, v in asdict(c).items() if k != "flip_map"} | {"passed": c.passed}
                for c in self.cases
            ],
        }

    def to_markdown(self) -> str:
        t = self.tolerances
        lines = [
            f"# Parity report: {self.format} vs PyTorch",
            "",
            f"**{'PASS' if self.passed else 'FAIL'}** - {self.summary()}",
            "",
            f"- reference: {self.reference}",
            f"- candidate: {self.candidate}",
            f"- tolerances: max abs <= {t.max_abs}, flipped voxels <= {t.max_flip_fraction}, "
            f"Dice per label >= {t.min_dice} (None = reported, not gated)",
            f"- created: {self.created}",
            "",
            "| case | shape | max abs | p99.9 abs | flipped | Dice per label | ref s | cand s "
            "| result |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for c in self.cases:
            dice = ", ".join(f"{k}: {v:.4f}" for k, v in c.dice.items())
            lines.append(
                f"| {c.name} | {'x'.join(map(str, c.shape))} | {_fmt(c.max_abs)} | "
                f"{_fmt(c.p999_abs)} | {c.flips} ({c.flip_fraction:.1e}) | {dice} | "
                f"{c.time_reference_s:.2f} | {c.time_candidate_s:.2f} | "
                f"{'pass' if c.passed else 'FAIL: ' + '; '.join(c.failures)} |"
            )
        return "\n".join(lines) + "\n"

    def write(self, folder: Path) -> list[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        js, md = folder / "parity_report.json", folder / "parity_report.md"
        js.write_text(json.dumps(self.to_dict(), indent=2))
        md.write_text(self.to_markdown())
        return [js, md, *write_parity_plots(self, folder)]


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2e}"


def _labels_of(output: np.ndarray, contract: InferenceContract) -> tuple[np.ndarray, bool]:
    """(N, D, H, W) labels and whether `output` held probabilities."""
    if np.issubdtype(output.dtype, np.floating) and output.ndim == 5:
        if output.shape[1] != contract.num_classes:
            raise ValueError(
                f"candidate returned {output.shape[1]} classes, expected {contract.num_classes}"
            )
        return labels_from_probabilities(output, contract.postprocessing, axis=1), True
    if np.issubdtype(output.dtype, np.integer) and output.ndim == 4:
        return output, False
    raise ValueError(
        f"a runner must return probabilities (N, K, D, H, W) float or labels (N, D, H, W) int, "
        f"got {output.dtype} {output.shape}"
    )


def compare(
    case: ParityCase,
    ref: np.ndarray,
    cand: np.ndarray,
    contract: InferenceContract,
    tol: Tolerances,
    times: tuple[float, float],
) -> CaseResult:
    """Differences between the reference's probabilities and a candidate's output."""
    ref_labels, _ = _labels_of(ref, contract)
    cand_labels, has_probs = _labels_of(cand, contract)
    if cand_labels.shape != ref_labels.shape:
        raise ValueError(f"{case.name}: candidate shape {cand.shape}, reference {ref.shape}")
    max_abs = p999 = None
    histogram: list[int] = []
    if has_probs:
        diff = np.abs(ref.astype(np.float64) - cand.astype(np.float64))
        max_abs, p999 = float(diff.max()), float(np.quantile(diff, 0.999))
        histogram = diff_histogram(diff)
    flips = int((ref_labels != cand_labels).sum())
    k = contract.num_classes
    onehot = [
        torch.nn.functional.one_hot(torch.from_numpy(x.astype(np.int64)), k).movedim(-1, 1)
        for x in (cand_labels, ref_labels)
    ]
    # both masks empty -> 1.0 (ignore_empty=False): agreeing on "no vessel" is agreement
    d = compute_dice(onehot[0], onehot[1], include_background=False, ignore_empty=False)
    dice = {
        contract.labels[str(i + 1)]: float(torch.nan_to_num(d[:, i], nan=1.0).min())
        for i in range(k - 1)
    }
    res = CaseResult(
        name=case.name,
        shape=list(case.volume.shape),
        why=case.why,
        max_abs=max_abs,
        p999_abs=p999,
        flips=flips,
        voxels=int(ref_labels.size),
        flip_fraction=flips / ref_labels.size,
        dice=dice,
        time_reference_s=times[0],
        time_candidate_s=times[1],
        diff_histogram=histogram,
        flip_map=flip_projection(ref_labels, cand_labels),
    )
    if tol.max_abs is not None and max_abs is not None and max_abs > tol.max_abs:
        res.failures.append(f"max abs {max_abs:.2e} > {tol.max_abs:.0e}")
    if tol.max_flip_fraction is not None and res.flip_fraction > tol.max_flip_fraction:
        res.failures.append(f"flipped {res.flip_fraction:.2e} > {tol.max_flip_fraction:.0e}")
    if tol.min_dice is not None:
        res.failures += [
            f"Dice {k} {v:.4f} < {tol.min_dice}" for k, v in dice.items() if v < tol.min_dice
        ]
    return res


def _timed(fn, volume: np.ndarray, affine: np.ndarray | None) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    out = fn(volume, affine)
    return out, time.perf_counter() - t0


class Reference:
    """The PyTorch side of one packaging run: the suite, and the reference output of each case
    computed once (with the time it took), however many formats are checked against it.

    Only the suite's own volumes are remembered (by identity; the suite keeps them alive); any
    other volume, such as the MAP's DICOM case, is run every time.
    """

    def __init__(self, runtime: Runtime, cases: list[ParityCase]) -> None:
        self.runtime, self.cases = runtime, cases
        self.description = runtime.description
        self._outputs: dict[int, tuple[np.ndarray, float]] = {}

    def output(
        self, volume: np.ndarray, affine: np.ndarray | None = None
    ) -> tuple[np.ndarray, float]:
        if not any(case.volume is volume for case in self.cases):
            return _timed(self.runtime.run, volume, affine)
        if id(volume) not in self._outputs:
            self._outputs[id(volume)] = _timed(self.runtime.run, volume, affine)
        return self._outputs[id(volume)]


def check_parity(
    reference: Runtime | Reference,
    candidate: Runtime,
    volumes: list[ParityCase],
    contract: InferenceContract,
    tolerances: Tolerances,
    format: str,
) -> ParityReport:
    """Run both runtimes on every case and compare; the caller decides what a failure stops."""
    if isinstance(reference, Runtime):
        reference = Reference(reference, [])
    cases = []
    bar = tqdm(volumes, desc=f"parity {format}", unit="case", leave=False, disable=None)
    for case in bar:  # a bar on a terminal only (disable=None); the log has every case
        ref, t_ref = reference.output(case.volume, case.affine)
        cand, t_cand = _timed(candidate.run, case.volume, case.affine)
        result = compare(case, ref, cand, contract, tolerances, (t_ref, t_cand))
        log.info(
            "parity %s %s %s: max_abs=%s flips=%d %s",
            format,
            case.name,
            "x".join(map(str, case.volume.shape)),
            _fmt(result.max_abs),
            result.flips,
            "pass" if result.passed else "FAIL " + "; ".join(result.failures),
        )
        cases.append(result)
    return ParityReport(format, reference.description, candidate.description, tolerances, cases)


def parity_suite(
    contract: InferenceContract, validation: list[Path] | None = None, seed: int = 0
) -> list[ParityCase]:
    """Shapes that break naive exporters, plus the run's own validation volumes.

    Synthetic cases are vessel volumes from the project's generator (so masks are not empty),
    in raw intensities like real input.
    """
    from clinbundle.training.synth import synthesize_volume

    rng = np.random.default_rng(seed)

    def vessels(shape: tuple[int, ...]) -> np.ndarray:
        # the generator needs >= 16 voxels per axis; smaller cases are crops of a larger volume
        image = synthesize_volume(tuple(max(s, 16) for s in shape), rng)[0]
        return np.ascontiguousarray(image[: shape[0], : shape[1], : shape[2]])

    r = contract.roi_size
    shapes = [
        ("odd", (r[0] + 11, r[1] + 5, r[2] + 19), "not a multiple of the roi or of 8"),
        ("smaller_than_roi", (r[0] // 2 + 3, r[1] // 2 + 1, r[2] // 2 + 5), "padded by MONAI"),
        ("anisotropic", (r[0] // 4 + 3, 2 * r[1] + 1, r[2] + 7), "thin slab"),
    ]
    cases = [ParityCase(name, vessels(shape)[None, None], why) for name, shape, why in shapes]
    pair = [vessels((r[0] + 3, r[1] + 7, r[2] + 1)) for _ in range(2)]
    cases.append(ParityCase("batch2", np.stack(pair)[:, None], "two volumes in one call"))
    cases += geometry_cases(contract, vessels((r[0] + 5, r[1] + 9, r[2] + 3)))
    for path in validation or []:
        img = nib.load(str(path))
        image = np.asarray(img.dataobj, dtype=np.float32)
        name = Path(path).name.removesuffix(".gz").removesuffix(".nii")
        cases.append(
            ParityCase(f"val:{name}", image[None, None], "the run's validation volume", img.affine)
        )
    return cases


def geometry_cases(contract: InferenceContract, volume: np.ndarray) -> list[ParityCase]:
    """The same anatomy as a scanner would store it: anisotropic (0.5 x 0.5 x 2.5 mm), LPS, and
    oblique (rotated 20 degrees, 0.9 x 0.9 x 1.3 mm); compared on the input's grid."""
    from clinbundle.training.synth import regrid

    base = np.diag([*(contract.geometry.spacing or (1.0, 1.0, 1.0)), 1.0])
    label = np.zeros(volume.shape, dtype=np.uint8)
    aniso, _, aniso_affine = regrid(volume, label, base, (0.5, 0.5, 2.5), "RAS")
    lps, _, lps_affine = regrid(volume, label, base, tuple(np.diag(base)[:3]), "LPS")
    a = np.deg2rad(20.0)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    oblique_affine = np.eye(4)
    oblique_affine[:3, :3] = rot @ np.diag([0.9, 0.9, 1.3])
    oblique_affine[:3, 3] = [-12.0, 7.0, 3.0]
    return [
        ParityCase(
            "aniso_0.5x0.5x2.5", aniso[None, None], "resampled to the contract", aniso_affine
        ),
        ParityCase("lps", lps[None, None], "stored LPS: reoriented and back", lps_affine),
        ParityCase("oblique", volume[None, None], "rotated 20 deg, anisotropic", oblique_affine),
    ]


def record_parity(report: ParityReport, model, folder: Path) -> list[Path]:
    """Log the report on the model's run and tag the model version `parity_<format>`.

    A model version has no artifacts of its own, so the files go to its run under
    `parity/<format>/v<version>/` and the version tag points there. A failing report is recorded
    too: the registry should say that a format was tried and did not hold.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    where = f"parity/{report.format}/v{model.version or 'run'}"
    files = report.write(folder)
    for path in files:
        client.log_artifact(model.run_id, str(path), where)
    tag = f"parity_{report.format}"
    if model.version is not None:
        client.set_model_version_tag(model.name, model.version, tag, report.summary())
        client.set_model_version_tag(model.name, model.version, f"{tag}_report", where)
    else:
        client.set_tag(model.run_id, tag, report.summary())
    log.info(
        "recorded %s on %s (%s): %s", tag, model.label, mlflow.get_tracking_uri(), report.summary()
    )
    return files


def settle_parity(
    report: ParityReport, model, folder: Path, record: bool, label: str, what: str, **extra
) -> list[Path]:
    """Attach the model to the report, keep it (MLflow and `folder`), stop on a breach.

    Recording comes first on purpose: the registry should say that a format was tried and did
    not hold, even though nothing of that format is written.
    """
    from clinbundle.runtime.errors import ParityError

    report.model = {
        "uri": model.uri,
        "name": model.name,
        "version": model.version,
        "run_id": model.run_id,
        **extra,
    }
    files = record_parity(report, model, folder) if record else report.write(folder)
    if not report.passed:
        raise ParityError(
            f"{label} parity failed for {model.label}: {report.summary()}; failing cases: "
            f"{', '.join(report.overall()['failed_cases'])}. No {what} was written.\n"
            f"{report.to_markdown()}"
        )
    return files
