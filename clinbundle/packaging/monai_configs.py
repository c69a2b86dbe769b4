"""The MONAI bundle's configs, written from the inference contract (never re-typed).

`inference.json` is the contract as MONAI transforms, in the Model Zoo's shape (spleen_ct_
segmentation): load -> Orientationd -> the contract's grid -> intensity -> SlidingWindowInferer
-> softmax -> Invertd (back to the input's grid) -> argmax (+ largest component) -> SaveImaged.
`metadata.json` declares the network's I/O (`network_data_format`) as the Model Zoo does, and
`metadata_schema.json` is the JSON schema `verify_metadata` checks it against offline.
"""

from __future__ import annotations

import importlib.metadata as md
from typing import Any

from clinbundle.runtime.contract import InferenceContract, Normalization

#: Where the Model Zoo's metadata schema lives; `verify_metadata` downloads it unless the
#: `--filepath` it is given already exists (the bundle ships configs/metadata_schema.json).
ZOO_SCHEMA_URL = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/"
    "0.8.1/meta_schema_20240725.json"
)
SCHEMA_FILE = "configs/metadata_schema.json"
GRID_SCRIPT = "scripts/model_grid.py"


def intensity_transforms(norm: Normalization) -> list[dict]:
    """The contract's normalisation as MONAI transforms (exactly runtime.inference.normalize)."""
    if norm.kind == "zscore":
        return [{"_target_": "NormalizeIntensityd", "keys": "image", "channel_wise": True}]
    if norm.kind == "window":
        return [
            {
                "_target_": "ScaleIntensityRanged",
                "keys": "image",
                "a_min": norm.a_min,
                "a_max": norm.a_max,
                "b_min": 0.0,
                "b_max": 1.0,
                "clip": True,
            }
        ]
    # ct: clip to the training foreground's percentiles, then its mean and sd
    return [
        {"_target_": "ThresholdIntensityd", "keys": "image", "threshold": norm.a_min,
         "above": True, "cval": norm.a_min},
        {"_target_": "ThresholdIntensityd", "keys": "image", "threshold": norm.a_max,
         "above": False, "cval": norm.a_max},
        {"_target_": "NormalizeIntensityd", "keys": "image", "subtrahend": norm.mean,
         "divisor": norm.std},
    ]  # fmt: skip


def _geometry(contract: InferenceContract) -> tuple[dict, list[str], list[str]]:
    """Config items for reorientation and the contract's grid, the preprocessing references to
    them, and the invertible ones (what Invertd undoes, in the order they ran)."""
    geo, items, pre, inverted = contract.geometry, {}, [], []
    if geo.orientation:
        items["orientation"] = {
            "_target_": "Orientationd",
            "keys": "image",
            "axcodes": geo.orientation,
        }
        pre.append("@orientation")
        inverted.append("@orientation")
    if geo.spacing:
        items["model_spacing"] = list(geo.spacing)
        items["model_grid"] = {
            "_target_": "Lambdad",
            "keys": "image",
            "overwrite": "grid",
            "func": {
                "_target_": "scripts.model_grid.grid_like",
                "_mode_": "callable",
                "spacing": "@model_spacing",
            },
        }
        items["resampling"] = {
            "_target_": "ResampleToMatchd",
            "keys": "image",
            "key_dst": "grid",
            "mode": "bilinear",
            "padding_mode": "border",
            "dtype": "$torch.float32",
        }
        pre += ["@model_grid", "@resampling", {"_target_": "DeleteItemsd", "keys": "grid"}]
        inverted.append("@resampling")
    return items, pre, inverted


def inference_config(contract: InferenceContract) -> dict[str, Any]:
    """configs/inference.json: `python -m monai.bundle run` segments every NIfTI file of
    `dataset_dir` into `output_dir` (`<name>_seg.nii.gz`, uint8 labels on the input's grid)."""
    geometry_items, geometry_pre, inverted = _geometry(contract)
    return {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "ckpt_path": "$@bundle_root + '/models/model.pt'",
        "dataset_dir": "$@bundle_root + '/input'",
        "output_dir": "$@bundle_root + '/eval'",
        "datalist": "$sorted(glob.glob(os.path.join(@dataset_dir, '*.nii.gz')) + "
        "glob.glob(os.path.join(@dataset_dir, '*.nii')))",
        "network_def": {
            "_target_": f"monai.networks.nets.{contract.network.family}",
            **contract.network.kwargs,
        },
        "network": "$@network_def.to(@device)",
        **geometry_items,
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {
                    "_target_": "LoadImaged",
                    "keys": "image",
                    "reader": "NibabelReader",
                    "image_only": True,
                    "dtype": "$np.float32",
                },
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                *geometry_pre,
                *intensity_transforms(contract.normalization),
            ],
        },
        "dataset": {
            "_target_": "Dataset",
            "data": "$[{'image': i} for i in @datalist]",
            "transform": "@preprocessing",
        },
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            "batch_size": 1,
            "shuffle": False,
            "num_workers": 0,
        },
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": list(contract.roi_size),
            "sw_batch_size": contract.sw_batch_size,
            "overlap": contract.overlap,
            "mode": contract.blend_mode,
        },
        "inverse_geometry": {"_target_": "Compose", "transforms": inverted},
        "postprocessing": {"_target_": "Compose", "transforms": postprocessing(contract)},
        "handlers": [
            {
                "_target_": "CheckpointLoader",
                "load_path": "@ckpt_path",
                "load_dict": {"model": "@network"},
                "map_location": "@device",
            }
        ],
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@dataloader",
            "network": "@network",
            "inferer": "@inferer",
            "postprocessing": "@postprocessing",
            "val_handlers": "@handlers",
            "amp": False,
        },
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@evaluator.run()"],
    }


def postprocessing(contract: InferenceContract, probabilities: bool = False) -> list[dict]:
    """softmax -> Invertd (back to the input's grid) -> [save probabilities] -> argmax ->
    [largest component] -> save labels: one flat list, as Model Zoo bundles have it."""
    steps: list[dict] = [
        {"_target_": "Activationsd", "keys": "pred", "softmax": True},
        {"_target_": "Invertd", "keys": "pred", "transform": "@inverse_geometry",
         "orig_keys": "image", "nearest_interp": False, "to_tensor": True},
    ]  # fmt: skip
    if probabilities:
        steps.append(_saver("prob", "$np.float32"))
    steps.append({"_target_": "AsDiscreted", "keys": "pred", "argmax": True})
    largest = contract.postprocessing.largest_component
    if largest:
        steps.append(
            {
                "_target_": "KeepLargestConnectedComponentd",
                "keys": "pred",
                "applied_labels": largest,
                "is_onehot": False,
            }
        )
    return [*steps, _saver("seg", "$np.uint8")]


def probabilities_overlay(contract: InferenceContract) -> dict[str, Any]:
    """configs/inference_probabilities.json, merged after inference.json: the same
    postprocessing, which also saves the softmax probabilities on the input's grid
    (`<name>_prob.nii.gz`, float32, classes last), the contract's output; the parity check
    compares them with PyTorch's."""
    return {
        "postprocessing": {
            "_target_": "Compose",
            "transforms": postprocessing(contract, probabilities=True),
        }
    }


def _saver(postfix: str, dtype: str) -> dict[str, Any]:
    return {
        "_target_": "SaveImaged",
        "keys": "pred",
        "output_dir": "@output_dir",
        "output_postfix": postfix,
        "output_ext": ".nii.gz",
        "output_dtype": dtype,
        "resample": False,
        "separate_folder": False,
        "squeeze_end_dims": True,
        "print_log": False,
    }


def _value_range(norm: Normalization) -> list[float]:
    """What the network sees after normalisation; z-score has no fixed range (empty)."""
    if norm.kind == "window":
        return [0.0, 1.0]
    if norm.kind == "ct":
        lo, hi = norm.a_min, norm.a_max
        return [(lo - norm.mean) / norm.std, (hi - norm.mean) / norm.std]  # type: ignore[operator]
    return []


def _version(pkg: str) -> str:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return "not installed"


def metadata(contract: InferenceContract, model, card: dict[str, Any]) -> dict[str, Any]:
    """configs/metadata.json in the Model Zoo's shape; `card` adds what the registry knows
    (version, changelog, description, metrics)."""
    channels = {k: v for k, v in sorted(contract.labels.items(), key=lambda kv: int(kv[0]))}
    modality = contract.modality or "any"
    norm = contract.normalization
    return {
        "schema": ZOO_SCHEMA_URL,
        **card,
        "monai_version": _version("monai"),
        "pytorch_version": _version("torch").split("+")[0],
        "numpy_version": _version("numpy"),
        "required_packages_version": {
            "nibabel": _version("nibabel"),
            "pytorch-ignite": _version("pytorch-ignite"),
            "fire": _version("fire"),
        },
        "name": str(model.name or "segmentation"),
        "task": f"3D segmentation of {', '.join(list(channels.values())[1:])}",
        "authors": "clinbundle (trained and packaged by its user)",
        "copyright": "Copyright (c) the owner of the training data and run",
        "data_type": "nibabel",
        "image_classes": f"{contract.in_channels} channel(s) of raw {modality} intensities",
        "label_classes": ", ".join(f"{k}: {v}" for k, v in channels.items()),
        "pred_classes": f"{contract.num_classes} channels of logits (softmax in the config)",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield" if modality.upper() == "CT" else "magnitude",
                    "modality": modality,
                    "num_channels": contract.in_channels,
                    "spatial_shape": list(contract.roi_size),
                    "dtype": "float32",
                    "value_range": _value_range(norm),
                    "is_patch_data": True,
                    "channel_def": {str(i): "image" for i in range(contract.in_channels)},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": contract.num_classes,
                    "spatial_shape": list(contract.roi_size),
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": True,
                    "channel_def": channels,
                }
            },
        },
    }


def _io_schema(required: list[str]) -> dict[str, Any]:
    number_list = {"type": "array", "items": {"type": "number"}}
    return {
        "type": "object",
        "required": required,
        "properties": {
            "type": {"type": "string"},
            "format": {"type": "string"},
            "modality": {"type": "string"},
            "num_channels": {"type": "integer", "minimum": 1},
            "spatial_shape": {
                "type": "array",
                "items": {"type": ["integer", "string"]},
                "minItems": 1,
            },
            "dtype": {"type": "string"},
            "value_range": number_list,
            "is_patch_data": {"type": "boolean"},
            "channel_def": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    }


def metadata_schema() -> dict[str, Any]:
    """The JSON schema `verify_metadata` checks metadata.json against offline.

    The Model Zoo's own schema (ZOO_SCHEMA_URL) cannot be fetched without a network; this one
    requires what that schema requires of a bundle's metadata (versions, changelog, task,
    description, authors, copyright, network_data_format with typed inputs and outputs), and
    `verify_metadata` reads it instead of downloading when given `--filepath` to it.
    """
    io = ["type", "format", "num_channels", "spatial_shape", "dtype", "value_range"]
    strings = ["task", "description", "authors", "copyright"]
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "MONAI bundle metadata (clinbundle's offline schema, Model Zoo fields)",
        "type": "object",
        "required": [
            "version",
            "changelog",
            "monai_version",
            "pytorch_version",
            "numpy_version",
            "required_packages_version",
            *strings,
            "network_data_format",
        ],
        "properties": {
            "version": {"type": "string", "pattern": r"^\d+\.\d+\.\d+$"},
            "changelog": {"type": "object", "additionalProperties": {"type": "string"}},
            "monai_version": {"type": "string"},
            "pytorch_version": {"type": "string"},
            "numpy_version": {"type": "string"},
            "required_packages_version": {
                "type": "object",
                "additionalProperties": {"type": "string"},
            },
            **{k: {"type": "string", "minLength": 1} for k in strings},
            "network_data_format": {
                "type": "object",
                "required": ["inputs", "outputs"],
                "properties": {
                    "inputs": {
                        "type": "object",
                        "minProperties": 1,
                        "additionalProperties": _io_schema([*io, "channel_def"]),
                    },
                    "outputs": {
                        "type": "object",
                        "minProperties": 1,
                        "additionalProperties": _io_schema([*io, "channel_def"]),
                    },
                },
            },
        },
    }
