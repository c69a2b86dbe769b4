"""`import gradio` without Gradio rewriting its own type stubs on every start.

Gradio's `ComponentMeta` calls `create_or_modify_pyi` for each of its ~80 component classes as
they are defined: it reads and parses each component's source file and rewrites the `.pyi`
stubs in site-packages, for editors. Measured on 2 cores that is ~1.7 s of CPU, half of
`import gradio` (3.6 s -> 1.9 s), on every start of the demo, and it writes into the installed
package (on a read-only install it fails: gradio-app/gradio#10121). Gradio has no switch for it,
so the function is replaced by a no-op right after `gradio.component_meta` is loaded and before
any component class exists. The stubs shipped in the wheel stay as they are; nothing else of
Gradio changes. Where Gradio is already imported, or loads differently, this does nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

_MODULE = "gradio.component_meta"


def _no_stubs(*_args: object, **_kwargs: object) -> None:
    return None


class _Loader(importlib.machinery.SourceFileLoader):
    def exec_module(self, module: types.ModuleType) -> None:
        super().exec_module(module)
        if hasattr(module, "create_or_modify_pyi"):
            module.create_or_modify_pyi = _no_stubs


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, name: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name != _MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or type(spec.loader) is not importlib.machinery.SourceFileLoader:
            return None
        spec.loader = _Loader(spec.loader.name, spec.loader.path)
        return spec


def import_gradio() -> types.ModuleType:
    """The `gradio` module, imported without the stub rewriting where it is not yet loaded."""
    if "gradio" not in sys.modules:
        finder = _Finder()
        sys.meta_path.insert(0, finder)
        try:
            import gradio  # noqa: F401
        finally:
            sys.meta_path.remove(finder)
    return sys.modules["gradio"]
