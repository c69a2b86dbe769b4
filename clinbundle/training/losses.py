"""Losses by name, from MONAI (and cbDice, see `clinbundle.training.cbdice`)."""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss, SoftDiceclDiceLoss

from clinbundle.runtime.errors import ConfigError
from clinbundle.training.cbdice import foreground, skeletons, soft_cbdice, soft_cldice
from clinbundle.training.config import LossConfig

LOSSES = ("dice_ce", "cldice", "cbdice_cldice")


class _OneHotDiceclDice(torch.nn.Module):
    """SoftDiceclDiceLoss expects one-hot targets and probabilities; training labels are indices."""

    def __init__(self, iters: int, alpha: float) -> None:
        super().__init__()
        self.loss = SoftDiceclDiceLoss(iter_=iters, alpha=alpha, softmax=True, to_onehot_y=True)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss(logits, target)


class CbDiceClDiceLoss(torch.nn.Module):
    """Dice + CE + alpha (1 - clDice) + w (1 - cbDice): the reference's compound (CE + Dice +
    cbDice) with MONAI's soft clDice added, as vessel teams train it. Both topology terms score
    the foreground (all vessel classes as one tree, as the reference does) and share one pair
    of soft skeletons."""

    def __init__(self, iters: int, cldice_weight: float, cbdice_weight: float) -> None:
        super().__init__()
        self.dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)
        self.iters = iters
        self.cldice_weight, self.cbdice_weight = cldice_weight, cbdice_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.dice_ce(logits, target)
        if not (self.cldice_weight or self.cbdice_weight):
            return loss
        fg, truth = foreground(logits.float()), (target > 0).float()
        skels = skeletons(fg, truth, self.iters)
        if self.cldice_weight:
            loss = loss + self.cldice_weight * (1.0 - soft_cldice(fg, truth, skels))
        if self.cbdice_weight:
            loss = loss + self.cbdice_weight * (1.0 - soft_cbdice(fg, truth, skels=skels))
        return loss


def build_loss(cfg: LossConfig) -> torch.nn.Module:
    if cfg.name == "dice_ce":
        return DiceCELoss(to_onehot_y=True, softmax=True)
    if cfg.name == "cldice":
        return _OneHotDiceclDice(cfg.cldice_iters, cfg.cldice_alpha)
    if cfg.name == "cbdice_cldice":
        return CbDiceClDiceLoss(cfg.cldice_iters, cfg.cldice_alpha, cfg.cbdice_weight)
    raise ConfigError(f"unknown loss '{cfg.name}'; choose one of {list(LOSSES)}")
