"""Full-image segmentation inference: single scale, multi-scale, flip and sliding windows; prediction files.

Every function works on whatever device the model and the image are on. Two ways of combining predictions,
chosen by TEST.FUSION:

``original`` (the default; the original project's Cityscapes test):
    the network's logits are upsampled bilinearly to the size of the image they were computed from (TEST.
    ALIGN_CORNERS, False as the original's ``F.upsample``); with flip, the flipped pass (its logits flipped
    back) is averaged with the plain one IN LOGIT SPACE, and the average is exponentiated (``exp(logits)``, not a
    softmax). A scale ``s <= 1`` runs the whole resized image at once, whatever its size; a scale ``s > 1`` slides
    crop-sized windows (TEST.IMAGE_SIZE) with a stride of one crop, the last row and column of windows moved back
    to end at the image border, no padding, and the ``exp`` maps of overlapping windows averaged. Each scale's map
    is resized back to the image size and the maps are SUMMED over the scales; the argmax is the prediction.
    Scale ``s`` resizes the image so that its long side is ``int(TEST.BASE_SIZE * s + 0.5)`` (bilinear, half-pixel
    centres like OpenCV's INTER_LINEAR). The scales are TEST.SCALE_LIST whatever TEST.MULTI_SCALE says (the
    original never read TEST.MULTI_SCALE). The original ran the flipped pass without a ``train_step``, that is
    in the unrolled pretraining mode (NUM_LAYERS applications of f) whenever TRAIN.PRETRAIN_STEPS > 0;
    TEST.FLIP_TRAIN_STEP (0, as the original) sets the step the flipped pass is run at, -1 solves it to
    equilibrium like the plain pass.
    The validation pass of training is the original's too: one forward of the whole image, logits upsampled with
    TRAIN.ALIGN_CORNERS (True, as the original's validation) to the image size, argmax.

``prob`` (this project's alternative):
    logits are upsampled (TEST.ALIGN_CORNERS) to the size of the image they were computed from and turned into
    softmax probabilities; sliding windows, the flipped pass (always solved to equilibrium) and the scales are
    averaged as probabilities, so the final map is a distribution. Sliding windows take over when the (scaled)
    image is larger than the crop in either direction: crops with a stride of 2/3 of the crop, the image padded
    at the bottom and right with black (the training crops' padding) up to at least one crop, the last window
    moved back to end at the border. Scales refer to TEST.BASE_SIZE when TEST.MULTI_SCALE is on, otherwise they
    multiply both sides; a scale that leaves the size unchanged does not resample.
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

from mdeq.datasets import denormalize, normalize

logger = logging.getLogger(__name__)

FUSIONS = ("original", "prob")


@dataclass(frozen=True)
class InferenceSettings:
    """How to run full-image inference.

    Attributes:
        scales: image scales whose predictions are combined.
        flip: also combine the horizontally flipped pass (flipped back).
        crop_size: (height, width) of sliding windows, or None: every scale runs the whole image at once.
        base_size: long side of scale 1 (None: scale 1 is the image as it is).
        fusion: "original" or "prob" (see the module docstring).
        align_corners: of the bilinear upsampling of logits (and, for several scales, of the score maps).
        flip_train_step: ``train_step`` passed to the network for the flipped pass of the original fusion
            (None: not passed).
    """

    scales: Tuple[float, ...] = (1.0,)
    flip: bool = False
    crop_size: Optional[Tuple[int, int]] = (1024, 2048)
    base_size: Optional[int] = None
    fusion: str = "original"
    align_corners: bool = False
    flip_train_step: Optional[int] = None

    def __post_init__(self) -> None:
        if self.fusion not in FUSIONS:
            raise ValueError(f"TEST.FUSION: unknown fusion {self.fusion!r}; valid names are {', '.join(FUSIONS)}")


def settings_from_cfg(cfg: CN, training: bool = False) -> InferenceSettings:
    """Inference settings from TEST.* (FUSION, MULTI_SCALE, SCALE_LIST, FLIP_TEST, IMAGE_SIZE [width, height],
    BASE_SIZE, ALIGN_CORNERS, FLIP_TRAIN_STEP) and TRAIN.ALIGN_CORNERS.

    Args:
        cfg: configuration.
        training: the validation pass of training: one scale, no flip; with the original fusion the whole image
            in one forward and TRAIN.ALIGN_CORNERS, as the original's validation.
    """
    width, height = cfg.TEST.IMAGE_SIZE
    crop = (int(height), int(width))
    fusion = str(cfg.TEST.FUSION)
    if training:
        if fusion == "original":
            return InferenceSettings(scales=(1.0,), flip=False, crop_size=None, fusion=fusion,
                                     align_corners=bool(cfg.TRAIN.ALIGN_CORNERS))
        return InferenceSettings(scales=(1.0,), flip=False, crop_size=crop, fusion=fusion,
                                 align_corners=bool(cfg.TEST.ALIGN_CORNERS))
    flip = bool(cfg.TEST.FLIP_TEST)
    align = bool(cfg.TEST.ALIGN_CORNERS)
    scales = tuple(float(s) for s in cfg.TEST.SCALE_LIST) or (1.0,)
    if fusion == "original":
        step = int(cfg.TEST.FLIP_TRAIN_STEP)
        return InferenceSettings(scales=scales, flip=flip, crop_size=crop, base_size=int(cfg.TEST.BASE_SIZE),
                                 fusion=fusion, align_corners=align, flip_train_step=step)
    if not cfg.TEST.MULTI_SCALE:
        return InferenceSettings(scales=(1.0,), flip=flip, crop_size=crop, fusion=fusion, align_corners=align)
    return InferenceSettings(scales=scales, flip=flip, crop_size=crop, base_size=int(cfg.TEST.BASE_SIZE),
                             fusion=fusion, align_corners=align)


def _logits(out) -> torch.Tensor:
    return (out[0] if isinstance(out, (tuple, list)) else out).float()


def _upsample(x: torch.Tensor, size: Tuple[int, int], align_corners: bool) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)


def forward_logits(model: nn.Module, image: torch.Tensor, align_corners: bool = False,
                   train_step: Optional[int] = None) -> torch.Tensor:
    """One pass of the network: logits upsampled bilinearly to the input's resolution.

    Args:
        model: maps (B, 3, H, W) to logits (B, K, h, w) (or a tuple whose first entry is the logits).
        image: (B, 3, H, W).
        align_corners: of the upsampling.
        train_step: passed to the network when not None.

    Returns:
        (B, K, H, W) float32 logits.
    """
    out = model(image) if train_step is None else model(image, train_step=train_step)
    return _upsample(_logits(out), tuple(image.shape[-2:]), align_corners)


def forward_probs(model: nn.Module, image: torch.Tensor, align_corners: bool = False) -> torch.Tensor:
    """One pass of the network: softmax probabilities at the input's resolution.

    Args:
        model: see :func:`forward_logits`.
        image: (B, 3, H, W).
        align_corners: of the upsampling of the logits.

    Returns:
        (B, K, H, W) float32 probabilities.
    """
    return F.softmax(forward_logits(model, image, align_corners), dim=1)


def resize_image(image: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of normalised images with half-pixel centres (OpenCV's INTER_LINEAR, which the original
    used); the input itself when the size is unchanged."""
    return _upsample(image, size, False)


def scaled_size(height: int, width: int, scale: float, base_size: Optional[int]) -> Tuple[int, int]:
    """The (height, width) of an image at ``scale`` (see the module docstring)."""
    if base_size is None:
        return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))
    long_side = int(base_size * scale + 0.5)
    if height > width:
        return long_side, max(1, int(width * long_side / height + 0.5))
    return max(1, int(height * long_side / width + 0.5)), long_side


# ------------------------------------------------------------------------------------------ original fusion
def original_pass(model: nn.Module, image: torch.Tensor, settings: InferenceSettings) -> torch.Tensor:
    """``exp`` of the logits of one image or window, averaged in logit space with the flipped pass when
    ``settings.flip``.

    Args:
        model: see :func:`forward_logits`.
        image: (B, 3, h, w).
        settings: flip, align_corners and flip_train_step.

    Returns:
        (B, K, h, w) ``exp(logits)``.
    """
    logits = forward_logits(model, image, settings.align_corners)
    if settings.flip:
        flipped = forward_logits(model, image.flip(-1), settings.align_corners, settings.flip_train_step)
        logits = (logits + flipped.flip(-1)) * 0.5
    return logits.exp()


def original_window_spans(length: int, crop: int) -> List[Tuple[int, int]]:
    """(start, end) of the original's windows along one axis: a stride of one crop, each window ending at
    ``min(start + crop, length)`` and moved back to start at ``max(end - crop, 0)``; never padded.

    Args:
        length: image length along the axis.
        crop: window length.
    """
    count = int(math.ceil((length - crop) / crop)) + 1
    spans = []
    for i in range(count):
        end = min(i * crop + crop, length)
        spans.append((max(end - crop, 0), end))
    return spans


def original_scale_scores(model: nn.Module, image: torch.Tensor, scale: float,
                          settings: InferenceSettings) -> torch.Tensor:
    """The original's score map of one (already resized) scale: the whole image for ``scale <= 1`` (or without a
    crop size), else the average of end-aligned windows.

    Args:
        model: see :func:`forward_logits`.
        image: (B, 3, h, w) the image at this scale.
        scale: the scale (decides whole image or windows).
        settings: crop size, flip, align_corners, flip_train_step.

    Returns:
        (B, K, h, w) ``exp(logits)`` scores.
    """
    if scale <= 1.0 or settings.crop_size is None:
        return original_pass(model, image, settings)
    b, _, h, w = image.shape
    ch, cw = settings.crop_size
    total: Optional[torch.Tensor] = None
    count = torch.zeros(1, 1, h, w, device=image.device)
    for y0, y1 in original_window_spans(h, ch):
        for x0, x1 in original_window_spans(w, cw):
            scores = original_pass(model, image[:, :, y0:y1, x0:x1], settings)  # (B, K, y1-y0, x1-x0)
            if total is None:
                total = torch.zeros(b, scores.shape[1], h, w, device=image.device)
            total[:, :, y0:y1, x0:x1] += scores
            count[:, :, y0:y1, x0:x1] += 1
    assert total is not None
    return total / count


def original_scores(model: nn.Module, image: torch.Tensor, settings: InferenceSettings) -> torch.Tensor:
    """The original fusion: per-scale ``exp(logits)`` maps resized to the image size and summed over the scales.

    Args:
        model: see :func:`forward_logits` (in eval mode).
        image: (B, 3, H, W) normalised images.
        settings: see :class:`InferenceSettings`.

    Returns:
        (B, K, H, W) summed scores (not probabilities).
    """
    h, w = image.shape[-2:]
    total: Optional[torch.Tensor] = None
    for scale in settings.scales:
        size = scaled_size(h, w, scale, settings.base_size)
        scores = original_scale_scores(model, resize_image(image, size), scale, settings)
        scores = _upsample(scores, (h, w), settings.align_corners)
        total = scores if total is None else total + scores
    assert total is not None
    return total


# ---------------------------------------------------------------------------------------------- prob fusion
def _black(image: torch.Tensor) -> torch.Tensor:
    """(1, 3, 1, 1) black in normalised units, on the image's device."""
    value = normalize(np.zeros((1, 1, 3), dtype=np.uint8)).reshape(1, 3, 1, 1)
    return torch.as_tensor(value, dtype=image.dtype, device=image.device)


def window_starts(length: int, crop: int, stride: int) -> List[int]:
    """Start offsets of windows of size ``crop`` that cover ``[0, length)`` (length >= crop) with the given stride;
    the last window is moved back to end exactly at ``length``."""
    if length <= crop:
        return [0]
    count = int(math.ceil((length - crop) / stride)) + 1
    return sorted({min(i * stride, length - crop) for i in range(count)})


def sliding_window_probs(model: nn.Module, image: torch.Tensor, crop_size: Tuple[int, int],
                         align_corners: bool = False) -> torch.Tensor:
    """Averages the probabilities of overlapping crop-sized windows (the prob fusion).

    Args:
        model: see :func:`forward_logits`.
        image: (B, 3, H, W).
        crop_size: (height, width) of a window; the stride is 2/3 of it.
        align_corners: of the upsampling of the logits.

    Returns:
        (B, K, H, W) probabilities.
    """
    b, _, h, w = image.shape
    ch, cw = crop_size
    ph, pw = max(h, ch), max(w, cw)
    padded = image
    if (ph, pw) != (h, w):
        padded = _black(image).expand(b, 3, ph, pw).clone()  # (B, 3, ph, pw)
        padded[:, :, :h, :w] = image
    stride_h, stride_w = max(1, int(ch * 2 / 3)), max(1, int(cw * 2 / 3))
    total: Optional[torch.Tensor] = None
    count = torch.zeros(1, 1, ph, pw, device=image.device)
    for y in window_starts(ph, ch, stride_h):
        for x in window_starts(pw, cw, stride_w):
            probs = forward_probs(model, padded[:, :, y:y + ch, x:x + cw], align_corners)  # (B, K, ch, cw)
            if total is None:
                total = torch.zeros(b, probs.shape[1], ph, pw, device=image.device)
            total[:, :, y:y + ch, x:x + cw] += probs
            count[:, :, y:y + ch, x:x + cw] += 1
    assert total is not None
    return (total / count)[:, :, :h, :w]


def single_scale_probs(model: nn.Module, image: torch.Tensor, crop_size: Optional[Tuple[int, int]],
                       flip: bool = False, align_corners: bool = False) -> torch.Tensor:
    """Probabilities of one scale: the whole image when it fits the crop (or without a crop size), else sliding
    windows; optionally averaged with the flipped pass flipped back.

    Args:
        model: see :func:`forward_logits`.
        image: (B, 3, H, W).
        crop_size: (height, width), or None.
        flip: average with the horizontally flipped pass.
        align_corners: of the upsampling of the logits.

    Returns:
        (B, K, H, W) probabilities.
    """
    h, w = image.shape[-2:]
    fits = crop_size is None or (h <= crop_size[0] and w <= crop_size[1])

    def run(x: torch.Tensor) -> torch.Tensor:
        if fits:
            return forward_probs(model, x, align_corners)
        return sliding_window_probs(model, x, crop_size, align_corners)

    probs = run(image)
    if flip:
        probs = 0.5 * (probs + run(image.flip(-1)).flip(-1))
    return probs


@torch.no_grad()
def predict_probs(model: nn.Module, image: torch.Tensor, settings: InferenceSettings) -> torch.Tensor:
    """The prob fusion: multi-scale (and flip, and sliding-window) probabilities at the image's resolution.

    Args:
        model: see :func:`forward_logits` (in eval mode).
        image: (B, 3, H, W) normalised images.
        settings: scales, flip, crop size, base size and align_corners (its fusion is not read).

    Returns:
        (B, K, H, W) probabilities averaged over the scales.
    """
    h, w = image.shape[-2:]
    total: Optional[torch.Tensor] = None
    for scale in settings.scales:
        size = scaled_size(h, w, scale, settings.base_size)
        probs = single_scale_probs(model, resize_image(image, size), settings.crop_size, settings.flip,
                                   settings.align_corners)
        probs = _upsample(probs, (h, w), settings.align_corners)
        total = probs if total is None else total + probs
    assert total is not None
    return total / len(settings.scales)


@torch.no_grad()
def predict_scores(model: nn.Module, image: torch.Tensor, settings: InferenceSettings) -> torch.Tensor:
    """The fused score map of ``settings.fusion`` at the image's resolution; its argmax is the prediction.

    Returns:
        (B, K, H, W): summed ``exp(logits)`` (original) or averaged probabilities (prob).
    """
    if settings.fusion == "original":
        return original_scores(model, image, settings)
    return predict_probs(model, image, settings)


@torch.no_grad()
def predict_labels(model: nn.Module, image: torch.Tensor, settings: InferenceSettings) -> torch.Tensor:
    """(B, H, W) int64 predicted train ids: the argmax of :func:`predict_scores`.

    The original fusion with one unresized scale, no flip and no windows (the validation pass of training) takes
    the argmax of the upsampled logits themselves, as the original's validation did (no ``exp`` that could
    overflow).
    """
    plain = (settings.fusion == "original" and settings.crop_size is None and not settings.flip
             and settings.base_size is None and tuple(settings.scales) == (1.0,))
    if plain:
        return forward_logits(model, image, settings.align_corners).argmax(dim=1)
    return predict_scores(model, image, settings).argmax(dim=1)


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
