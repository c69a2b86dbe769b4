"""The reviewer demo (`clinbundle demo`): its logic in-process, then the page in real Chromium.

The end-to-end tests start `clinbundle demo` as a user would (a subprocess on a free loopback
port, the session's champion and its ONNX bundle) and drive the page in Debian's chromium
through playwright; playwright never downloads a browser here. No mocks: the runtimes, the
MLflow registry, the HTTP server of the endpoint test and the browser are all real.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, UploadFile
from fastapi.responses import JSONResponse, Response
from mlflow.tracking import MlflowClient

from clinbundle.apps.demo import (
    VERDICTS,
    EndpointClient,
    ReviewerDemo,
    endpoint_runtime,
    ensure_samples,
    onnx_bundle_runtime,
    pytorch_runtime,
    read_volume,
)
from clinbundle.apps.render import dice_per_label, render_slice
from clinbundle.packaging.bento import free_port
from clinbundle.runtime.bundle_reader import load_bundle
from clinbundle.runtime.errors import ClinbundleError, InputError

STARTUP_BOUND_S = 15.0  # the bound for CPU start-up once installed (measured ~5 s)
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (Linux), to tell a slow start from a busy machine."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return round((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), 1)
    except (OSError, ValueError, IndexError):
        return None


def _samples(trained) -> dict[str, tuple[Path, Path]]:
    return ensure_samples(Path("unused"), trained.data)


# --------------------------------------------------------------------------- rendering


def test_render_overlay_follows_opacity_and_outlines_truth() -> None:
    image = np.arange(8 * 10 * 12, dtype=np.float32).reshape(8, 10, 12)
    pred = np.zeros(image.shape, np.uint8)
    pred[2:6, 3:7, 4:8] = 1
    args = (image, "axial", 5, (0.0, float(image.max())))
    plain = render_slice(*args)
    faint = render_slice(*args, prediction=pred, opacity=0.2)
    strong = render_slice(*args, prediction=pred, opacity=0.9)
    assert plain.dtype == np.uint8 and plain.shape[2] == 3 and min(plain.shape[:2]) >= 200
    assert not np.array_equal(plain, faint) and not np.array_equal(faint, strong)
    assert np.array_equal(render_slice(*args, prediction=pred, opacity=0.0), plain)
    outlined = render_slice(*args, truth=pred)
    green = np.all(outlined == [40, 230, 90], axis=-1)
    assert green.any() and not green.all()
    # another slice index is another picture; an index past the end is clipped, not an error
    assert not np.array_equal(render_slice(image, "axial", 1, args[3]), plain)
    render_slice(image, "sagittal", 999, args[3])


def test_dice_per_label() -> None:
    truth = np.zeros((4, 4, 4), np.uint8)
    truth[:2] = 1
    pred = np.zeros_like(truth)
    pred[:1] = 1
    scores = dice_per_label(pred, truth, {"0": "background", "1": "vessel"})
    assert scores == {"vessel": pytest.approx(2 * 16 / (16 + 32))}
    assert np.isnan(dice_per_label(pred * 0, truth * 0, {"0": "bg", "1": "v"})["v"])


# --------------------------------------------------------------------------- bad inputs


def _write(path: Path, data: bytes | np.ndarray) -> Path:
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        np.save(path, data)
    return path


@pytest.mark.parametrize(
    ("name", "data", "needle"),
    [
        ("notes.txt", b"hello", "not a NIfTI"),
        ("broken.nii.gz", b"\x1f\x8b this is not gzip at all", "corrupt gzip file"),
        ("deflate.nii.gz", b"\x1f\x8b\x08\x00 definitely not a volume", "corrupt gzip file"),
        ("truncated.nii", b"\x00" * 100, "not a NIfTI"),
        ("garbage.npy", b"not numpy", "not a NIfTI"),
        ("halved.npy", b"\x93NUMPY\x01\x00", "corrupt .npy file"),
        (
            "flat.npy",
            np.zeros((32, 32), np.float32),
            r"must be 3-D \(D, H, W\), got shape \(32, 32\)",
        ),
        ("fourd.npy", np.zeros((8, 8, 8, 2), np.float32), "must be 3-D"),
        ("nan.npy", np.full((8, 8, 8), np.nan, np.float32), "NaN or Inf"),
        ("text.npy", np.full((3, 3, 3), "a"), "real numbers"),
        ("pickled.npy", np.array([{"a": 1}] * 3, dtype=object), "allow_pickle=False"),
        ("empty.npy", np.zeros((0, 8, 8), np.float32), "is empty"),
        ("huge.npy", np.zeros((260, 256, 256), np.uint8), "over what this demo runs"),
    ],
)
def test_bad_uploads_are_one_clear_message(tmp_path: Path, name, data, needle) -> None:
    with pytest.raises(InputError, match=needle) as info:
        read_volume(_write(tmp_path / name, data))
    assert name in str(info.value)


def test_nifti_with_a_singleton_fourth_axis_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "t1.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((6, 7, 8, 1), np.int16), np.diag([2.0, 2, 2, 1])), path)
    array, affine = read_volume(path)
    assert array.shape == (6, 7, 8) and affine[0, 0] == 2.0


# --------------------------------------------------------------------------- runtimes, reviews


def default_runtime(bundle: Path) -> str:
    """The runtime the bundle measured fastest at packaging: what the demo runs (issue 15)."""
    return json.loads((bundle / "manifest.json").read_text())["runtimes"]["default"]


@pytest.fixture(scope="module")
def reviewer(packaged, tmp_path_factory) -> ReviewerDemo:
    """PyTorch (the registered champion) and its ONNX bundle, side by side."""
    runtimes = [pytorch_runtime(packaged.model, "cpu"), onnx_bundle_runtime(packaged.bundle, "cpu")]
    return ReviewerDemo(runtimes, _samples(packaged.trained), tmp_path_factory.mktemp("out"))


def test_pytorch_and_onnx_segment_a_sample_alike(reviewer: ReviewerDemo, packaged) -> None:
    name = sorted(reviewer.samples)[0]
    torch_case, _torch_file = reviewer.segment(reviewer.load_sample(name), "PyTorch")
    onnx_case, onnx_file = reviewer.segment(reviewer.load_sample(name), "ONNX bundle")
    described = reviewer.runtime("ONNX bundle").description
    assert default_runtime(packaged.bundle) in described, described
    assert "pytorch" in reviewer.runtime("PyTorch").description
    # the same model through the shared sliding-window path: near-identical labels
    assert (torch_case.prediction != onnx_case.prediction).mean() < 1e-3
    assert 0.0 <= torch_case.dice["vessel"] <= 1.0 and torch_case.seconds > 0
    saved = nib.load(onnx_file)
    assert np.array_equal(np.asanyarray(saved.dataobj), onnx_case.prediction)
    assert np.allclose(saved.affine, onnx_case.affine)
    card = reviewer.runtime("ONNX bundle").info
    assert "Parity" in card.parity_markdown and "held-out dice" in card.card_markdown()


def test_flags_are_stored_on_the_model_version(reviewer: ReviewerDemo, tracking) -> None:
    case = reviewer.load_sample(sorted(reviewer.samples)[0])
    with pytest.raises(InputError, match="verdict"):
        reviewer.flag(case, "meh", "x", "r")
    with pytest.raises(InputError, match="comment"):
        reviewer.flag(case, VERDICTS[0], "  ", "r")
    where = reviewer.flag(case, VERDICTS[2], "misses the thin branch", "dr test")
    client = MlflowClient()
    tags = client.get_model_version(tracking.name, tracking.version).tags
    latest = json.loads(tags["review_latest"])
    assert latest["comment"] == "misses the thin branch" and latest["verdict"] == "wrong"
    assert tags[f"review_{where.split('tag review_')[1].split()[0]}"] == tags["review_latest"]
    artifact = latest["artifact"].split(f"runs:/{tracking.run_id}/")[1]
    review = json.loads(
        Path(
            client.download_artifacts(tracking.run_id, artifact, str(reviewer.output_dir))
        ).read_text()
    )
    assert review["case"]["sha256"] == case.sha256 and review["model"]["run_id"] == tracking.run_id


def test_an_upload_is_named_by_its_hash_never_its_file_name(
    reviewer: ReviewerDemo, tracking, tmp_path: Path, caplog
) -> None:
    """A file name is often patient data: it must reach no log, output file, tag or review."""
    image, _label = next(iter(reviewer.samples.values()))
    upload = tmp_path / "DOE_JANE_MRN0042.nii.gz"
    upload.write_bytes(Path(image).read_bytes())
    with caplog.at_level("DEBUG"):
        case = reviewer.load_upload(upload)
        assert case.name == f"upload-{case.sha256[:12]}"
        case, out = reviewer.segment(case, "ONNX bundle")
        where = reviewer.flag(case, VERDICTS[0], "looks right", "dr test")
    client = MlflowClient()
    tags = client.get_model_version(tracking.name, tracking.version).tags
    artifact = json.loads(tags["review_latest"])["artifact"].split(f"runs:/{tracking.run_id}/")[1]
    review = Path(client.download_artifacts(tracking.run_id, artifact, str(tmp_path))).read_text()
    assert json.loads(review)["case"]["name"] == case.name
    for text in (out.name, json.dumps(tags), review, where, caplog.text):
        assert "DOE" not in text and "MRN0042" not in text, text[:500]
    bad = tmp_path / "SMITH_JOHN.nii.gz"
    bad.write_bytes(b"not a volume")
    with pytest.raises(InputError, match="the upload") as info:
        reviewer.load_upload(bad)
    assert "SMITH" not in str(info.value)


def test_endpoint_client_sends_the_token() -> None:
    assert "authorization" not in EndpointClient("http://127.0.0.1:1")._http.headers
    client = EndpointClient("http://127.0.0.1:1", token="t0k")
    assert client._http.headers["authorization"] == "Bearer t0k"


def test_endpoint_runtime_against_a_real_http_service(packaged, tmp_path: Path) -> None:
    """The client side of the bento contract (POST /segment multipart NIfTI -> NIfTI labels,
    GET /metadata), against a small FastAPI service that runs the real ONNX bundle. It checks
    our HTTP client and NIfTI round trip; compatibility with the real bento service (issue 5,
    not merged yet) is not proven here."""
    bundle = load_bundle(packaged.bundle, "cpu")
    api = FastAPI()

    @api.get("/metadata")
    def metadata() -> dict:
        return {**bundle.manifest, "execution_provider": bundle.runtime.description}

    @api.post("/segment")
    async def segment(file: UploadFile) -> Response:
        raw = await file.read()
        try:
            img = nib.Nifti1Image.from_bytes(gzip.decompress(raw))
        except Exception as e:
            return JSONResponse({"error": f"not NIfTI: {e}"}, status_code=400)
        volume = np.asanyarray(img.dataobj).astype(np.float32)
        labels = bundle.predict(volume[None, None]).argmax(1)[0].astype(np.uint8)
        out = nib.Nifti1Image(labels, img.affine)
        return Response(gzip.compress(out.to_bytes()), media_type="application/gzip")

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}"
        rt = endpoint_runtime(url)
        assert rt.info.run_id == packaged.model.run_id
        assert default_runtime(packaged.bundle) in rt.description
        image, _label = next(iter(_samples(packaged.trained).values()))
        volume, affine = read_volume(image)
        volume = volume.astype(np.float32)
        remote = rt.segment(volume, affine)
        local = bundle.predict(volume[None, None]).argmax(1)[0]
        assert np.array_equal(remote, local)
        with pytest.raises(ClinbundleError, match="answered 404"):
            EndpointClient(url)._call("GET", "/nothing-here")
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    with pytest.raises(ClinbundleError, match="bento endpoint"):
        endpoint_runtime(url)  # the service is gone: one clear message


# --------------------------------------------------------------------------- the real page


def chromium_path() -> str:
    """Debian's chromium (override with CHROMIUM_PATH); a missing browser fails loudly."""
    path = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
    if not (Path(path).is_file() and os.access(path, os.X_OK)):
        pytest.fail(
            f"no chromium at {path}: the browser test needs Debian's chromium "
            "(`make system-deps`, or `apt-get install chromium`) or CHROMIUM_PATH set to a "
            "Chromium binary; playwright's own browser download is not used"
        )
    return path


@pytest.fixture(scope="module")
def demo_server(packaged, tmp_path_factory):
    """`clinbundle demo` as a subprocess: time from process start to HTTP 200 on the page."""
    workdir = tmp_path_factory.mktemp("demo")
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": packaged.trained.tracking_uri,
        "GRADIO_ANALYTICS_ENABLED": "False",
    }
    cmd = [
        *(sys.executable, "-m", "clinbundle", "demo"),
        *("--model", f"models:/{packaged.trained.name}@champion"),
        *("--bundle", str(packaged.bundle), "--device", "cpu"),
        *("--port", str(port), "--workdir", str(workdir)),
    ]
    log = (workdir / "demo.log").open("w")
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    url = f"http://127.0.0.1:{port}/"
    ready = cpu = load = None
    while time.monotonic() - started < 120 and proc.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    ready = time.monotonic() - started
                    cpu = _cpu_seconds(proc.pid)
                    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
                    break
        except OSError:
            time.sleep(0.1)
    try:
        if ready is None:
            pytest.fail(f"the demo did not come up:\n{(workdir / 'demo.log').read_text()[-3000:]}")
        # The page is served first; the runtimes open after it (RuntimeLoader), then the log
        # says "demo ready". Tests that use the page start once it is.
        opened = None
        while time.monotonic() - started < 180 and proc.poll() is None:
            if "demo ready:" in (workdir / "demo.log").read_text():
                opened = time.monotonic() - started
                break
            time.sleep(0.1)
        if opened is None:
            pytest.fail(f"the runtimes did not open:\n{(workdir / 'demo.log').read_text()[-3000:]}")
        yield {
            "url": url,
            "startup_s": ready,
            "ready_s": opened,
            "cpu_s": cpu,
            "load": load,
            "workdir": workdir,
        }
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_a_runtime_that_cannot_open_closes_the_page(tmp_path: Path) -> None:
    # The page is served before the runtimes open; one that cannot open must still end the
    # command with its reason (exit 2 on the CLI) and leave nothing listening.
    from clinbundle.apps.demo import run_demo

    port = free_port()
    with pytest.raises(ClinbundleError, match="missing"):
        run_demo(tmp_path / "work", bundle=tmp_path / "missing", port=port, block=False)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)


@pytest.mark.slow
def test_demo_starts_within_15_seconds(demo_server) -> None:
    # A correctness bound from the issue, not a benchmark: the page answers in ~5 s on 2 CPU
    # cores (Gradio, MLflow, the samples); PyTorch, MONAI and the model open after it, and the
    # page says so until they have (~12 s from start, reported here, not bounded).
    wall, cpu, load = demo_server["startup_s"], demo_server["cpu_s"], demo_server["load"]
    cores = os.cpu_count() or 1
    report = (
        f"demo start-up to HTTP 200: {wall:.1f} s wall, {cpu} s CPU of its own, "
        f"load average {load:.1f} on {cores} cores; runtimes open at "
        f"{demo_server['ready_s']:.1f} s"
    )
    print(report)
    if wall >= STARTUP_BOUND_S and cpu is not None and load > cores:
        # Oversubscribed by other processes (a shared machine): the wall clock then measures
        # the neighbours, so the demo's own CPU time is held to the bound instead, and said.
        print("machine oversubscribed: judging the demo's own CPU time against the bound")
        assert cpu < STARTUP_BOUND_S, report
        return
    assert wall < STARTUP_BOUND_S, report


def _image_bytes(page, selector: str) -> tuple[str, bytes]:
    src = page.locator(selector).get_attribute("src")
    return src, page.request.get(src).body()


@pytest.mark.slow
def test_reviewer_flow_in_a_real_browser(demo_server, tracking, packaged, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    executable = chromium_path()
    bad = tmp_path / "corrupt.nii.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00 definitely not a volume")
    shot = tmp_path / "reviewer_demo.png"
    comment = f"thin branch missed ({time.time_ns()})"
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"),  # a fresh, empty profile
            executable_path=executable,
            headless=True,
            args=CHROMIUM_FLAGS,
        )
        try:
            page = ctx.new_page()
            page.set_default_timeout(60_000)
            # expect() has its own 5 s default, which a first Run can pass on 2 loaded cores
            # (the bundle's default runtime may load its package on first use)
            expect.set_options(timeout=60_000)
            page.goto(demo_server["url"])
            expect(page.locator("#model-card")).to_contain_text(f"{tracking.name} v")

            # load a bundled sample and run the ONNX bundle on it
            page.locator("#sample input").click()
            page.get_by_role("option", name="vessel_t000").click()
            expect(page.locator("#status")).to_contain_text("Loaded vessel_t000")
            page.locator("#runtime").get_by_text("ONNX bundle").click()
            expect(page.locator("#run-info")).to_contain_text(default_runtime(packaged.bundle))
            page.locator("#run").click()
            expect(page.locator("#run-info")).to_contain_text("ONNX bundle took")
            expect(page.locator("#dice")).to_contain_text("Dice vs ground truth: vessel")
            page.get_by_text("Parity report").first.click()
            expect(page.locator("#parity")).to_contain_text("Parity report: onnx vs PyTorch")

            # move the axial slider: the overlay image is re-rendered with other bytes
            before_src, before = _image_bytes(page, "#view-axial img")
            slider = page.locator("#slider-axial input[type=range]")
            slider.focus()
            for _ in range(5):
                page.keyboard.press("ArrowRight")
            expect(page.locator("#view-axial img")).not_to_have_attribute("src", before_src)
            _after_src, after = _image_bytes(page, "#view-axial img")
            assert before[:8] == after[:8] == b"\x89PNG\r\n\x1a\n" and before != after

            # the label opacity changes the overlay too
            coronal_src, coronal = _image_bytes(page, "#view-coronal img")
            opacity = page.locator("#opacity input[type=number]")
            opacity.fill("1")
            opacity.press("Enter")
            expect(page.locator("#view-coronal img")).not_to_have_attribute("src", coronal_src)
            assert _image_bytes(page, "#view-coronal img")[1] != coronal

            # the label volume downloads as NIfTI of the sample's shape
            href = page.locator("#download a").first.get_attribute("href")
            labels = nib.Nifti1Image.from_bytes(gzip.decompress(page.request.get(href).body()))
            assert labels.shape == tuple(int(s) for s in _shape(page))

            # a corrupt upload: an error in the page, and the page keeps working
            page.locator("#upload input[type=file]").set_input_files(str(bad))
            expect(page.get_by_text("corrupt gzip file").first).to_be_visible()
            page.locator("#sample input").click()
            page.get_by_role("option", name="vessel_t001").click()
            expect(page.locator("#status")).to_contain_text("Loaded vessel_t001")
            page.locator("#run").click()
            expect(page.locator("#run-info")).to_contain_text("for vessel_t001")

            # flag the case; the flag lands on the model version in MLflow
            page.locator("#verdict").get_by_text("minor issues").click()
            page.locator("#comment textarea").fill(comment)
            page.locator("#flag").click()
            expect(page.locator("#flag-status")).to_contain_text("Flag stored")
            page.screenshot(path=str(shot), full_page=True)
            print(f"screenshot: {shot}")
        finally:
            ctx.close()

    tags = MlflowClient().get_model_version(tracking.name, tracking.version).tags
    latest = json.loads(tags["review_latest"])
    assert latest["comment"] == comment and latest["verdict"] == "minor issues"
    assert latest["case"] == "vessel_t001"
    assert shot.stat().st_size > 10_000


def _shape(page) -> list[str]:
    text = page.locator("#status").inner_text()
    return text.split("(")[1].split(",")[0].split("x")
