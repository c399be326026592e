"""Shared base of the segmentation datasets: list files, reading, augmentation and normalisation.

The sample pipeline is the original MDEQ (HRNet-family) loader's, in numpy and OpenCV (device agnostic), drawing
its random numbers in the same order from the same generators, so that the same ``random`` / ``np.random``
states give the same sample:

* training with multi-scale on (TRAIN.MULTI_SCALE): the long side is rescaled to ``BASE_SIZE * s`` with
  ``s = 0.5 + random.randint(0, SCALE_FACTOR) / 10`` (image bilinear, label nearest); the image is padded at the
  bottom and right up to the crop with BLACK (0 before normalisation, as the original) and the label with
  ``ignore_label``, so padded pixels never carry loss; a random crop of ``crop_size`` (offset x drawn before y);
* training without multi-scale: the full image, neither rescaled nor cropped (the original crops only inside
  its multi-scale step; set SCALE_FACTOR 0 and BASE_SIZE to twice the image's long side for crops at scale 1);
* then, in training, a horizontal flip when ``np.random.choice(2)`` draws 0 (TRAIN.FLIP) and label
  downsampling by ``downsample_rate`` (OpenCV nearest, as the original);
* evaluation: the full image, or (``center_crop``) the long side resized to ``BASE_SIZE`` and a centre crop
  (padded with black where the resized image is smaller than the crop; the original sliced with negative
  offsets there);
* test (unlabelled lists): the full image and an all-ignore label.

Raw label ids are mapped to train ids (``convert_label``) only on the cropped window; mapping commutes with
cropping and nearest resizing, so this equals the original's mapping of the whole label first.
"""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from .common import BadFileError

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MAX_LISTED = 5  # missing paths quoted in one error message


def normalize(image: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """Scales an RGB uint8 image to [0, 1] and normalises it per channel.

    Args:
        image: (H, W, 3) uint8, RGB.
        mean: per-channel mean (of [0, 1] values).
        std: per-channel standard deviation.

    Returns:
        (H, W, 3) float32.
    """
    scale = 1.0 / (255.0 * np.asarray(std, dtype=np.float32))  # (3,)
    shift = np.asarray(mean, dtype=np.float32) / np.asarray(std, dtype=np.float32)  # (3,)
    return image.astype(np.float32) * scale - shift


def denormalize(image: Union[torch.Tensor, np.ndarray], mean: Sequence[float] = IMAGENET_MEAN,
                std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """Inverts ``normalize`` for display.

    Args:
        image: (3, H, W) normalised image (tensor on any device, or array).
        mean: per-channel mean used by ``normalize``.
        std: per-channel standard deviation used by ``normalize``.

    Returns:
        (H, W, 3) uint8, RGB.
    """
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu().numpy()
    hwc = np.transpose(np.asarray(image, dtype=np.float32), (1, 2, 0))  # (H, W, 3)
    rgb = (hwc * np.asarray(std, dtype=np.float32) + np.asarray(mean, dtype=np.float32)) * 255.0
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def resize_long_side(image: np.ndarray, long_size: int,
                     label: Optional[np.ndarray] = None) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Resizes so that the longer side is long_size, keeping the aspect ratio (as the original does).

    Args:
        image: (H, W, C) array, resized bilinearly.
        long_size: new length of the longer side.
        label: optional (H, W) array, resized with nearest neighbours.

    Returns:
        The resized image and label (None when no label was given).
    """
    h, w = image.shape[:2]
    if h > w:
        new_h, new_w = long_size, int(w * long_size / h + 0.5)
    else:
        new_w, new_h = long_size, int(h * long_size / w + 0.5)
    new_w, new_h = max(new_w, 1), max(new_h, 1)
    image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    if label is not None:
        label = cv2.resize(label, (new_w, new_h), interpolation=cv2.INTER_NEAREST)
    return image, label


def downsample_label(label: np.ndarray, rate: int) -> np.ndarray:
    """Nearest-neighbour downsampling of an (H, W) label map by ``rate`` (OpenCV's ``fx = fy = 1 / rate``, as the
    original: the output has ``round(H / rate)`` rows, row i taken from source row ``floor(i * rate)``)."""
    if rate == 1:
        return label
    small = cv2.resize(np.ascontiguousarray(label).astype(np.int32), None, fx=1.0 / rate, fy=1.0 / rate,
                       interpolation=cv2.INTER_NEAREST)
    return small.astype(label.dtype)


@dataclass(frozen=True)
class SegSample:
    """One line of a list file: the image path, the label path (None in unlabelled lists) and a name."""

    image: str
    label: Optional[str]
    name: str


def read_list_file(list_path: str, data_root: str, labelled: Optional[bool],
                   layout_hint: str = "") -> Tuple[List[SegSample], bool]:
    """Parses a list file of ``image_path [label_path]`` lines (paths relative to data_root).

    Args:
        list_path: the list file.
        data_root: folder the paths in the list are relative to.
        labelled: True: every line must name a label; False: labels are ignored (test split); None: decide
            from the file (all lines with labels, or none).
        layout_hint: appended to error messages (the expected on-disk layout).

    Returns:
        The samples and whether they carry labels. A sample's name is the label file's base name (the image
        file's in unlabelled lists), without extension, as in the original.

    Raises:
        FileNotFoundError: the list file is missing.
        ValueError: the list is empty or malformed.
    """
    if not os.path.isfile(list_path):
        raise FileNotFoundError(f"segmentation list file not found: {list_path}. {layout_hint}")
    rows = []
    with open(list_path) as fh:
        for lineno, line in enumerate(fh, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) > 2:
                raise ValueError(f"{list_path}:{lineno}: expected 'image_path [label_path]', got {line.strip()!r}")
            rows.append((lineno, fields))
    if not rows:
        raise ValueError(f"segmentation list file {list_path} names no images. {layout_hint}")
    with_label = [len(f) == 2 for _, f in rows]
    if labelled is None:
        if all(with_label):
            labelled = True
        elif not any(with_label):
            labelled = False
            logger.info("%s names no labels: treating it as an unlabelled (test) list", list_path)
        else:
            lineno = rows[with_label.index(False)][0]
            raise ValueError(f"{list_path}:{lineno}: this line names no label file while others do; every line "
                             f"must be 'image_path label_path' (or none of them, for a test list).")
    elif labelled and not all(with_label):
        lineno = rows[with_label.index(False)][0]
        raise ValueError(f"{list_path}:{lineno}: expected 'image_path label_path' (this split needs labels). "
                         f"{layout_hint}")
    samples = []
    for _, fields in rows:
        image = os.path.join(data_root, fields[0])
        label = os.path.join(data_root, fields[1]) if labelled else None
        name = os.path.splitext(os.path.basename(fields[1] if labelled else fields[0]))[0]
        samples.append(SegSample(image, label, name))
    return samples, labelled


class BaseSegDataset(Dataset):
    """A segmentation dataset read from a list file.

    Subclasses set ``num_classes`` and ``class_names`` and override ``convert_label`` (raw label ids ->
    train ids) and ``colorize``.

    Args:
        samples: the samples (see ``read_list_file``).
        has_labels: whether samples carry labels (False: test split, the label returned is all ignore).
        train: training augmentation (random rescale, crop, flip, label downsampling).
        ignore_label: train id of pixels without loss (also the label padding value).
        crop_size: (height, width) of training crops, or of the evaluation centre crop.
        base_size: long side the random rescale (training) or the centre crop resize (evaluation) refers to.
        multi_scale: random rescale and crop in training (without it the full image is used, as the original).
        scale_factor: range of the random rescale in tenths (the scale is 0.5 + randint(0, scale_factor) / 10).
        flip: random horizontal flips in training.
        downsample_rate: training labels are downsampled by this factor.
        center_crop: evaluation on a centre crop instead of the full image.
        num_samples: keep only the first num_samples samples (0: all).
        skip_bad_files: missing or unreadable files are skipped with a warning instead of raising.
        layout_hint: the expected on-disk layout, appended to error messages.

    Items are ``(image (3, H, W) float32, label (H', W') int64, size (2,) int64 original (H, W), name)``.
    """

    num_classes = 0
    class_names: Tuple[str, ...] = ()

    def __init__(self, samples: Sequence[SegSample], *, has_labels: bool, train: bool, ignore_label: int = 255,
                 crop_size: Tuple[int, int] = (512, 1024), base_size: int = 2048, multi_scale: bool = False,
                 scale_factor: int = 16, flip: bool = False, downsample_rate: int = 1, center_crop: bool = False,
                 num_samples: int = 0, skip_bad_files: bool = False, layout_hint: str = "") -> None:
        if train and not has_labels:
            raise ValueError("a training split needs labels; the list file names images only")
        if int(downsample_rate) < 1:
            raise ValueError(f"TRAIN.DOWNSAMPLERATE must be a positive integer, got {downsample_rate}")
        self.has_labels = has_labels
        self.train = train
        self.ignore_label = int(ignore_label)
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.base_size = int(base_size)
        self.multi_scale = multi_scale
        self.scale_factor = int(scale_factor)
        self.flip = flip
        self.downsample_rate = int(downsample_rate)
        self.center_crop = center_crop
        self.skip_bad_files = skip_bad_files
        self.layout_hint = layout_hint
        samples = list(samples)
        if num_samples:
            samples = samples[:int(num_samples)]
        self.files = self._drop_missing(samples)
        self._bad: set = set()

    # ------------------------------------------------------------------------------------------ files
    def _drop_missing(self, samples: List[SegSample]) -> List[SegSample]:
        missing = []
        kept = []
        for s in samples:
            gone = [p for p in (s.image, s.label) if p is not None and not os.path.isfile(p)]
            missing.extend(gone)
            if not gone:
                kept.append(s)
        if missing and not self.skip_bad_files:
            listed = ", ".join(missing[:_MAX_LISTED]) + (" ..." if len(missing) > _MAX_LISTED else "")
            raise FileNotFoundError(
                f"{len(missing)} file(s) named in the list are missing: {listed}. {self.layout_hint} "
                f"Set DATASET.SKIP_BAD_FILES True to train without them."
            )
        for path in missing:
            logger.warning("skipping sample with missing file %s (DATASET.SKIP_BAD_FILES)", path)
        if not kept:
            raise FileNotFoundError(f"none of the listed files exist. {self.layout_hint}")
        return kept

    def __len__(self) -> int:
        return len(self.files)

    @staticmethod
    def read_image(path: str) -> np.ndarray:
        """Reads an image as (H, W, 3) uint8 RGB; an unreadable file raises a BadFileError naming it."""
        image = cv2.imread(path, cv2.IMREAD_COLOR)
        if image is None:
            raise BadFileError(path, "OpenCV cannot decode it")
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)

    @staticmethod
    def read_label(path: str) -> np.ndarray:
        """Reads a label image as (H, W) uint8 raw ids; an unreadable file raises a BadFileError naming it."""
        label = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
        if label is None:
            raise BadFileError(path, "OpenCV cannot decode it")
        return label

    # ------------------------------------------------------------------------------------- labels
    def convert_label(self, label: np.ndarray, inverse: bool = False) -> np.ndarray:
        """Maps raw label ids to train ids (or back with inverse); the base class keeps ids as they are."""
        return label.astype(np.int64) if not inverse else label

    def colorize(self, train_ids: Union[np.ndarray, torch.Tensor]) -> np.ndarray:
        """Colours an (H, W) map of train ids; the base class repeats the ids as grey levels."""
        ids = train_ids.cpu().numpy() if isinstance(train_ids, torch.Tensor) else np.asarray(train_ids)
        return np.repeat(np.clip(ids, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)

    # ------------------------------------------------------------------------------------- samples
    def _crop(self, image: np.ndarray, label: Optional[np.ndarray], random_offset: bool
              ) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """Crops crop_size from an RGB uint8 image and a raw label, padding bottom/right where too small.

        The padding is black (0 before normalisation) in the image and ``ignore_label`` in the label. A random
        offset draws x, then y, with ``random.randint`` over the padded image, as the original does.

        Returns:
            image (ch, cw, 3) float32 normalised, and train ids (ch, cw) int64 (None without a label).
        """
        ch, cw = self.crop_size
        h, w = image.shape[:2]
        span_y, span_x = max(h, ch) - ch, max(w, cw) - cw
        if random_offset:
            x = random.randint(0, span_x)
            y = random.randint(0, span_y)
        else:
            y, x = int(round(span_y / 2.0)), int(round(span_x / 2.0))
        part = image[y:y + ch, x:x + cw]  # (hh, ww, 3), hh <= ch, ww <= cw
        hh, ww = part.shape[:2]
        out = np.zeros((ch, cw, 3), dtype=np.uint8)  # black padding
        out[:hh, :ww] = part
        out_label = None
        if label is not None:
            out_label = np.full((ch, cw), self.ignore_label, dtype=np.int64)
            out_label[:hh, :ww] = self.convert_label(label[y:y + ch, x:x + cw])
        return normalize(out), out_label

    def gen_sample(self, image: np.ndarray, label: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """The training or evaluation transform of one labelled sample.

        Args:
            image: (H, W, 3) uint8 RGB.
            label: (H, W) uint8 raw label ids.

        Returns:
            image (h, w, 3) float32 normalised and label (h', w') int64 train ids.
        """
        if self.train:
            if self.multi_scale:
                scale = 0.5 + random.randint(0, self.scale_factor) / 10.0
                image, label = resize_long_side(image, int(self.base_size * scale + 0.5), label)
                image, label = self._crop(image, label, random_offset=True)
            else:
                image, label = normalize(image), self.convert_label(label)
            if self.flip and np.random.choice(2) == 0:
                image, label = image[:, ::-1], label[:, ::-1]
            label = downsample_label(label, self.downsample_rate)
            return image, label
        if self.center_crop:
            image, label = resize_long_side(image, self.base_size, label)
            return self._crop(image, label, random_offset=False)
        return normalize(image), self.convert_label(label)

    def load(self, index: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
        """Reads and transforms sample index; raises BadFileError for an unreadable file."""
        sample = self.files[index]
        image = self.read_image(sample.image)
        size = torch.tensor(image.shape[:2], dtype=torch.long)  # original (H, W)
        if not self.has_labels:
            if self.center_crop:
                out, _ = self._crop(resize_long_side(image, self.base_size)[0], None, random_offset=False)
            else:
                out = normalize(image)
            label = np.full(out.shape[:2], self.ignore_label, dtype=np.int64)
        else:
            raw = self.read_label(sample.label)
            if raw.shape != image.shape[:2]:
                raise BadFileError(sample.label, f"label is {raw.shape[1]}x{raw.shape[0]} but its image "
                                                 f"{sample.image} is {image.shape[1]}x{image.shape[0]}")
            out, label = self.gen_sample(image, raw)
        chw = torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))  # (3, H, W)
        return chw, torch.from_numpy(np.ascontiguousarray(label)), size, sample.name

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
        if not self.skip_bad_files:
            return self.load(index)
        for attempt in range(len(self.files)):
            i = (index + attempt) % len(self.files)
            if i in self._bad:
                continue
            try:
                return self.load(i)
            except BadFileError as exc:
                self._bad.add(i)
                logger.warning("skipping unreadable file %s (DATASET.SKIP_BAD_FILES): %s", exc.path, exc)
        raise ValueError(f"no readable sample left in this split. {self.layout_hint}")
