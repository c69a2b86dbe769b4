"""Probabilities -> the label map a clinician sees: one place for every format's argmax and the
contract's post-processing (MONAI's KeepLargestConnectedComponent for the labels it names)."""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import KeepLargestConnectedComponent

from clinbundle.runtime.contract import PostProcessing


def labels_from_probabilities(
    probabilities: np.ndarray, post: PostProcessing | None = None, axis: int = 0
) -> np.ndarray:
    """uint8 argmax over the class `axis`, then the contract's post-processing."""
    return postprocess(probabilities.argmax(axis).astype(np.uint8), post)


def postprocess(labels: np.ndarray, post: PostProcessing | None) -> np.ndarray:
    """Keep only the largest connected component of each label `post` lists (per volume)."""
    if post is None or not post.largest_component:
        return labels
    keep = KeepLargestConnectedComponent(applied_labels=post.largest_component, is_onehot=False)
    if labels.ndim == 3:
        return np.asarray(keep(torch.from_numpy(labels)[None]))[0].astype(np.uint8)
    return np.stack([postprocess(v, post) for v in labels])
