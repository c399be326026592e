"""Segmentation criteria: (class-weighted) cross-entropy with an ignore label, and its OHEM variant.

Both take logits at any resolution: when their spatial size differs from the label's, the logits are first
upsampled bilinearly to the label size, with ``align_corners`` as TRAIN.ALIGN_CORNERS says (True by default:
the original's CrossEntropy and OhemCrossEntropy upsample with ``align_corners=True``). Pixels whose label is
``ignore_label`` carry no loss and no gradient.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from yacs.config import CfgNode as CN

logger = logging.getLogger(__name__)


def match_label_size(logits: torch.Tensor, label: torch.Tensor, align_corners: bool = True) -> torch.Tensor:
    """Upsamples logits bilinearly to the label's spatial size when they differ.

    Args:
        logits: (B, K, h, w) scores.
        label: (B, H, W) train ids.
        align_corners: the ``align_corners`` of the bilinear upsampling.

    Returns:
        (B, K, H, W) scores (the input itself when h, w == H, W).
    """
    if logits.shape[-2:] != label.shape[-2:]:
        logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=align_corners)
    return logits


class SegCrossEntropy(nn.Module):
    """Pixel-wise cross-entropy averaged over the labelled pixels (weighted by their class weights).

    The value equals ``F.cross_entropy(logits, label, weight, ignore_index=ignore_label)``; a batch without any
    labelled pixel gives 0 (with a zero gradient) instead of NaN.

    Args:
        ignore_label: label value that carries no loss (TRAIN.IGNORE_LABEL).
        weight: optional (K,) per-class weights.
        align_corners: of the upsampling to the label size (TRAIN.ALIGN_CORNERS).
    """

    def __init__(self, ignore_label: int = 255, weight: Optional[torch.Tensor] = None,
                 align_corners: bool = True) -> None:
        super().__init__()
        self.ignore_label = int(ignore_label)
        self.align_corners = bool(align_corners)
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32))

    def pixel_losses(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Per-pixel (weighted) losses, 0 at ignored pixels.

        Args:
            logits: (B, K, h, w) scores (upsampled to the label size when needed).
            label: (B, H, W) int64 train ids.

        Returns:
            (B, H, W) float losses.
        """
        logits = match_label_size(logits, label, self.align_corners)
        weight = None if self.weight is None else self.weight.to(logits.dtype)
        return F.cross_entropy(logits, label, weight=weight, ignore_index=self.ignore_label, reduction="none")

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Scalar loss.

        Args:
            logits: (B, K, h, w) scores.
            label: (B, H, W) int64 train ids.
        """
        losses = self.pixel_losses(logits, label)  # (B, H, W)
        valid = label != self.ignore_label
        if self.weight is None:
            denom = valid.sum().to(losses.dtype)
        else:
            safe = torch.where(valid, label, torch.zeros_like(label))
            denom = (self.weight.to(losses.dtype)[safe] * valid).sum()  # sum of the labelled pixels' weights
        return losses.sum() / denom.clamp_min(1e-12)


class OhemCrossEntropy(SegCrossEntropy):
    """Online hard example mining over pixels, with the original's selection rule.

    Among the N labelled pixels, with p the softmax probability of the true class sorted ascending
    (p_(0) <= p_(1) <= ...), let k = min(min_kept, N - 1) and threshold = max(thresh, p_(k)). The loss is the plain
    mean of the (class-weighted) per-pixel losses of the pixels with p strictly below the threshold. So about
    ``min_kept`` of the hardest pixels are kept when fewer than that are below ``thresh``; with ``min_kept >= N``
    the threshold is the largest p (or ``thresh``), and pixels at it are dropped, as in the original. When no
    pixel is kept (all labelled pixels tie at the threshold, or none is labelled) the loss is 0 with a zero
    gradient, where the original's mean of nothing was NaN (or, without labelled pixels, an index error).

    Args:
        ignore_label: label value that carries no loss.
        thresh: LOSS.OHEMTHRES.
        min_kept: LOSS.OHEMKEEP (at least 1).
        weight: optional (K,) per-class weights.
        align_corners: of the upsampling to the label size (TRAIN.ALIGN_CORNERS).
    """

    def __init__(self, ignore_label: int = 255, thresh: float = 0.7, min_kept: int = 100000,
                 weight: Optional[torch.Tensor] = None, align_corners: bool = True) -> None:
        super().__init__(ignore_label, weight, align_corners)
        self.thresh = float(thresh)
        self.min_kept = max(1, int(min_kept))

    def kept_mask(self, prob: torch.Tensor) -> torch.Tensor:
        """Which labelled pixels are kept.

        Args:
            prob: (N,) true-class probabilities of the labelled pixels.

        Returns:
            (N,) bool mask.
        """
        n = prob.numel()
        k = min(self.min_kept, n - 1)
        kth = torch.sort(prob).values[k]
        threshold = torch.clamp(kth, min=self.thresh)
        return prob < threshold

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Scalar loss (0 with a zero gradient when no pixel is labelled).

        Args:
            logits: (B, K, h, w) scores.
            label: (B, H, W) int64 train ids.
        """
        logits = match_label_size(logits, label, self.align_corners)
        losses = self.pixel_losses(logits, label).reshape(-1)  # (B*H*W,)
        valid = (label != self.ignore_label).reshape(-1)
        if not bool(valid.any()):
            return logits.sum() * 0.0
        safe = torch.where(label == self.ignore_label, torch.zeros_like(label), label)
        with torch.no_grad():
            prob = F.softmax(logits.detach().float(), dim=1).gather(1, safe.unsqueeze(1))  # (B, 1, H, W)
            prob = prob.reshape(-1)[valid]  # (N,) labelled pixels only
            keep = self.kept_mask(prob)
        if not bool(keep.any()):
            return logits.sum() * 0.0
        return losses[valid][keep].mean()


def build_criterion(cfg: CN, class_weights: Optional[torch.Tensor] = None) -> nn.Module:
    """The segmentation criterion of a config.

    Args:
        cfg: reads TRAIN.IGNORE_LABEL, TRAIN.ALIGN_CORNERS and LOSS.USE_OHEM / OHEMTHRES / OHEMKEEP /
            CLASS_BALANCE.
        class_weights: the dataset's (K,) class weights; used when LOSS.CLASS_BALANCE is on.

    Returns:
        :class:`OhemCrossEntropy` when LOSS.USE_OHEM, else :class:`SegCrossEntropy`.
    """
    weight = class_weights if cfg.LOSS.CLASS_BALANCE else None
    if cfg.LOSS.CLASS_BALANCE and class_weights is None:
        logger.info("LOSS.CLASS_BALANCE is on but the dataset has no class weights; using an unweighted loss")
    align = bool(cfg.TRAIN.ALIGN_CORNERS)
    if cfg.LOSS.USE_OHEM:
        return OhemCrossEntropy(cfg.TRAIN.IGNORE_LABEL, cfg.LOSS.OHEMTHRES, cfg.LOSS.OHEMKEEP, weight, align)
    return SegCrossEntropy(cfg.TRAIN.IGNORE_LABEL, weight, align)
