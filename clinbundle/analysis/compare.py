"""`clinbundle compare`: a grid's losses x folds x checkpoints side by side, on evidence.

Reads the evaluation runs `clinbundle evaluate` logged (per-case held-out scores), then:
- a table: loss x fold x checkpoint, every metric's mean and BCa 95% CI;
- paired bootstrap tests between losses: the same held-out volumes of the same folds, each
  metric scored on the checkpoint selected for that metric (best_<metric>);
- on the registered versions: `checkpoint_metric`, held-out best values (`heldout_<metric>`),
  `is_best_for_loss`, `is_best_overall`, `ensemble_candidate` (the folds of the best loss), and
  the per-loss aliases `best-<loss>` (`best-dice-ce`, `best-cbdice-cldice`);
- a Markdown report with PNG plots (per-metric box plots, training curves), logged as artifacts
  of the grid's parent run (`compare/`).
"""

from __future__ import annotations

import itertools
import json
import logging
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import mlflow
from matplotlib.figure import Figure  # no pyplot: no display backend, no global state
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from clinbundle import metric_definitions as M
from clinbundle.analysis.evaluate import EVAL_TAG, UPSTREAM_TAG, training_runs
from clinbundle.analysis.stats import Interval, mean_ci, paired_difference_ci
from clinbundle.runtime.errors import ModelResolutionError

log = logging.getLogger("clinbundle.compare")


@dataclass
class Cell:
    """One checkpoint of one training run, scored on the held-out cases."""

    loss: str
    fold: str
    checkpoint: str
    run_id: str
    cases: list[str]
    scores: dict[str, list[float]]

    def interval(self, metric: str) -> Interval:
        return mean_ci(self.scores[metric])


@dataclass
class PairedTest:
    metric: str
    a: str
    b: str
    difference: Interval  # mean(sign * (a - b)): positive = a better

    @property
    def verdict(self) -> str:
        d = self.difference
        if not d.defined:
            return f"undecided ({d.note})"
        if d.low > 0:
            return f"{self.a} better"
        if d.high < 0:
            return f"{self.b} better"
        return "no evidence of a difference"


@dataclass
class Comparison:
    grid_run_id: str
    metric: str
    cells: list[Cell]
    tests: list[PairedTest]
    versions: dict[str, dict[str, str]]  # version -> tags set
    aliases: dict[str, str]
    report: Path


def collect(grid_run_id: str) -> list[Cell]:
    """The newest evaluation of each (training run, checkpoint) of the grid."""
    client = MlflowClient()
    cells = []
    for run in training_runs(grid_run_id):
        evals = client.search_runs(
            [run.info.experiment_id],
            filter_string=f"tags.{UPSTREAM_TAG} = '{run.info.run_id}'",
            order_by=["attributes.start_time DESC"],
        )
        seen: set[str] = set()
        loss, fold = run.data.tags.get("loss_type", "?"), run.data.tags.get("fold_id", "?")
        for ev in evals:  # newest first: a later evaluation (e.g. recomputed) wins
            tags = ev.data.tags
            listed = tags.get("checkpoints") or tags.get("checkpoint", "")
            names = [n for n in listed.split(",") if n and n not in seen]
            if not names or not tags.get(EVAL_TAG):
                continue
            seen.update(names)
            summary = mlflow.artifacts.load_dict(f"runs:/{ev.info.run_id}/evaluation.json")
            for which in names:
                cells.append(
                    Cell(loss, fold, which, run.info.run_id, summary["cases"], summary["scores"])
                )
    if not cells:
        raise ModelResolutionError(
            f"no evaluations of {grid_run_id}'s runs; run `clinbundle evaluate {grid_run_id}` first"
        )
    return cells


def paired_tests(cells: list[Cell]) -> list[PairedTest]:
    """Loss vs loss per metric, on best_<metric> checkpoints, pairing (fold, case)."""
    tests = []
    losses = sorted({c.loss for c in cells})
    metrics = sorted({m for c in cells for m in c.scores})
    for metric in metrics:
        by_loss: dict[str, dict[tuple[str, str], float]] = defaultdict(dict)
        for c in cells:
            if c.checkpoint == f"best_{metric}" and metric in c.scores:
                for case, v in zip(c.cases, c.scores[metric], strict=True):
                    by_loss[c.loss][c.fold, case] = v
        for a, b in itertools.combinations(losses, 2):
            keys = sorted(set(by_loss[a]) & set(by_loss[b]))
            if len(keys) < 2:
                continue
            xa, xb = [by_loss[a][k] for k in keys], [by_loss[b][k] for k in keys]
            sign = M.get(metric).sign()
            tests.append(PairedTest(metric, a, b, paired_difference_ci(xa, xb, sign)))
    return tests


def tag_versions(cells: list[Cell], metric: str) -> tuple[dict[str, dict[str, str]], dict]:
    """Tags and per-loss aliases on the versions the grid's runs registered."""
    client = MlflowClient()
    m = M.get(metric)
    entries = []  # (name, version, loss, held-out mean on `metric`, tags)
    for run_id in sorted({c.run_id for c in cells}):
        for mv in client.search_model_versions(f"run_id = '{run_id}'"):
            sel = mv.tags.get("selection_metric", "")
            own = [c for c in cells if c.run_id == run_id and c.checkpoint == f"best_{sel}"]
            if not own or metric not in own[0].scores:
                continue
            cell = own[0]
            tags = {"checkpoint_metric": sel}
            for k in cell.scores:
                ci = cell.interval(k)
                tags[f"heldout_{k}"] = f"{ci.mean:.6g}"
                tags[f"heldout_{k}_ci95"] = f"{ci.low:.6g},{ci.high:.6g}"
            entries.append((mv.name, str(mv.version), cell.loss, cell.interval(metric).mean, tags))
    if not entries:
        raise ModelResolutionError("the grid's runs registered no model versions to tag")
    best = max(entries, key=lambda e: m.sign() * e[3])
    out, aliases = {}, {}
    for loss in sorted({e[2] for e in entries}):
        mine = [e for e in entries if e[2] == loss]
        top = max(mine, key=lambda e: m.sign() * e[3])
        alias = f"best-{loss.replace('_', '-')}"
        client.set_registered_model_alias(top[0], alias, top[1])
        aliases[alias] = f"{top[0]}/{top[1]}"
        for e in mine:
            tags = e[4] | {
                "compare_metric": metric,
                "is_best_for_loss": str(e is top).lower(),
                "is_best_overall": str(e is best).lower(),
                "ensemble_candidate": str(loss == best[2]).lower(),
            }
            for k, v in tags.items():
                client.set_model_version_tag(e[0], e[1], k, v)
            out[f"{e[0]}/{e[1]}"] = tags
    return out, aliases


def _boxplot(cells: list[Cell], metric: str, out: Path) -> Path:
    groups: dict[str, list[float]] = defaultdict(list)
    for c in cells:
        if c.checkpoint == f"best_{metric}" and metric in c.scores:
            groups[c.loss] += c.scores[metric]
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    ax.boxplot(list(groups.values()), tick_labels=list(groups))
    d = M.get(metric)
    ax.set_title(f"held-out {metric} (best_{metric} checkpoints, all folds)")
    ax.set_ylabel(f"{metric} ({d.unit})" if d.unit else metric)
    fig.tight_layout()
    path = out / f"box_{metric}.png"
    fig.savefig(path, dpi=100)
    return path


def _curves(runs: list[Run], out: Path, metric: str) -> Path:
    client = MlflowClient()
    fig = Figure(figsize=(9, 3.5))
    axes = fig.subplots(1, 2)
    for run in runs:
        label = f"{run.data.tags.get('loss_type')} fold {run.data.tags.get('fold_id')}"
        for ax, key in zip(axes, ("train_loss", metric), strict=True):
            hist = sorted(client.get_metric_history(run.info.run_id, key), key=lambda h: h.step)
            ax.plot([h.step for h in hist], [h.value for h in hist], marker="o", label=label)
            ax.set_title(f"{key} per epoch" if key == "train_loss" else f"validation {key}")
            ax.set_xlabel("epoch")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = out / "training_curves.png"
    fig.savefig(path, dpi=100)
    return path


def _markdown(cmp: Comparison, plots: list[Path]) -> str:
    metrics = [m for m in M.case_metrics() if any(m in c.scores for c in cmp.cells)]
    lines = [
        f"# Grid comparison ({cmp.grid_run_id})",
        "",
        f"Held-out volumes per cell: {len(cmp.cells[0].cases)}; intervals are BCa 95% CIs "
        f"(scipy.stats.bootstrap). Ranking metric: {cmp.metric}.",
        "",
        "## Loss x fold x checkpoint",
        "",
        "| loss | fold | checkpoint | " + " | ".join(metrics) + " |",
        "|---|---|---|" + "---|" * len(metrics),
    ]
    for c in sorted(cmp.cells, key=lambda c: (c.loss, c.fold, c.checkpoint)):
        vals = []
        for m in metrics:
            i = c.interval(m)
            vals.append(f"{i.mean:.3f} [{i.low:.3f}, {i.high:.3f}]")
        lines.append(f"| {c.loss} | {c.fold} | {c.checkpoint} | " + " | ".join(vals) + " |")
    lines += ["", "## Paired bootstrap tests between losses", ""]
    lines += ["| metric | a | b | mean diff (a better > 0) | 95% CI | n | verdict |"]
    lines += ["|---|---|---|---|---|---|---|"]
    for t in cmp.tests:
        d = t.difference
        ci = f"{d.low:.4f} .. {d.high:.4f}"
        lines.append(f"| {t.metric} | {t.a} | {t.b} | {d.mean:+.4f} | {ci} | {d.n} | {t.verdict} |")
    lines += ["", "## Registered versions", ""]
    lines += ["| version | loss best | overall best | ensemble candidate | held-out |"]
    lines += ["|---|---|---|---|---|"]
    for v, tags in sorted(cmp.versions.items()):
        held = tags.get(f"heldout_{cmp.metric}", "")
        lines.append(
            f"| {v} | {tags['is_best_for_loss']} | {tags['is_best_overall']} | "
            f"{tags['ensemble_candidate']} | {cmp.metric} {held} |"
        )
    lines += ["", "Aliases: " + ", ".join(f"`@{a}` -> {v}" for a, v in cmp.aliases.items()), ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def compare_grid(grid_run_id: str, metric: str = "dice") -> Comparison:
    """Compare, tag, alias and report (logged to the grid run's `compare/` artifacts)."""
    M.get(metric)
    cells = collect(grid_run_id)
    tests = paired_tests(cells)
    versions, aliases = tag_versions(cells, metric)
    out = Path(tempfile.mkdtemp(prefix="clinbundle-compare-"))
    metrics = sorted({m for c in cells for m in c.scores})
    plots = [_boxplot(cells, m, out) for m in metrics]
    plots.append(_curves(training_runs(grid_run_id), out, metric))
    cmp = Comparison(grid_run_id, metric, cells, tests, versions, aliases, out / "report.md")
    cmp.report.write_text(_markdown(cmp, plots))
    table = [vars(c) for c in cells]
    (out / "comparison.json").write_text(json.dumps({"cells": table, "aliases": aliases}))
    client = MlflowClient()
    client.log_artifacts(grid_run_id, str(out), "compare")
    log.info("comparison of %s: %d cells, %d tests", grid_run_id, len(cells), len(tests))
    return cmp
