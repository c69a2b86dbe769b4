"""Issue 14 (4, 5): signed, self-checking bundles and the SBOM inside every bundle.

Real keys (cryptography), real signatures (OpenSSF model-signing, private-key mode), real
bundles of the session champion; the MAP app runs as a process and the bento as a server.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from clinbundle.apps import http_io
from clinbundle.cli import main
from clinbundle.packaging.bento import free_port, stop_process_group
from clinbundle.packaging.sbom import SBOM_FILE
from clinbundle.packaging.signing import PRIVATE_KEY_FILE, PUBLIC_KEY_FILE
from clinbundle.runtime.bundle_reader import load_bundle, read_manifest
from clinbundle.runtime.errors import BundleError
from clinbundle.runtime.hashing import sha256_file
from clinbundle.runtime.signature import (
    SIGNATURE_FILE,
    TRUSTED_KEY_ENV,
    key_fingerprint,
    readable_mismatch,
)

from conftest import package_champion


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Two key pairs, A and B, made by `clinbundle keys new`."""
    root = tmp_path_factory.mktemp("keys")
    out = {}
    for name in ("a", "b"):
        assert main(["keys", "new", "--out", str(root / name)]) == 0
        out[name] = (root / name / PRIVATE_KEY_FILE, root / name / PUBLIC_KEY_FILE)
    return out


@pytest.fixture(scope="module")
def signed_bundle(packaged, keys, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`clinbundle package onnx --sign-key A` on the session champion."""
    t = packaged.trained
    out = tmp_path_factory.mktemp("signed") / "onnx"
    rc = package_champion(t, "onnx", out, "--sign-key", str(keys["a"][0]))
    assert rc == 0
    return out


def _sbom_in_manifest(folder: Path) -> dict:
    manifest = read_manifest(folder)
    assert SBOM_FILE in manifest["files"], sorted(manifest["files"])
    assert manifest["files"][SBOM_FILE] == sha256_file(folder / SBOM_FILE)
    sbom = json.loads((folder / SBOM_FILE).read_text())
    assert sbom["bomFormat"] == "CycloneDX"
    names = {c["name"].lower() for c in sbom["components"]}
    assert {"onnxruntime", "numpy", "torch", "model-signing"} <= names, "not this environment"
    return sbom


def test_keys_new_writes_a_private_key_only_its_owner_reads(keys, tmp_path: Path) -> None:
    private, public = keys["a"]
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in private.read_bytes() and b"PUBLIC KEY" in public.read_bytes()
    assert key_fingerprint(public) != key_fingerprint(keys["b"][1])
    # never overwrites a key
    assert main(["keys", "new", "--out", str(private.parent)]) == 2


def test_signed_bundle_verifies_with_its_key_and_fails_with_another(
    signed_bundle: Path, keys, capsys
) -> None:
    assert (signed_bundle / SIGNATURE_FILE).is_file()
    manifest = read_manifest(signed_bundle)
    # the manifest leaves the signature out; the signature covers the manifest
    assert SIGNATURE_FILE not in manifest["files"]
    _sbom_in_manifest(signed_bundle)

    capsys.readouterr()
    assert main(["verify", str(signed_bundle), "--key", str(keys["a"][1]), "--device", "cpu"]) == 0
    assert f"verified with key {key_fingerprint(keys['a'][1])}" in capsys.readouterr().out

    assert main(["verify", str(signed_bundle), "--key", str(keys["b"][1]), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "does not verify with the trusted key" in err and key_fingerprint(keys["b"][1]) in err

    # no key: hashes and parity as before, the signature only reported
    assert main(["verify", str(signed_bundle), "--device", "cpu"]) == 0
    assert "signature signed, not checked" in capsys.readouterr().out


def test_a_mismatch_names_the_changed_files_in_either_of_model_signings_shapes() -> None:
    """One mismatch comes as its text; several as the repr of a list, where a digest holding
    both quote kinds makes Python escape the names' quotes (seen in CI)."""

    def entry(name: str) -> str:
        return f"Hash mismatch for '{name}': Expected 'Digest(digest_value=b\"x\")', Actual 'y'"

    one = f"Signature mismatch: {entry('model.onnx')}"
    several = f"Signature mismatch: {[entry('manifest.json'), entry('model.onnx')]}"
    assert "\\'manifest.json\\'" in several  # the shape CI met
    assert readable_mismatch(one) == "changed since signing: model.onnx"
    assert readable_mismatch(several) == "changed since signing: manifest.json, model.onnx"
    assert readable_mismatch("Invalid signature") == "Invalid signature"


def test_a_changed_byte_with_a_matching_manifest_is_caught_by_the_signature(
    signed_bundle: Path, keys, tmp_path: Path
) -> None:
    copy = tmp_path / "tampered"
    shutil.copytree(signed_bundle, copy)
    model = copy / "model.onnx"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0x01
    model.write_bytes(bytes(data))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["model.onnx"] = sha256_file(model)  # the hashes alone now pass
    (copy / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

    assert load_bundle(copy, "cpu").signature == "signed, not checked"  # no key: as before
    with pytest.raises(BundleError, match="does not verify") as err:
        load_bundle(copy, "cpu", trusted_key=keys["a"][1])
    # model-signing names one mismatch or both (the graph and the manifest both changed)
    named = str(err.value).split("changed since signing: ")[-1].split(", ")
    assert named and set(named) <= {"model.onnx", "manifest.json"}, str(err.value)
    assert main(["verify", str(copy), "--key", str(keys["a"][1]), "--device", "cpu"]) == 2


def test_load_bundle_with_a_trusted_key_refuses_unsigned_and_runs_signed(
    packaged, signed_bundle: Path, keys, monkeypatch
) -> None:
    assert load_bundle(packaged.bundle, "cpu").signature == "unsigned"
    monkeypatch.setenv(TRUSTED_KEY_ENV, str(keys["a"][1]))
    with pytest.raises(BundleError, match="is not signed"):
        load_bundle(packaged.bundle, "cpu")
    bundle = load_bundle(signed_bundle, "cpu")
    assert bundle.signature == f"verified with key {key_fingerprint(keys['a'][1])}"
    volume = np.load(signed_bundle / "sample" / "input.npy")
    expected = np.load(signed_bundle / "sample" / "reference.npy")
    max_abs = bundle.manifest["parity"]["tolerances"]["max_abs"]
    np.testing.assert_allclose(bundle.predict(volume), expected, atol=max_abs)

    monkeypatch.setenv(TRUSTED_KEY_ENV, str(keys["b"][1]))
    with pytest.raises(BundleError, match="does not verify"):
        load_bundle(signed_bundle, "cpu")


def test_the_service_loader_refuses_an_unsigned_bundle_and_reports_the_signature(
    packaged, signed_bundle: Path, keys, monkeypatch
) -> None:
    """What the bento runs in its loading thread (`http_io.load_and_warm_up`)."""
    monkeypatch.setenv(TRUSTED_KEY_ENV, str(keys["a"][1]))
    with pytest.raises(BundleError, match="is not signed"):
        http_io.load_and_warm_up(packaged.bundle)
    http_io.load_and_warm_up(signed_bundle)
    meta = http_io.service_metadata(signed_bundle)
    assert meta["signature"] == f"verified with key {key_fingerprint(keys['a'][1])}"


def test_every_onnx_bundle_carries_an_sbom_in_its_manifest(packaged) -> None:
    sbom = _sbom_in_manifest(packaged.bundle)
    assert sbom["specVersion"] == "1.6"


# ---- the MAP: built signed, run as a process -------------------------------------------------


@pytest.fixture(scope="module")
def signed_map(packaged, keys, tmp_path_factory: pytest.TempPathFactory) -> Path:
    t = packaged.trained
    out = tmp_path_factory.mktemp("map-signed") / "ctx"
    # signing is under test here, not parity (test_map.py): the tiny session model's
    # borderline voxels may flip on the oblique NIfTI/DICOM round trips
    rc = package_champion(t, "map", out, "--sign-key", str(keys["a"][0]), "--max-flips", "0.05")
    assert rc == 0
    return out


@pytest.mark.slow
def test_map_is_signed_with_an_sbom_and_its_app_refuses_an_unsigned_bundle(
    signed_map: Path, packaged, keys, tmp_path: Path
) -> None:
    from clinbundle.packaging.map_bundle import run_map

    name = packaged.model.name
    nested = signed_map / "models" / name
    assert (signed_map / SIGNATURE_FILE).is_file() and (nested / SIGNATURE_FILE).is_file()
    manifest = read_manifest(signed_map)
    assert f"models/{name}/{SIGNATURE_FILE}" in manifest["files"]  # the context covers it
    _sbom_in_manifest(signed_map)
    _sbom_in_manifest(nested)
    assert (
        yaml.safe_load((signed_map / "app.yaml").read_text())["clinbundle"]["trusted-key"] is None
    )
    assert main(["verify", str(signed_map), "--key", str(keys["a"][1]), "--device", "cpu"]) == 0
    assert main(["verify", str(signed_map), "--key", str(keys["b"][1]), "--device", "cpu"]) == 2

    # the deployer names the trusted key in app.yaml, relative to it
    ctx = tmp_path / "ctx"
    shutil.copytree(signed_map, ctx)
    shutil.copy(keys["a"][1], ctx / "trusted.pub.pem")
    config = yaml.safe_load((ctx / "app.yaml").read_text())
    config["clinbundle"]["trusted-key"] = "trusted.pub.pem"
    (ctx / "app.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    volume = np.load(nested / "sample" / "input.npy")[0, 0]
    import nibabel as nib

    (tmp_path / "in").mkdir()
    nib.save(nib.Nifti1Image(volume, np.diag([0.8, 0.7, 1.5, 1.0])), tmp_path / "in" / "a.nii.gz")
    env_key = os.environ.pop(TRUSTED_KEY_ENV, None)
    try:
        proc = run_map(ctx, tmp_path / "in", tmp_path / "out_signed")
        assert proc.returncode == 0, proc.stderr[-3000:]
        log = proc.stdout + proc.stderr
        assert f"signature verified with key {key_fingerprint(keys['a'][1])}" in log
        assert (tmp_path / "out_signed" / "a_seg.nii.gz").is_file()

        # the same context with the nested bundle's signature removed (its hashes still hold)
        (ctx / "models" / name / SIGNATURE_FILE).unlink()
        proc = run_map(ctx, tmp_path / "in", tmp_path / "out_unsigned")
        assert proc.returncode != 0
        assert "is not signed" in proc.stderr and "refusing to load it" in proc.stderr
        assert not list((tmp_path / "out_unsigned").glob("*.nii.gz"))
    finally:
        if env_key is not None:
            os.environ[TRUSTED_KEY_ENV] = env_key


# ---- the bento: its bundle's SBOM, and the served service refusing an unsigned bundle --------


@pytest.fixture(scope="module")
def bento_archive(packaged, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """conftest's bento, with loose parity gates: signing and SBOMs are under test here, not
    parity (test_bento.py); the tiny session model may flip borderline voxels on `oblique`."""
    t = packaged.trained
    out = tmp_path_factory.mktemp("bento-sbom") / "out"
    cmd = [sys.executable, "-m", "clinbundle", "package", "bento", "--model"]
    cmd += [f"models:/{t.name}@champion", "--bundle", str(packaged.bundle), "--out", str(out)]
    cmd += ["--workdir", str(t.workdir), "--max-abs", "1", "--max-flips", "0.05"]
    env = {k: v for k, v in os.environ.items() if k != "BENTOML_HOME"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    return Path(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_bento_carries_the_sbom_and_refuses_an_unsigned_bundle_when_a_key_is_set(
    bento_archive: Path, keys, tmp_path: Path
) -> None:
    assert (bento_archive.parent / SBOM_FILE).is_file()
    with tarfile.open(bento_archive) as tar:
        names = tar.getnames()
        [manifest_name] = [n for n in names if n.endswith("/bundle/manifest.json")]
        manifest = json.loads(tar.extractfile(manifest_name).read())  # type: ignore[union-attr]
        assert SBOM_FILE in manifest["files"]
        assert any(n.endswith(f"/bundle/{SBOM_FILE}") for n in names)
        assert any(n.endswith(f"src/{SBOM_FILE}") for n in names)

    # the session bento's bundle is unsigned: with a trusted key it must never become ready
    home = tmp_path / "serve"
    port = free_port()
    env = os.environ | {"BENTOML_HOME": str(home / "bentoml"), TRUSTED_KEY_ENV: str(keys["a"][1])}
    cmd = [sys.executable, "-m", "clinbundle", "serve", str(bento_archive), "--port", str(port)]
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*cmd, "--workdir", str(home)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # until the load failed (logged), not a blind sleep
            assert proc.poll() is None, log.read_text()[-3000:]
            if "model failed to load" in log.read_text(errors="replace"):
                break
            time.sleep(1)
        else:
            pytest.fail("the server never reported the refused model:\n" + log.read_text()[-3000:])
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url + "/readyz", timeout=10)
        assert err.value.code == 503
        upload = io.BytesIO()
        np.save(upload, np.zeros((8, 8, 8), np.float32))
        r = httpx.post(
            url + "/segment_array",
            files={"array": ("a.npy", upload.getvalue(), "application/octet-stream")},
            timeout=30,
        )
        assert r.status_code == 503, r.text
        # BentoML 1.4.39 answers its ServiceUnavailable with a generic message: the reason is
        # in the server log (bentos/service.py could pass it on, as ClientError does for 4xx)
        assert "is not signed" in log.read_text(errors="replace")
    finally:
        stop_process_group(proc)
