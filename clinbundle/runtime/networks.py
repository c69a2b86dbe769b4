"""MONAI networks by name, and the per-family facts the contract needs.

DynUNet needs spatial sizes divisible by the product of its strides (8 for the defaults here);
SegResNet by 2**(len(blocks_down)-1); UNet by the product of its strides; an ensemble by the
least common multiple of its members'.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from monai.networks.nets import DynUNet, SegResNet, UNet

from clinbundle.runtime.contract import EnsembleSpec, NetworkSpec
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
    if spec.ensemble is not None:
        return math.lcm(*(spatial_divisor(m.network) for m in spec.ensemble.members))
    if spec.family == "DynUNet":
        return math.prod(k["strides"])
    if spec.family == "SegResNet":
        return 2 ** (len(k["blocks_down"]) - 1)
    return math.prod(k["strides"])


def build_network(spec: NetworkSpec) -> torch.nn.Module:
    if spec.ensemble is not None:
        return EnsembleNet(spec.ensemble)
    cls = {"DynUNet": DynUNet, "SegResNet": SegResNet, "UNet": UNet}[spec.family]
    return cls(**spec.kwargs)


class EnsembleNet(torch.nn.Module):
    """K members (and their mirrored passes) as one network: patches -> log of the mean softmax.

    Why one module and not K predictors: softmax(log(mean_k p_k)) is exactly mean_k p_k, so the
    one inference path (`segment`: window, blend, softmax), every runtime and the ONNX export
    take the ensemble unchanged, as one graph, and parity compares it like any model. The mean
    is taken per patch, before MONAI blends the windows; the blended quantity is the ensemble's
    log-probability, as a single model's blended quantity is its logits. MONAI has no module
    that averages softmax outputs (its `MeanEnsemble` averages a list of tensors outside a
    network), hence this one; the log-mean is `logsumexp(log_softmax) - log(n)`, stable in fp16.
    State-dict keys are `members.<i>.<member key>`.
    """

    def __init__(self, spec: EnsembleSpec) -> None:
        super().__init__()
        self.members = torch.nn.ModuleList(build_network(m.network) for m in spec.members)
        dims = [a + 2 for a in spec.mirror_axes]  # spatial axis -> tensor dim of (N, C, D, H, W)
        self.flips = [
            [d for i, d in enumerate(dims) if mask >> i & 1] for mask in range(2 ** len(dims))
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for member in self.members:
            for flip in self.flips:
                y = member(torch.flip(x, flip) if flip else x)
                y = torch.log_softmax(y.float(), dim=1)
                outs.append(torch.flip(y, flip) if flip else y)
        return torch.logsumexp(torch.stack(outs), dim=0) - math.log(len(outs))
