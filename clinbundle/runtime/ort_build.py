"""Which ONNX Runtime build this environment has.

ONNX Runtime ships its CPU and CUDA builds as two distributions, `onnxruntime` and
`onnxruntime-gpu`, of one `onnxruntime` module; clinbundle installs one of them through its `cpu`
or `gpu` extra. Pins and version reports must name the distribution that is really installed:
a bento packaged on a CUDA host that pinned `onnxruntime` would have its image install the CPU
build over the CUDA one.
"""

from __future__ import annotations

import importlib.metadata as md

from clinbundle.runtime.errors import BundleError

#: clinbundle extra -> the ONNX Runtime distribution it installs
ORT_BUILDS = {"cpu": "onnxruntime", "gpu": "onnxruntime-gpu"}


def installed_builds() -> list[str]:
    """The ONNX Runtime distributions installed here (one, when the environment is sound)."""
    found = []
    for dist in ORT_BUILDS.values():
        try:
            md.version(dist)
        except md.PackageNotFoundError:
            continue
        found.append(dist)
    return found


def distribution(name: str) -> str:
    """`onnxruntime` (either build's name) -> the build installed here; other names unchanged.

    With none or both builds installed the name is returned as given: version lookups then say
    what is there, and `ort_extra` refuses to pin such an environment.
    """
    if name not in ORT_BUILDS.values():
        return name
    found = installed_builds()
    return found[0] if len(found) == 1 else name


def ort_extra() -> str:
    """The clinbundle extra (`cpu` or `gpu`) whose ONNX Runtime build is installed here."""
    found = installed_builds()
    if len(found) != 1:
        raise BundleError(
            f"exactly one ONNX Runtime build must be installed, found {found or 'none'}: "
            "pip install 'clinbundle[cpu]' (or 'clinbundle[gpu]' on a CUDA host), after "
            "uninstalling the other build"
        )
    return next(extra for extra, dist in ORT_BUILDS.items() if dist == found[0])
