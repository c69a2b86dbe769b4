"""Bundle signatures (OpenSSF model-signing, private-key mode): what a reader checks.

Who covers whom, so that the manifest and the signature never chase each other:

    manifest.json   the sha256 of every file of the folder but itself and `model.sig`
    model.sig       a model-signing signature (a Sigstore bundle, signed with an EC key) over
                    every file of the folder but itself, manifest.json included

So the manifest is written first, the signature last, and a signed bundle's bytes are all
covered by the signature (the manifest's hashes by way of manifest.json itself). Only the
folder's own top-level `model.sig` is left out: a bundle nested in a MAP context keeps its
signature, which the context's manifest and signature then cover like any other file.

Trust comes from the reader, never from the bundle: a public key given to `load_bundle`
(`trusted_key=`), or the path in CLINBUNDLE_TRUSTED_KEY. With a trusted key, an unsigned or
badly signed bundle is refused (`BundleError`); without one, the state is only reported:
"unsigned", "signed, not checked" or "verified with key sha256:<fingerprint>".

model-signing is imported only when a signature is checked, so a reader without a trusted key
needs nothing beyond the runtime core's own libraries.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from clinbundle.runtime.errors import BundleError

SIGNATURE_FILE = "model.sig"
TRUSTED_KEY_ENV = "CLINBUNDLE_TRUSTED_KEY"
UNSIGNED, NOT_CHECKED = "unsigned", "signed, not checked"


def hashing_config():
    """What is signed: every file of the folder but the top-level signature (git paths too)."""
    from model_signing import hashing

    return hashing.Config().set_ignored_paths(paths=[SIGNATURE_FILE], ignore_git_paths=False)


def key_fingerprint(public_key: Path | str) -> str:
    """sha256 of the key's DER SubjectPublicKeyInfo, first 16 hex digits: `sha256:0123...`."""
    from cryptography.hazmat.primitives import serialization

    path = Path(public_key)
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError, TypeError) as e:
        raise BundleError(
            f"the public key {path} cannot be read as a PEM public key ({e})"
        ) from None
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(der).hexdigest()[:16]


def trusted_key_from_env() -> Path | None:
    """The public key named by CLINBUNDLE_TRUSTED_KEY, if set (empty counts as unset)."""
    value = os.environ.get(TRUSTED_KEY_ENV, "").strip()
    return Path(value) if value else None


def readable_mismatch(reason: str) -> str:
    """model-signing lists raw digests: name the changed files instead. One mismatch comes as
    its text, several as the repr of a list, where the names' quotes may be escaped."""
    changed = re.findall(r"Hash mismatch for \\?'([^'\\]+)\\?'", reason)
    return "changed since signing: " + ", ".join(changed) if changed else reason


def verify_signature(folder: Path, public_key: Path | str) -> str:
    """Check `folder/model.sig` against `public_key`; the state string, or BundleError."""
    from model_signing import verifying

    folder, public_key = Path(folder), Path(public_key)
    fingerprint = key_fingerprint(public_key)
    signature = folder / SIGNATURE_FILE
    if not signature.is_file():
        raise BundleError(
            f"{folder} is not signed (no {SIGNATURE_FILE}) and a trusted key is configured "
            f"({public_key}, {fingerprint}): refusing to load it"
        )
    try:
        verifying.Config().use_elliptic_key_verifier(public_key=public_key).set_hashing_config(
            hashing_config()
        ).verify(folder, signature)
    except Exception as e:  # model-signing raises ValueError, cryptography InvalidSignature
        reason = readable_mismatch(str(e) or type(e).__name__)
        raise BundleError(
            f"{folder}: the signature in {SIGNATURE_FILE} does not verify with the trusted key "
            f"{public_key} ({fingerprint}): {reason}"
        ) from None
    return f"verified with key {fingerprint}"


def check_signature(folder: Path, trusted_key: Path | str | None = None) -> str:
    """The bundle's signature state; with a trusted key (argument, else CLINBUNDLE_TRUSTED_KEY)
    an unsigned or badly signed bundle raises BundleError."""
    key = Path(trusted_key) if trusted_key else trusted_key_from_env()
    if key is not None:
        return verify_signature(Path(folder), key)
    return NOT_CHECKED if (Path(folder) / SIGNATURE_FILE).is_file() else UNSIGNED
