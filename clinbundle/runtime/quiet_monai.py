"""`import monai` without the MONAI Deploy App SDK, and holoscan's stack where it does run.

`import monai` imports every package under `monai/` (`monai.utils.load_submodules`, for MONAI's
own export decorators). monai-deploy-app-sdk installs itself into that folder (`monai/deploy`),
so once the `map` extra is installed every `import monai` also imports holoscan and the SDK's
DICOM operators: about 1 s more, a holoscan "Current stack size ... may cause segmentation
faults" warning and an nvImageCodec one, in commands that never build or run a MAP. MONAI offers
no switch for it: its exclusion pattern is fixed in `monai/__init__.py`, and
`pkgutil.walk_packages` imports every package it walks whether MONAI then excludes it or not.
What both honour is `sys.modules`: while `monai/__init__.py` runs, `monai.deploy` is a
placeholder with no submodules, so the walk skips it; it is removed as soon as MONAI is loaded,
and code that needs the SDK (the MAP app) imports `monai.deploy...` as usual. Nothing of MONAI
uses the SDK. This module is part of the runtime core because every format's code imports it
first (through `clinbundle/__init__.py`), without patching site-packages.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import resource
import sys
import types

#: The stack holoscan asks for (its warning names `ulimit -s 32768`).
HOLOSCAN_STACK_BYTES = 32 * 1024 * 1024


class _MonaiLoader(importlib.machinery.SourceFileLoader):
    """MONAI's own loader, running `monai/__init__.py` with `monai.deploy` held out."""

    def exec_module(self, module: types.ModuleType) -> None:
        hold = types.ModuleType("monai.deploy", "held out while MONAI loads (clinbundle)")
        hold.__path__ = []
        sys.modules.setdefault("monai.deploy", hold)
        try:
            super().exec_module(module)
        finally:
            if sys.modules.get("monai.deploy") is hold:
                del sys.modules["monai.deploy"]
            if getattr(module, "deploy", None) is hold:
                delattr(module, "deploy")


class _MonaiFinder(importlib.abc.MetaPathFinder):
    """Finds `monai` where the path finder does, and loads it with `_MonaiLoader`."""

    def find_spec(
        self, name: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name != "monai":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or type(spec.loader) is not importlib.machinery.SourceFileLoader:
            return None  # an unusual install (zip, frozen): the import system's own way
        spec.loader = _MonaiLoader(spec.loader.name, spec.loader.path)
        return spec


def hold_out_map_sdk() -> None:
    """From now on, `import monai` does not import the MAP SDK (a no-op once MONAI is loaded)."""
    if "monai" not in sys.modules and not any(isinstance(f, _MonaiFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MonaiFinder())


def raise_stack_limit(want: int = HOLOSCAN_STACK_BYTES) -> None:
    """Raise this process's soft stack limit to what holoscan wants (up to the hard limit).

    Done in-process, before holoscan is imported: holoscan checks the limit at import, and
    threads started afterwards get stacks of that size.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    want = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_STACK, (want, hard))
