"""Pictures of a parity report: where a format differs from PyTorch, for a reviewer's eye.

- `parity_diff_histogram.png`: per case, how many probabilities differ by how much
  (decade bins of |candidate - reference|), so "max abs 3e-5" is seen to be a few voxels.
- `parity_flip_map.png`: per case, flipped labels counted along the last voxel axis (the
  demo's axial direction), so flips are seen to sit on vessel borders, not in a block.

Matplotlib's object API (a `Figure`, no pyplot state), so it is safe inside any process.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from clinbundle.packaging.parity import ParityReport

#: Bin edges of |candidate - reference| on probabilities: exact 0 falls in the first bin.
DIFF_BINS = np.array([0.0, *(10.0**e for e in range(-9, 1))])
HISTOGRAM_PNG = "parity_diff_histogram.png"
FLIP_MAP_PNG = "parity_flip_map.png"


def diff_histogram(diff: np.ndarray) -> list[int]:
    """Counts of |differences| in DIFF_BINS (differences above 1 go in the last bin)."""
    counts, _ = np.histogram(np.clip(diff, 0.0, 1.0), bins=DIFF_BINS)
    return [int(c) for c in counts]


def flip_projection(ref_labels: np.ndarray, cand_labels: np.ndarray) -> np.ndarray:
    """(N, D, H, W) label maps -> (D, H) count of flipped voxels along W, over the batch."""
    return (ref_labels != cand_labels).sum(axis=(0, -1)).astype(np.int32)


def write_parity_plots(report: ParityReport, folder: Path) -> list[Path]:
    """The two PNGs into `folder` (only what the report has: labels-only formats have no
    probabilities and so no histogram)."""
    from matplotlib.figure import Figure

    out = []
    hist = [c for c in report.cases if c.diff_histogram]
    if hist:
        fig = Figure(figsize=(7, 4), dpi=100)
        ax = fig.add_subplot()
        x = np.arange(len(DIFF_BINS) - 1)
        for c in hist:
            ax.step(x, np.maximum(c.diff_histogram, 0.5), where="mid", label=c.name)
        ax.set_yscale("log")
        ax.set_xticks(x, [f"<1e{e}" for e in range(-9, 1)], rotation=45)
        ax.set_xlabel("|candidate - reference| of a probability")
        ax.set_ylabel("values (log)")
        ax.set_title(f"{report.format} vs PyTorch: differences per case")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        out.append(folder / HISTOGRAM_PNG)
        fig.savefig(out[-1])
    maps = [c for c in report.cases if c.flip_map is not None]
    if maps:
        fig = Figure(figsize=(2.2 * len(maps), 2.6), dpi=100)
        for i, c in enumerate(maps, 1):
            ax = fig.add_subplot(1, len(maps), i)
            ax.imshow(np.rot90(c.flip_map), cmap="magma", vmin=0, vmax=max(1, c.flip_map.max()))
            ax.set_title(f"{c.name}\n{c.flips} flipped", fontsize=7)
            ax.axis("off")
        fig.suptitle(f"{report.format} vs PyTorch: flipped labels (sum along the last axis)")
        fig.tight_layout()
        out.append(folder / FLIP_MAP_PNG)
        fig.savefig(out[-1])
    return out
