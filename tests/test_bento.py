"""The BentoML service, built from the champion and served for real over HTTP."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from test_http_io import gzip_bomb, nifti_header_bomb, npy_header_bomb

from clinbundle.packaging.bento import free_port
from clinbundle.packaging.runtimes import torch_runtime
from clinbundle.runtime.bundle_reader import load_bundle
from clinbundle.training.synth import synthesize_volume

pytestmark = pytest.mark.slow
TOKEN = "s3cret-test-token"
MAX_VOXELS = 300_000  # a 70^3 volume is over it; the test volumes are under
MAX_BYTES = 8 * 1024**2
MAX_CONCURRENCY = 2  # a burst of 6 must overflow it
BODY_TIMEOUT_S = 0.4  # a body that stalls this long gets a 408


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    first_readyz: int  # status of /readyz as soon as the server answered /healthz
    segment_while_loading: int
    tmpdir: Path
    archive: Path


@pytest.fixture(scope="session")
def server(bento_archive: Path, tmp_path_factory: pytest.TempPathFactory):
    """`clinbundle serve ARCHIVE` in a fresh BentoML home: token, limits, slow warm-up."""
    home = tmp_path_factory.mktemp("serve")
    tmpdir = home / "tmp"
    tmpdir.mkdir()
    port = free_port()
    env = os.environ | {
        "BENTOML_HOME": str(home / "bentoml"),
        "TMPDIR": str(tmpdir),
        "CLINBUNDLE_API_TOKEN": TOKEN,
        "CLINBUNDLE_MAX_VOXELS": str(MAX_VOXELS),
        "CLINBUNDLE_MAX_REQUEST_BYTES": str(MAX_BYTES),
        "CLINBUNDLE_MAX_CONCURRENCY": str(MAX_CONCURRENCY),
        "CLINBUNDLE_WARMUP_RUNS": "25",  # a loading window long enough to observe
        "CLINBUNDLE_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "clinbundle",
            "serve",
            str(bento_archive),
            "--port",
            str(port),
            "--workdir",
            str(home),
        ],
        env=env,
        stdout=open(home / "server.log", "wb"),  # noqa: SIM115 (lives as long as the server)
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    first = seg = None
    try:
        deadline = time.monotonic() + 900  # generous: CI machines are shared
        while time.monotonic() < deadline:
            assert proc.poll() is None, (home / "server.log").read_text()[-3000:]
            try:
                if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                    first = httpx.get(url + "/readyz", timeout=5).status_code
                    seg = _post(url, "/segment", _npy(np.zeros((8, 8, 8), np.float32))).status_code
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        while httpx.get(url + "/readyz", timeout=5).status_code != 200:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.5)
        yield Server(url, proc, first, seg, tmpdir, bento_archive)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


def _nii_gz(array: np.ndarray, affine: np.ndarray | None = None) -> bytes:
    img = nib.Nifti1Image(array, np.diag([0.8, 0.8, 1.5, 1.0]) if affine is None else affine)
    return gzip.compress(img.to_bytes())


def _post(
    url: str, route: str, payload: bytes, token: str | None = TOKEN, **data
) -> httpx.Response:
    field = "array" if route == "/segment_array" else "file"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(
        url + route,
        files={field: ("upload.bin", payload)},
        data=data,
        headers=headers,
        timeout=300,
    )


def _volume(shape=(41, 37, 45), seed=5) -> np.ndarray:
    return synthesize_volume(shape, np.random.default_rng(seed))[0]


def test_readyz_is_not_ready_before_the_model_is_loaded(server: Server) -> None:
    assert server.first_readyz == 503
    assert server.segment_while_loading == 503
    assert httpx.get(server.url + "/readyz").status_code == 200


def test_segment_nifti_matches_the_onnx_bundle_exactly_and_pytorch_within_tolerance(
    server: Server, packaged
) -> None:
    image = _volume()
    affine = np.array([[0, 0, 1.5, -20], [0, -0.8, 0, 30], [0.8, 0, 0, 5], [0, 0, 0, 1]])
    r = _post(server.url, "/segment", _nii_gz(image, affine))
    assert r.status_code == 200, r.text
    seg = nib.Nifti1Image.from_bytes(
        gzip.decompress(r.content) if r.content[:2] == b"\x1f\x8b" else r.content
    )
    labels = np.asarray(seg.dataobj)
    assert labels.dtype == np.uint8 and labels.shape == image.shape
    assert np.allclose(seg.affine, affine)
    bundle = load_bundle(packaged.bundle, device="cpu")
    # the header's geometry is used: reoriented and resampled to the contract, and back
    assert np.array_equal(labels, bundle.predict(image[None, None], affine, "labels")[0])
    ref = torch_runtime(packaged.model.load_network(), packaged.model.contract).run(
        image[None, None], affine
    )
    assert (labels != ref[0].argmax(0)).mean() <= 1e-4
    assert labels.any()  # the model finds vessels; an all-zero answer would pass trivially


def test_probabilities_and_segment_array(server: Server, packaged) -> None:
    image = _volume((33, 40, 36), seed=6)
    bundle = load_bundle(packaged.bundle, device="cpu")
    want = bundle.predict(image[None, None])
    r = _post(server.url, "/segment", _npy(image), probabilities="true")
    assert r.status_code == 200, r.text
    probs = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(r.content)).dataobj)
    assert probs.shape == (*image.shape, 2) and np.array_equal(np.moveaxis(probs, -1, 0), want[0])
    batch = np.stack([image, image[::-1].copy()])[:, None]
    r = _post(server.url, "/segment_array", _npy(batch))
    assert r.status_code == 200, r.text
    labels = np.load(io.BytesIO(r.content), allow_pickle=False)
    assert labels.shape == (2, *image.shape) and labels.dtype == np.uint8
    assert np.array_equal(labels, bundle.predict(batch).argmax(1))


def _bad_inputs() -> list:
    good = _volume((24, 24, 24), seed=7)
    nan = good.copy()
    nan[3, 4, 5] = np.nan
    inf = good.copy()
    inf[0, 0, 0] = np.inf
    full = _nii_gz(good)
    return [
        ("/segment", _npy(good[0]), 400, "must be 3-D"),
        ("/segment", _nii_gz(np.zeros((20, 20, 20, 3), np.float32)), 400, "expected a 3-D volume"),
        ("/segment", _npy(np.zeros((20, 20, 20), bool)), 400, "real numbers"),
        ("/segment", _nii_gz(nan), 400, "NaN or Inf"),
        ("/segment", _npy(inf), 400, "NaN or Inf"),
        ("/segment", b"", 400, "empty"),
        ("/segment", full[: len(full) // 2], 400, "corrupt"),
        ("/segment", b"\x1f\x8b\x08\x00 not a deflate stream", 400, "corrupt gzip"),
        ("/segment", gzip.decompress(full)[:400], 400, "corrupt NIfTI"),
        ("/segment", b"patient,name\n1,x\n", 400, "not a NIfTI"),
        ("/segment", _npy(np.array([{"a": 1}] * 8, dtype=object)), 400, "allow_pickle=False"),
        ("/segment", pickle.dumps(good), 400, "not a NIfTI"),
        ("/segment", _npy(np.zeros((70, 70, 70), np.float32)), 413, "over this service's limit"),
        ("/segment", b"\x00" * (MAX_BYTES + 10), 413, "over the limit"),
        ("/segment_array", _npy(good.astype(np.float64)), 400, "expected float32"),
        ("/segment_array", _npy(good.astype(np.int16)), 400, "expected float32"),
        ("/segment_array", _npy(good[None]), 400, "(N, C, D, H, W)"),
        ("/segment_array", _npy(good[None, None].repeat(2, 1)), 400, "channel"),
        ("/segment_array", _nii_gz(good), 400, "takes a .npy file"),
    ]


def test_every_bad_input_is_a_4xx_and_the_server_keeps_serving(server: Server) -> None:
    good = _npy(_volume((24, 24, 24), seed=8))
    for route, payload, status, needle in _bad_inputs():
        r = _post(server.url, route, payload)
        assert r.status_code == status, (needle, r.status_code, r.text[:500])
        assert needle in r.json()["error"], (needle, r.text[:500])
        assert _post(server.url, "/segment", good).status_code == 200, needle
    # nothing the requests wrote is left in the server's temp folder (BentoML empties a
    # request's folder just after its response is sent: allow it that moment)
    for _ in range(50):
        left = [p for p in server.tmpdir.rglob("*") if p.is_file() and p.suffix in (".gz", ".npy")]
        if not left:
            break
        time.sleep(0.1)
    assert not left, left


def test_auth_metadata_and_bentoml_endpoints(server: Server, packaged) -> None:
    volume = _npy(_volume((24, 24, 24), seed=9))
    assert _post(server.url, "/segment", volume, token=None).status_code == 401
    assert _post(server.url, "/segment", volume, token="wrong").status_code == 401
    assert httpx.get(server.url + "/metadata").status_code == 401
    for open_path in ("/healthz", "/readyz", "/metrics"):
        assert httpx.get(server.url + open_path).status_code == 200, open_path
    meta = httpx.get(server.url + "/metadata", headers={"Authorization": f"Bearer {TOKEN}"})
    assert meta.status_code == 200
    m = meta.json()
    assert m["model"]["name"] == packaged.model.name
    assert m["model"]["version"] == packaged.model.version
    assert m["contract"] == packaged.model.contract.model_dump(mode="json")
    assert m["parity"]["passed"]
    # the bento runs the bundle's measured default runtime, and says so (issue 15)
    default = json.loads((packaged.bundle / "manifest.json").read_text())["runtimes"]["default"]
    assert m["runtime"]["name"] == m["runtimes"]["default"] == default, m["runtime"]
    assert m["execution_provider"].startswith(default) and "default" in m["runtime"]["why"]
    assert m["runtime"]["allocator"].startswith("glibc, large blocks kept in the heap")
    assert {"bentoml", "onnxruntime"} <= set(m["serving_libraries"])
    assert "bentoml_service_request_total" in httpx.get(server.url + "/metrics").text


def test_requests_beyond_max_concurrency_get_429_and_the_server_keeps_serving(
    server: Server,
) -> None:
    """A burst over CLINBUNDLE_MAX_CONCURRENCY: 200s and 429s with an error body, never a 500."""
    meta = httpx.get(server.url + "/metadata", headers={"Authorization": f"Bearer {TOKEN}"})
    assert meta.json()["limits"]["max_concurrency"] == MAX_CONCURRENCY
    payload = _npy(_volume((64, 64, 64), seed=10))
    burst = 3 * MAX_CONCURRENCY
    for _attempt in range(3):  # a burst must land while the first requests are in inference
        barrier = threading.Barrier(burst)

        def one(_: int, barrier: threading.Barrier = barrier) -> httpx.Response:
            barrier.wait()
            return _post(server.url, "/segment", payload)

        with ThreadPoolExecutor(burst) as pool:
            responses = list(pool.map(one, range(burst)))
        statuses = sorted(r.status_code for r in responses)
        assert set(statuses) <= {200, 429}, [(r.status_code, r.text[:300]) for r in responses]
        if 429 in statuses:
            break
    assert 200 in statuses and 429 in statuses, statuses
    assert statuses.count(200) >= MAX_CONCURRENCY, statuses  # the limit's worth got through
    assert all(r.json()["error"] for r in responses if r.status_code == 429)
    assert _post(server.url, "/segment", payload).status_code == 200


def test_bento_parity_is_on_the_model_version_and_inside_the_bento(
    server: Server, packaged, tracking
) -> None:
    import tarfile

    mv = MlflowClient().get_model_version(tracking.name, packaged.model.version)
    assert mv.tags["parity_bento"].startswith("pass max_abs=")
    with tarfile.open(server.archive) as tar:
        names = tar.getnames()
        report = next(n for n in names if n.endswith("src/parity/parity_report.json"))
        data = json.loads(tar.extractfile(report).read())
    assert data["passed"] and data["format"] == "bento"
    assert any(
        n.endswith("models/clinbundle-onnx") or "/models/clinbundle-onnx/" in n for n in names
    )


def test_the_service_runs_with_no_network(bento_archive: Path, tmp_path: Path) -> None:
    port = 3917
    client = (
        "import httpx, io, numpy as np, time\n"
        f"u = 'http://127.0.0.1:{port}'\n"
        "for _ in range(600):\n"
        "    try:\n"
        "        if httpx.get(u + '/readyz').status_code == 200: break\n"
        "    except httpx.TransportError: pass\n"
        "    time.sleep(0.5)\n"
        "b = io.BytesIO(); np.save(b, np.random.default_rng(0).normal(100, 40, (24, 24, 24)).astype('float32'))\n"
        "r = httpx.post(u + '/segment', files={'file': ('v.npy', b.getvalue())}, timeout=300)\n"
        "print('STATUS', r.status_code, len(r.content))\n"
    )
    script = (
        "ip link set lo up || exit 1; "
        f"setsid {sys.executable} -m clinbundle serve {bento_archive} --port {port} "
        f"--workdir {tmp_path} > {tmp_path / 'server.log'} 2>&1 & SERVER=$!; "
        f'{sys.executable} -c "$CLIENT"; kill -TERM -- -$SERVER; wait $SERVER'
    )
    env = {k: v for k, v in os.environ.items() if k != "BENTOML_HOME"} | {"CLIENT": client}
    r = subprocess.run(
        ["unshare", "--net", "bash", "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert "STATUS 200" in r.stdout, (
        r.stdout + r.stderr + (tmp_path / "server.log").read_text()[-3000:]
    )


# --- hostile requests: each a 4xx in well under a second, and the server keeps serving --------

BOUNDARY = "cbtestboundary"


def _multipart(field: str, payload: bytes, filename: str | None = "v.npy") -> bytes:
    disposition = f'form-data; name="{field}"' + (f'; filename="{filename}"' if filename else "")
    return (
        (
            f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n"
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + payload
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


def _raw(url: str, route: str, body: bytes, length: int, content_type: str) -> tuple[int, bytes]:
    """Exactly these bytes on a socket, with this Content-Length (true or not): (status, body)."""
    import socket

    host, port = url.removeprefix("http://").split(":")
    head = (
        f"POST {route} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {length}\r\n\r\n"
    ).encode()
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(head + body)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1])
    # what follows the answer (the rest of a body longer than its Content-Length, which the
    # server then reads as a next request and refuses) is not part of it
    return status, data.split(b"\r\n\r\n", 1)[1][: _length(data)]


def _length(response: bytes) -> int:
    for line in response.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 1 << 30


def _timed_post(route: str, payload, field: str | None = None):
    """A request maker: payload (bytes, or a function making them) sent as multipart field."""
    field = field or ("array" if route == "/segment_array" else "file")

    def call(url: str) -> tuple[int, str, float]:
        body = payload() if callable(payload) else payload
        t0 = time.perf_counter()
        r = httpx.post(
            url + route,
            files={field: ("upload.bin", body)},
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=30,
        )
        return r.status_code, r.text, time.perf_counter() - t0

    return call


def _timed_raw(body: bytes, length: int | None = None, content_type: str | None = None):
    """A request maker: raw bytes on a socket, with a Content-Length that may lie."""
    content_type = content_type or f"multipart/form-data; boundary={BOUNDARY}"

    def call(url: str) -> tuple[int, str, float]:
        t0 = time.perf_counter()
        n = len(body) if length is None else length
        status, text = _raw(url, "/segment", body, n, content_type)
        return status, text.decode(), time.perf_counter() - t0

    return call


def _hostile() -> list:
    """(name, request maker, expected status, regex the error must match)."""
    small_header = nifti_header_bomb((24, 24, 24))[:352]  # a valid header: 24^3 float32
    good = _multipart("file", _npy(np.zeros((8, 8, 8), np.float32)))
    end = f"--{BOUNDARY}--\r\n".encode()
    return [
        ("npy header bomb", _timed_post("/segment", npy_header_bomb()), 413, "declares"),
        ("npy bomb array", _timed_post("/segment_array", npy_header_bomb()), 413, "declares"),
        ("nifti header bomb", _timed_post("/segment", nifti_header_bomb()), 413, "declares"),
        ("nifti-2 bomb", _timed_post("/segment", nifti_header_bomb(version=2)), 413, "declares"),
        (
            "gzipped nifti header bomb",
            _timed_post("/segment", gzip.compress(nifti_header_bomb())),
            413,
            "declares",
        ),
        (
            "gzip bomb",
            _timed_post("/segment", lambda: gzip_bomb(small_header, 300 * 1024**2)),
            413,
            "unpacks to more than",
        ),
        (
            "gzip of zeros",
            _timed_post("/segment", lambda: gzip_bomb(b"", 300 * 1024**2)),
            400,
            "not a NIfTI",
        ),
        ("Content-Length short", _timed_raw(good, len(good) - 40), 400, "closing boundary"),
        ("Content-Length long", _timed_raw(good, len(good) + 40), 408, "Content-Length"),
        ("no boundary", _timed_raw(good, None, "multipart/form-data"), 400, "boundary"),
        ("not multipart", _timed_raw(b"{}", None, "application/json"), 400, "multipart"),
        ("no parts", _timed_raw(end), 400, "no parts"),
        ("empty body", _timed_raw(b""), 400, "closing boundary"),
        ("garbage body", _timed_raw(b"x" * 500), 400, "closing boundary|malformed"),
        ("wrong field", _timed_post("/segment", b"\x00\xff" * 50, "volume"), 400, "field 'file'"),
        (
            "wrong field array",
            _timed_post("/segment_array", b"\x93NUMPY", "file"),
            400,
            "field 'array'",
        ),
        (
            "a string, not a file (BentoML would fetch it as a URL)",
            _timed_raw(_multipart("file", b"http://127.0.0.1:1/x", None)),
            400,
            "no file upload",
        ),
    ]


HOSTILE = _hostile()


@pytest.mark.parametrize(("name", "call", "status", "needle"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_request_is_a_fast_4xx_and_the_server_keeps_serving(
    server: Server, name: str, call, status: int, needle: str
) -> None:
    import re

    got, text, took = call(server.url)
    assert got == status, (name, got, text[:500])
    assert re.search(needle, json.loads(text)["error"]), (name, text[:500])
    assert took < 1.0, (name, took)
    good = _post(server.url, "/segment", _npy(_volume((24, 24, 24), seed=11)))
    assert good.status_code == 200, (name, good.text[:500])


FUZZ_VENV = Path(__file__).resolve().parents[1] / ".venv-fuzz"  # ignored by git


def _schemathesis() -> Path:
    """schemathesis in a venv of its own (its pins must not move the project's), made once."""
    st = FUZZ_VENV / "bin" / "st"
    if not st.exists():
        subprocess.run(["python3", "-m", "venv", str(FUZZ_VENV)], check=True, timeout=300)
        subprocess.run(
            [str(FUZZ_VENV / "bin" / "pip"), "install", "-q", "schemathesis>=4,<5"],
            check=True,
            timeout=1200,
        )
    return st


def test_schemathesis_finds_no_server_error(server: Server, tmp_path: Path) -> None:
    """Inputs generated from the service's own OpenAPI schema: any 5xx fails."""
    import re

    st = _schemathesis()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    schema = tmp_path / "openapi.json"
    schema.write_bytes(httpx.get(server.url + "/docs.json", headers=auth, timeout=30).content)
    r = subprocess.run(
        [
            str(st),
            "run",
            str(schema),
            "--url",
            server.url,
            "--header",
            f"Authorization: Bearer {TOKEN}",
            "--checks",
            "not_a_server_error",
            "--max-examples",
            "20",
            "--seed",
            "1",
            "--request-timeout",
            "120",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env={k: v for k, v in os.environ.items() if not k.startswith("PYTHON")},
        cwd=tmp_path,  # schemathesis keeps a .schemathesis/ cache in its working dir
    )
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    tested = re.search(r"Tested: (\d+)", r.stdout)
    assert tested and int(tested[1]) >= 2 and " generated" in r.stdout, r.stdout[-3000:]
    assert _post(server.url, "/segment", _npy(_volume((24, 24, 24), seed=12))).status_code == 200


def test_image_and_typed_inputs_are_declared_with_the_sdk(server: Server) -> None:
    """Issue 18: the image comes from service.py (`bentoml.images.Image`, pinned, no lock),
    and the arguments' types are checked by BentoML before the service code runs."""
    import importlib.metadata as md

    from clinbundle.packaging.bento import SERVICE_DIR
    from clinbundle.packaging.bento_image import bento_pins

    pins = bento_pins(server.archive)
    for name in ("bentoml", "onnxruntime", "monai", "nibabel"):
        assert f"{name}=={md.version(name)}" in pins, pins
    # exactly bentos/requirements.txt, pinned: a lock would have added their dependencies
    wanted = (SERVICE_DIR / "requirements.txt").read_text().splitlines()
    assert len(pins) == len([w for w in wanted if w.split("#")[0].strip()]), pins
    auth = {"Authorization": f"Bearer {TOKEN}"}
    schema = httpx.get(server.url + "/docs.json", headers=auth, timeout=30).json()
    assert "a 3-D volume: .nii, .nii.gz or float .npy" in json.dumps(schema)
    good = _npy(_volume((24, 24, 24), seed=13))
    r = _post(server.url, "/segment", good, probabilities="perhaps")
    assert r.status_code == 400, (r.status_code, r.text[:500])
    assert _post(server.url, "/segment", good, probabilities="true").status_code == 200
