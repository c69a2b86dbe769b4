"""What the CLI tells a user beyond its options: an example per command, its version, and
which extra a command needs (`pip install 'clinbundle[map]'`) before it starts any work."""

from __future__ import annotations

import argparse
import importlib.metadata as md
import importlib.util
import platform

from clinbundle.runtime.errors import ClinbundleError
from clinbundle.runtime.ort_build import distribution

#: One copy-paste example per command (its path of sub-command names), shown under --help.
EXAMPLES = {
    (): "clinbundle quickstart --workdir work",
    ("data",): "clinbundle data synth --out data/vessels --n 16 --n-test 4",
    ("data", "synth"): "clinbundle data synth --out data/vessels --n 16 --n-test 4 --seed 0",
    ("data", "add-corrections"): "clinbundle data add-corrections --table out/predictions.parquet "
    "--labels corrected/ --data data/vessels",
    ("train",): "clinbundle train --data data/vessels --workdir work --set train.epochs=100",
    ("promote",): "clinbundle promote --model vessel-seg --data data/vessels --workdir work",
    ("ensemble",): "clinbundle ensemble --from GRID_RUN_ID --workdir work",
    ("evaluate",): "clinbundle evaluate RUN_ID --data data/vessels --workdir work",
    ("compare",): "clinbundle compare GRID_RUN_ID --metric dice --workdir work",
    ("quickstart",): "clinbundle quickstart --package --workdir work",
    ("package",): "clinbundle package onnx --model models:/vessel-seg@champion --out bundle",
    ("package", "onnx"): "clinbundle package onnx --workdir work --out bundle --device cpu",
    ("package", "bento"): "clinbundle package bento --workdir work --out bento --bundle bundle",
    ("package", "map"): "clinbundle package map --workdir work --out map",
    ("package", "monai-bundle"): "clinbundle package monai-bundle --workdir work --out monai",
    ("serve",): "clinbundle serve bento/ --port 3000 --workdir work",
    ("run-map",): "clinbundle run-map map -i dicom-series/ -o out/",
    ("verify",): "clinbundle verify bundle --key signing-key.pub.pem",
    ("demo",): "clinbundle demo --bundle bundle --samples data/vessels --workdir work",
    (
        "predict",
    ): "clinbundle predict --bundle bundle --input scans/ --output preds/ --flag-worst 5",
    ("keys",): "clinbundle keys new --out keys",
    ("keys", "new"): "clinbundle keys new --out keys",
    ("config",): "clinbundle config --set compute.device=cpu --set train.epochs=5",
}

#: Optional extras (pyproject.toml) and the modules that show each is installed.
EXTRAS = {
    # ONNX Runtime: `cpu` (onnxruntime) or `gpu` (onnxruntime-gpu) installs the one module
    "cpu": ("onnxruntime",),
    "serve": ("bentoml",),
    "map": ("holoscan", "holoscan_cli", "pydicom", "highdicom"),
    "demo": ("gradio", "httpx"),
    "bundle": ("fire", "ignite"),
    "pacs": ("dicomweb_client",),
}
#: The extras a command needs (its path of sub-command names).
NEEDS = {
    ("package", "bento"): ("serve",),
    ("serve",): ("serve",),
    ("package", "map"): ("map",),
    ("package", "monai-bundle"): ("bundle",),
    ("run-map",): ("map",),
    ("demo",): ("demo",),
    # every format: checked before training, not after the ONNX bundle (minutes in)
    ("quickstart", "--package"): ("serve", "map", "bundle"),
}


def subparsers(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every (command path, parser) of the tree, the root first."""
    found = [(path, parser)]
    for action in parser._actions:  # argparse has no public walk of its sub-parsers
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += subparsers(sub, (*path, name))
    return found


def add_examples(parser: argparse.ArgumentParser) -> None:
    """Put each command's example under its --help (kept as written: a raw epilog)."""
    for path, sub in subparsers(parser):
        if path in EXAMPLES:
            sub.epilog = f"example:\n  {EXAMPLES[path]}"
            sub.formatter_class = argparse.RawDescriptionHelpFormatter


def version_text() -> str:
    """clinbundle's version and the libraries a bug report needs (read without importing)."""
    from clinbundle import __version__

    libs = []
    names = ("torch", "monai", "mlflow", "onnxruntime", "bentoml", "monai-deploy-app-sdk")
    for name in map(distribution, names):
        try:
            libs.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            continue
    return f"clinbundle {__version__} (python {platform.python_version()}; {', '.join(libs)})"


def extra_of(module: str | None) -> str | None:
    """The extra that installs `module` (a missing import's name), if it is one of ours."""
    top = (module or "").split(".")[0]
    return next((extra for extra, mods in EXTRAS.items() if top in mods), None)


def missing_extra(extra: str, module: str) -> ClinbundleError:
    hint = " (or 'clinbundle[gpu]' on a CUDA host)" if extra == "cpu" else ""
    return ClinbundleError(
        f"this command needs the '{extra}' extra ({module} is not installed): "
        f"pip install 'clinbundle[{extra}]'{hint}"
    )


def require_extras(path: tuple[str, ...]) -> None:
    """Fail before any work when the command's extras are missing (checked without importing)."""
    for extra in NEEDS.get(path, ()):
        for module in EXTRAS[extra]:
            if importlib.util.find_spec(module) is None:
                raise missing_extra(extra, module)
