"""Full-image segmentation inference: single scale, multi-scale, flip and sliding windows; prediction files.

Every function works on whatever device the model and the image are on.

How predictions are combined (one rule everywhere): the network's logits are upsampled bilinearly
(``align_corners=False``) to the size of the image they were computed from and turned into softmax
probabilities; sliding windows, the flipped pass and the scales are then averaged as probabilities. Resizing
probabilities back to the original size (bilinear) keeps them distributions, so the final map is an average of
distributions and its argmax is the prediction.

Scales: with ``base_size`` (TEST.BASE_SIZE, used when TEST.MULTI_SCALE is on) scale ``s`` resizes the image so
that its long side is ``base_size * s``, as the HRNet family does; without it, scale ``s`` multiplies both sides.
A scale that leaves the size unchanged does not resample at all. Sliding windows take over when the (scaled)
image is larger than the crop (TEST.IMAGE_SIZE) in either direction: crops of that size with a stride of 2/3 of
it, the image padded at the bottom and right (with zeros, i.e. the mean colour of a normalised image, as the
datasets pad) up to at least one crop, overlapping windows averaged.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from yacs.config import CfgNode as CN

from mdeq.datasets import denormalize

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferenceSettings:
    """How to run full-image inference.

    Attributes:
        scales: image scales whose predictions are averaged.
        flip: also average the horizontally flipped pass (flipped back).
        crop_size: (height, width) of sliding windows; images larger than this in either direction are
            processed window by window.
        base_size: long side of scale 1 (None: scale 1 is the image as it is).
    """

    scales: Tuple[float, ...] = (1.0,)
    flip: bool = False
    crop_size: Tuple[int, int] = (1024, 2048)
    base_size: Optional[int] = None


def settings_from_cfg(cfg: CN, training: bool = False) -> InferenceSettings:
    """Inference settings from TEST.* (MULTI_SCALE, SCALE_LIST, FLIP_TEST, IMAGE_SIZE [width, height], BASE_SIZE).

    Args:
        cfg: configuration.
        training: the validation pass of training: one scale, no flip (sliding windows still apply).
    """
    width, height = cfg.TEST.IMAGE_SIZE
    if training or not cfg.TEST.MULTI_SCALE:
        return InferenceSettings(scales=(1.0,), flip=bool(cfg.TEST.FLIP_TEST) and not training,
                                 crop_size=(int(height), int(width)))
    scales = tuple(float(s) for s in cfg.TEST.SCALE_LIST) or (1.0,)
    return InferenceSettings(scales=scales, flip=bool(cfg.TEST.FLIP_TEST), crop_size=(int(height), int(width)),
                             base_size=int(cfg.TEST.BASE_SIZE))


def forward_probs(model: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """One pass of the network: softmax probabilities at the input's resolution.

    Args:
        model: maps (B, 3, H, W) to logits (B, K, h, w) (or a tuple whose first entry is the logits).
        image: (B, 3, H, W).

    Returns:
        (B, K, H, W) float32 probabilities.
    """
    out = model(image)
    logits = out[0] if isinstance(out, (tuple, list)) else out
    logits = logits.float()
    if logits.shape[-2:] != image.shape[-2:]:
        logits = F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
    return F.softmax(logits, dim=1)


def window_starts(length: int, crop: int, stride: int) -> List[int]:
    """Start offsets of windows of size ``crop`` that cover ``[0, length)`` (length >= crop) with the given stride;
    the last window is moved back to end exactly at ``length``."""
    if length <= crop:
        return [0]
    count = int(math.ceil((length - crop) / stride)) + 1
    return sorted({min(i * stride, length - crop) for i in range(count)})


def sliding_window_probs(model: nn.Module, image: torch.Tensor, crop_size: Tuple[int, int]) -> torch.Tensor:
    """Averages the probabilities of overlapping crop-sized windows.

    Args:
        model: see :func:`forward_probs`.
        image: (B, 3, H, W).
        crop_size: (height, width) of a window; the stride is 2/3 of it.

    Returns:
        (B, K, H, W) probabilities.
    """
    b, _, h, w = image.shape
    ch, cw = crop_size
    ph, pw = max(h, ch), max(w, cw)
    padded = F.pad(image, (0, pw - w, 0, ph - h)) if (ph, pw) != (h, w) else image  # (B, 3, ph, pw)
    stride_h, stride_w = max(1, int(ch * 2 / 3)), max(1, int(cw * 2 / 3))
    total: Optional[torch.Tensor] = None
    count = torch.zeros(1, 1, ph, pw, device=image.device)
    for y in window_starts(ph, ch, stride_h):
        for x in window_starts(pw, cw, stride_w):
            probs = forward_probs(model, padded[:, :, y:y + ch, x:x + cw])  # (B, K, ch, cw)
            if total is None:
                total = torch.zeros(b, probs.shape[1], ph, pw, device=image.device)
            total[:, :, y:y + ch, x:x + cw] += probs
            count[:, :, y:y + ch, x:x + cw] += 1
    assert total is not None
    return (total / count)[:, :, :h, :w]


def single_scale_probs(model: nn.Module, image: torch.Tensor, crop_size: Tuple[int, int],
                       flip: bool = False) -> torch.Tensor:
    """Probabilities of one scale: the whole image when it fits the crop, else sliding windows; optionally
    averaged with the flipped pass flipped back.

    Args:
        model: see :func:`forward_probs`.
        image: (B, 3, H, W).
        crop_size: (height, width).
        flip: average with the horizontally flipped pass.

    Returns:
        (B, K, H, W) probabilities.
    """
    h, w = image.shape[-2:]
    fits = h <= crop_size[0] and w <= crop_size[1]

    def run(x: torch.Tensor) -> torch.Tensor:
        return forward_probs(model, x) if fits else sliding_window_probs(model, x, crop_size)

    probs = run(image)
    if flip:
        probs = 0.5 * (probs + run(image.flip(-1)).flip(-1))
    return probs


def scaled_size(height: int, width: int, scale: float, base_size: Optional[int]) -> Tuple[int, int]:
    """The (height, width) of an image at ``scale`` (see the module docstring)."""
    if base_size is None:
        return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))
    long_side = int(base_size * scale + 0.5)
    if height > width:
        return long_side, max(1, int(width * long_side / height + 0.5))
    return max(1, int(height * long_side / width + 0.5)), long_side


@torch.no_grad()
def predict_probs(model: nn.Module, image: torch.Tensor, settings: InferenceSettings) -> torch.Tensor:
    """Multi-scale (and flip, and sliding-window) probabilities at the image's own resolution.

    Args:
        model: see :func:`forward_probs` (in eval mode).
        image: (B, 3, H, W) normalised images.
        settings: scales, flip, crop size and base size.

    Returns:
        (B, K, H, W) probabilities averaged over the scales.
    """
    h, w = image.shape[-2:]
    total: Optional[torch.Tensor] = None
    for scale in settings.scales:
        size = scaled_size(h, w, scale, settings.base_size)
        scaled = image if size == (h, w) else F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        probs = single_scale_probs(model, scaled, settings.crop_size, settings.flip)
        if size != (h, w):
            probs = F.interpolate(probs, size=(h, w), mode="bilinear", align_corners=False)
        total = probs if total is None else total + probs
    assert total is not None
    return total / len(settings.scales)


def predict_labels(model: nn.Module, image: torch.Tensor, settings: InferenceSettings) -> torch.Tensor:
    """(B, H, W) int64 predicted train ids: the argmax of :func:`predict_probs`."""
    return predict_probs(model, image, settings).argmax(dim=1)


# ------------------------------------------------------------------------------------------- prediction files
def image_base_names(dataset) -> Dict[str, str]:
    """Sample name -> base name of its image file without extension (what prediction files are called).

    Args:
        dataset: a segmentation dataset (its ``files`` list of samples).
    """
    return {s.name: os.path.splitext(os.path.basename(s.image))[0] for s in getattr(dataset, "files", [])}


def _write_png(path: str, array: np.ndarray) -> None:
    """Writes (H, W) uint8 or (H, W, 3) uint8 RGB as a PNG."""
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(path, array):
        raise OSError(f"could not write {path}; check that the folder is writable")


class PredictionWriter:
    """Writes prediction PNGs for a dataset: colourised maps, overlays and benchmark label-id maps.

    Files are named after the input image (``<image base name>.png``) in the subfolders ``color/`` (palette
    colours), ``overlay/`` (the image blended half and half with the colours) and ``label_ids/`` (uint8 maps of
    the dataset's raw label ids, train ids mapped back with ``convert_label(inverse=True)``; the form the
    Cityscapes benchmark server accepts).

    Args:
        dataset: the segmentation dataset (for ``colorize``, ``convert_label`` and the image names).
        out_dir: output folder.
        color: write ``color/`` and ``overlay/``.
        label_ids: write ``label_ids/``.
    """

    def __init__(self, dataset, out_dir: str, color: bool = True, label_ids: bool = True) -> None:
        self.dataset, self.out_dir = dataset, out_dir
        self.color, self.label_ids = color, label_ids
        self.names = image_base_names(dataset)
        self.count = 0
        for sub, on in (("color", color), ("overlay", color), ("label_ids", label_ids)):
            if on:
                os.makedirs(os.path.join(out_dir, sub), exist_ok=True)

    def write(self, images: torch.Tensor, preds: torch.Tensor, names: Sequence[str]) -> None:
        """Writes the files of one batch.

        Args:
            images: (B, 3, H, W) normalised images.
            preds: (B, H, W) predicted train ids.
            names: the batch's sample names.
        """
        preds_np = preds.detach().cpu().numpy()
        for i, name in enumerate(names):
            base = self.names.get(name, name)
            pred = preds_np[i]  # (H, W)
            if self.color:
                colours = self.dataset.colorize(pred)  # (H, W, 3) uint8
                _write_png(os.path.join(self.out_dir, "color", base + ".png"), colours)
                rgb = denormalize(images[i])  # (H, W, 3) uint8
                blend = (0.5 * rgb.astype(np.float32) + 0.5 * colours.astype(np.float32)).round()
                _write_png(os.path.join(self.out_dir, "overlay", base + ".png"), blend.astype(np.uint8))
            if self.label_ids:
                ids = np.asarray(self.dataset.convert_label(pred, inverse=True)).astype(np.uint8)  # (H, W)
                _write_png(os.path.join(self.out_dir, "label_ids", base + ".png"), ids)
            self.count += 1
