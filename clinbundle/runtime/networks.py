"""MONAI networks by name, and the per-family facts the contract needs.

DynUNet needs spatial sizes divisible by the product of its strides (8 for the defaults here);
SegResNet by 2**(len(blocks_down)-1); UNet by the product of its strides.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from monai.networks.nets import DynUNet, SegResNet, UNet

from clinbundle.runtime.contract import NetworkSpec
from clinbundle.runtime.errors import ConfigError

FAMILIES = {"dynunet": "DynUNet", "segresnet": "SegResNet", "unet": "UNet"}


def network_spec(
    name: str, in_channels: int, num_classes: int, filters: list[int] | None = None
) -> NetworkSpec:
    """Turn a config name and width into the kwargs of the MONAI class (stored in the contract)."""
    family = FAMILIES.get(name.lower())
    if family is None:
        raise ConfigError(f"unknown model '{name}'; choose one of {sorted(FAMILIES)}")
    filters = list(filters or [16, 32, 64, 128])
    if len(filters) < 2:
        raise ConfigError("model.filters needs at least two levels, e.g. [8, 16, 32]")
    n = len(filters)
    if family == "DynUNet":
        kwargs: dict[str, Any] = dict(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=num_classes,
            kernel_size=[3] * n,
            strides=[1] + [2] * (n - 1),
            upsample_kernel_size=[2] * (n - 1),
            filters=filters,
            norm_name="instance",
            res_block=True,
        )
    elif family == "SegResNet":
        kwargs = dict(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=num_classes,
            init_filters=filters[0],
            blocks_down=[1] + [2] * (n - 1),
            blocks_up=[1] * (n - 1),
        )
    else:
        kwargs = dict(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=num_classes,
            channels=filters,
            strides=[2] * (n - 1),
            num_res_units=1,
            norm="instance",
        )
    return NetworkSpec(family=family, kwargs=kwargs)


def spatial_divisor(spec: NetworkSpec) -> int:
    """The number every spatial size must be a multiple of for this network."""
    k = spec.kwargs
    if spec.family == "DynUNet":
        return math.prod(k["strides"])
    if spec.family == "SegResNet":
        return 2 ** (len(k["blocks_down"]) - 1)
    return math.prod(k["strides"])


def build_network(spec: NetworkSpec) -> torch.nn.Module:
    cls = {"DynUNet": DynUNet, "SegResNet": SegResNet, "UNet": UNet}[spec.family]
    return cls(**spec.kwargs)
