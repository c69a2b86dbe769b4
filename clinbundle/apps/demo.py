"""`clinbundle demo`: a Gradio page where a reviewer looks at what a model does before it ships.

    input  (bundled synthetic sample | uploaded NIfTI / .npy | flagged cases of a predict
            table, with the labels predict stored: `--queue`, see review_queue.py)
      -> runtime (PyTorch model from the registry | ONNX bundle | bento endpoint over HTTP)
      -> three slice views with label overlay, Dice when the sample has a ground truth
      -> model card, parity report, inference time, execution provider actually used
      -> download the labels as NIfTI; flag the case: stored on the model version in MLflow

PyTorch and ONNX go through `Runtime.run`, the shared sliding-window path of every format, so
the reviewer sees exactly what the packaged model does; the endpoint runtime goes through the
bento service's own HTTP API (`POST /segment`, `GET /metadata`).

The logic lives in `ReviewerDemo` (plain Python, testable without a browser); `build_app`
only wires it to Gradio components.
"""

from __future__ import annotations

import functools
import getpass
import gzip
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np

from clinbundle.apps.render import VIEW_AXIS, VIEWS, dice_per_label, display_window, render_slice
from clinbundle.runtime.errors import ClinbundleError, InputError

if TYPE_CHECKING:
    from clinbundle.apps.review_queue import ReviewQueue

log = logging.getLogger("clinbundle.demo")

MAX_VOXELS = 256**3  # larger uploads would take minutes on a CPU: refuse them clearly
SAMPLE_SHAPE = (64, 64, 64)
SAMPLE_SEED = 7
VERDICTS = ("looks right", "minor issues", "wrong")
ENDPOINT_FIELD = "file"  # multipart field of the bento service's POST /segment
#: The page's names of the runtimes (the radio buttons; a review records which one ran).
PYTORCH, ONNX_BUNDLE, ENDPOINT = "PyTorch", "ONNX bundle", "Bento endpoint"


# --------------------------------------------------------------------------- inputs


@dataclass
class Case:
    """One volume on screen: image, optional ground truth, and the last prediction."""

    name: str
    image: np.ndarray  # float32 (D, H, W), raw intensities
    affine: np.ndarray | None  # None: a .npy upload, taken to be on the model grid
    sha256: str
    truth: np.ndarray | None = None
    prediction: np.ndarray | None = None
    runtime: str | None = None
    seconds: float | None = None
    dice: dict[str, float] = field(default_factory=dict)
    window: tuple[float, float] = (0.0, 1.0)
    origin: dict | None = None  # a review-queue case: its table, stored output, uncertainty

    def __post_init__(self) -> None:
        self.window = display_window(self.image)


def read_volume(
    path: Path, what: str = "volume", shown: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A 3-D float32 array and its affine from a NIfTI or .npy file; InputError names the file.

    The service's reader (`http_io.read_volume`: by the bytes, bounded gunzip, no pickles, 3-D
    real finite numbers), so the demo refuses exactly what the service refuses, with this
    demo's voxel limit.
    """
    from clinbundle.apps import http_io

    path = Path(path)
    try:
        array, affine = http_io.read_volume(path, MAX_VOXELS, "what this demo runs")
    except http_io.BadRequest as e:
        raise InputError(f"{shown or path.name} ({what}): {e}") from None
    return array[0, 0], None if affine is None else np.asarray(affine, dtype=float)


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def load_case(image_path: Path, label_path: Path | None = None, name: str | None = None) -> Case:
    """Read an image (and its ground truth) into a Case; shapes must agree."""
    image, affine = read_volume(image_path, shown=name)
    truth = None
    if label_path is not None:
        truth, _ = read_volume(label_path, "label volume")
        if truth.shape != image.shape:
            raise InputError(
                f"{Path(label_path).name}: label shape {truth.shape} differs from image "
                f"shape {image.shape}"
            )
        truth = truth.astype(np.uint8)
    image = image.astype(np.float32)
    return Case(name or Path(image_path).name, image, affine, _sha256(image), truth)


def ensure_samples(workdir: Path, samples: Path | None = None) -> dict[str, tuple[Path, Path]]:
    """Sample name -> (image, label): the held-out pairs of an MSD folder.

    Without `samples`, the synthetic set is generated once into WORKDIR/demo/samples (same
    seed, same bytes), so the demo needs no download and commits no data.
    """
    from clinbundle.training.synth import write_dataset

    root = samples or workdir / "demo" / "samples"
    if samples is None and not (root / "dataset.json").is_file():
        started = time.perf_counter()
        write_dataset(root, n=2, n_test=3, shape=SAMPLE_SHAPE, seed=SAMPLE_SEED)
        log.info(
            "generated the synthetic sample volumes in %s (%.1f s)",
            root,
            time.perf_counter() - started,
        )
    try:
        meta = json.loads((root / "dataset.json").read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{root}: no readable dataset.json ({e}); give an MSD folder") from None
    pairs = [e for e in meta.get("test", []) if isinstance(e, dict) and "label" in e]
    source = "held-out"
    if not pairs:
        pairs, source = meta.get("training", []), "training"
    found = {}
    for entry in pairs:
        image, label = root / entry["image"], root / entry["label"]
        if image.is_file() and label.is_file():
            found[_case_name(image)] = (image, label)
    if not found:
        raise InputError(f"{root}: dataset.json lists no image/label pairs that exist")
    log.info("%d sample volumes (%s pairs of %s)", len(found), source, root)
    return found


def _case_name(path: Path) -> str:
    return re.sub(r"\.nii(\.gz)?$|\.npy$", "", path.name)


# --------------------------------------------------------------------------- runtimes


@dataclass
class ModelInfo:
    """What the side panel shows and where a review is stored."""

    name: str | None
    version: str | None
    run_id: str | None
    uri: str
    metrics: list[tuple[str, str, str]]  # (set and metric, value, 95% CI)
    parity_markdown: str
    model_card: str = ""

    def card_markdown(self) -> str:
        title = f"{self.name or 'model'} v{self.version or '?'}"
        rows = "\n".join(f"| {m} | {v} | {ci} |" for m, v, ci in self.metrics) or (
            "| no metrics recorded | - | - |"
        )
        return (
            f"### {title}\n\nmodel `{self.uri}`  \nrun `{self.run_id or 'unknown'}`\n\n"
            f"| metric | value | 95% CI |\n|---|---|---|\n{rows}\n"
        )


def _metric_rows(best: dict, held_out: dict) -> list[tuple[str, str, str]]:
    from clinbundle.metric_definitions import known

    def shown(name: str, v: object) -> str:
        return known(name).format(float(v)) if known(name) else f"{float(v):.4f}"

    rows = [(f"validation {k} (best epoch)", shown(k, v), "-") for k, v in sorted(best.items())]
    if "mean" in held_out:
        lo, hi = [*str(held_out.get("ci95", "nan,nan")).split(","), "nan"][:2]
        rows.append(
            (
                f"held-out {held_out.get('metric', '?')}",
                shown(str(held_out.get("metric", "?")), held_out["mean"]),
                f"{float(lo):.4f} .. {float(hi):.4f} (BCa bootstrap)",
            )
        )
    return rows


@dataclass
class DemoRuntime:
    """A way to segment one 3-D volume, with the words that say what actually ran it."""

    key: str
    segment: Callable[[np.ndarray, np.ndarray], np.ndarray]  # (image, affine) -> labels
    description: str
    info: ModelInfo
    labels: dict[str, str] = field(default_factory=lambda: {"0": "background", "1": "foreground"})


def _labels_from(runtime_run: Callable) -> Callable:
    """A runner of the one inference path as (image, affine) -> labels on the image's grid."""

    def segment(image: np.ndarray, affine: np.ndarray) -> np.ndarray:
        return runtime_run(image[None, None].astype(np.float32), affine, output="labels")[0]

    return segment


def pytorch_runtime(model: Any, device: str = "auto") -> DemoRuntime:
    """The registered model in eager PyTorch (the reference every bundle is checked against)."""
    import torch

    from clinbundle.packaging.runtimes import torch_runtime

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        log.info(
            "PyTorch runtime: device auto -> %s (CUDA available: %s)", device, device == "cuda"
        )
    runtime = torch_runtime(model.load_network(), model.contract, device)
    tags = model.version_tags
    held_out = {
        k.removeprefix("promotion_"): v for k, v in tags.items() if k.startswith("promotion_")
    }
    info = ModelInfo(
        name=model.name,
        version=model.version,
        run_id=model.run_id,
        uri=model.uri,
        metrics=_metric_rows(model.metadata.get("best", {}), held_out),
        parity_markdown="PyTorch is the reference runtime: parity is checked against it "
        "when a bundle is built (start the demo with `--bundle` to see a bundle's report).",
    )
    return DemoRuntime(
        PYTORCH, _labels_from(runtime.run), runtime.description, info, model.contract.labels
    )


def onnx_bundle_runtime(path: Path, device: str = "auto") -> DemoRuntime:
    """An ONNX bundle through its default runtime (measured at packaging; CLINBUNDLE_RUNTIME
    overrides); its model card and parity report come with it."""
    from clinbundle.runtime.bundle_reader import load_bundle

    bundle = load_bundle(Path(path), device)
    m, prov = bundle.manifest.get("model", {}), bundle.manifest.get("provenance", {})
    parity_file = bundle.path / "parity" / "parity_report.md"
    card_file = bundle.path / "README.md"
    info = ModelInfo(
        name=m.get("name"),
        version=m.get("version"),
        run_id=m.get("run_id"),
        uri=m.get("uri", str(path)),
        metrics=_metric_rows(prov.get("training_metrics", {}), prov.get("held_out", {})),
        parity_markdown=parity_file.read_text() if parity_file.is_file() else "no parity report",
        model_card=card_file.read_text() if card_file.is_file() else "",
    )
    log.info("ONNX bundle %s runs on %s", path, bundle.runtime.description)
    return DemoRuntime(
        ONNX_BUNDLE,
        _labels_from(bundle.predict),
        bundle.runtime.description,
        info,
        bundle.contract.labels,
    )


def _nifti_bytes(array: np.ndarray, affine: np.ndarray | None) -> bytes:
    img = nib.Nifti1Image(array, np.eye(4) if affine is None else affine)
    return gzip.compress(img.to_bytes(), compresslevel=1)


def _read_nifti_bytes(data: bytes) -> np.ndarray:
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return np.asanyarray(nib.Nifti1Image.from_bytes(data).dataobj)


class EndpointClient:
    """The bento service's HTTP API: `GET /metadata`, `POST /segment` (multipart NIfTI in,
    NIfTI label volume out). Plain HTTP, so the demo needs no BentoML installed."""

    def __init__(self, url: str, timeout: float = 300.0, token: str | None = None) -> None:
        import httpx

        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(timeout=timeout, headers=headers)
        self._errors = (httpx.HTTPError,)

    def _call(self, method: str, path: str, **kwargs: Any):
        try:
            r = self._http.request(method, self.url + path, **kwargs)
        except self._errors as e:
            raise ClinbundleError(f"bento endpoint {self.url}{path}: {e}") from None
        if r.status_code >= 400:
            raise ClinbundleError(
                f"bento endpoint {self.url}{path} answered {r.status_code}: {r.text[:300]}"
            )
        return r

    def metadata(self) -> dict:
        try:
            return self._call("GET", "/metadata", timeout=15).json()
        except ValueError:
            raise ClinbundleError(f"bento endpoint {self.url}/metadata is not JSON") from None

    def segment(self, image: np.ndarray, affine: np.ndarray) -> np.ndarray:
        files = {ENDPOINT_FIELD: ("volume.nii.gz", _nifti_bytes(image, affine), "application/gzip")}
        r = self._call("POST", "/segment", files=files)
        try:
            labels = _read_nifti_bytes(r.content)
        except Exception as e:
            raise ClinbundleError(f"bento endpoint {self.url}/segment: not NIfTI ({e})") from None
        labels = np.squeeze(labels) if labels.ndim > 3 else labels
        if labels.shape != image.shape:
            raise ClinbundleError(
                f"bento endpoint returned labels of shape {labels.shape} for a volume of "
                f"shape {image.shape}"
            )
        return labels.astype(np.uint8)


def endpoint_runtime(url: str, token: str | None = None) -> DemoRuntime:
    """A running bento service; its /metadata supplies the model card, as far as it says.

    The bearer token (`token`, else CLINBUNDLE_API_TOKEN) is sent with every request: a service
    off loopback requires one.
    """
    client = EndpointClient(url, token=token or os.environ.get("CLINBUNDLE_API_TOKEN") or None)
    meta = client.metadata()
    m = meta.get("model", meta) if isinstance(meta.get("model", meta), dict) else {}
    prov = meta.get("provenance", {}) if isinstance(meta.get("provenance"), dict) else {}
    ep = meta.get("execution_provider") or meta.get("runtime") or "not reported by the service"
    description = f"bento endpoint {client.url} ({ep})"
    log.info("endpoint runtime: %s", description)
    info = ModelInfo(
        name=m.get("name"),
        version=None if m.get("version") is None else str(m.get("version")),
        run_id=m.get("run_id"),
        uri=m.get("uri", client.url),
        metrics=_metric_rows(prov.get("training_metrics", {}), prov.get("held_out", {})),
        parity_markdown=meta.get("parity", {}).get("summary", "")
        if isinstance(meta.get("parity"), dict)
        else "the service reports no parity summary",
        model_card="```json\n" + json.dumps(meta, indent=2)[:4000] + "\n```",
    )
    contract = meta.get("contract") if isinstance(meta.get("contract"), dict) else {}
    labels = contract.get("labels") or {"0": "background", "1": "foreground"}
    return DemoRuntime(ENDPOINT, client.segment, description, info, labels)


# --------------------------------------------------------------------------- reviews


def record_review(info: ModelInfo, review: dict) -> str:
    """Store a review on the model: artifact `reviews/<ts>.json` on its run, and model version
    tags `review_<n>` and `review_latest`, so the review travels with the model version."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if not info.run_id:
        raise ClinbundleError("this runtime does not say which MLflow run its model came from")
    client = MlflowClient()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    artifact = f"reviews/{stamp}.json"
    try:
        client.log_text(info.run_id, json.dumps(review, indent=2, sort_keys=True), artifact)
        where = f"runs:/{info.run_id}/{artifact}"
        if info.name and info.version:
            tags = client.get_model_version(info.name, info.version).tags
            taken = [int(k[7:]) for k in tags if re.fullmatch(r"review_\d+", k)]
            key = f"review_{max(taken, default=0) + 1}"
            summary = json.dumps(
                {
                    "at": stamp,
                    "verdict": review["verdict"],
                    "case": review["case"]["name"],
                    "reviewer": review["reviewer"],
                    "comment": review["comment"][:500],
                    "artifact": where,
                }
            )
            client.set_model_version_tag(info.name, info.version, key, summary)
            client.set_model_version_tag(info.name, info.version, "review_latest", summary)
            where += f" and tag {key} on {info.name} v{info.version}"
    except MlflowException as e:
        raise ClinbundleError(f"could not store the review in MLflow: {e.message}") from None
    log.info("review stored: %s", where)
    return where


# --------------------------------------------------------------------------- the app logic


class RuntimeLoader:
    """The demo's runtimes, opened in a background thread while the page starts.

    Importing PyTorch and MONAI and opening a model are most of the demo's start-up (about 9 s
    of CPU on 2 cores, against ~4 s for the page itself), so the page is served first and says
    that the model is opening; every action that needs a runtime waits for it here. They are
    opened after the page is up, not beside it: both are Python (one GIL), so in parallel each
    would take as long as both in turn. The keys (the page's radio buttons) are known from the
    arguments before anything is opened. A failure is kept and raised to whoever waits:
    `run_demo` then closes the page and exits.
    """

    def __init__(self, keys: list[str], load: Callable[[], list[DemoRuntime]]) -> None:
        if not keys:
            raise ClinbundleError("no runtime: give --model, --bundle or --endpoint")
        self.keys = keys
        self._load = load
        self._runtimes: dict[str, DemoRuntime] = {}
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-runtimes", daemon=True)
        self.seconds: float | None = None

    @classmethod
    def loaded(cls, runtimes: list[DemoRuntime]) -> RuntimeLoader:
        loader = cls([r.key for r in runtimes], lambda: runtimes)
        loader._run()
        return loader

    def start(self) -> RuntimeLoader:
        self._thread.start()
        return self

    def _run(self) -> None:
        started = time.perf_counter()
        try:
            runtimes = {r.key: r for r in self._load()}
            if list(runtimes) != self.keys:
                raise RuntimeError(f"runtimes {list(runtimes)} opened, {self.keys} announced")
            self._runtimes = runtimes
        except BaseException as e:  # kept for the waiting thread to raise
            self._error = e
        finally:
            self.seconds = time.perf_counter() - started
            self._done.set()

    def wait(self) -> dict[str, DemoRuntime]:
        """The runtimes once opened; the loading error, if there was one."""
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._runtimes


class ReviewerDemo:
    """Samples, runtimes and the actions of the page, independent of Gradio."""

    def __init__(
        self,
        runtimes: list[DemoRuntime] | RuntimeLoader,
        samples: dict[str, tuple[Path, Path]],
        output_dir: Path,
        queue: ReviewQueue | None = None,
    ) -> None:
        if not isinstance(runtimes, RuntimeLoader):
            runtimes = RuntimeLoader.loaded(runtimes)  # refuses an empty list
        self.runtimes = runtimes
        self.samples = samples
        self.queue = queue
        self.output_dir = output_dir
        output_dir.mkdir(parents=True, exist_ok=True)
        # Gradio runs handlers in worker threads: two reviewers flagging at once must not both
        # take the same review_<n> (reviews from other processes can still race; the artifact,
        # named by its timestamp, is never lost).
        self._flag_lock = threading.Lock()

    @property
    def default_runtime(self) -> str:
        return self.runtimes.keys[0]

    def runtime(self, key: str) -> DemoRuntime:
        if key not in self.runtimes.keys:
            raise ClinbundleError(f"unknown runtime '{key}'; choose one of {self.runtimes.keys}")
        return self.runtimes.wait()[key]

    def load_sample(self, name: str) -> Case:
        if name not in self.samples:
            raise InputError(f"no sample named '{name}'")
        image, label = self.samples[name]
        return load_case(image, label, name=name)

    def load_upload(self, path: Path) -> Case:
        """An upload is named by its content hash, never its file name: a file name is often a
        patient's name or accession number, and the case name reaches logs, output files and,
        with a review, the model registry."""
        case = load_case(Path(path), name="the upload")
        case.name = f"upload-{case.sha256[:12]}"
        return case

    def segment(self, case: Case, runtime_key: str) -> tuple[Case, Path]:
        """Run one runtime on the case; Dice against the ground truth; labels written as NIfTI."""
        rt = self.runtime(runtime_key)
        started = time.perf_counter()
        labels = rt.segment(case.image, case.affine)
        case.seconds = time.perf_counter() - started
        case.prediction, case.runtime = labels, runtime_key
        case.dice = dice_per_label(labels, case.truth, rt.labels) if case.truth is not None else {}
        log.info(
            "segmented %s with %s in %.2f s on %s; Dice %s",
            case.name,
            runtime_key,
            case.seconds,
            rt.description,
            case.dice or "n/a (no ground truth)",
        )
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", case.name)
        out = self.output_dir / f"{_case_name(Path(safe))}_labels_{runtime_key.split()[0]}.nii.gz"
        out.write_bytes(_nifti_bytes(labels, case.affine))
        return case, out

    def flag(self, case: Case | None, verdict: str, comment: str, reviewer: str) -> str:
        if case is None:
            raise InputError("load a sample or upload a volume before flagging a case")
        if verdict not in VERDICTS:
            raise InputError(f"choose a verdict: {', '.join(VERDICTS)}")
        comment = (comment or "").strip()
        if not comment:
            raise InputError("write a comment: say what you saw")
        key = case.runtime or self.default_runtime
        rt = self.runtime(key)
        review = {
            "verdict": verdict,
            "comment": comment,
            "reviewer": (reviewer or "").strip() or "anonymous",
            "case": {
                "name": case.name,
                "sha256": case.sha256,
                "shape": list(case.image.shape),
                "has_ground_truth": case.truth is not None,
            },
            "runtime": key if case.prediction is not None else None,
            "execution": rt.description if case.prediction is not None else None,
            "inference_seconds": case.seconds,
            "dice": case.dice,
            "model": {"name": rt.info.name, "version": rt.info.version, "run_id": rt.info.run_id},
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        if case.origin is not None:
            review["queue"] = case.origin
        with self._flag_lock:
            return record_review(rt.info, review)


# --------------------------------------------------------------------------- Gradio wiring


def _dice_markdown(case: Case) -> str:
    if case.prediction is None:
        return "Run the segmentation to see the overlay and Dice."
    if case.truth is None:
        return "No ground truth for this volume: Dice not available."
    return "**Dice vs ground truth:** " + ", ".join(
        f"{name} {value:.3f}" for name, value in case.dice.items()
    )


def _run_markdown(case: Case, rt: DemoRuntime) -> str:
    if case.prediction is None:
        return f"Runtime ready: {rt.description}"
    return (
        f"**{case.runtime}** took **{case.seconds:.2f} s** for {case.name} "
        f"({'x'.join(map(str, case.image.shape))})  \nexecution: `{rt.description}`"
    )


def build_app(demo: ReviewerDemo):
    """The page: inputs and views on the left, model card and review on the right.

    The side panel is filled when the page loads (`on_runtime` of the default runtime), so the
    page can be served while the runtimes are still opening (`RuntimeLoader`).
    """
    from clinbundle.apps.gradio_import import import_gradio

    gr = import_gradio()

    def user_errors(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any) -> Any:
            try:
                return fn(*args)
            except ClinbundleError as e:
                log.warning("shown to the user: %s", e)
                raise gr.Error(str(e), duration=None) from None
            except gr.Error:
                raise
            except Exception as e:  # keep the page alive; the log has the traceback
                log.exception("unexpected error in the demo")
                raise gr.Error(f"unexpected error: {type(e).__name__}: {e}", duration=None) from e

        return wrapper

    def views(case: Case | None, a: float, c: float, s: float, opacity: float, pred, truth):
        if case is None:
            return [None, None, None]
        index = {"axial": a, "coronal": c, "sagittal": s}
        return [
            render_slice(
                case.image,
                v,
                int(index[v]),
                case.window,
                case.prediction if pred else None,
                case.truth if truth else None,
                opacity,
            )
            for v in VIEWS
        ]

    def show_case(case: Case, opacity: float, pred: bool, truth: bool):
        mids = {v: case.image.shape[VIEW_AXIS[v]] // 2 for v in VIEWS}
        sliders = [
            gr.Slider(minimum=0, maximum=case.image.shape[VIEW_AXIS[v]] - 1, value=mids[v])
            for v in VIEWS
        ]
        images = views(case, mids["axial"], mids["coronal"], mids["sagittal"], opacity, pred, truth)
        status = f"Loaded **{case.name}** ({'x'.join(map(str, case.image.shape))}" + (
            ", with ground truth)" if case.truth is not None else ", no ground truth)"
        )
        return [case, *sliders, *images, status, _dice_markdown(case), None]

    @user_errors
    def on_sample(name: str, opacity: float, pred: bool, truth: bool):
        if not name:
            raise InputError("choose a sample volume")
        return show_case(demo.load_sample(name), opacity, pred, truth)

    @user_errors
    def on_upload(file: str | None, opacity: float, pred: bool, truth: bool):
        if not file:
            raise InputError("no file received")
        return show_case(demo.load_upload(Path(file)), opacity, pred, truth)

    @user_errors
    def on_segment(case: Case | None, key: str, a, c, s, opacity, pred, truth):
        if case is None:
            raise InputError("load a sample or upload a volume first")
        case, out = demo.segment(case, key)
        images = views(case, a, c, s, opacity, pred, truth)
        return [
            case,
            *images,
            _dice_markdown(case),
            _run_markdown(case, demo.runtime(key)),
            str(out),
        ]

    @user_errors
    def on_view(view: str, case: Case | None, index: float, opacity, pred, truth):
        if case is None:
            return None
        return render_slice(
            case.image,
            view,
            int(index),
            case.window,
            case.prediction if pred else None,
            case.truth if truth else None,
            opacity,
        )

    @user_errors
    def on_runtime(key: str):
        rt = demo.runtime(key)
        return (
            rt.info.card_markdown(),
            rt.info.parity_markdown,
            rt.info.model_card or "(none)",
            f"Runtime ready: {rt.description}",
        )

    @user_errors
    def on_flag(case: Case | None, verdict: str, comment: str, reviewer: str):
        return f"Flag stored: {demo.flag(case, verdict, comment, reviewer)}"

    @user_errors
    def on_queue(index: int, opacity: float, pred: bool, truth: bool):
        """Open queue case `index` (past the last, the last again). A case that cannot open is
        said in the queue's line and the page is cleared, so "next" still moves past it and no
        review can land on the case shown before."""
        queue = demo.queue
        index = max(0, min(int(index), len(queue) - 1))
        try:
            shown = show_case(queue.open(index), opacity, pred, truth)
        except ClinbundleError as e:
            log.warning("queue case %d cannot open: %s", index + 1, e)
            why = f"{queue.markdown(index)}  \n**this case cannot open:** {e}"
            cleared = [None, *(gr.skip() for _ in VIEWS), *(None for _ in VIEWS)]
            return [index, why, *cleared, "No case loaded.", "", None]
        return [index, queue.markdown(index), *shown]

    with gr.Blocks(title="clinbundle reviewer demo") as app:
        case_state = gr.State(None)
        gr.Markdown(
            "# Reviewer demo\nLook at what the model does before it ships: pick a sample or "
            "upload a volume, run it, scroll the slices, and flag what you see."
        )
        with gr.Row():
            with gr.Column(scale=3):
                queue_index = gr.State(0)
                if demo.queue is not None:
                    with gr.Row():
                        queue_status = gr.Markdown(elem_id="queue-status")
                        queue_next = gr.Button("Next flagged case", elem_id="queue-next", scale=0)
                with gr.Row():
                    sample = gr.Dropdown(
                        choices=list(demo.samples),
                        value=None,
                        label="Sample volume (synthetic, with ground truth)",
                        elem_id="sample",
                    )
                    upload = gr.File(
                        label="... or upload a NIfTI (.nii, .nii.gz) or .npy volume",
                        type="filepath",
                        elem_id="upload",
                    )
                with gr.Row():
                    runtime = gr.Radio(
                        choices=demo.runtimes.keys,
                        value=demo.default_runtime,
                        label="Runtime",
                        elem_id="runtime",
                    )
                    run_btn = gr.Button("Run segmentation", variant="primary", elem_id="run")
                status = gr.Markdown("Choose a sample or upload a volume.", elem_id="status")
                images, sliders = [], []
                with gr.Row():
                    for v in VIEWS:
                        with gr.Column(min_width=200):
                            images.append(
                                gr.Image(
                                    label=v,
                                    interactive=False,
                                    format="png",
                                    elem_id=f"view-{v}",
                                )
                            )
                            sliders.append(
                                gr.Slider(
                                    0, 1, value=0, step=1, label=f"{v} slice", elem_id=f"slider-{v}"
                                )
                            )
                with gr.Row():
                    opacity = gr.Slider(
                        0, 1, value=0.5, step=0.05, label="Label opacity", elem_id="opacity"
                    )
                    show_pred = gr.Checkbox(True, label="Show prediction (filled)")
                    show_truth = gr.Checkbox(True, label="Show ground truth (green outline)")
                dice = gr.Markdown("", elem_id="dice")
                download = gr.File(
                    label="Label volume (NIfTI)", interactive=False, elem_id="download"
                )
            with gr.Column(scale=2):
                card = gr.Markdown("Opening the model ...", elem_id="model-card")
                run_info = gr.Markdown("", elem_id="run-info")
                with gr.Accordion("Parity report", open=False):
                    parity = gr.Markdown("", elem_id="parity")
                with gr.Accordion("Full model card", open=False):
                    full_card = gr.Markdown("")
                with gr.Group():
                    gr.Markdown("### Flag this case")
                    verdict = gr.Radio(list(VERDICTS), label="Verdict", elem_id="verdict")
                    comment = gr.Textbox(label="Comment", lines=3, elem_id="comment")
                    reviewer = gr.Textbox(label="Reviewer", value=_user(), elem_id="reviewer")
                    flag_btn = gr.Button("Flag case", elem_id="flag")
                    flag_status = gr.Markdown("", elem_id="flag-status")

        display = [opacity, show_pred, show_truth]
        loaded = [case_state, *sliders, *images, status, dice, download]
        sample.input(on_sample, [sample, *display], loaded)
        upload.upload(on_upload, [upload, *display], loaded)
        run_btn.click(
            on_segment,
            [case_state, runtime, *sliders, *display],
            [case_state, *images, dice, run_info, download],
        )
        for v, img, sl in zip(VIEWS, images, sliders, strict=True):
            sl.input(
                lambda case, i, o, p, t, _v=v: on_view(_v, case, i, o, p, t),
                [case_state, sl, *display],
                img,
            )
        for control in display:
            control.input(
                lambda case, a, c, s, o, p, t: views(case, a, c, s, o, p, t),
                [case_state, *sliders, *display],
                images,
            )
        side_panel = [card, parity, full_card, run_info]
        runtime.input(on_runtime, runtime, side_panel)
        app.load(lambda: on_runtime(demo.default_runtime), None, side_panel)
        flag_btn.click(on_flag, [case_state, verdict, comment, reviewer], flag_status)
        if demo.queue is not None:
            queued = [queue_index, queue_status, *loaded]
            app.load(lambda *d: on_queue(0, *d), display, queued, api_name="queue_open")
            queue_next.click(
                lambda i, *d: on_queue(i + 1, *d),
                [queue_index, *display],
                queued,
                api_name="queue_next",
            )
    return app


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return ""


# --------------------------------------------------------------------------- command


def runtime_keys(model: str | None, bundle: Path | None, endpoint: str | None) -> list[str]:
    """The runtimes asked for; with none asked for, the registry's champion in PyTorch."""
    keys = [PYTORCH] if model or not (bundle or endpoint) else []
    return keys + [ONNX_BUNDLE] * bool(bundle) + [ENDPOINT] * bool(endpoint)


def build_runtimes(
    workdir: Path,
    model: str | None,
    bundle: Path | None,
    endpoint: str | None,
    name: str,
    device: str,
    token: str | None = None,
) -> list[DemoRuntime]:
    """The runtimes of `runtime_keys`, opened in that order."""
    from clinbundle.packaging.model_source import resolve_model

    def registered() -> DemoRuntime:
        if not model:
            log.info("no --model/--bundle/--endpoint: using models:/%s@champion", name)
        resolved = resolve_model(model, workdir / "cache" / "models", default_name=name)
        return pytorch_runtime(resolved, device)

    openers = {
        PYTORCH: registered,
        ONNX_BUNDLE: lambda: onnx_bundle_runtime(bundle, device),
        ENDPOINT: lambda: endpoint_runtime(endpoint, token),
    }
    runtimes = [openers[key]() for key in runtime_keys(model, bundle, endpoint)]
    log.info("demo runtimes: %s", ", ".join(f"{r.key} [{r.description}]" for r in runtimes))
    return runtimes


def run_demo(
    workdir: Path,
    model: str | None = None,
    bundle: Path | None = None,
    endpoint: str | None = None,
    name: str = "vessel-seg",
    device: str = "auto",
    port: int = 7860,
    samples: Path | None = None,
    block: bool = True,
    token: str | None = None,
    queue: Path | None = None,
):
    """Start the page on 127.0.0.1:PORT (loopback only: patient-like data stays local).

    With `queue` (a predictions table) the page opens its flagged cases; a model, bundle or
    endpoint is then only loaded when one is given, and samples only when `samples` is.
    """
    from clinbundle.tracking import configure_tracking

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("GRADIO_TEMP_DIR", str(workdir / "cache" / "gradio"))
    configure_tracking(workdir)
    review_queue, stored = None, []
    if queue is not None:
        from clinbundle.apps.review_queue import open_queue

        review_queue, queue_runtime = open_queue(queue)
        stored.append(queue_runtime)
    asked = queue is None or bool(model or bundle or endpoint)
    keys = [r.key for r in stored] + (runtime_keys(model, bundle, endpoint) if asked else [])

    def open_runtimes() -> list[DemoRuntime]:
        if not asked:
            return stored
        return stored + build_runtimes(workdir, model, bundle, endpoint, name, device, token)

    loader = RuntimeLoader(keys, open_runtimes)
    shown = ensure_samples(workdir, samples) if queue is None or samples else {}
    demo = ReviewerDemo(loader, shown, workdir / "demo" / "outputs", review_queue)
    app = build_app(demo)
    try:
        app.launch(
            server_name="127.0.0.1",
            server_port=port,
            prevent_thread_lock=True,
            show_error=True,
            quiet=True,
            allowed_paths=[str(demo.output_dir)],
        )
    except OSError as e:
        raise ClinbundleError(
            f"cannot serve the demo on 127.0.0.1:{port} ({e}); try --port"
        ) from None
    url = f"http://127.0.0.1:{port}/"
    log.info("reviewer demo at %s; opening the runtimes", url)
    print(f"reviewer demo running at {url} (Ctrl+C stops it)", flush=True)
    try:
        loader.start().wait()
    except BaseException:
        app.close()
        raise
    log.info("demo ready: runtimes %s opened in %.1f s", ", ".join(keys), loader.seconds)
    if block:
        app.block_thread()
    return app
