"""PyTorch network -> ONNX graph with dynamic batch and spatial axes.

The TorchScript-based exporter (`dynamo=False`) is the default: on this project's networks it
exports DynUNet in ~3 s where the dynamo exporter takes ~40 s, with the same outputs (both
within 2e-5 of PyTorch); `exporter="dynamo"` selects the other one. fp16 uses ONNX Runtime's
own converter (`onnxruntime.transformers.float16`) with float32 inputs and outputs kept, so the
graph's interface, and the shared sliding-window path around it, stay the same.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Literal

import onnx
import torch

from clinbundle.runtime.bundle_reader import CONTRACT_KEY
from clinbundle.runtime.contract import InferenceContract

log = logging.getLogger("clinbundle.export")

OPSET = 17
INPUT, OUTPUT = "image", "logits"
Exporter = Literal["torchscript", "dynamo"]


def _staged_mean(g, t, axes: list[int]):
    """Mean over `axes` one axis at a time: short sums, as accurate as PyTorch's reduction.

    ONNX Runtime's InstanceNormalization kernel, and a single ReduceMean over a whole patch, sum
    ~10^5 float32 values in one run; when a channel's mean is large against its spread (patches
    that are mostly MONAI's zero padding) the variance loses digits. On a trained DynUNet the
    logits were 2.5e-4 from a float64 reference where PyTorch's fp32 was 9e-6, which broke the
    1e-4 parity on volumes smaller than the roi; with staged means ONNX Runtime is at 1e-5.

    The stages alternate ReduceMean and ReduceSum of the values divided by the axis size (the
    same mean): OpenVINO's ReduceMerge folds a chain of ReduceMeans back into one reduction over
    the whole patch, which its CPU plugin sums in one fp32 run per channel (the same loss again:
    logits 6.3e-4 from PyTorch on the tiny test model's zero-padded patch, probabilities 1.5e-4
    on its parity suite and 7.8e-4 on the quickstart champion's). It merges only reductions of
    one kind that feed each other directly; with the kinds alternating and a Div between them
    it keeps every stage (logits 5e-6, as ONNX Runtime). Dividing before the sum, not after,
    keeps an fp16 graph's sums in range; only every other stage pays the Shape/Cast/Div nodes.
    """
    for stage, axis in enumerate(reversed(axes)):
        if stage % 2 == 0:
            t = g.op("ReduceMean", t, axes_i=[axis], keepdims_i=1)
            continue
        size = g.op("Shape", t, start_i=axis, end_i=axis + 1)  # dynamic: any patch shape
        t = g.op("Div", t, g.op("Cast", size, to_i=onnx.TensorProto.FLOAT))
        t = g.op("ReduceSum", t, g.op("Constant", value_t=torch.tensor([axis])), keepdims_i=1)
    return t


def _normalise(g, x, axes: list[int], eps: float):
    centred = g.op("Sub", x, _staged_mean(g, x, axes))
    var = _staged_mean(g, g.op("Mul", centred, centred), axes)
    eps_c = g.op("Constant", value_t=torch.tensor(eps, dtype=torch.float32))
    return g.op("Div", centred, g.op("Sqrt", g.op("Add", var, eps_c)))


def _affine(g, y, weight, bias, rank: int):
    from torch.onnx import symbolic_helper as sh

    shape = g.op("Constant", value_t=torch.tensor([1, -1] + [1] * (rank - 2), dtype=torch.int64))
    if not sh._is_none(weight):
        y = g.op("Mul", y, g.op("Reshape", weight, shape))
    if not sh._is_none(bias):
        y = g.op("Add", y, g.op("Reshape", bias, shape))
    return y


def _instance_norm(g, x, weight, bias, _rm, _rv, _use_stats, _momentum, eps, _cudnn):
    from torch.onnx import symbolic_helper as sh

    rank = sh._get_tensor_rank(x) or 5
    y = _normalise(g, x, list(range(2, rank)), sh._parse_arg(eps, "f"))
    return _affine(g, y, weight, bias, rank)


def _group_norm(g, x, num_groups, weight, bias, eps, _cudnn):
    """(N, C, *S) -> (N, G, C/G, *S), normalise over all but the first two axes, back."""
    from torch.onnx import symbolic_helper as sh

    rank = sh._get_tensor_rank(x) or 5
    groups = sh._parse_arg(num_groups, "i")
    shape = g.op("Shape", x)

    def part(lo: int, hi: int):
        return g.op(
            "Slice",
            shape,
            g.op("Constant", value_t=torch.tensor([lo])),
            g.op("Constant", value_t=torch.tensor([hi])),
        )

    grouped = g.op(
        "Concat",
        part(0, 1),
        g.op("Constant", value_t=torch.tensor([groups, -1])),
        part(2, rank),
        axis_i=0,
    )
    y = _normalise(
        g, g.op("Reshape", x, grouped), list(range(2, rank + 1)), sh._parse_arg(eps, "f")
    )
    return _affine(g, g.op("Reshape", y, shape), weight, bias, rank)


def export_onnx(
    network: torch.nn.Module,
    contract: InferenceContract,
    path: Path,
    precision: Literal["fp32", "fp16"] = "fp32",
    exporter: Exporter = "torchscript",
    metadata: dict[str, str] | None = None,
) -> Path:
    """Export, check the graph (onnx.checker, full) and embed contract + provenance."""
    network = network.cpu().eval()
    example = torch.zeros(1, contract.in_channels, *contract.roi_size)
    axes = {0: "batch", 2: "depth", 3: "height", 4: "width"}
    log.info(
        "exporting %s to ONNX (opset %d, %s exporter, %s)",
        contract.model_family,
        OPSET,
        exporter,
        precision,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        if exporter == "dynamo":
            dim = torch.export.Dim.DYNAMIC
            program = torch.onnx.export(
                network,
                (example,),
                dynamo=True,
                input_names=[INPUT],
                output_names=[OUTPUT],
                dynamic_shapes=({0: dim, 2: dim, 3: dim, 4: dim},),
                opset_version=max(OPSET, 18),
            )
            program.save(str(path))
        else:
            torch.onnx.register_custom_op_symbolic("aten::instance_norm", _instance_norm, OPSET)
            torch.onnx.register_custom_op_symbolic("aten::group_norm", _group_norm, OPSET)
            torch.onnx.export(
                network,
                example,
                str(path),
                dynamo=False,
                opset_version=OPSET,
                input_names=[INPUT],
                output_names=[OUTPUT],
                dynamic_axes={INPUT: axes, OUTPUT: axes},
            )
    model = onnx.load(str(path))
    if precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16
        from onnxruntime.transformers.onnx_model import OnnxModel

        model = convert_float_to_float16(model, keep_io_types=True)
        OnnxModel(model).topological_sort()  # the converter appends its input casts last
    props = {
        CONTRACT_KEY: contract.to_json(),
        "precision": precision,
        "exporter": exporter,
        **(metadata or {}),
    }
    onnx.helper.set_model_props(model, {k: str(v) for k, v in props.items()})
    model.producer_name, model.doc_string = "clinbundle", f"{contract.model_family} segmentation"
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path
