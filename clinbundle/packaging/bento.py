"""Champion -> BentoML bento, proven over real HTTP, exported as a `.bento` archive.

    ONNX bundle (reused or made) -> BentoML model store (in the work dir)
    -> staged build context: bentos/service.py + requirements.txt (pinned) + clinbundle
    -> bentoml build (offline) -> `bentoml serve` on 127.0.0.1 -> parity over HTTP
    -> report into the bento and onto the model version -> bentoml export -> OUT/

The ONNX bundle inside the bento carries its SBOM (listed in its manifest) and, with a signing
key, is signed again in the store (so a bundle given with --bundle is signed too); a copy of the
SBOM of this environment, where the HTTP parity ran, goes into the bento (src/) and OUT/.

A breach deletes the bento from the store and leaves OUT untouched.
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from tqdm import tqdm

import clinbundle
from clinbundle.apps.http_io import BUNDLE_DIR
from clinbundle.packaging.bundle import staged_folder
from clinbundle.packaging.parity import (
    ParityReport,
    Reference,
    Tolerances,
    check_parity,
    settle_parity,
)
from clinbundle.packaging.runtimes import http_runtime
from clinbundle.packaging.sbom import SBOM_FILE, write_sbom
from clinbundle.packaging.signing import sign_bundle
from clinbundle.runtime.errors import BundleError, ParityError
from clinbundle.runtime.ort_build import distribution
from clinbundle.vendoring import vendor_runtime

if TYPE_CHECKING:
    from clinbundle.packaging.model_source import ResolvedModel

log = logging.getLogger("clinbundle.bento")

BENTO_MODEL = "clinbundle-onnx"
#: What the service imports of clinbundle besides the runtime core.
SERVICE_MODULES = ("apps/__init__.py", "apps/http_io.py")
SERVICE_DIR = Path(clinbundle.__file__).resolve().parents[1] / "bentos"
#: What of the staged build context goes into the bento (not the build's __pycache__).
BENTO_INCLUDE = [
    "service.py",
    "requirements.txt",
    "clinbundle/**/*.py",
    "clinbundle/configs/*.yaml",
    "parity/*",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Poll /readyz; fail early, with the server's output, if the process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BundleError(f"the bento server exited with code {proc.returncode} before ready")
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/readyz", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise BundleError(f"the bento server at {url} was not ready after {timeout:.0f} s")


def serve_command(bento: str, host: str, port: int) -> list[str]:
    """`bentoml serve` of this interpreter's environment."""
    return [sys.executable, "-m", "bentoml", "serve", bento, "--host", host, "--port", str(port)]


@contextlib.contextmanager
def running_bento(
    bento: str, env: dict[str, str] | None = None, log_file: Path | None = None
) -> Iterator[str]:
    """Serve a bento (tag or folder) on a free loopback port for the duration of the block."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    out = open(log_file, "wb") if log_file else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(
        serve_command(bento, "127.0.0.1", port),
        env=os.environ | (env or {}),
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_until_ready(url, proc)
        log.info("bento %s ready at %s", bento, url)
        yield url
    finally:
        stop_process_group(proc)
        if log_file:
            out.close()


def stop_process_group(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM a server started with start_new_session=True, SIGKILL it after `grace_s`."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def pinned(packages: list[str]) -> list[str]:
    """Each package at the version installed here: the versions the parity check ran on
    (`onnxruntime` names the ONNX Runtime build installed here, CPU or CUDA)."""
    pins = []
    for name in map(distribution, packages):
        try:
            pins.append(f"{name}=={md.version(name)}")
        except md.PackageNotFoundError:
            pins.append(name)
    return pins


def import_bundle(bundle: Path, model: ResolvedModel, sign_key: Path | None = None) -> str:
    """Copy the ONNX bundle into the BentoML model store (signing the copy with `sign_key`, if
    given); returns the model tag."""
    import bentoml

    labels = {"registered_model": str(model.name), "registered_version": str(model.version)}
    with bentoml.models.create(
        BENTO_MODEL, labels=labels, metadata={"run_id": model.run_id, "uri": model.uri}
    ) as m:
        shutil.copytree(bundle, Path(m.path) / BUNDLE_DIR)
        if sign_key is not None:
            sign_bundle(Path(m.path) / BUNDLE_DIR, sign_key)
    log.info("imported %s into the BentoML store as %s", bundle, m.tag)
    return str(m.tag)


def stage_build_context(ctx: Path) -> None:
    """bentos/ + the clinbundle package, with the service's requirements pinned."""
    if not (SERVICE_DIR / "service.py").is_file():
        raise BundleError(
            f"{SERVICE_DIR} with service.py was not found: package bentos from a clinbundle "
            "source checkout (the bento build context lives in its bentos/ folder)"
        )
    shutil.copy(SERVICE_DIR / "service.py", ctx / "service.py")
    vendor_runtime(ctx, extra=SERVICE_MODULES)
    lines = (SERVICE_DIR / "requirements.txt").read_text().splitlines()
    names = [n for n in (line.split("#")[0].strip() for line in lines) if n]
    (ctx / "requirements.txt").write_text("".join(p + "\n" for p in pinned(names)))
    (ctx / "parity").mkdir(exist_ok=True)


def _next(bar: tqdm, step: str) -> None:
    bar.update()
    bar.set_description(step)


def build_bento(
    model: ResolvedModel,
    onnx_bundle: Path,
    out: Path,
    tolerances: Tolerances | None = None,
    validation_limit: int = 2,
    force: bool = False,
    record: bool = True,
    reference: Reference | None = None,
    sign_key: Path | None = None,
) -> tuple[Path, ParityReport]:
    """Build, prove parity over HTTP, export; ParityError (and nothing kept) on a breach.

    `reference`: the packaging run's PyTorch outputs when the ONNX bundle was just checked too.
    `sign_key`: sign the bento's copy of the ONNX bundle before the bento is built.
    """
    import bentoml

    from clinbundle.packaging.onnx_bundle import parity_reference

    tol = tolerances or Tolerances.for_precision("fp32")
    reference = reference or parity_reference(model, validation_limit)
    cases = reference.cases
    steps = tqdm(total=4, desc="bento: import model", unit="step", leave=False, disable=None)
    with staged_folder(out, force=force) as tmp, steps:
        model_tag = import_bundle(onnx_bundle, model, sign_key)
        _next(steps, "bento: build")
        ctx = Path(tempfile.mkdtemp(prefix="bento-ctx-", dir=tmp))
        stage_build_context(ctx)
        env = {"CLINBUNDLE_BENTO_MODEL": model_tag}
        with environment(env):  # the service reads it when the build imports it (its envs)
            bento = bentoml.bentos.build(
                "service:Segmentation", include=BENTO_INCLUDE, build_ctx=str(ctx)
            )
        shutil.rmtree(ctx)
        tag = str(bento.tag)
        log.info("built bento %s", tag)
        _next(steps, "bento: serve and check parity over HTTP")
        try:
            with running_bento(tag, env, log_file=tmp / "parity-server.log") as url:
                candidate = http_runtime(url, model.contract)
                report = check_parity(reference, candidate, cases, model.contract, tol, "bento")
        except BaseException:
            bentoml.bentos.delete(tag)
            raise
        try:
            files = settle_parity(
                report, model, tmp, record, "bento (over HTTP)", "bento", bento=tag
            )
        except ParityError:
            bentoml.bentos.delete(tag)
            raise
        inside = Path(bento.path) / "src" / "parity"  # the report travels inside the bento
        inside.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy(f, inside / f.name)
        sbom = write_sbom(tmp / SBOM_FILE)
        shutil.copy(sbom, inside.parent / SBOM_FILE)
        archive = tmp / f"{tag.replace(':', '-')}.bento"
        _next(steps, "bento: export")
        bentoml.export_bento(tag, str(archive))
        steps.update()
        (tmp / "BENTO_TAG").write_text(tag + "\n")
    return out / archive.name, report


def archive_tag(archive: Path) -> str:
    """The bento tag written inside a `.bento` archive (its bento.yaml)."""
    import tarfile

    try:
        with tarfile.open(archive) as tar:
            member = next(m for m in tar.getmembers() if Path(m.name).name == "bento.yaml")
            info = yaml.safe_load(tar.extractfile(member).read())  # type: ignore[union-attr]
    except (tarfile.TarError, StopIteration, OSError) as e:
        raise BundleError(f"{archive} is not a bento archive ({e})") from None
    return f"{info['name']}:{info['version']}"


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """`values` in os.environ for the block only: a tag left behind would make every later
    `bentoml serve` started from this process look for that model instead of its own."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def ensure_imported(path: Path) -> str:
    """A `.bento` archive (or a folder holding exactly one) -> a tag in the local store."""
    import bentoml
    from bentoml.exceptions import NotFound

    if path.is_dir():
        archives = sorted(path.glob("*.bento"))
        if len(archives) != 1:
            raise BundleError(f"{path} holds {len(archives)} .bento archives; give one archive")
        path = archives[0]
    if not path.is_file():
        raise BundleError(f"{path} does not exist: give a .bento archive or the folder it is in")
    tag = archive_tag(path)
    try:
        bentoml.bentos.get(tag)
        log.info("bento %s is already in the store (%s)", tag, os.environ.get("BENTOML_HOME"))
    except NotFound:
        bentoml.import_bento(str(path))
        log.info("imported %s as %s", path, tag)
    return tag
