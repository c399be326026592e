"""Running averages, top-k accuracy and confusion-matrix metrics (reduced over all ranks)."""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import numpy as np
import torch

from mdeq.utils.distributed import all_reduce_sum


class AverageMeter:
    """Keeps the last value and the running (count-weighted) average."""

    def __init__(self) -> None:
        self.val = self.avg = self.sum = 0.0
        self.count = 0

    def update(self, val: float, n: int = 1) -> None:
        self.val = float(val)
        self.sum += float(val) * n
        self.count += n
        self.avg = self.sum / max(self.count, 1)


def correct_counts(output: torch.Tensor, target: torch.Tensor, topk: Sequence[int] = (1, 5)) -> torch.Tensor:
    """Numbers of samples whose label is among the top-k logits, one entry per k (a float tensor)."""
    maxk = min(max(topk), output.shape[1])
    pred = output.topk(maxk, dim=1).indices  # (B, maxk)
    hit = pred.eq(target.view(-1, 1))
    return torch.stack([hit[:, :min(k, maxk)].any(dim=1).sum() for k in topk]).float()


def accuracy(output: torch.Tensor, target: torch.Tensor, topk: Sequence[int] = (1, 5)) -> list:
    """Top-k accuracies in percent (as the original reports them)."""
    counts = correct_counts(output, target, topk)
    return [float(c) * 100.0 / target.shape[0] for c in counts]


def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_label: int
                     ) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts, rows = ground truth, columns = prediction; ignored pixels skipped.

    Args:
        pred: (N, H, W) predicted class ids.
        label: (N, H, W) ground-truth train ids.
    """
    valid = label != ignore_label
    idx = label[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def reduce_confusion(conf: torch.Tensor) -> torch.Tensor:
    """Sums a confusion matrix over all ranks."""
    return all_reduce_sum(conf.clone())


def iou_from_confusion(conf: np.ndarray) -> Tuple[np.ndarray, float, float]:
    """(per-class IoU, mean IoU, pixel accuracy), as the original computes them.

    The mean is over all classes; a class absent from both ground truth and prediction counts as IoU 0.
    """
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    iou = tp / np.maximum(union, 1.0)
    mean_iou = float(iou.mean())
    pixel_acc = float(tp.sum() / max(conf.sum(), 1))
    return iou, mean_iou, pixel_acc


def solver_summary(info: Dict) -> Dict[str, float]:
    """Floats for logging from a model's info dict (forward and, after backward, backward solver stats)."""
    out: Dict[str, float] = {}
    for phase in ("forward", "backward"):
        stats = info.get(phase)
        if stats:
            for key in ("nstep", "abs_res", "rel_res", "diverged"):
                out[f"{phase}/{key}"] = float(stats[key])
    if info.get("jac_loss") is not None:
        out["jac_loss"] = float(info["jac_loss"].detach())
    return out
