"""Champion -> MONAI Deploy MAP build context, proven by running the app as a real process.

    resolve model -> ONNX bundle into models/<name>/ (its own ONNX parity gate)
    -> app/ (the MAP app + the clinbundle package it imports) -> app.yaml, map/app.json,
       map/pkg.json, pip/requirements.txt, Dockerfile
    -> run `python app -i -o -m` on the parity suite as NIfTI files and on a synthetic DICOM
       series; labels read back (nibabel, highdicom) vs PyTorch with `check_parity`
    -> parity report, manifest -> rename into place                 (any failure: nothing)

The layout is the one `monai-deploy package` (holoscan-cli 4.2) builds, written here instead of
driving the packager: the packager downloads a versions manifest from the internet, needs
`docker buildx` and has no dry-run. The manifests are made by holoscan-cli's own
`ApplicationConfiguration` from app.yaml, so they are what the packager would write.

Context layout (image paths in brackets):

    Dockerfile                  ARG BASE_IMAGE (CUDA); user holoscan (uid 1000)
    app/                        [/opt/holoscan/app] __main__.py + vendored clinbundle package
    models/<name>/              [/opt/holoscan/models/<name>] the ONNX bundle
    app.yaml                    [/var/holoscan/app.yaml] application, resources, clinbundle
    map/app.json, map/pkg.json  [/etc/holoscan/app.json, /etc/holoscan/pkg.json]
    pip/requirements.txt        pinned: what passed parity here
    parity/                     parity_report.{json,md}
    sbom.cdx.json               CycloneDX SBOM of the environment the MAP parity ran in
    manifest.json, README.md
    model.sig                   with a signing key: signature over the whole context (the
                                nested bundle is signed with the same key on its own)

A trusted key for the app (`trusted-key` in app.yaml's clinbundle section) is the deployer's
setting, not the bundle's: a context cannot vouch for itself. It is left empty here; set it in
the deployed app.yaml (relative to that file, or absolute), or set CLINBUNDLE_TRUSTED_KEY.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml

from clinbundle.apps.map_app.selection import series_rules
from clinbundle.packaging.bundle import build_manifest, staged_folder, write_manifest
from clinbundle.packaging.dicom_synth import SeriesInfo, oblique, quantize_hu, write_ct_series
from clinbundle.packaging.model_source import ResolvedModel
from clinbundle.packaging.onnx_bundle import RuntimeOptions, build_onnx_bundle, parity_reference
from clinbundle.packaging.parity import (
    ParityCase,
    ParityReport,
    Reference,
    Tolerances,
    check_parity,
    settle_parity,
)
from clinbundle.packaging.sbom import SBOM_FILE, write_sbom
from clinbundle.packaging.signing import sign_bundle
from clinbundle.runtime.bundle_reader import check_hashes, read_manifest
from clinbundle.runtime.errors import BundleError, ParityError
from clinbundle.runtime.ort_build import ort_extra
from clinbundle.runtime.runners import Runtime
from clinbundle.vendoring import vendor_runtime

log = logging.getLogger("clinbundle.map")

SDK_VERSION = "4.0.0"
#: A CUDA 13 runtime image (holoscan-cu13 needs libcudart.so.13); override with --build-arg.
DEFAULT_BASE_IMAGE = "nvcr.io/nvidia/cuda:13.0.1-runtime-ubuntu24.04"
DICOM_CASE = "odd"  # the parity case that is also sent as a DICOM series
#: What holoscan-cu13 needs on a base image without CUDA 13 (CPU-only hosts, CI's stand-in).
CUDART_REQUIREMENT = "nvidia-cuda-runtime==13.0.*"
APP_RUN_TIMEOUT_S = 600


WHEELS_README = """\
Wheels put here are mounted into the image build and preferred by pip (`--find-links`):
for a build with no network, or a CPU build of torch on a CPU-only host. The image never holds
them. Add them to a copy of this folder, so that `clinbundle verify` of the original still holds.
"""


def _requirement_lines() -> list[str]:
    """clinbundle's own dependencies, its `map` extra and the installed ONNX Runtime build's extra
    (`cpu` or `gpu`), pinned at the installed versions."""
    from packaging.requirements import Requirement

    extras = ("map", ort_extra())
    lines = []
    for spec in md.requires("clinbundle") or []:
        req = Requirement(spec)
        if req.marker and not any(req.marker.evaluate({"extra": e}) for e in extras):
            continue
        version = md.version(req.name).split("+")[0]  # torch 2.13.0+cpu -> the build fits the image
        lines.append(f"{req.name}=={version}")
    return sorted(set(lines), key=str.lower)


def write_app(dest: Path) -> Path:
    """app/: the launcher plus the runtime core and the MAP app it imports (vendored).

    Vendoring the code (not a wheel) keeps the build free of build tools and network, and
    `python app/` puts app/ first on sys.path, so the copy in the MAP is the code that ran the
    parity check below.
    """
    vendor_runtime(dest, extra=("apps/__init__.py", "apps/dicom_seg.py", "apps/map_app"))
    shutil.copy2(dest / "clinbundle" / "apps" / "map_app" / "__main__.py", dest / "__main__.py")
    return dest


def app_config(model: ResolvedModel, title: str) -> dict:
    """app.yaml: the packager's `application` + `resources`, and the app's own settings."""
    return {
        "application": {
            "title": title,
            "version": f"{model.version or '0'}.0.0",
            "input-formats": ["file"],
            "output-formats": ["file"],
        },
        # The app runs the bundle's default runtime on the CPU (requirements.txt); a GPU helps
        # nothing but the holoscan runtime, which starts without one.
        "resources": {"cpu": 2, "gpu": 0, "memory": "4Gi"},
        "clinbundle": {
            "model": model.name,
            "device": "auto",
            # a runtime the bundle ships (onnxruntime, openvino, pytorch-aoti, ...); empty:
            # the bundle's default, measured fastest among its parity-passing runtimes
            "runtime": None,
            # DICOMSeriesSelectorOperator rules from the contract's modality; of several
            # matching series the app takes the one with the most slices (logged), unless
            # series-strict is true
            "series-selection": series_rules(model.contract.modality),
            "series-strict": False,
            # a public key PEM (relative to this file, or absolute) the bundle must be signed
            # with; empty: any bundle loads and its signature state is only logged
            "trusted-key": None,
        },
    }


def write_manifests(ctx: Path, model_name: str) -> tuple[dict, dict]:
    """map/app.json and map/pkg.json, made by holoscan-cli 4.2 from app.yaml like the packager."""
    from holoscan_cli.common.enum_types import SdkType
    from holoscan_cli.packager.config_reader import ApplicationConfiguration
    from holoscan_cli.packager.parameters import PackageBuildParameters

    params = PackageBuildParameters()
    params.application = ctx / "app"  # a folder with __main__.py: a Python module app
    params.models = {model_name: ctx / "models" / model_name}
    params.sdk = SdkType.MonaiDeploy
    config = ApplicationConfiguration()
    config.read(ctx / "app.yaml")
    app_manifest = config.populate_app_manifest(params)
    app_manifest.sdk = SdkType.MonaiDeploy.value
    app_manifest.sdk_version = SDK_VERSION
    pkg_manifest = config.populate_package_manifest(params)
    (ctx / "map").mkdir()
    app_json, pkg_json = app_manifest.data, json.loads(json.dumps(pkg_manifest.data, default=str))
    (ctx / "map" / "app.json").write_text(json.dumps(app_json, indent=2) + "\n")
    (ctx / "map" / "pkg.json").write_text(json.dumps(pkg_json, indent=2) + "\n")
    return app_json, pkg_json


def dockerfile(app_json: dict, model_name: str, title: str, version: str) -> str:
    """The image layout of a MAP (holoscan-cli's Dockerfile.jinja2, without its build stages)."""
    env = app_json["environment"]
    work = app_json["workingDirectory"]
    lines = [
        "# syntax=docker/dockerfile:1",
        "# MONAI Deploy Application Package made by `clinbundle package map`.",
        "# docker build -t NAME . ; docker run --rm --ulimit stack=33554432 \\",
        "#   -v IN:/var/holoscan/input -v OUT:/var/holoscan/output NAME",
        f"ARG BASE_IMAGE={DEFAULT_BASE_IMAGE}",
        "FROM ${BASE_IMAGE}",
        "ARG UNAME=holoscan",
        "ARG UID=1000",
        "ARG GID=1000",
        "ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1",
        "# python3 (>= 3.11) with venv: from the base image when it has them, else from apt",
        "# hadolint ignore=DL3008",
        "RUN if python3 -c 'import sys, venv, ensurepip; assert sys.version_info >= (3, 11)' \\",
        '    2>/dev/null; then echo "base image has $(python3 --version)"; \\',
        "    else apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \\",
        "    && rm -rf /var/lib/apt/lists/*; fi",
        f'LABEL org.opencontainers.image.title="{title}"',
        f'LABEL org.opencontainers.image.version="{version}"',
        f'LABEL org.monai.deploy.app-sdk="{SDK_VERSION}"',
        "# uid 1000 may be taken by the base image's default user (ubuntu)",
        "RUN (userdel -r ubuntu 2>/dev/null || true) && groupadd -f -g $GID $UNAME \\",
        "    && useradd -l -m -d /home/$UNAME -s /bin/bash -g $GID -u $UID $UNAME",
        f"RUN mkdir -p /etc/holoscan {env['HOLOSCAN_APPLICATION']} {env['HOLOSCAN_MODEL_PATH']} \\",
        f"    {work}/input {work}/output {env['HOLOSCAN_LOGS_PATH']} \\",
        f"    && chown -R $UID:$GID {work}",
        f"ENV HOLOSCAN_INPUT_PATH={work}/input",
        f"ENV HOLOSCAN_OUTPUT_PATH={work}/output",
        *(
            f"ENV {k}={v}"
            for k, v in env.items()
            if k not in ("HOLOSCAN_INPUT_PATH", "HOLOSCAN_OUTPUT_PATH")
        ),
        "COPY pip/requirements.txt /tmp/requirements.txt",
        "# wheels/ (mounted, not copied): local wheels pip prefers, e.g. for an offline build",
        "RUN --mount=type=bind,source=wheels,target=/tmp/wheels \\",
        "    python3 -m venv /opt/holoscan/venv \\",
        "    && /opt/holoscan/venv/bin/pip install --no-cache-dir --find-links /tmp/wheels \\",
        "       -r /tmp/requirements.txt",
        "# holoscan-cu13 loads libcudart.so.13: a CUDA 13 base has it, any other base gets it from PyPI",
        "RUN if ! python3 -c \"import ctypes; ctypes.CDLL('libcudart.so.13')\" 2>/dev/null; then \\",
        f"    /opt/holoscan/venv/bin/pip install --no-cache-dir '{CUDART_REQUIREMENT}' \\",
        "    && ls -d /opt/holoscan/venv/lib/python3*/site-packages/nvidia/cu13/lib \\",
        "       > /etc/ld.so.conf.d/zz-cudart-pypi.conf && ldconfig; fi",
        "ENV PATH=/opt/holoscan/venv/bin:$PATH",
        f"COPY models/{model_name} {env['HOLOSCAN_MODEL_PATH']}/{model_name}",
        f"COPY map/app.json {env['HOLOSCAN_APP_MANIFEST_PATH']}",
        f"COPY map/pkg.json {env['HOLOSCAN_PKG_MANIFEST_PATH']}",
        f"COPY app.yaml {env['HOLOSCAN_CONFIG_PATH']}",
        f"COPY app {env['HOLOSCAN_APPLICATION']}",
        "USER $UNAME",
        f"WORKDIR {work}",
        f"ENTRYPOINT {json.dumps(json.loads(app_json['command']))}",
        "",
    ]
    return "\n".join(lines)


def run_map(
    map_dir: Path,
    input_dir: Path,
    output_dir: Path,
    offline: bool = False,
    timeout: float = APP_RUN_TIMEOUT_S,
    via_env: bool = False,
) -> subprocess.CompletedProcess:
    """Run the MAP's app as the MAP runtime does: `python app -i IN -o OUT -m models`.

    HOLOSCAN_CONFIG_PATH points at the context's app.yaml (the app raises its own stack limit
    to what holoscan wants: no `preexec_fn`, which is not safe beside the threads of
    `package_every_format`), and `offline` runs it in a fresh network namespace (`unshare
    --net`, needs root or user namespaces) to prove it needs no network. `via_env` passes the folders as
    HOLOSCAN_INPUT_PATH / HOLOSCAN_OUTPUT_PATH / HOLOSCAN_MODEL_PATH instead, as a MAP runtime
    does inside the container.
    """
    map_dir = Path(map_dir).resolve()
    if not (map_dir / "app" / "__main__.py").is_file():
        raise BundleError(f"{map_dir} is not a MAP build context (no app/__main__.py)")
    folders = {
        "HOLOSCAN_INPUT_PATH": str(Path(input_dir).resolve()),
        "HOLOSCAN_OUTPUT_PATH": str(Path(output_dir).resolve()),
        "HOLOSCAN_MODEL_PATH": str(map_dir / "models"),
    }
    cmd = [sys.executable, str(map_dir / "app")]
    if not via_env:
        cmd += ["-i", folders.pop("HOLOSCAN_INPUT_PATH"), "-o", folders.pop("HOLOSCAN_OUTPUT_PATH")]
        cmd += ["-m", folders.pop("HOLOSCAN_MODEL_PATH")]
    if offline:
        cmd = ["unshare", "--net", *cmd]
    env = os.environ | {"HOLOSCAN_CONFIG_PATH": str(map_dir / "app.yaml")} | folders
    env.pop("PYTHONPATH", None)
    with tempfile.TemporaryDirectory(prefix="map-run-") as cwd:
        return subprocess.run(
            cmd,
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def _checked_run(map_dir: Path, input_dir: Path, output_dir: Path) -> float:
    t0 = time.perf_counter()
    proc = run_map(map_dir, input_dir, output_dir)
    if proc.returncode != 0:
        raise ParityError(
            f"the MAP app failed (exit {proc.returncode}) on {input_dir.name}; "
            f"no MAP was written:\n{proc.stderr[-4000:]}"
        )
    return time.perf_counter() - t0


def read_seg_labels(seg_path: Path, source_files: list[Path]) -> np.ndarray:
    """A DICOM SEG back to [i, j, k] labels, frames matched to the source slices by UID."""
    import highdicom as hd
    from pydicom import dcmread

    seg = hd.seg.segread(seg_path)
    uids = [dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in source_files]
    segments = [int(s.SegmentNumber) for s in seg.SegmentSequence]
    kji = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=segments, combine_segments=True
    )
    return np.transpose(np.asarray(kji), (2, 1, 0)).astype(np.int64)


def map_parity(
    map_dir: Path,
    reference: Runtime | Reference,
    cases: list[ParityCase],
    model: ResolvedModel,
    tolerances: Tolerances,
) -> ParityReport:
    """Run the app (one process per input kind) and compare its labels with PyTorch."""
    outputs: dict[int, np.ndarray] = {}
    seconds: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="map-parity-") as tmpdir:
        tmp = Path(tmpdir)
        (tmp / "nifti_in").mkdir()
        names = {}
        on_grid = np.diag([*(model.contract.geometry.spacing or (0.8, 0.7, 1.5)), 1.0])
        for c, case in enumerate(cases):
            for n, volume in enumerate(case.volume[:, 0]):
                name = f"case{c}_{n}"
                names[name] = (c, n)
                affine = on_grid if case.affine is None else case.affine
                nib.save(nib.Nifti1Image(volume, affine), tmp / "nifti_in" / f"{name}.nii.gz")
        t = _checked_run(map_dir, tmp / "nifti_in", tmp / "nifti_out")
        for c, case in enumerate(cases):
            labels = [
                np.asarray(nib.load(tmp / "nifti_out" / f"case{c}_{n}_seg.nii.gz").dataobj)
                for n in range(case.volume.shape[0])
            ]
            outputs[id(case.volume)] = np.stack(labels).astype(np.int64)
            seconds[id(case.volume)] = t / len(cases)

        # the same awkward volume as a DICOM series, at the whole-HU precision DICOM stores
        source = next(c for c in cases if c.name == DICOM_CASE)
        volume = quantize_hu(source.volume[0, 0])
        geometry = oblique()
        files = write_ct_series(volume, tmp / "dicom_in", geometry, SeriesInfo())
        t = _checked_run(map_dir, tmp / "dicom_in", tmp / "dicom_out")
        segs = list((tmp / "dicom_out").glob("*.dcm"))
        if len(segs) != 1:
            raise ParityError(f"the MAP app wrote {len(segs)} DICOM SEG files, expected 1")
        dicom_case = ParityCase(
            f"dicom:{DICOM_CASE}",
            volume[None, None],
            "CT series (oblique, 0.8 x 0.7 x 1.5 mm) -> DICOM SEG",
            geometry.affine_ras(),
        )
        outputs[id(dicom_case.volume)] = read_seg_labels(segs[0], files)[None]
        seconds[id(dicom_case.volume)] = t

    candidate = Runtime(
        lambda v, _affine: outputs[id(v)],
        f"MAP app process (monai-deploy-app-sdk {SDK_VERSION}, ONNX bundle); labels from "
        "NIfTI / DICOM SEG files (time: share of the app process)",
    )
    report = check_parity(
        reference, candidate, [*cases, dicom_case], model.contract, tolerances, "map"
    )
    for result in report.cases:  # the app ran all cases of a kind in one process
        match = next(c for c in [*cases, dicom_case] if c.name == result.name)
        result.time_candidate_s = seconds[id(match.volume)]
    return report


def reuse_onnx_bundle(bundle: Path, model: ResolvedModel, tolerances: Tolerances) -> None:
    """Check that `bundle` is an ONNX bundle of this very model that passed this parity gate.

    `quickstart --package` and CI build the ONNX bundle first; nesting that one (instead of
    building and checking a second, identical one, ~1.5 minutes on 2 cores) is only sound when
    its files are the ones its manifest lists and the manifest names the same run, version and
    tolerances and a passed parity. Anything else is refused (BundleError), before any writing.
    """
    manifest = read_manifest(Path(bundle))
    wrong = check_hashes(Path(bundle), manifest)
    if manifest.get("format") != "onnx":
        wrong.append(f"format is {manifest.get('format')!r}, not 'onnx'")
    made_from = manifest.get("model", {})
    for key, want in (("run_id", model.run_id), ("version", model.version)):
        if str(made_from.get(key)) != str(want):
            wrong.append(f"made from {key} {made_from.get(key)}, not this model's {want}")
    parity = manifest.get("parity", {})
    if parity.get("tolerances") != asdict(tolerances):
        wrong.append(
            f"checked with tolerances {parity.get('tolerances')}, not {asdict(tolerances)}"
        )
    if parity.get("passed") is not True:
        wrong.append("its parity check did not pass")
    if wrong:
        raise BundleError(f"{bundle} cannot be nested in this MAP: " + "; ".join(wrong))
    log.info("nesting the ONNX bundle %s (%s)", bundle, parity.get("summary"))


def nest_onnx_bundle(
    dest: Path,
    model: ResolvedModel,
    reference: Reference,
    tol: Tolerances,
    onnx_bundle: Path | None,
    sign_key: Path | None,
    **build_options: object,
) -> None:
    """models/<name>/: a copy of `onnx_bundle` (already checked by `reuse_onnx_bundle`) when
    given, signed with `sign_key` if set; else a new ONNX bundle with its own parity gate."""
    if onnx_bundle is None:
        build_onnx_bundle(
            model,
            dest,
            tolerances=tol,
            record=False,
            reference=reference,
            sign_key=sign_key,
            **build_options,
        )
        return
    shutil.copytree(onnx_bundle, dest)
    if sign_key is not None:
        sign_bundle(dest, sign_key)


def build_map(
    model: ResolvedModel,
    out: Path,
    device: str = "auto",
    tolerances: Tolerances | None = None,
    validation_limit: int = 2,
    force: bool = False,
    record: bool = True,
    sign_key: Path | None = None,
    runtimes: RuntimeOptions | None = None,
    reference: Reference | None = None,
    onnx_bundle: Path | None = None,
) -> tuple[Path, ParityReport]:
    """Write a MAP build context for `model`; ParityError (and nothing written) on a breach.

    `sign_key`: sign the nested ONNX bundle and then the whole context (after its manifest).
    `reference`: the packaging run's PyTorch outputs when other formats are checked too.
    `onnx_bundle`: nest this ONNX bundle of the model (`reuse_onnx_bundle`) instead of
    building one; BundleError, nothing written, when it is not one."""
    tol = tolerances or Tolerances.for_precision("fp32")
    name = model.name or "model"
    title = f"clinbundle {name} segmentation"
    # PyTorch runs once for both checks (and for every format of `quickstart --package`)
    if onnx_bundle is not None:
        reuse_onnx_bundle(onnx_bundle, model, tol)  # before the reference: refuse in seconds
    reference = reference or parity_reference(model, validation_limit)
    with staged_folder(out, force=force) as tmp:
        nest_onnx_bundle(
            tmp / "models" / name,
            model,
            reference,
            tol,
            onnx_bundle,
            sign_key,
            device=device,
            runtimes=runtimes,
        )
        write_app(tmp / "app")
        config = app_config(model, title)
        (tmp / "app.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        (tmp / "pip").mkdir()
        (tmp / "pip" / "requirements.txt").write_text(
            "# Pinned to the versions that passed the MAP parity check (clinbundle, its [map]\n"
            "# extra and the ONNX Runtime build it ran on).\n"
            + "\n".join(_requirement_lines())
            + "\n"
        )
        (tmp / "wheels").mkdir()
        (tmp / "wheels" / "README.md").write_text(WHEELS_README)
        app_json, _pkg = write_manifests(tmp, name)
        (tmp / "Dockerfile").write_text(
            dockerfile(app_json, name, title, config["application"]["version"])
        )

        report = map_parity(tmp, reference, reference.cases, model, tol)
        settle_parity(report, model, tmp / "parity", record, "MAP", "MAP")
        for leftover in tmp.rglob("__pycache__"):  # the parity runs compiled the vendored copy
            shutil.rmtree(leftover)
        write_sbom(tmp / SBOM_FILE)
        extra = {
            "sdk": "monai-deploy",
            "sdk_version": SDK_VERSION,
            "base_image": DEFAULT_BASE_IMAGE,
        }
        write_manifest(tmp, build_manifest(tmp, "map", model, report, extra))
        if sign_key is not None:
            sign_bundle(tmp, sign_key)
    log.info("MAP build context %s: %s", out, report.summary())
    return out, report
