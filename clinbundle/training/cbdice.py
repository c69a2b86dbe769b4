"""Centreline-boundary Dice (cbDice; Shi et al., MICCAI 2024, "Centerline Boundary Dice Loss
for Vascular Segmentation", reference implementation github.com/PengchengShi1220/cbDice).

clDice (Shit et al. 2021) scores skeletons against masks, so a vessel of 1 voxel counts as much
as one of 10. cbDice weights each skeleton voxel by the inverse square of its normalised radius
and each mask voxel by its normalised distance to the boundary, which balances thin against thick
vessels and penalises boundary shifts that clDice cannot see.

What comes from libraries: the soft (differentiable) skeleton is MONAI's `soft_skel` (the clDice
one); the distance transforms are MONAI's `distance_transform_edt` (scipy on the CPU, cuCIM on
a GPU). Both act on thresholded masks and only produce weights, so nothing non-differentiable
is written here.

What is ours, and why: the few tensor lines that turn those into the paper's weights and the
weighted precision/sensitivity (`_weights`, `_combine`, `soft_cbdice`), and MONAI's clDice
formula applied to the same skeletons (`soft_cldice`, checked equal to MONAI's loss). No maintained package
ships cbDice; the reference code is an nnU-Net plug-in (it imports nnunetv2 and a
topology-preserving skeletoniser we do not need). We follow its default path (the
morphological soft skeleton) line for line, except that the loss is 1 - cbDice rather than
-cbDice (same gradient, non-negative like the other terms).
"""

from __future__ import annotations

import torch
from monai.losses.cldice import soft_skel
from monai.transforms.utils import distance_transform_edt

_EPS = 1e-7


def _weights(
    mask_prob: torch.Tensor, skel_prob: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q_v, q_sv, q_s) of one volume set, shapes (B, *spatial).

    q_v: distance to the boundary, clipped at and normalised by the largest skeleton radius;
    q_sv: the skeleton's radius, normalised the same way; q_s: 1 / radius^2 (3-D; 1 / radius in
    2-D) on skeleton voxels. Each is multiplied by the (soft) mask or skeleton it came from, so
    gradients flow through the probabilities; the weights themselves are constants.
    """
    with torch.no_grad():
        mask, skel = mask_prob > 0.5, skel_prob > 0.5
        dist = torch.as_tensor(distance_transform_edt(mask.float().cpu()), dtype=torch.float32)
        dist = dist.to(mask_prob.device) * mask
        radius = dist * skel
        r_max = radius.flatten(1).amax(1).clamp_min(1.0).view(-1, *[1] * (dist.dim() - 1))
        dist_norm = torch.minimum(dist, r_max) / r_max
        r_norm = radius / r_max
        power = 2 if dist.dim() == 4 else 1  # (B, D, H, W): 3-D
        inv = (1 + _EPS) / (r_norm**power + _EPS) * skel
    return dist_norm * mask_prob, r_norm * mask_prob, inv * skel_prob


def _combine(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """b * c, except a * c where only `a` has a radius (the reference's `combine_tensors`)."""
    return torch.where((a != 0) & (b == 0), a * c, b * c)


def skeletons(
    fg_prob: torch.Tensor, fg_true: torch.Tensor, iters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """MONAI's soft skeletons of prediction and truth (the truth's needs no gradient)."""
    with torch.no_grad():
        skel_t = soft_skel(fg_true.float(), iters)
    return soft_skel(fg_prob, iters), skel_t


def soft_cbdice(
    fg_prob: torch.Tensor,
    fg_true: torch.Tensor,
    iters: int = 3,
    smooth: float = 1.0,
    skels: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """cbDice in [0, 1] of a foreground probability map and a binary truth, both (B, 1, *spatial);
    `skels` (from `skeletons`) lets a caller share the skeletons with clDice."""
    fg_true = fg_true.float()
    skel_p, skel_t = skels if skels is not None else skeletons(fg_prob, fg_true, iters)
    q_vl, q_slvl, q_sl = _weights(fg_true[:, 0], skel_t[:, 0])
    q_vp, q_spvp, q_sp = _weights(fg_prob[:, 0], skel_p[:, 0])
    tprec = ((q_sp * q_vl).sum() + smooth) / (_combine(q_spvp, q_slvl, q_sp).sum() + smooth)
    tsens = ((q_sl * q_vp).sum() + smooth) / (_combine(q_slvl, q_spvp, q_sl).sum() + smooth)
    return 2.0 * tprec * tsens / (tprec + tsens)


def soft_cldice(
    fg_prob: torch.Tensor, fg_true: torch.Tensor, skels: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """MONAI's `SoftclDiceLoss` formula (smooth 1, 1, 1e-4; per sample, then the batch mean) on
    skeletons already computed: MONAI's class computes its own, and the soft skeleton is most
    of the loss's cost on a CPU, so sharing halves it. Equal to MONAI's on two classes
    (tests/test_losses.py checks it)."""
    skel_p, skel_t = skels
    dims = list(range(1, fg_prob.dim()))
    tprec = ((skel_p * fg_true).sum(dims) + 1.0) / (skel_p.sum(dims) + 1.0)
    tsens = ((skel_t * fg_prob).sum(dims) + 1.0) / (skel_t.sum(dims) + 1.0)
    return (2.0 * tprec * tsens / (tprec + tsens + 1e-4)).mean()


def foreground(logits: torch.Tensor) -> torch.Tensor:
    """P(any foreground class): softmax over background and the strongest foreground logit,
    as the reference does, so multi-class vessel labels act as one tree."""
    fg = logits[:, 1:].amax(1, keepdim=True)
    return torch.softmax(torch.cat([logits[:, :1], fg], 1), 1)[:, 1:]
