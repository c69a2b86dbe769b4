"""Signing keys and bundle signatures (OpenSSF model-signing, private-key mode, offline).

The reader's side (what is covered, how a signature is checked) is the runtime core's
`clinbundle.runtime.signature`; this module makes keys and signs a staged bundle after its
manifest is written and before it is renamed into place.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from clinbundle.runtime.errors import BundleError
from clinbundle.runtime.signature import SIGNATURE_FILE, hashing_config, key_fingerprint

log = logging.getLogger("clinbundle.signing")

PRIVATE_KEY_FILE, PUBLIC_KEY_FILE = "signing-key.pem", "signing-key.pub.pem"


def new_keypair(out: Path) -> tuple[Path, Path]:
    """An EC P-256 key pair in `out`: the private key PEM (PKCS#8, unencrypted, mode 0600) and
    its public key PEM. Existing files are never overwritten."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out = Path(out)
    private, public = out / PRIVATE_KEY_FILE, out / PUBLIC_KEY_FILE
    for p in (private, public):
        if p.exists():
            raise BundleError(f"{p} already exists; choose another --out folder")
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.chmod(private, 0o600)  # whatever the umask
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    log.info("new signing key %s (public key %s, %s)", private, public, key_fingerprint(public))
    return private, public


def sign_bundle(folder: Path, private_key: Path | str) -> Path:
    """Sign every file of `folder` but its `model.sig` (manifest.json included) -> model.sig."""
    from model_signing import signing

    folder, private_key = Path(folder), Path(private_key)
    if not private_key.is_file():
        raise BundleError(f"the signing key {private_key} does not exist")
    signature = folder / SIGNATURE_FILE
    try:
        signing.Config().use_elliptic_key_signer(private_key=private_key).set_hashing_config(
            hashing_config()
        ).sign(folder, signature)
    except (ValueError, TypeError) as e:  # not a PEM private key, or not an EC key
        raise BundleError(f"cannot sign with {private_key} ({e})") from None
    log.info("signed %s with %s", folder, private_key)
    return signature
