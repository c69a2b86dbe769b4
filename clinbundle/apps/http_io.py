"""What the BentoML service does besides routing: read uploads safely, segment, describe itself.

Kept out of `bentos/service.py` so that the service stays one short file and this part is
importable and testable without a server.

Uploads are recognised by their bytes, never by their name (names are not used as paths):
gzip -> NIfTI inside, NIfTI-1/2 header, or the .npy magic; .npy is read with allow_pickle=False.
NIfTI data of any real numeric type is accepted (CT is usually int16) and read as float32 with
its scaling; /segment_array takes float32 .npy only, as its contract says.

Uploads are sized from their headers before anything is allocated: the .npy header's and the
NIfTI header's shape are checked against the voxel limit before the data is read, and gzip is
inflated in slices only as far as the NIfTI header inside says it reaches, so a 200-byte file
that declares 4000^3 voxels, or a gzip bomb, is a 413 that costs nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib.metadata as md
import io
import json
import logging
import math
import os
import tempfile
import threading
import time
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from clinbundle.runtime.allocator import tune_allocator
from clinbundle.runtime.bundle_reader import OnnxBundle, load_bundle
from clinbundle.runtime.errors import InputError
from clinbundle.runtime.geometry import check_affine, spacing_of
from clinbundle.runtime.ort_build import distribution

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
#: Seconds an upload's body may stall before the request gets a 408 (a Content-Length longer
#: than the body would otherwise hold a worker for ever).
BODY_TIMEOUT_S = float(os.environ.get("CLINBUNDLE_BODY_TIMEOUT_S", 30))
#: The ONNX bundle's folder inside the BentoML model (BentoML keeps its model.yaml beside it, so
#: the bundle's manifest still lists every file of its folder).
BUNDLE_DIR = "bundle"
OPEN_PATHS = ("/healthz", "/livez", "/readyz", "/metrics")
STATE: dict[str, object] = {
    "execution_provider": None,
    "loaded_at": None,
    "signature": None,
    "runtime": None,
}


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
    STATE["runtime"] = {
        "name": bundle.runtime_name,
        "why": bundle.runtime_reason,
        "sw_batch_size": bundle.sw_batch_size,
        "allocator": tune_allocator(),
    }
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
        array = _npy(data, max_voxels, limit_name)
        if array.ndim != 3:
            raise BadRequest(f"a .npy volume must be 3-D (D, H, W), got shape {array.shape}")
        if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
            raise BadRequest(f"a .npy volume must hold real numbers, got {array.dtype}")
        array = array.astype(np.float32)
        affine = None  # no geometry: the array is taken to be on the model's grid
    else:
        image = _nifti(data, max_voxels, limit_name)
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


#: gzip and .npy data are inflated / checked in slices of this size
_CHUNK = 1 << 16
#: extensions between a NIfTI header and its data are small; more is a crafted file
_MAX_NIFTI_OFFSET = 16 * 1024**2
#: bytes a .nii.gz may unpack to beyond what its header declares (writers' padding)
_GZIP_SLACK = 1 << 16
_NPY_HEADERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def _check_declared(shape: tuple[int, ...], what: str, max_voxels: int, limit_name: str) -> int:
    """The voxel count a header declares, checked before anything that size is allocated."""
    voxels = math.prod(int(n) for n in shape)
    if voxels == 0 or min(shape, default=0) == 0:
        raise BadRequest(f"{what} is empty (shape {tuple(shape)})")
    if voxels > max_voxels:
        raise TooLarge(
            f"{what} declares {voxels} voxels (shape {tuple(shape)}), over {limit_name} of "
            f"{max_voxels}; crop or downsample it"
        )
    return voxels


def _npy_header(data: bytes) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of a .npy, from its header alone: nothing is allocated."""
    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
        reader = _NPY_HEADERS.get(version)
        if reader is None:
            raise BadRequest(f"unsupported .npy format version {version}; use numpy.save")
        shape, _fortran, dtype = reader(f)
    except (ValueError, OSError, EOFError, SyntaxError) as e:
        raise BadRequest(f"corrupt .npy file ({e})") from None
    if dtype.hasobject:
        raise BadRequest(".npy files with Python objects are refused (allow_pickle=False)")
    return tuple(shape), dtype, f.tell()


def _npy(data: bytes, max_voxels: int = MAX_VOXELS, limit_name: str = SERVICE_LIMIT) -> np.ndarray:
    """A .npy upload, sized from its header before np.load allocates anything."""
    shape, dtype, offset = _npy_header(data)
    voxels = _check_declared(shape, "the array", max_voxels, limit_name)
    if len(data) - offset < voxels * dtype.itemsize:
        raise BadRequest(f"corrupt .npy file (shorter than its header's shape {shape})")
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except MemoryError:
        raise TooLarge("the .npy array does not fit in this server's memory") from None
    except (ValueError, OSError, EOFError) as e:
        raise BadRequest(f"corrupt .npy file ({e})") from None


def _inflate(data: bytes, limit: int) -> bytes:
    """gunzip in slices; more than `limit` bytes out is a TooLarge, so a bomb stops there.

    Nothing is inflated beyond limit + 1 bytes, however small the body and large its claim.
    """
    out, pos, tail = bytearray(), 0, b""
    d = zlib.decompressobj(wbits=31)  # gzip framing
    try:
        while len(out) <= limit:
            if d.eof:  # a further gzip member may follow (as gzip.open reads them)
                pos -= len(d.unused_data)
                if data[pos : pos + 2] != b"\x1f\x8b":
                    break
                d, tail = zlib.decompressobj(wbits=31), b""
            if not tail and pos >= len(data):
                break
            feed = tail or data[pos : pos + _CHUNK]
            pos += 0 if tail else len(feed)
            out += d.decompress(feed, limit + 1 - len(out))
            tail = d.unconsumed_tail
    except zlib.error as e:  # a damaged deflate stream
        raise BadRequest(f"corrupt gzip file ({e})") from None
    if len(out) > limit:
        raise TooLarge(f"the gzip file unpacks to more than {limit} bytes, what its header allows")
    if not d.eof:
        raise BadRequest("corrupt gzip file (it ends before its deflate stream does)")
    return bytes(out)


def _nifti_header(head: bytes):
    """(image class, header) from a NIfTI's first bytes (348 for NIfTI-1, 540 for NIfTI-2)."""
    if head[344:348] == b"n+1\x00":
        cls = nib.Nifti1Image
    elif head[4:8] == b"n+2\x00":
        cls = nib.Nifti2Image
    else:
        raise BadRequest(
            "not a NIfTI (.nii / .nii.gz) or .npy file; send a 3-D NIfTI or .npy volume"
        )
    size = cls.header_class.sizeof_hdr
    if len(head) < size:
        raise BadRequest(f"corrupt NIfTI file (a {size}-byte header, {len(head)} bytes sent)")
    try:
        header = cls.header_class.from_fileobj(io.BytesIO(head[:size]))
        header.get_data_dtype()
        return cls, header
    except Exception as e:  # nibabel raises several types for broken headers
        raise BadRequest(f"corrupt NIfTI file ({type(e).__name__}: {e})") from None


def _nifti_bytes_needed(header, max_voxels: int, limit_name: str) -> int:
    """Header + data bytes the header declares, its voxels checked against the limit first."""
    try:
        shape, offset = header.get_data_shape(), int(header.get_data_offset())
    except Exception as e:  # dims or offset out of range in a crafted header
        raise BadRequest(f"corrupt NIfTI file ({type(e).__name__}: {e})") from None
    if any(int(n) < 0 for n in shape):
        raise BadRequest(f"corrupt NIfTI file (negative dimension in {shape})")
    voxels = _check_declared(shape, "the volume", max_voxels, limit_name)
    if not 0 <= offset <= _MAX_NIFTI_OFFSET:
        raise BadRequest(f"corrupt NIfTI file (data offset {offset})")
    return max(offset, header.sizeof_hdr) + voxels * header.get_data_dtype().itemsize


def _gunzip_nifti(data: bytes, max_voxels: int, limit_name: str) -> bytes:
    """A .nii.gz unpacked only as far as its header (checked first) says it reaches."""
    _cls, header = _nifti_header(_inflate_head(data, 540))
    return _inflate(data, _nifti_bytes_needed(header, max_voxels, limit_name) + _GZIP_SLACK)


def _inflate_head(data: bytes, n: int) -> bytes:
    """The first `n` unpacked bytes of a gzip stream (fewer if it is shorter), for the header."""
    d = zlib.decompressobj(wbits=31)
    out, pos, tail = b"", 0, b""
    try:
        while len(out) < n and not d.eof and (tail or pos < len(data)):
            feed = tail or data[pos : pos + _CHUNK]
            pos += 0 if tail else len(feed)
            out += d.decompress(feed, n - len(out))
            tail = d.unconsumed_tail
    except zlib.error as e:
        raise BadRequest(f"corrupt gzip file ({e})") from None
    if len(out) < n and not d.eof:
        raise BadRequest("corrupt gzip file (it ends before its deflate stream does)")
    return out


def _nifti(
    data: bytes, max_voxels: int = MAX_VOXELS, limit_name: str = SERVICE_LIMIT
) -> nib.Nifti1Image:
    """A NIfTI upload, its header's shape checked before the data is unpacked or read."""
    if data[:2] == b"\x1f\x8b":
        data = _gunzip_nifti(data, max_voxels, limit_name)
    cls, header = _nifti_header(data)
    if len(data) < _nifti_bytes_needed(header, max_voxels, limit_name):
        raise BadRequest("corrupt NIfTI file (shorter than its header declares)")
    try:
        image = cls.from_bytes(data)
        image.get_fdata(dtype=np.float32)  # a broken file fails here, not later
        return image
    except MemoryError:
        raise TooLarge("the NIfTI volume does not fit in this server's memory") from None
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
    libs = ("bentoml", "onnxruntime", "openvino", "torch", "numpy", "nibabel", "clinbundle")
    for lib in map(distribution, libs):  # onnxruntime: the build installed, CPU or CUDA
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
        # which shipped runtime runs and why; the measured table is the manifest's `runtimes`
        "runtime": STATE["runtime"],
        "runtimes": manifest.get("runtimes"),
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
    """ASGI middleware: bearer token (when set), request size and upload framing, checked
    before the body reaches BentoML.

    BentoML 1.4 has no request size limit of its own; a POST must declare its Content-Length
    (every HTTP client does for a file upload) so that oversize bodies are refused unread.
    BentoML answers a malformed multipart body (no boundary, no parts, a wrong field) with a
    500, and waits for ever for a body shorter than its Content-Length: the upload routes'
    bodies are followed here as they stream in (`_UploadCheck`) and refused with a 4xx.
    It also unwraps BentoML 1.4.39's 4xx bodies, which come as `[{"error": ...}]` (a stray
    comma in its error handler), so every error of this service is `{"error": "..."}`.
    """

    def __init__(
        self,
        app,
        token: str | None = None,
        max_bytes: int = MAX_REQUEST_BYTES,
        upload_fields: dict[str, str] | None = None,
        body_timeout: float = BODY_TIMEOUT_S,
    ):
        self.app, self.token, self.max_bytes = app, token, max_bytes
        self.upload_fields, self.body_timeout = upload_fields or {}, body_timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] == "/metadata":
            # the metadata app is mounted at /metadata/; answer /metadata without a redirect
            scope = scope | {"path": "/metadata/", "raw_path": b"/metadata/"}
        headers = dict(scope.get("headers") or [])
        problem = None if scope["path"].rstrip("/") in OPEN_PATHS else self._refusal(scope, headers)
        if problem:
            await _respond(send, *problem)
            return
        field = self.upload_fields.get(scope["path"]) if scope["method"] == "POST" else None
        if field:
            check = _UploadCheck(headers, field, receive, send, self.body_timeout)
            receive, send = check.receive, check.send
        await self.app(scope, receive, _unwrapping_errors(send))

    def _authorized(self, headers: dict) -> bool:
        """Constant-time comparison: the time taken tells nothing about the token."""
        given = headers.get(b"authorization", b"")
        return hmac.compare_digest(given, f"Bearer {self.token}".encode())

    def _refusal(self, scope, headers: dict) -> tuple[int, str] | None:
        if self.token and not self._authorized(headers):
            return 401, "missing or wrong bearer token ('Authorization: Bearer ...')"
        if scope["method"] != "POST":
            return None
        length = headers.get(b"content-length")
        if length is None:
            return 411, "send a Content-Length header"
        if not length.isdigit():
            return 400, "the Content-Length header is not a number"
        if int(length) > self.max_bytes:
            return (
                413,
                f"request of {int(length)} bytes is over the limit of "
                f"{self.max_bytes} (CLINBUNDLE_MAX_REQUEST_BYTES)",
            )
        if scope["path"] in self.upload_fields:
            return _multipart_refusal(headers, self.upload_fields[scope["path"]])
        return None


def _multipart_refusal(headers: dict, field: str) -> tuple[int, str] | None:
    from python_multipart.multipart import parse_options_header  # BentoML's own dependency

    kind, params = parse_options_header(headers.get(b"content-type"))
    if kind != b"multipart/form-data" or not params.get(b"boundary"):
        return (
            400,
            f"send the volume as a multipart/form-data upload (field '{field}') with a "
            "boundary in its Content-Type",
        )
    return None


async def _respond(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class _UploadCheck:
    """Follows one upload's multipart body as the app reads it, without keeping it.

    At its end it must have been well formed, with the expected field as a file part; a body
    that stops arriving for `timeout` seconds (a Content-Length longer than what is sent) gets
    a 408. Either way this answers the client itself and the app sees a disconnect, so what
    BentoML does with the broken body (a 500 or a wait) never reaches the client.
    """

    def __init__(self, headers: dict, field: str, receive, send, timeout: float) -> None:
        from python_multipart.multipart import MultipartParser, parse_options_header

        _kind, params = parse_options_header(headers.get(b"content-type"))
        self.field, self._receive, self._send, self.timeout = field, receive, send, timeout
        self.parts: list[tuple[str, bool]] = []  # (name, is a file) of each part
        self.ended = self.body_done = self.responded = self.started = False
        self.error: str | None = None
        self._name = self._value = b""
        self.parser = MultipartParser(
            params[b"boundary"],
            callbacks={
                "on_header_field": self._on_name,
                "on_header_value": self._on_value,
                "on_header_end": self._on_header_end,
                "on_end": self._on_end,
            },
        )

    def _on_name(self, data: bytes, start: int, end: int) -> None:
        self._name += data[start:end]

    def _on_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _on_header_end(self) -> None:
        from python_multipart.multipart import parse_options_header

        if self._name.strip().lower() == b"content-disposition":
            _kind, params = parse_options_header(self._value)
            part = params.get(b"name", b"").decode("latin-1")
            self.parts.append((part, b"filename" in params))
        self._name = self._value = b""

    def _on_end(self) -> None:
        self.ended = True

    def _feed(self, chunk: bytes) -> None:
        if self.error is None and chunk:
            try:
                self.parser.write(chunk)
            except Exception as e:  # python-multipart's parse errors
                self.error = f"malformed multipart body ({e})"

    def _problem(self) -> str | None:
        """Why the complete body cannot be an upload of `field`, or None."""
        if self.error:
            return self.error
        if not self.ended:
            return (
                "the multipart body ends before its closing boundary (cut short, or a "
                "Content-Length shorter than the body)"
            )
        if not self.parts:
            return f"the multipart body has no parts; send the volume as field '{self.field}'"
        files = [name for name, is_file in self.parts if is_file]
        if self.field not in files:
            got = ", ".join(repr(n) for n, _ in self.parts)
            return f"no file upload in field '{self.field}' (got {got}); send the volume there"
        return None

    async def receive(self):
        if self.responded:
            return {"type": "http.disconnect"}
        if self.body_done:  # e.g. a response listening for a disconnect: no timeout there
            return await self._receive()
        try:
            message = await asyncio.wait_for(self._receive(), self.timeout)
        except TimeoutError:
            await self._refuse(
                408,
                f"no request data for {self.timeout:g} s; the body is shorter than its "
                "Content-Length, or the client stalled",
            )
            return {"type": "http.disconnect"}
        if message["type"] == "http.request":
            self._feed(message.get("body", b""))
            if not message.get("more_body", False):
                self.body_done = True
                problem = self._problem()
                if problem:
                    await self._refuse(400, problem)
                    return {"type": "http.disconnect"}
        return message

    async def _refuse(self, status: int, message: str) -> None:
        if not self.started:
            self.responded = True
            await _respond(self._send, status, message)

    async def send(self, message) -> None:
        if self.responded:
            return  # already answered; the app's answer to the cut-off body is dropped
        self.started = True
        await self._send(message)


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
