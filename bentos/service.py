"""BentoML service: a clinbundle ONNX bundle behind HTTP (one file; the work is in http_io).

The image is declared here with the SDK (`bentoml.images.Image`): Python 3.11 and the packages
of requirements.txt, which `clinbundle package bento` pins to the versions its HTTP parity check
ran on; locking stays off so the build needs no package index.

Inference is the bundle's runner, i.e. the shared sliding-window path on ONNX Runtime (CUDA when
present, else CPU; logged), so the service answers exactly what the ONNX bundle answers. The
model loads in a background thread: /readyz is 503 until it is loaded and warmed up.

Environment: CLINBUNDLE_BENTO_MODEL (model tag, default clinbundle-onnx:latest),
CLINBUNDLE_DEVICE (auto|cpu|cuda), CLINBUNDLE_API_TOKEN (bearer token; auth off when unset),
CLINBUNDLE_MAX_VOXELS, CLINBUNDLE_MAX_REQUEST_BYTES, CLINBUNDLE_MAX_CONCURRENCY (requests in
flight; more get 429), CLINBUNDLE_BODY_TIMEOUT_S (a stalled upload gets 408),
CLINBUNDLE_WARMUP_RUNS.
"""

from __future__ import annotations

import logging
import os
import threading
from http import HTTPStatus
from pathlib import Path
from typing import Annotated

import bentoml
from bentoml.exceptions import BentoMLException, ServiceUnavailable
from pydantic import Field
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from clinbundle.apps import http_io

log = logging.getLogger("clinbundle.bento")
log.info(
    "limits: max_concurrency %d (CLINBUNDLE_MAX_CONCURRENCY; more get 429), max_voxels %d, "
    "memory budget %.1f GiB (a request that could never fit gets 413, one that does not fit "
    "beside those in flight 429)",
    http_io.MAX_CONCURRENCY,
    http_io.MAX_VOXELS,
    http_io.LEDGER.budget / 2**30,
)
MODEL_TAG = os.environ.get("CLINBUNDLE_BENTO_MODEL", "clinbundle-onnx:latest")
MODEL = bentoml.models.BentoModel(MODEL_TAG)
# read here, not with Image.requirements_file: BentoML refuses paths under a hidden folder
REQUIREMENTS = Path(__file__).with_name("requirements.txt").read_text().splitlines()
IMAGE = bentoml.images.Image(python_version="3.11", lock_python_packages=False).python_packages(
    *(r for r in (line.split("#")[0].strip() for line in REQUIREMENTS) if r)
)
Volume = Annotated[Path, Field(description="a 3-D volume: .nii, .nii.gz or float .npy")]
Array = Annotated[Path, Field(description="float32 .npy: (D, H, W) or (N, C, D, H, W)")]
Probabilities = Annotated[
    bool, Field(description="return float32 probabilities (D, H, W, K) instead of labels")
]


class ClientError(BentoMLException):
    """Carries http_io's 4xx status to BentoML's error response."""

    def __init__(self, e: http_io.BadRequest) -> None:
        super().__init__(str(e), error_code=HTTPStatus(e.status))


async def metadata(_request) -> JSONResponse:
    return JSONResponse(http_io.service_metadata(Path(MODEL.stored.path) / http_io.BUNDLE_DIR))


@bentoml.asgi_app(Starlette(routes=[Route("/", metadata)]), path="/metadata")
@bentoml.service(
    name="clinbundle-segmentation",
    description="3D segmentation over HTTP from a parity-checked clinbundle ONNX bundle",
    image=IMAGE,
    envs=[{"name": "CLINBUNDLE_BENTO_MODEL", "value": MODEL_TAG}],
    labels={"owner": "clinbundle"},
    traffic={"timeout": 600, "max_concurrency": http_io.MAX_CONCURRENCY},
)
class Segmentation:
    bundle_model = MODEL

    def __init__(self) -> None:
        self.bundle, self.error = None, None
        threading.Thread(target=self._load, daemon=True).start()

    def _load(self) -> None:
        try:
            self.bundle = http_io.load_and_warm_up(
                Path(self.bundle_model.path) / http_io.BUNDLE_DIR
            )
        except Exception as e:  # reported by every request until fixed
            self.error = f"model failed to load: {type(e).__name__}: {e}"
            log.exception("model failed to load")

    def __is_ready__(self) -> bool:
        return self.bundle is not None

    def _run(self, fn, *args):
        if self.bundle is None:
            raise ServiceUnavailable(self.error or "the model is still loading; retry shortly")
        try:
            return fn(self.bundle, *args)
        except http_io.BadRequest as e:
            raise ClientError(e) from None
        except MemoryError:  # whatever allocation failed, the upload was too large for here
            raise ClientError(
                http_io.TooLarge("the volume does not fit in this server's memory")
            ) from None

    @bentoml.api(route="/segment")
    def segment(
        self, file: Volume, probabilities: Probabilities = False, ctx: bentoml.Context = None
    ) -> Path:
        """A 3-D .nii/.nii.gz/.npy -> uint8 label NIfTI with the input's affine, or float32
        (D, H, W, K) probabilities with probabilities=true."""

        def run(bundle, path):
            volume, affine = http_io.read_volume(path)
            return http_io.segment_nifti(bundle, volume, affine, probabilities, ctx.temp_dir)

        return self._run(run, file)

    @bentoml.api(route="/segment_array")
    def segment_array(
        self, array: Array, probabilities: Probabilities = False, ctx: bentoml.Context = None
    ) -> Path:
        """float32 .npy (D, H, W) or (N, C, D, H, W) -> uint8 labels (or probabilities) .npy."""
        return self._run(http_io.segment_npy, array, probabilities, ctx.temp_dir)


Segmentation.add_asgi_middleware(
    http_io.RequestGuard,
    token=os.environ.get("CLINBUNDLE_API_TOKEN") or None,
    upload_fields={"/segment": "file", "/segment_array": "array"},
)
