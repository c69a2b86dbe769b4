"""The bundle's README.md: a model card a stranger can read without clinbundle.

Sections follow the Model Zoo's docs/README and "Model Cards for Model Reporting" (Mitchell et
al. 2019): intended use, inputs and outputs, training data, metrics with confidence intervals,
parity, limitations, provenance.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from clinbundle.runtime.runtime_choice import SW_BATCH_ENV

if TYPE_CHECKING:
    from clinbundle.packaging.model_source import ResolvedModel
    from clinbundle.packaging.parity import ParityReport


def _shown(name: str, value: float) -> str:
    """The value as the metric registry formats it (unit included); unknown names plainly."""
    from clinbundle.metric_definitions import known

    return known(name).format(value) if known(name) else f"{value:.4f}"


def _metrics_rows(model: ResolvedModel) -> list[str]:
    rows = []
    best = model.metadata.get("best", {})
    for name, value in sorted(best.items()):
        rows.append(f"| validation (best epoch) | {name} | {_shown(name, value)} | - |")
    tags = model.version_tags
    if "promotion_mean" in tags:
        lo, hi = tags.get("promotion_ci95", "nan,nan").split(",")
        metric = tags.get("promotion_metric", "?")
        rows.append(
            f"| held-out ({tags.get('promotion_eval_set', '?').split(' (')[0]}) | "
            f"{metric} | {_shown(metric, float(tags['promotion_mean']))} | "
            f"{float(lo):.4f} .. {float(hi):.4f} (BCa bootstrap) |"
        )
    return rows or ["| - | no metrics recorded | - | - |"]


def ensemble_section(contract) -> str:
    """Members and cost of an ensemble (clinbundle ensemble); empty for a single network."""
    spec = contract.network.ensemble
    if spec is None:
        return ""
    rows = [
        f"| {i} | {m.network.family} | `{m.model_uri}` | `{m.run_id}` | `{m.checkpoint}` | "
        f"`{m.weights_sha256[:16]}` |"
        for i, m in enumerate(spec.members)
    ]
    mirror = (
        f"mirrored along axes {spec.mirror_axes} (every combination: "
        f"{2 ** len(spec.mirror_axes)} passes per member)"
        if spec.mirror_axes
        else "no test-time mirroring"
    )
    return f"""## Ensemble
The mean softmax of {len(spec.members)} members, {mirror}, taken per patch inside the one
graph (it returns the log of that mean; softmax gives the mean back).
**Cost: {spec.forward_passes} member forward passes per patch**, about {spec.forward_passes}x
the time and memory traffic of one member (same windows, same blending).

| member | network | model | run | checkpoint | weights sha256 (first 16) |
|---|---|---|---|---|---|
{chr(10).join(rows)}

"""


def _normalisation_text(norm) -> str:
    if norm.kind == "zscore":
        return "per-volume z-score (mean 0, sd 1) inside the model"
    if norm.kind == "window":
        return f"clip to [{norm.a_min}, {norm.a_max}] and scale to [0, 1] inside the model"
    return (
        f"nnU-Net CT: clip to [{norm.a_min:.4g}, {norm.a_max:.4g}] (training foreground 0.5/99.5 "
        f"percentiles), then (x - {norm.mean:.4g}) / {norm.std:.4g}, inside the model"
    )


def runtimes_section(manifest: dict) -> str:
    """The measured runtime table (manifest `runtimes`), or a line saying only ORT ships."""
    table = manifest.get("runtimes")
    if not table:
        return "Only ONNX Runtime ships in this bundle (runtime candidates were not measured).\n"
    rows = []
    for name, e in table["candidates"].items():
        p = e.get("parity", {})
        mx = p.get("max_abs")
        dice = min(p["min_dice"].values()) if p.get("min_dice") else float("nan")
        verdict = (
            "pass"
            if e.get("passed")
            else "FAIL" + (f" ({e['error'][:60]})" if e.get("error") else "")
        )
        rows.append(
            f"| {name}{' (default)' if name == table['default'] else ''} | {e['precision']} | "
            f"{e.get('seconds', float('nan')):.2f} | {e.get('gflops', float('nan')):.1f} | "
            f"{e.get('sgemm_pct', float('nan')):.0f}% | {e.get('peak_rss_mb', float('nan')):.0f} | "
            f"{'n/a' if mx is None else f'{mx:.1e}'} | {p.get('flip_fraction', float('nan')):.1e} | "
            f"{dice:.4f} | {verdict} |"
        )
    return _runtime_table(table, rows) + _sw_batch_line(table.get("sw_batch"))


def _sw_batch_line(sw: dict | None) -> str:
    if not sw:
        return ""
    times = ", ".join(f"{b}: {s:.2f} s" for b, s in sw["seconds"].items())
    return (
        f"\nSliding-window batch: **{sw['chosen']}** for {sw['runtime']} (measured: {times}; the "
        f"contract's {sw['contract']}); `{SW_BATCH_ENV}` overrides it.\n"
    )


def _runtime_table(table: dict, rows: list[str]) -> str:
    return f"""Each runtime ran the parity suite; those that passed were timed end to end on a
{"x".join(map(str, table["volume_shape"]))} volume ({table["gflop_per_volume"]} GFLOP of network work), {table["threads"]} threads,
interleaved with sgemm ({table["sgemm_gflops"]} GFLOP/s, same run; the packaging machine may
be shared, so % of sgemm is the figure that travels). Default: **{table["default"]}**
({table["chosen_by"]}). Override with `CLINBUNDLE_RUNTIME=NAME` (`runtime:` in a MAP's
app.yaml); a runtime that failed parity is refused.

| runtime | precision | seconds | GFLOP/s | % of sgemm | peak RSS MB | max abs | flipped | min Dice | parity |
|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}
"""


def precision_text(precision: str) -> str:
    """A bf16 bundle's graph is fp32: bf16 is what its default runtime may compute in."""
    if precision == "bf16":
        return (
            "fp32; a bf16 bundle: its default is the fastest runtime, bf16 under the Dice rule "
            "included (see Runtimes)"
        )
    return precision


def render_model_card(
    model: ResolvedModel, report: ParityReport, manifest: dict, files: dict[str, str]
) -> str:
    c = model.contract
    p = model.run_params
    labels = ", ".join(f"{k} = {v}" for k, v in sorted(c.labels.items(), key=lambda kv: int(kv[0])))
    norm = c.normalization
    norm_text = _normalisation_text(norm)
    geo = c.geometry
    geometry_text = (
        f"resampled to {' x '.join(f'{s:g}' for s in geo.spacing)} mm"
        if geo.spacing
        else "kept on its own grid (trained natively"
        + (f" on {geo.spacing_range[0]}..{geo.spacing_range[1]} mm" if geo.spacing_range else "")
        + ")"
    ) + (f", reoriented to {geo.orientation}" if geo.orientation else "")
    o = report.overall()
    parity_rows = [
        f"| {r.name} | {'x'.join(map(str, r.shape))} | "
        f"{'n/a' if r.max_abs is None else f'{r.max_abs:.1e}'} | {r.flip_fraction:.1e} | "
        f"{min(r.dice.values()) if r.dice else float('nan'):.4f} | "
        f"{'pass' if r.passed else 'FAIL'} |"
        for r in report.cases
    ]
    title = f"{model.name or 'model'} v{model.version or '?'}"
    return f"""# {title}: {c.model_family} 3D segmentation ({manifest["format"]} bundle)

Made by `clinbundle package {manifest["format"]}` from `{model.uri}` (run `{model.run_id}`).
Every file is listed with its sha256 in `manifest.json`; `clinbundle verify .` checks them and
re-runs this model on `sample/` against the stored PyTorch output.

## Intended use
Research and evaluation of 3D segmentation ({labels}) on volumes like its training data.
It is not a medical device and has not been validated for clinical decisions; validate it on
data from the site where it will be used before relying on it.

## Inputs and outputs
| | |
|---|---|
| input | float32 array (N, {c.in_channels}, D, H, W) of raw intensities; any D, H, W >= 1; with its affine (NIfTI header, DICOM geometry) |
| modality | {c.modality or "any"} |
| geometry | each input is {geometry_text}; the answer is mapped back to the input's grid (bilinear probabilities, argmax there) |
| normalisation | {norm_text} |
| output | float32 softmax probabilities (N, {c.num_classes}, D, H, W) on the input's grid; labels = argmax over axis 1{", then the largest component of labels " + str(c.postprocessing.largest_component) if c.postprocessing.largest_component else ""} |
| classes | {labels} |
| sliding window | roi {list(c.roi_size)}, overlap {c.overlap}, {c.blend_mode} blending, batch {c.sw_batch_size} (MONAI `sliding_window_inference`) |
| graph | `model.onnx` maps one batch of normalised patches to logits; dynamic batch and spatial axes (multiples of {c.spatial_divisor}); precision {precision_text(manifest["precision"])} |

{ensemble_section(c)}The whole contract is `contract.json` (also in `model.onnx` metadata_props). Run it with
clinbundle (`clinbundle.runtime.bundle_reader.load_bundle`), or with any ONNX Runtime by
normalising, windowing and blending as the contract says.

## Training data
- data set: `{p.get("data_root", "?")}`, sha256 `{model.metadata.get("dataset_sha256", "?")}`
- volumes: {p.get("data_num_train", "?")} training, {p.get("data_num_val", "?")} validation (fold {p.get("data_fold", "?")} of {p.get("data_folds", "?")}), {p.get("data_num_test", "?")} held-out test
- loss `{p.get("loss_name", "?")}`, {p.get("train_epochs", "?")} epochs, lr {p.get("train_lr", "?")}, seed {p.get("train_seed", "?")}

## Metrics
| set | metric | value | 95% CI |
|---|---|---|---|
{chr(10).join(_metrics_rows(model))}

## Parity with PyTorch
{"PASS" if report.passed else "FAIL"}: {report.summary()}.
Reference: {report.reference}. Candidate: {report.candidate}.
Tolerances: max abs {report.tolerances.max_abs}, flipped fraction {report.tolerances.max_flip_fraction}, Dice per label {report.tolerances.min_dice} (None = not gated).
Overall max abs difference {o["max_abs"] if o["max_abs"] is None else f"{o['max_abs']:.2e}"}, flipped voxels {o["flips"]} of {o["voxels"]}.

| case | shape | max abs | flipped | min Dice | result |
|---|---|---|---|---|---|
{chr(10).join(parity_rows)}

Full report: `parity/parity_report.md` and `.json`.

![Differences per case](parity/parity_diff_histogram.png)
![Flipped labels per case](parity/parity_flip_map.png)

## Runtimes
{runtimes_section(manifest)}
## Limitations
- Volumes without geometry (a bare array, a .npy upload) are taken to be on the training grid
  ({geometry_text}); give NIfTI or DICOM so the spacing and orientation are known.
- Resampling a volume much coarser than the training grid (e.g. 5 mm slices) cannot restore
  what the scanner did not record; the parity suite's anisotropic case shows the effect.
- Single input channel ({c.in_channels}); intensities are normalised per volume, so crops of a
  volume are not normalised like the whole volume.
- Near-tie voxels can flip label between runtimes; the flipped fraction above bounds it.
- Metrics come from {p.get("data_num_val", "?")} validation and {p.get("data_num_test", "?")} held-out volumes of
  one data set; the CIs say how uncertain they are, not how the model does elsewhere.

## Provenance
- model `{model.uri}` = {model.label}, run `{model.run_id}`, training commit `{model.run_tags.get("git_commit", "unknown")}`
- packaged by clinbundle at commit `{manifest["provenance"]["packaging_commit"]}` on {manifest["created"]}
- libraries: {", ".join(f"{k} {v}" for k, v in manifest["libraries"].items())}
- files: {", ".join(f"`{f}`" for f in sorted(files))}
"""
