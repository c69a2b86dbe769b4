"""Losses by name, from MONAI."""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss, SoftDiceclDiceLoss

from clinbundle.runtime.errors import ConfigError
from clinbundle.training.config import LossConfig

LOSSES = ("dice_ce", "cldice")


class _OneHotDiceclDice(torch.nn.Module):
    """SoftDiceclDiceLoss expects one-hot targets and probabilities; training labels are indices."""

    def __init__(self, iters: int, alpha: float) -> None:
        super().__init__()
        self.loss = SoftDiceclDiceLoss(iter_=iters, alpha=alpha, softmax=True, to_onehot_y=True)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss(logits, target)


def build_loss(cfg: LossConfig) -> torch.nn.Module:
    if cfg.name == "dice_ce":
        return DiceCELoss(to_onehot_y=True, softmax=True)
    if cfg.name == "cldice":
        return _OneHotDiceclDice(cfg.cldice_iters, cfg.cldice_alpha)
    raise ConfigError(f"unknown loss '{cfg.name}'; choose one of {list(LOSSES)}")
