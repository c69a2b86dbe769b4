"""Champion -> verified ONNX bundle, and `verify` for a bundle someone handed you.

    resolve model -> export (dynamic axes, onnx.checker) -> parity vs PyTorch on the suite
    -> sample + model card + manifest -> rename into place          (any failure: nothing)

Bundle layout (a folder a stranger can read):

    README.md                    model card
    manifest.json                sha256 of every file, provenance, contract, parity summary,
                                 runtimes: each candidate's parity and timing, the default
    model.onnx                   graph; contract and provenance in metadata_props
    contract.json                the inference contract
    parity/parity_report.{json,md}
    parity/runtimes/NAME/        each runtime candidate's parity report
    runtimes/model.pt2           compiled PyTorch (AOTInductor) for the packaging CPU's ISA
    sample/input.npy             a raw volume of awkward shape ...
    sample/reference.npy         ... and PyTorch's probabilities for it (what verify re-checks)
    sbom.cdx.json                CycloneDX SBOM of the Python environment parity ran in
    model.sig                    with a signing key: model-signing signature over all the above
                                 (manifest.json included; see clinbundle.runtime.signature)
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from clinbundle.packaging.bundle import build_manifest, staged_folder, write_manifest
from clinbundle.packaging.model_card import render_model_card
from clinbundle.packaging.onnx_export import OPSET, Exporter, export_onnx
from clinbundle.packaging.parity import (
    ParityCase,
    ParityReport,
    Reference,
    Tolerances,
    check_parity,
    parity_suite,
    settle_parity,
)
from clinbundle.packaging.runtime_candidates import (
    BF16_TOLERANCES,
    measure_candidates,
    open_candidates,
)
from clinbundle.packaging.runtimes import torch_runtime
from clinbundle.packaging.sbom import SBOM_FILE, write_sbom
from clinbundle.packaging.signing import sign_bundle
from clinbundle.runtime.bundle_reader import (
    CONTRACT_FILE,
    MANIFEST,
    MODEL_FILE,
    check_hashes,
    load_bundle,
    read_manifest,
)
from clinbundle.runtime.errors import BundleError, ConfigError, ParityError
from clinbundle.runtime.hashing import tree_hashes
from clinbundle.runtime.runners import CPU_EP, Runtime, onnx_runtime, onnx_session
from clinbundle.runtime.runtime_choice import ORT, runtime_table
from clinbundle.runtime.signature import check_signature
from clinbundle.runtime.threads import resolve_threads

if TYPE_CHECKING:  # serving loads bundles without MLflow installed
    from clinbundle.packaging.model_source import ResolvedModel

log = logging.getLogger("clinbundle.onnx")

SAMPLE_CASE = "odd"


def parity_cases(model: ResolvedModel, validation_limit: int = 2) -> list[ParityCase]:
    """The suite every format is checked on: awkward shapes plus the run's validation volumes."""
    from clinbundle.packaging.model_source import validation_volumes

    return parity_suite(model.contract, validation_volumes(model, limit=validation_limit))


def parity_reference(
    model: ResolvedModel, validation_limit: int = 2, network: torch.nn.Module | None = None
) -> Reference:
    """PyTorch on the CPU over the suite: what every format of one packaging run is held to."""
    network = model.load_network() if network is None else network
    runtime = torch_runtime(network, model.contract, "cpu")
    return Reference(runtime, parity_cases(model, validation_limit))


def build_onnx_bundle(
    model: ResolvedModel,
    out: Path,
    precision: Literal["fp32", "fp16", "bf16"] = "fp32",
    device: str = "auto",
    tolerances: Tolerances | None = None,
    exporter: Exporter = "torchscript",
    validation_limit: int = 2,
    force: bool = False,
    record: bool = True,
    reference: Reference | None = None,
    sign_key: Path | None = None,
    runtimes: RuntimeOptions | None = None,
) -> tuple[Path, ParityReport]:
    """Export, prove parity, write the bundle; ParityError (and no bundle) on a breach.

    `runtimes`: how the runtime candidates are measured (`runtime_candidates`); an fp32 bundle
    ships each that is available here, with the measured table and default in the manifest.
    A bf16 bundle is the same fp32 graph and candidates (the fp32 ones held to fp32
    tolerances) whose default may be the bf16 candidate, under the Dice rule, where it is the
    fastest: refused up front where this CPU has no bf16 units or the candidates are off.

    `reference`: the packaging run's PyTorch outputs when other formats are checked too.
    `sign_key`: an EC private key PEM; the staged bundle is signed (model.sig) after its
    manifest is written, before it is renamed into place.
    """
    graph = "fp16" if precision == "fp16" else "fp32"
    if precision == "bf16":
        require_bf16(runtimes)
    tol = tolerances or Tolerances.for_precision(graph)
    log.info("parity tolerances for the %s graph: %s", graph, tol)
    network = model.load_network()
    reference = reference or parity_reference(model, validation_limit, network)
    cases = reference.cases
    with staged_folder(out, force=force) as tmp:
        onnx_path = export_onnx(
            network,
            model.contract,
            tmp / MODEL_FILE,
            precision=graph,
            exporter=exporter,
            metadata={
                "model_uri": model.uri,
                "model_name": str(model.name),
                "model_version": str(model.version),
                "run_id": model.run_id,
                "dataset_sha256": str(model.metadata.get("dataset_sha256")),
            },
        )
        session = onnx_session(onnx_path, device)
        candidate = onnx_runtime(session, model.contract)
        report = check_parity(reference, candidate, cases, model.contract, tol, "onnx")
        settle_parity(report, model, tmp / "parity", record, "ONNX", "bundle", precision=graph)
        (tmp / CONTRACT_FILE).write_text(model.contract.to_json())
        # the ORT candidate is this file on this provider: its parity is the gate's
        known = {ORT: report} if session.get_providers() == [CPU_EP] else {}
        table = measure_runtimes(
            tmp, network, model.contract, reference, tol, precision, runtimes, known
        )
        sample = next(c for c in cases if c.name == SAMPLE_CASE)
        (tmp / "sample").mkdir()
        np.save(tmp / "sample" / "input.npy", sample.volume)
        np.save(tmp / "sample" / "reference.npy", reference.output(sample.volume)[0])
        write_sbom(tmp / SBOM_FILE)
        extra = {
            "precision": precision,
            "exporter": exporter,
            "opset": OPSET,
            "execution_provider": candidate.description,
            "sample": {"case": SAMPLE_CASE, "shape": list(sample.volume.shape)},
        }
        if table is not None:
            extra["runtimes"] = table
        manifest = build_manifest(tmp, "onnx", model, report, extra)
        (tmp / "README.md").write_text(
            render_model_card(model, report, manifest, manifest["files"] | {"README.md": ""})
        )
        manifest["files"] = tree_hashes(tmp, exclude=(MANIFEST,))  # now with the card
        write_manifest(tmp, manifest)
        if sign_key is not None:
            sign_bundle(tmp, sign_key)
    return out, report


@dataclass(frozen=True)
class RuntimeOptions:
    """Runtime candidates at packaging: on or off (default: CLINBUNDLE_PACKAGE_RUNTIMES, "all"
    or "onnxruntime"), threads (default physical cores), the timing volume's shape (default
    twice the roi) and the bf16 candidate's tolerances (Dice rule)."""

    enabled: bool = field(default_factory=lambda: package_runtimes_default() == "all")
    threads: int | None = None
    bench_shape: tuple[int, ...] | None = None
    bf16_tolerances: Tolerances = BF16_TOLERANCES


PACKAGE_RUNTIMES_ENV = "CLINBUNDLE_PACKAGE_RUNTIMES"


def package_runtimes_default() -> str:
    """ "all" (measure every candidate) unless CLINBUNDLE_PACKAGE_RUNTIMES says "onnxruntime"."""
    value = os.environ.get(PACKAGE_RUNTIMES_ENV, "all").strip() or "all"
    if value not in ("all", "onnxruntime"):
        raise ValueError(f"{PACKAGE_RUNTIMES_ENV}={value!r}: use all or onnxruntime")
    return value


def measure_runtimes(
    tmp: Path,
    network: torch.nn.Module,
    contract,
    reference: Reference,
    tol: Tolerances,
    precision: str,
    options: RuntimeOptions | None,
    known: dict[str, ParityReport] | None = None,
) -> dict | None:
    """The manifest's `runtimes` table for the staged bundle in `tmp` (None: ORT only)."""
    options = options or RuntimeOptions()
    if not options.enabled or precision == "fp16":
        log.info(
            "runtime candidates skipped (%s): the bundle runs ONNX Runtime",
            f"asked (--runtimes / {PACKAGE_RUNTIMES_ENV})"
            if not options.enabled
            else f"{precision} bundle",
        )
        return None
    threads = resolve_threads(options.threads)
    cands = open_candidates(tmp, network, contract, tol, threads, options.bf16_tolerances)
    return measure_candidates(
        cands,
        reference,
        contract,
        network,
        threads,
        precision,
        options.bench_shape,
        tmp / "parity" / "runtimes",
        known,
    )


def require_bf16(options: RuntimeOptions | None) -> None:
    """A bf16 bundle needs the runtime candidates and a CPU with bf16 units (OpenVINO's)."""
    if not (options or RuntimeOptions()).enabled:
        raise ConfigError(
            f"a bf16 bundle's default is a measured runtime candidate: leave "
            f"{PACKAGE_RUNTIMES_ENV} / --runtimes at 'all'"
        )
    try:
        from clinbundle.runtime.openvino_runner import openvino_bf16_capable
    except ImportError as e:
        raise ConfigError(f"a bf16 bundle runs on OpenVINO, which is not installed: {e}") from None
    if not openvino_bf16_capable():
        raise ConfigError(
            "this CPU has no bf16 units (OpenVINO's OPTIMIZATION_CAPABILITIES): package the "
            "bf16 bundle on the kind of machine that will serve it, or package fp32"
        )


def verify_bundle(path: Path, device: str = "auto", key: Path | None = None) -> ParityReport:
    """Hashes first (a changed byte names its file), then the signature (checked with `key`,
    else CLINBUNDLE_TRUSTED_KEY; required when either is given), then parity on the bundle's
    own sample. A MAP context is checked as a whole, then its nested ONNX bundle (same key)."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest.get("format") == "map":  # a MAP build context: its models/<name> is a bundle
        problems = check_hashes(path, manifest)
        if problems:
            raise BundleError(f"{path} failed verification:\n  - " + "\n  - ".join(problems))
        log.info("%s: signature %s", path, check_signature(path, key))
        nested = sorted(p.parent for p in path.glob(f"models/*/{MANIFEST}"))
        if len(nested) != 1:
            raise BundleError(f"{path}: a MAP holds one ONNX bundle under models/, found {nested}")
        return verify_bundle(nested[0], device, key)
    try:
        # checks every file's hash and the signature before anything runs
        bundle = load_bundle(path, device, trusted_key=key)
    except (BundleError, ParityError):
        raise
    except Exception as e:  # ORT refuses a graph it cannot parse
        raise BundleError(f"{MODEL_FILE}: ONNX Runtime cannot load it ({e})") from None
    report = verify_sample(path, manifest, bundle.runtime, bundle.contract, bundle.runtime_name)
    for name in shipped_runtimes(manifest, bundle.runtime_name):
        other = load_bundle(path, device, trusted_key=key, runtime=name)
        verify_sample(path, manifest, other.runtime, other.contract, name)
    log.info("%s verified: %d files, %s", path, len(manifest["files"]), report.summary())
    return report


def shipped_runtimes(manifest: dict, default: str) -> list[str]:
    """The bundle's parity-passing runtimes other than `default` (each re-checked by verify)."""
    table = runtime_table(manifest)
    return [n for n, e in table["candidates"].items() if e.get("passed") and n != default]


def verify_sample(
    path: Path, manifest: dict, runtime: Runtime, contract, name: str
) -> ParityReport:
    """Parity of one runtime on the bundle's sample, at the tolerances that runtime passed."""
    volume = np.load(path / "sample" / "input.npy", allow_pickle=False)
    reference = np.load(path / "sample" / "reference.npy", allow_pickle=False)
    entry = runtime_table(manifest)["candidates"].get(name, {})
    tol = Tolerances(**(entry.get("tolerances") or manifest["parity"]["tolerances"]))
    stored = Runtime(lambda _v, _a: reference, "PyTorch output stored in sample/reference.npy")
    report = check_parity(stored, runtime, [ParityCase("sample", volume)], contract, tol, name)
    if not report.passed:
        raise ParityError(
            f"runtime {name} no longer reproduces sample/reference.npy: {report.summary()}"
        )
    log.info("verify: runtime %s reproduces the sample: %s", name, report.summary())
    return report
