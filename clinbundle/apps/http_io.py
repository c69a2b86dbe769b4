"""What the BentoML service does besides routing: read uploads safely, segment, describe itself.

Kept out of `bentos/service.py` so that the service stays one short file and this part is
importable and testable without a server.

Uploads are recognised by their bytes, never by their name (names are not used as paths):
gzip -> NIfTI inside, NIfTI-1/2 header, or the .npy magic; .npy is read with allow_pickle=False.
NIfTI data of any real numeric type is accepted (CT is usually int16) and read as float32 with
its scaling; /segment_array takes float32 .npy only, as its contract says.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.metadata as md
import io
import json
import logging
import os
import tempfile
import threading
import time
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from clinbundle.runtime.bundle_reader import OnnxBundle, load_bundle
from clinbundle.runtime.errors import InputError
from clinbundle.runtime.geometry import check_affine, spacing_of

log = logging.getLogger("clinbundle.service")

#: Request body limit (bytes); overridable by environment.
MAX_REQUEST_BYTES = int(os.environ.get("CLINBUNDLE_MAX_REQUEST_BYTES", 512 * 1024**2))
#: Share of the machine's (or the container's) memory that requests in flight may use.
MEMORY_SHARE = float(os.environ.get("CLINBUNDLE_MEMORY_SHARE", 0.75))
#: Bytes one request holds per voxel of the input grid (the float32 volume, one class mapped
#: back, the best-so-far probability, the labels, the upload itself) and of the model grid per
#: class (sliding-window output and softmax) plus per voxel (resampled and normalised image,
#: the window count map). Measured peaks stay under these (benchmarks/whole_ct.py).
BYTES_PER_INPUT_VOXEL, BYTES_PER_MODEL_VOXEL, BYTES_PER_MODEL_VOXEL_CLASS = 16, 12, 8
#: Requests in flight at once; more are refused at once with 429 (BentoML's max_concurrency),
#: not queued: each one holds a volume and its probabilities, and on a CPU a queue only turns
#: into client timeouts. Raise it on a machine with more cores or a GPU.
MAX_CONCURRENCY = int(os.environ.get("CLINBUNDLE_MAX_CONCURRENCY", 8))
#: The ONNX bundle's folder inside the BentoML model (BentoML keeps its model.yaml beside it, so
#: the bundle's manifest still lists every file of its folder).
BUNDLE_DIR = "bundle"
OPEN_PATHS = ("/healthz", "/livez", "/readyz", "/metrics")
STATE: dict[str, object] = {"execution_provider": None, "loaded_at": None, "signature": None}


class BadRequest(ValueError):
    """The upload cannot be segmented; the message says why (answered with a 4xx)."""

    status = 400


class TooLarge(BadRequest):
    status = 413


class Busy(BadRequest):
    """Too much in flight: retry later (429, as for BentoML's concurrency limit)."""

    status = 429


def load_and_warm_up(bundle_path: Path) -> OnnxBundle:
    """Open the bundle and run warm-up inferences; only then is the service ready."""
    device = os.environ.get("CLINBUNDLE_DEVICE", "auto")
    bundle = load_bundle(bundle_path, device=device)  # CLINBUNDLE_TRUSTED_KEY: signed only
    STATE["signature"] = bundle.signature
    runs = int(os.environ.get("CLINBUNDLE_WARMUP_RUNS", "1"))
    shape = (1, bundle.contract.in_channels, *bundle.contract.roi_size)
    t0 = time.perf_counter()
    for _ in range(runs):
        bundle.predict(np.random.default_rng(0).normal(0, 1, shape).astype(np.float32))
    STATE["execution_provider"] = bundle.runtime.description
    STATE["loaded_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    log.info(
        "model loaded (device=%s, %s); %d warm-up run(s) in %.2f s",
        device,
        bundle.runtime.description,
        runs,
        time.perf_counter() - t0,
    )
    return bundle


def memory_budget() -> int:
    """Bytes that requests may use: MEMORY_SHARE of the cgroup limit or physical memory."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        raw = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        total = min(total, int(raw)) if raw.isdigit() else total
    except OSError:
        pass
    return int(total * MEMORY_SHARE)


def request_bytes(
    shape: tuple[int, ...], spacing: tuple | None, contract, probabilities: bool = False
) -> int:
    """What segmenting one volume of `shape` (at `spacing` mm) holds at its peak."""
    n_in = int(np.prod(shape))
    target = contract.geometry.spacing
    scale = 1.0 if target is None or spacing is None else np.prod(np.divide(spacing, target))
    n_model = int(n_in * scale)
    k = contract.num_classes
    need = n_in * BYTES_PER_INPUT_VOXEL + n_model * (
        BYTES_PER_MODEL_VOXEL + k * BYTES_PER_MODEL_VOXEL_CLASS
    )
    return need + (n_in * 4 * k if probabilities else 0)


#: Voxel limit of an upload, checked from its header before anything is allocated: an explicit
#: CLINBUNDLE_MAX_VOXELS, else what the memory budget holds for a 4-class model on its own grid
#: (about 400 M voxels on 24 GiB: a 512 x 512 x 1000 CT fits). The model-aware check comes per
#: request (`check_memory`).
MAX_VOXELS = int(os.environ.get("CLINBUNDLE_MAX_VOXELS", 0)) or memory_budget() // (
    BYTES_PER_INPUT_VOXEL + BYTES_PER_MODEL_VOXEL + 4 * BYTES_PER_MODEL_VOXEL_CLASS
)
SERVICE_LIMIT = "this service's limit (CLINBUNDLE_MAX_VOXELS, or derived from its memory)"


class MemoryLedger:
    """Requests reserve their estimated peak before they run: one that could never fit is a
    413 with the numbers, one that does not fit beside those in flight a 429 (retry), so the
    process is never OOM-killed by a burst of large volumes."""

    def __init__(self, budget: int) -> None:
        self.budget, self.used = budget, 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def reserve(self, need: int, what: str):
        if need > self.budget:
            raise TooLarge(
                f"{what} needs about {need / 2**30:.1f} GiB to segment, over this service's "
                f"memory budget of {self.budget / 2**30:.1f} GiB (CLINBUNDLE_MEMORY_SHARE of "
                "the machine); crop it or send it at a coarser spacing"
            )
        with self._lock:
            if self.used + need > self.budget:
                raise Busy(
                    f"{what} needs about {need / 2**30:.1f} GiB; "
                    f"{(self.budget - self.used) / 2**30:.1f} GiB is free while other requests "
                    "run: retry shortly"
                )
            self.used += need
        try:
            yield
        finally:
            with self._lock:
                self.used -= need


LEDGER = MemoryLedger(memory_budget())


def _check_volume(
    array: np.ndarray, what: str, max_voxels: int = MAX_VOXELS, limit_name: str = SERVICE_LIMIT
) -> None:
    if array.size == 0 or min(array.shape, default=0) == 0:
        raise BadRequest(f"{what} is empty (shape {array.shape})")
    if array.size > max_voxels:
        raise TooLarge(
            f"{what} has {array.size} voxels, over {limit_name} of {max_voxels}; "
            "crop or downsample it"
        )
    if not np.isfinite(array).all():
        raise BadRequest(f"{what} holds NaN or Inf values; fix or mask them first")


def read_volume(
    path: Path,
    max_voxels: int = MAX_VOXELS,
    limit_name: str = SERVICE_LIMIT,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Upload -> (float32 (1, 1, D, H, W), affine); no affine (None) for .npy.

    The one reader of uploaded volumes (the service and the demo): it goes by the bytes, not
    the name, unpacks gzip with a bound, never unpickles, and refuses what a runtime would
    choke on (not 3-D, not real numbers, empty, NaN/Inf, too large) with a BadRequest.
    """
    data = Path(path).read_bytes()
    if not data:
        raise BadRequest("the uploaded file is empty")
    if data[:6] == b"\x93NUMPY":
        array = _npy(data)
        if array.ndim != 3:
            raise BadRequest(f"a .npy volume must be 3-D (D, H, W), got shape {array.shape}")
        if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
            raise BadRequest(f"a .npy volume must hold real numbers, got {array.dtype}")
        array = array.astype(np.float32)
        affine = None  # no geometry: the array is taken to be on the model's grid
    else:
        image = _nifti(data)
        if len(image.shape) == 4 and image.shape[3] == 1:
            image = image.slicer[..., 0]
        if len(image.shape) != 3:
            raise BadRequest(f"expected a 3-D volume, got a NIfTI of shape {image.shape}")
        dtype = image.get_data_dtype()
        if dtype.names or not (
            np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)
        ):
            raise BadRequest(f"NIfTI data type {dtype} is not a real-valued intensity volume")
        array = np.asarray(image.get_fdata(dtype=np.float32))
        affine = image.affine
    _check_volume(array, "the volume", max_voxels, limit_name)
    return array[None, None], affine


def _npy(data: bytes) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise BadRequest(
                ".npy files with Python objects are refused (allow_pickle=False)"
            ) from None
        raise BadRequest(f"corrupt .npy file ({e})") from None
    except (OSError, EOFError) as e:
        raise BadRequest(f"corrupt .npy file ({e})") from None


def _nifti(data: bytes) -> nib.Nifti1Image:
    if data[:2] == b"\x1f\x8b":
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
                data = f.read(MAX_REQUEST_BYTES * 8 + 1)  # a bounded read: no gzip bombs
        except (OSError, EOFError, zlib.error) as e:  # zlib.error: a damaged deflate stream
            raise BadRequest(f"corrupt gzip file ({e})") from None
        if len(data) > MAX_REQUEST_BYTES * 8:
            raise TooLarge("the gzip file unpacks to more than this service accepts")
    magic = data[344:348]
    cls = {b"n+1\x00": nib.Nifti1Image, b"n+2\x00": nib.Nifti2Image}.get(magic)
    if cls is None:
        raise BadRequest(
            "not a NIfTI (.nii / .nii.gz) or .npy file; send a 3-D NIfTI or .npy volume"
        )
    try:
        image = cls.from_bytes(data)
        image.get_fdata(dtype=np.float32)  # a truncated file fails here, not later
        return image
    except Exception as e:  # nibabel raises several types for broken headers and data
        raise BadRequest(f"corrupt NIfTI file ({type(e).__name__}: {e})") from None


def _predict(
    bundle: OnnxBundle, volume: np.ndarray, affine: np.ndarray | None, probabilities: bool
) -> np.ndarray:
    """The one inference path under this request's memory reservation; bad geometry is a 400."""
    spacing = None
    try:
        if affine is not None:
            spacing = spacing_of(check_affine(affine, "the volume"))
        need = request_bytes(volume.shape[1:], spacing, bundle.contract, probabilities)
        with LEDGER.reserve(need * volume.shape[0], "the volume"):
            output = "probabilities" if probabilities else "labels"
            return bundle.predict(volume, affine, output=output)
    except InputError as e:
        raise BadRequest(str(e)) from None
    except MemoryError:
        raise TooLarge("the volume does not fit in this service's memory") from None


def segment_nifti(
    bundle: OnnxBundle,
    volume: np.ndarray,
    affine: np.ndarray | None,
    probabilities: bool,
    out_dir: str,
) -> Path:
    """Labels (uint8) or, if asked, float32 (D, H, W, K) probabilities, on the input's grid and
    with its affine (a .npy upload, which has none, is taken to be on the model's grid)."""
    result = _predict(bundle, volume, affine, probabilities)[0]
    if probabilities:
        data = np.moveaxis(result, 0, -1).astype(np.float32)
    else:
        data = result.astype(np.uint8)
    image = nib.Nifti1Image(data, np.eye(4) if affine is None else affine)
    image.header.set_xyzt_units("mm")
    out = Path(tempfile.mkdtemp(dir=out_dir)) / "segmentation.nii.gz"
    nib.save(image, out)
    return out


def segment_npy(bundle: OnnxBundle, path: Path, probabilities: bool, out_dir: str) -> Path:
    """float32 .npy (D, H, W) or (N, C, D, H, W) -> uint8 labels or float32 probabilities .npy."""
    data = Path(path).read_bytes()
    if not data:
        raise BadRequest("the uploaded file is empty")
    if data[:6] != b"\x93NUMPY":
        raise BadRequest("/segment_array takes a .npy file (numpy.save of a float32 array)")
    array = _npy(data)
    if array.dtype != np.float32:
        raise BadRequest(f"expected float32 data, got {array.dtype}; send array.astype('float32')")
    if array.ndim not in (3, 5):
        raise BadRequest(f"expected (D, H, W) or (N, C, D, H, W), got shape {array.shape}")
    _check_volume(array, "the array")
    volume = array[None, None] if array.ndim == 3 else array
    result = _predict(bundle, np.ascontiguousarray(volume), None, probabilities)
    if array.ndim == 3:
        result = result[0]
    out = Path(tempfile.mkdtemp(dir=out_dir)) / "result.npy"
    np.save(out, result, allow_pickle=False)
    return out


def service_metadata(bundle_path: Path) -> dict:
    """Model, contract, provenance, parity and versions: what a client may want to check."""
    manifest = json.loads((bundle_path / "manifest.json").read_text())
    serving = {}
    for lib in ("bentoml", "onnxruntime", "numpy", "nibabel", "clinbundle"):
        try:
            serving[lib] = md.version(lib)
        except md.PackageNotFoundError:
            serving[lib] = "not installed"
    return {
        "model": manifest["model"],
        "contract": manifest["contract"],
        "provenance": manifest["provenance"],
        "parity": manifest["parity"],
        "bundle_libraries": manifest["libraries"],
        "serving_libraries": serving,
        "execution_provider": STATE["execution_provider"],
        "loaded_at": STATE["loaded_at"],
        # "unsigned", "signed, not checked" or "verified with key sha256:..." (None: not loaded)
        "signature": STATE["signature"],
        "limits": {
            "max_request_bytes": MAX_REQUEST_BYTES,
            "max_voxels": MAX_VOXELS,
            "memory_budget_bytes": LEDGER.budget,
            "bytes_per_voxel": {
                "input_grid": BYTES_PER_INPUT_VOXEL,
                "model_grid": BYTES_PER_MODEL_VOXEL,
                "model_grid_per_class": BYTES_PER_MODEL_VOXEL_CLASS,
            },
            "max_concurrency": MAX_CONCURRENCY,
        },
    }


class RequestGuard:
    """ASGI middleware: bearer token (when set) and request size, checked before the body is read.

    BentoML 1.4 has no request size limit of its own; a POST must declare its Content-Length
    (every HTTP client does for a file upload) so that oversize bodies are refused unread.
    It also unwraps BentoML 1.4.39's 4xx bodies, which come as `[{"error": ...}]` (a stray
    comma in its error handler), so every error of this service is `{"error": "..."}`.
    """

    def __init__(self, app, token: str | None = None, max_bytes: int = MAX_REQUEST_BYTES):
        self.app, self.token, self.max_bytes = app, token, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] == "/metadata":
            # the metadata app is mounted at /metadata/; answer /metadata without a redirect
            scope = scope | {"path": "/metadata/", "raw_path": b"/metadata/"}
        if scope["type"] == "http" and scope["path"].rstrip("/") not in OPEN_PATHS:
            headers = dict(scope.get("headers") or [])
            problem = None
            if self.token and headers.get(b"authorization") != f"Bearer {self.token}".encode():
                problem = (401, "missing or wrong bearer token ('Authorization: Bearer ...')")
            elif scope["method"] == "POST":
                length = headers.get(b"content-length")
                if length is None:
                    problem = (411, "send a Content-Length header")
                elif int(length) > self.max_bytes:
                    problem = (
                        413,
                        f"request of {int(length)} bytes is over the limit of "
                        f"{self.max_bytes} (CLINBUNDLE_MAX_REQUEST_BYTES)",
                    )
            if problem:
                body = json.dumps({"error": problem[1]}).encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": problem[0],
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, _unwrapping_errors(send))


def _unwrapping_errors(send):
    """Pass responses through; rewrite a 4xx JSON body `[{...}]` to `{...}`."""
    start: dict | None = None
    chunks: list[bytes] = []

    async def wrapped(message) -> None:
        nonlocal start
        if message["type"] == "http.response.start" and 400 <= message["status"] < 500:
            start = message
            return
        if start is None:
            await send(message)
            return
        chunks.append(message.get("body", b""))
        if message.get("more_body"):
            return
        body = b"".join(chunks)
        try:
            parsed = json.loads(body)
            if isinstance(parsed, list) and len(parsed) == 1 and isinstance(parsed[0], dict):
                body = json.dumps(parsed[0]).encode()
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
        headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send(start | {"headers": headers})
        await send({"type": "http.response.body", "body": body})

    return wrapped
