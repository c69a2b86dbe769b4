"""The service's upload readers on bytes: sized from their headers before anything is allocated.

Hostile uploads (a tiny .npy or NIfTI declaring a huge shape, a gzip bomb) must be refused from
their headers: fast, and with no allocation near what they declare (tracemalloc sees numpy's).
"""

from __future__ import annotations

import gzip
import io
import time
import tracemalloc
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from clinbundle.apps import http_io
from clinbundle.apps.http_io import BadRequest, TooLarge

LIMIT = 300_000
HUGE = (4000, 4000, 4000)  # 64e9 voxels: 256 GB as float32


def npy_header_bomb(shape=HUGE, dtype="<f4") -> bytes:
    buf = io.BytesIO()
    header = {"descr": dtype, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + b"\x00" * 100


def nifti_header_bomb(shape=HUGE, version=1) -> bytes:
    cls = nib.Nifti1Header if version == 1 else nib.Nifti2Header
    header = cls()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header.set_data_offset(header.sizeof_hdr + 4)
    return header.binaryblock + b"\x00" * 4 + b"\x00" * 100


def gzip_bomb(prefix: bytes, zeros: int) -> bytes:
    """`prefix` then `zeros` zero bytes, gzipped in slices (a few hundred kB for 200 MB)."""
    c = zlib.compressobj(9, wbits=31)
    out = [c.compress(prefix)]
    block = b"\x00" * (1 << 20)
    for _ in range(zeros >> 20):
        out.append(c.compress(block))
    return b"".join([*out, c.flush()])


def _read(tmp_path: Path, data: bytes):
    path = tmp_path / "upload.bin"
    path.write_bytes(data)
    return http_io.read_volume(path, max_voxels=LIMIT)


def _refused(tmp_path: Path, data: bytes, error: type, needle: str) -> None:
    """Refused with `error`, in well under a second, peak allocation under 8 MB."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(error, match=needle):
            _read(tmp_path, data)
        took = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert took < 0.5, took
    assert peak < 8 * 1024**2 + 2 * len(data), peak


def test_npy_header_bomb_is_refused_from_its_header(tmp_path: Path) -> None:
    bomb = npy_header_bomb()
    assert len(bomb) < 300
    _refused(tmp_path, bomb, TooLarge, "declares 64000000000 voxels")
    with pytest.raises(TooLarge, match="declares"):
        http_io._npy(bomb, LIMIT)
    # under the limit but the data is missing: corrupt, not an allocation
    _refused(tmp_path, npy_header_bomb((60, 60, 60)), BadRequest, "shorter than its header")


def test_npy_object_and_bad_headers(tmp_path: Path) -> None:
    _refused(tmp_path, npy_header_bomb((8, 8, 8), "|O"), BadRequest, "allow_pickle=False")
    _refused(tmp_path, b"\x93NUMPY\x01\x00\x10\x00{'descr': 12}  \n", BadRequest, "corrupt .npy")
    _refused(tmp_path, b"\x93NUMPY\x09\x00" + b" " * 20, BadRequest, "corrupt .npy|version")


@pytest.mark.parametrize("version", [1, 2])
def test_nifti_header_bomb_is_refused_before_get_fdata(tmp_path: Path, version: int) -> None:
    bomb = nifti_header_bomb(version=version)
    _refused(tmp_path, bomb, TooLarge, "declares 64000000000 voxels")
    _refused(tmp_path, gzip.compress(bomb), TooLarge, "declares 64000000000 voxels")


def test_gzip_bomb_inflates_only_what_the_header_declares(tmp_path: Path) -> None:
    small = nifti_header_bomb((24, 24, 24))[:352]  # a valid header, 24^3 float32 declared
    bomb = gzip_bomb(small, 200 * 1024**2)
    assert len(bomb) < 1024**2
    _refused(tmp_path, bomb, TooLarge, "unpacks to more than")
    _refused(tmp_path, gzip_bomb(b"", 200 * 1024**2), BadRequest, "not a NIfTI")
    with pytest.raises(TooLarge):
        http_io._inflate(gzip_bomb(b"", 50 * 1024**2), 1000)


def test_good_volumes_still_read(tmp_path: Path) -> None:
    data = np.random.default_rng(0).normal(size=(20, 24, 28)).astype(np.float32)
    affine = np.diag([0.8, 0.8, 1.5, 1.0])
    for cls in (nib.Nifti1Image, nib.Nifti2Image):
        raw = cls(data, affine).to_bytes()
        for payload in (
            raw,
            gzip.compress(raw),
            gzip.compress(raw[:5000]) + gzip.compress(raw[5000:]),
        ):
            volume, got = _read(tmp_path, payload)
            assert np.array_equal(volume[0, 0], data) and np.allclose(got, affine)
    buf = io.BytesIO()
    np.save(buf, data.astype(np.int16))
    volume, got = _read(tmp_path, buf.getvalue())
    assert volume.dtype == np.float32 and np.array_equal(volume[0, 0], data.astype(np.int16))
    with pytest.raises(TooLarge, match="over this service's limit|declares"):
        _read(
            tmp_path,
            gzip.compress(nib.Nifti1Image(np.zeros((70, 70, 70), np.float32), affine).to_bytes()),
        )


def test_truncated_and_corrupt_gzip(tmp_path: Path) -> None:
    raw = nib.Nifti1Image(np.ones((24, 24, 24), np.float32), np.eye(4)).to_bytes()
    full = gzip.compress(raw)
    _refused(tmp_path, full[: len(full) // 2], BadRequest, "corrupt")
    _refused(tmp_path, b"\x1f\x8b\x08\x00 not a deflate stream", BadRequest, "corrupt gzip")
    _refused(tmp_path, raw[:400], BadRequest, "corrupt NIfTI")
