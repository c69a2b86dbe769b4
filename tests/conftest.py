"""Shared fixtures: one tiny model is trained once per session and reused everywhere.

The model is small (DynUNet [8, 16, 32], 32^3 patches, a few epochs on 40^3 synthetic volumes)
so the whole suite runs on 2 CPU cores; tests that need a model that has really learned use the
full quickstart (marked slow).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest

from clinbundle.packaging.bento import free_port

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "model.filters=[8,16,32]",
    "compute.patch_size=[32,32,32]",
    "data.folds=3",
    "train.epochs=8",
    "train.lr=0.003",
    "tracking.experiment=tests",
    "tracking.model_name=tiny-vessels",
    "tracking.system_metrics_interval_s=2",  # a short run still gets system metrics
]


@dataclass
class Trained:
    workdir: Path
    data: Path
    tracking_uri: str
    name: str
    run_id: str
    version: str
    state: object


@pytest.fixture(scope="session", autouse=True)
def _isolated_env(tmp_path_factory: pytest.TempPathFactory):
    """Nothing a test does may reach the user's MLflow, BentoML home or temp folders."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    for k in saved:
        os.environ.pop(k, None)
    os.environ.setdefault("BENTOML_HOME", str(tmp_path_factory.mktemp("bentoml")))
    # measuring every runtime candidate costs ~1 min per packaging on 2 cores: only the
    # session's `packaged` bundle and the tests that are about runtimes ask for it
    os.environ.setdefault("CLINBUNDLE_PACKAGE_RUNTIMES", "onnxruntime")
    # the AOTInductor compiles' cache (hundreds of MB) goes with the session's temp folders
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor")))
    strays = [Path.cwd() / "mlruns", Path.cwd() / "mlflow.db", REPO / "mlruns", REPO / "mlflow.db"]
    before = {p for p in strays if p.exists()}
    yield
    leaked = {p for p in strays if p.exists()} - before
    assert not leaked, f"the test session wrote MLflow files outside its temp dirs: {leaked}"
    for k, v in saved.items():
        if v is not None:
            os.environ[k] = v


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from clinbundle.training.synth import write_dataset

    root = tmp_path_factory.mktemp("data") / "vessels"
    # a scanner archive: mixed spacings and orientations (the model trains on their median grid)
    write_dataset(root, n=6, shape=(40, 40, 40), seed=3, n_test=3, mixed_geometry=True)
    return root


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, synth_data: Path) -> Trained:
    """Train, register (@challenger) and promote (@champion) the session's tiny model."""
    from clinbundle.registry import promote
    from clinbundle.training.run import run_training

    workdir = tmp_path_factory.mktemp("work")
    state = run_training(workdir, overrides=[f"data.root={synth_data}", *TINY])
    name = state.config.tracking.model_name
    decision = promote(name, synth_data, metric="dice", minimum=0.0)
    assert decision.promoted, decision.reason
    return Trained(
        workdir=workdir,
        data=synth_data,
        tracking_uri=mlflow.get_tracking_uri(),
        name=name,
        run_id=state.extra["run_id"],
        version=state.extra["model_version"],
        state=state,
    )


@pytest.fixture
def tracking(trained: Trained):
    """Re-point MLflow at the session store (a test may have pointed it elsewhere)."""
    mlflow.set_tracking_uri(trained.tracking_uri)
    mlflow.set_registry_uri(trained.tracking_uri)
    return trained


@dataclass
class Packaged:
    trained: Trained
    model: object  # clinbundle.packaging.model_source.ResolvedModel
    bundle: Path
    report: object  # clinbundle.packaging.parity.ParityReport


@pytest.fixture(scope="session")
def packaged(trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> Packaged:
    """The session's champion resolved from the registry and packaged once as an ONNX bundle,
    with every runtime candidate measured (issue 15)."""
    from clinbundle.packaging.model_source import resolve_model
    from clinbundle.packaging.onnx_bundle import RuntimeOptions, build_onnx_bundle

    mlflow.set_tracking_uri(trained.tracking_uri)
    mlflow.set_registry_uri(trained.tracking_uri)
    model = resolve_model(f"models:/{trained.name}@champion", trained.workdir / "cache" / "models")
    out = tmp_path_factory.mktemp("bundles") / "onnx"
    # every runtime candidate, timed on a volume 1.5x the roi (8 windows) to keep it cheap
    timing = tuple(3 * r // 2 for r in model.contract.roi_size)
    options = RuntimeOptions(enabled=True, bench_shape=timing)
    bundle, report = build_onnx_bundle(model, out, device="cpu", runtimes=options)
    return Packaged(trained, model, bundle, report)


@pytest.fixture(scope="session")
def bento_archive(packaged, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`clinbundle package bento` on the session champion, reusing its ONNX bundle."""
    t = packaged.trained
    out = tmp_path_factory.mktemp("bento") / "out"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "clinbundle",
            "package",
            "bento",
            "--model",
            f"models:/{t.name}@champion",
            "--bundle",
            str(packaged.bundle),
            "--out",
            str(out),
            "--workdir",
            str(t.workdir),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env={k: v for k, v in os.environ.items() if k != "BENTOML_HOME"},
    )
    assert r.returncode == 0, r.stderr[-4000:]
    archive = Path(r.stdout.strip().splitlines()[-1])
    assert archive.suffix == ".bento" and archive.parent == out and archive.is_file()
    return archive


def package_champion(trained: Trained, kind: str, out: Path, *extra: str) -> int:
    """`clinbundle package KIND` of the session champion on the CPU (the CLI's exit code)."""
    from clinbundle.cli import main

    model = f"models:/{trained.name}@champion"
    args = ["package", kind, "--model", model, "--out", str(out), "--workdir", str(trained.workdir)]
    return main([*args, "--device", "cpu", *extra])


def geometry_variants(data_root: Path) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """The held-out vessels as stored, resampled to 0.5 x 0.5 x 2.5 mm, and stored LPS:
    (variant, raw image, truth on that grid, affine) for each case."""
    import nibabel as nib

    from clinbundle.runtime.geometry import spacing_of
    from clinbundle.training.synth import regrid

    out = []
    meta = json.loads((data_root / "dataset.json").read_text())
    for pair in meta["test"]:
        img, lab = nib.load(data_root / pair["image"]), nib.load(data_root / pair["label"])
        image = np.asarray(img.dataobj, dtype=np.float32)
        label = np.asarray(lab.dataobj).astype(np.uint8)
        out.append(("stored", image, label, img.affine))
        out.append(("0.5x0.5x2.5", *regrid(image, label, img.affine, (0.5, 0.5, 2.5), "RAS")))
        out.append(("LPS", *regrid(image, label, img.affine, spacing_of(img.affine), "LPS")))
    return out


def mean_dice_by_variant(variants: list, segment) -> dict[str, float]:
    """Mean Dice against the truth on each input's own grid, per variant; `segment(image,
    affine)` returns labels on the image's grid (the format under test)."""
    from clinbundle.runtime.geometry import spacing_of
    from clinbundle.training.metrics import segmentation_metrics

    scores: dict[str, list[float]] = {}
    for variant, image, label, affine in variants:
        labels = segment(image, affine)
        assert labels.shape == image.shape, (variant, labels.shape, image.shape)
        dice = segmentation_metrics(labels, label, 2, spacing_of(affine))["dice"]
        scores.setdefault(variant, []).append(dice)
    return {k: float(np.mean(v)) for k, v in scores.items()}


def assert_same_vessels(dice: dict[str, float], tolerance: float = 0.05) -> None:
    """Issue 13's acceptance: every geometry within `tolerance` of the stored one."""
    assert dice["stored"] > 0.3, f"the model found few vessels at all: {dice}"
    for variant, value in dice.items():
        assert abs(value - dice["stored"]) <= tolerance, f"{variant}: {dice}"


def wait_until_it_answers(
    url: str, proc: subprocess.Popen, log: Path, seconds: float, any_status: bool = False
) -> None:
    """Poll `url` until a server started as `proc` answers (2xx; with `any_status` an HTTP error
    such as 401 counts too); a server that exits or stays silent fails with its log's tail."""
    for _ in range(int(seconds * 4)):
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except urllib.error.HTTPError:
            if any_status:
                return
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(log.read_text()[-3000:])
        time.sleep(0.25)
    raise RuntimeError(f"{url} did not answer in {seconds:.0f} s")


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 (sqlite backend, served artifacts) that a test can
    stop and start again on the same port with the same store, like a restarted server."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.artifacts = root / "server-artifacts"
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self) -> None:
        self._log = open(self.root / "server.log", "a")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "mlflow"),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--backend-store-uri",
                f"sqlite:///{self.root / 'server.db'}",
                "--artifacts-destination",
                str(self.artifacts),
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.root,
        )
        # generous: a shared CI machine may be slow to start it
        wait_until_it_answers(self.url + "/health", self.proc, self.root / "server.log", 120)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        if self._log is not None:
            self._log.close()
        self.proc = self._log = None


@pytest.fixture
def mlflow_server(tmp_path: Path):
    """A server of its own for one test (it may stop and restart it)."""
    server = MlflowServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def shared_mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """One server for the tests of a module that only log to it."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def train_until_signal(args: list[str], cwd: Path, env: dict, pattern: str, sig: int):
    """Run `clinbundle -v ARGS`; send `sig` the moment a stderr line matches `pattern` (a log
    line of the loop, not a blind sleep). Returns (exit code, stderr, whether it matched)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "clinbundle", "-v", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    seen = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if not seen.is_set() and re.search(pattern, line):
                seen.set()
                proc.send_signal(sig)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    proc.wait(timeout=600)
    reader.join(timeout=30)
    return proc.returncode, "".join(lines), seen.is_set()


def earlier_seg(files: list[Path], path: Path) -> None:
    """An earlier DICOM SEG of a series, as another tool writes one and a PACS sends it along
    (highdicom); tests/test_dicom.py and tests/test_pacs.py feed it to the apps."""
    import highdicom as hd
    from pydicom import dcmread
    from pydicom.sr.codedict import codes

    sources = [dcmread(f) for f in files]
    mask = np.zeros((len(sources), sources[0].Rows, sources[0].Columns), bool)
    mask[:, :5, :5] = True
    description = hd.seg.SegmentDescription(
        1,
        "old",
        codes.SCT.AnatomicalStructure,
        codes.SCT.AnatomicalStructure,
        hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    hd.seg.Segmentation(
        source_images=sources,
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=hd.UID(),
        series_number=50,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="earlier",
        manufacturer_model_name="earlier",
        software_versions="1",
        device_serial_number="1",
    ).save_as(path)
