"""Run inside an image (stdin to its venv's python): which ONNX Runtime build it has, and its
execution providers. argv[1] is the clinbundle extra the image was built with (ORT_EXTRA): `cpu`
(the `onnxruntime` distribution: every image CI builds) or `gpu` (`onnxruntime-gpu`, an image
for a CUDA host, which must then offer the CUDA provider). Both installed at once shadow each
other's files: refused.
"""

import importlib.metadata as md
import sys

import onnxruntime as ort

from clinbundle.runtime.ort_build import ORT_BUILDS, installed_builds

extra = sys.argv[1]
want, found = ORT_BUILDS[extra], installed_builds()
dists = [f"{name}=={md.version(name)}" for name in found]
providers = ort.get_available_providers()
print(f"ONNX Runtime {ort.__version__}: {', '.join(dists)}; providers {providers}")
if found != [want]:
    sys.exit(f"ORT_EXTRA={extra}: expected exactly {want} installed, found {dists}")
if "CPUExecutionProvider" not in providers:
    sys.exit("no CPUExecutionProvider")
if (want == "onnxruntime-gpu") != ("CUDAExecutionProvider" in providers):
    sys.exit(f"{want} with providers {providers}: the build does not match the image's purpose")
