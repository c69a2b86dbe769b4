"""Runtimes used at packaging time besides the bundle's own: eager PyTorch (the reference of
every parity check) and HTTP (a served bento). Both plug into the one sliding-window path through
`clinbundle.runtime.runners.volume_runner`.
"""

from __future__ import annotations

import numpy as np
import torch

from clinbundle.runtime.allocator import tune_allocator
from clinbundle.runtime.contract import InferenceContract
from clinbundle.runtime.errors import DeviceError
from clinbundle.runtime.inference import torch_predictor
from clinbundle.runtime.runners import Runtime, local_runtime


def torch_runtime(network: torch.nn.Module, contract: InferenceContract, device: str = "cpu"):
    """Eager PyTorch: the reference of every parity check (fp32; no autocast)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for, but PyTorch sees no CUDA device")
    network = network.to(device).eval()
    tune_allocator()
    return local_runtime(
        torch_predictor(network),
        contract,
        device,
        f"pytorch {torch.__version__} eager fp32 on {device}",
    )


def http_runtime(
    url: str, contract: InferenceContract, token: str | None = None, timeout: float = 600
) -> Runtime:
    """A running clinbundle service as a runner: volumes go up as .npy, probabilities come back.

    The service runs the shared sliding-window path itself; this runner only moves bytes, so a
    difference from the ONNX bundle can only come from the server side.
    """
    import gzip
    import io

    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    endpoint = url.rstrip("/") + "/segment_array"

    def run_nifti(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
        """With geometry: the volume as NIfTI to /segment, probabilities back as NIfTI."""
        import nibabel as nib

        r = httpx.post(
            url.rstrip("/") + "/segment",
            files={"file": ("volume.nii", nib.Nifti1Image(volume[0, 0], affine).to_bytes())},
            data={"probabilities": "true"},
            headers=headers,
            timeout=timeout,
        )
        if r.status_code != 200:
            raise RuntimeError(f"{url}/segment answered {r.status_code}: {r.text[:500]}")
        probs = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(r.content)).dataobj)
        return np.moveaxis(probs, -1, 0)[None].astype(np.float32)

    def run(volume: np.ndarray, affine: np.ndarray | None = None) -> np.ndarray:
        if affine is not None:
            if volume.shape[0] != 1:
                raise ValueError("one volume per request when an affine is given")
            return run_nifti(volume, affine)
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(volume, dtype=np.float32), allow_pickle=False)
        r = httpx.post(
            endpoint,
            files={"array": ("volume.npy", buf.getvalue(), "application/octet-stream")},
            data={"probabilities": "true"},
            headers=headers,
            timeout=timeout,
        )
        if r.status_code != 200:
            raise RuntimeError(f"{endpoint} answered {r.status_code}: {r.text[:500]}")
        return np.load(io.BytesIO(r.content), allow_pickle=False)

    return Runtime(run, f"HTTP {url} (clinbundle service, ONNX Runtime server side)")
