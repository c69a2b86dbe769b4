"""Open an ONNX bundle for inference, checking it first: what the bento, the MAP, the demo and
batch inference all load. The builder (`clinbundle.packaging.onnx_bundle`) is not needed here.

Opening checks the manifest's sha256 of every file before a byte of the model runs (so a bundle
changed after its parity check is refused, naming the file), then its signature (`signature.py`:
required and checked when a trusted key is configured, else only reported), then that the
contract embedded in model.onnx equals contract.json.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from clinbundle.runtime.contract import InferenceContract
from clinbundle.runtime.errors import BundleError
from clinbundle.runtime.hashing import sha256_file, tree_hashes
from clinbundle.runtime.inference import Output
from clinbundle.runtime.runners import Runtime
from clinbundle.runtime.runtime_choice import choose_runtime
from clinbundle.runtime.signature import SIGNATURE_FILE, check_signature

log = logging.getLogger("clinbundle.bundle")

MANIFEST, MODEL_FILE, CONTRACT_FILE = "manifest.json", "model.onnx", "contract.json"
#: The metadata_props key of model.onnx that holds the contract.
CONTRACT_KEY = "inference_contract"


def embedded_contract(path: Path) -> InferenceContract:
    """The contract stored in a model.onnx (what a runtime reads without the bundle around it)."""
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    if CONTRACT_KEY not in props:
        raise KeyError(f"{path} has no inference_contract in its metadata_props")
    return InferenceContract.model_validate(json.loads(props[CONTRACT_KEY]))


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not folder.is_dir():
        raise BundleError(f"{folder} is not a folder: give the path of a bundle")
    if not path.is_file():
        raise BundleError(f"{folder} has no {MANIFEST}: not a clinbundle bundle")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(manifest.get("files"), dict):
        raise BundleError(f"{path} lists no files")
    return manifest


def check_hashes(folder: Path, manifest: dict) -> list[str]:
    """Problems, each naming its file: missing, changed, or not in the manifest.

    The manifest lists every file but itself and the folder's signature (`model.sig`, which
    covers the manifest in turn: see `clinbundle.runtime.signature`)."""
    problems = []
    for rel, want in manifest["files"].items():
        p = folder / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif (got := sha256_file(p)) != want:
            problems.append(
                f"{rel}: sha256 {got[:12]}... differs from the manifest's {want[:12]}..."
            )
    present = set(tree_hashes(folder, exclude=(MANIFEST, SIGNATURE_FILE)))
    problems += [
        f"{rel}: not listed in the manifest" for rel in sorted(present - set(manifest["files"]))
    ]
    return problems


@dataclass
class OnnxBundle:
    """A bundle opened for inference: its contract, manifest and the runtime that runs it.

    `signature`: "unsigned", "signed, not checked" or "verified with key sha256:<fingerprint>".
    `runtime_name` / `runtime_reason`: which shipped runtime runs and why (`runtime_choice`),
    `sw_batch_size` the sliding-window batch it runs with.
    """

    path: Path
    manifest: dict
    contract: InferenceContract
    runtime: Runtime
    signature: str = "unsigned"
    runtime_name: str = "onnxruntime"
    runtime_reason: str = ""
    sw_batch_size: int | None = None

    def predict(
        self,
        volume: np.ndarray,
        affine: np.ndarray | None = None,
        output: Output = "probabilities",
    ) -> np.ndarray:
        """Raw float32 (N, C, D, H, W) on the grid `affine` describes -> probabilities
        (N, K, D, H, W) or labels (N, D, H, W) on that grid, via the one inference path."""
        return self.runtime.run(volume, affine, output)


def load_bundle(
    path: Path,
    device: str = "auto",
    threads: int | None = None,
    trusted_key: Path | str | None = None,
    runtime: str | None = None,
) -> OnnxBundle:
    """Open a bundle: hashes first, then the signature, then the contract from model.onnx (must
    match contract.json).

    `trusted_key`: a public key PEM the bundle must be signed with (default: the path in
    CLINBUNDLE_TRUSTED_KEY, if set); without one an unsigned bundle opens as before.
    `runtime`: a shipped runtime by name (default: CLINBUNDLE_RUNTIME, else the bundle's
    measured default; see `clinbundle.runtime.runtime_choice`). `threads`: default physical cores.
    """
    path = Path(path)
    manifest = read_manifest(path)
    problems = check_hashes(path, manifest)
    if problems:
        raise BundleError(f"{path} failed verification:\n  - " + "\n  - ".join(problems))
    signature = check_signature(path, trusted_key)
    log.info("%s: signature %s", path, signature)
    if not (path / MODEL_FILE).is_file():
        raise BundleError(f"{path} has no {MODEL_FILE}")
    try:
        contract = embedded_contract(path / MODEL_FILE)
    except Exception as e:  # a corrupt protobuf raises DecodeError, a foreign model KeyError
        raise BundleError(f"{MODEL_FILE}: cannot read its inference contract ({e})") from None
    on_disk = InferenceContract.from_json((path / CONTRACT_FILE).read_text())
    if contract != on_disk:
        raise BundleError(f"{MODEL_FILE}: its embedded contract differs from {CONTRACT_FILE}")
    chosen = choose_runtime(path, manifest, contract, device, threads, runtime)
    log.info("opened %s (%d files checked)", path, len(manifest["files"]))
    return OnnxBundle(
        *(path, manifest, contract, chosen.runtime, signature),
        *(chosen.name, chosen.reason, chosen.sw_batch_size),
    )
