"""Segmentation criteria: the original's losses recorded from its code (tests/data/original_seg_oracle.json, see
tests/data/README_seg.md), ignore handling, class weights, upsampling to the label size, OHEM against numpy."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mdeq.config import get_default_config
from mdeq.core.seg_criterion import OhemCrossEntropy, SegCrossEntropy, build_criterion
from mdeq.datasets import CITYSCAPES_CLASS_WEIGHTS, convert_label

IGNORE = 255
K = 19
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
with open(os.path.join(ROOT, "tests", "data", "original_seg_oracle.json")) as _fh:
    ORACLE = json.load(_fh)["losses"]


@pytest.mark.parametrize("case", range(len(ORACLE["cases"])))
def test_losses_and_gradients_equal_the_original_code(case):
    """CE and OHEM (weighted or not) on logits smaller than the label: align_corners=True upsampling."""
    rec = ORACLE["cases"][case]
    logits = torch.tensor(ORACLE["logits"], dtype=torch.float32, requires_grad=True)
    label = torch.tensor(ORACLE["label"])
    weight = torch.tensor(ORACLE["weight"], dtype=torch.float32) if rec["weighted"] else None
    if rec["kind"] == "ce":
        crit = SegCrossEntropy(ORACLE["ignore_label"], weight)
    else:
        crit = OhemCrossEntropy(ORACLE["ignore_label"], rec["thres"], rec["min_kept"], weight)
    assert crit.align_corners  # the default is the original's
    loss = crit(logits, label)
    loss.backward()
    assert loss.item() == pytest.approx(rec["loss"], rel=1e-5, abs=1e-6)
    torch.testing.assert_close(logits.grad, torch.tensor(rec["grad"], dtype=torch.float32), rtol=1e-5, atol=1e-6)
    # the other upsampling gives another loss on this input
    other = type(crit)(**{**_ctor_args(crit), "align_corners": False})
    assert abs(float(other(logits.detach(), label)) - rec["loss"]) > 1e-4


def _ctor_args(crit):
    args = {"ignore_label": crit.ignore_label, "weight": crit.weight}
    if isinstance(crit, OhemCrossEntropy):
        args.update(thresh=crit.thresh, min_kept=crit.min_kept)
    return args


def _batch(seed=0, b=2, h=6, w=10, ignore_fraction=0.3):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, K, h, w, generator=g) * 2
    label = torch.randint(0, K, (b, h, w), generator=g)
    label[torch.rand(b, h, w, generator=g) < ignore_fraction] = IGNORE
    return logits, label


def test_weighted_cross_entropy_equals_torch_and_ignores_ignored_pixels():
    logits, label = _batch()
    weight = torch.tensor(CITYSCAPES_CLASS_WEIGHTS)
    crit = SegCrossEntropy(IGNORE, weight)
    expected = F.cross_entropy(logits, label, weight=weight, ignore_index=IGNORE)
    assert torch.allclose(crit(logits, label), expected, atol=1e-6)
    # changing the logits at ignored pixels leaves the loss unchanged (and gives them zero gradient)
    changed = logits.clone()
    changed[(label == IGNORE).unsqueeze(1).expand_as(logits)] = 1e3
    assert torch.allclose(crit(changed, label), crit(logits, label), atol=1e-6)
    changed.requires_grad_(True)
    crit(changed, label).backward()
    assert torch.all(changed.grad[(label == IGNORE).unsqueeze(1).expand_as(logits)] == 0)
    # while changing a labelled pixel does change it
    other = logits.clone()
    i = torch.nonzero(label != IGNORE)[0]
    other[i[0], :, i[1], i[2]] += torch.randn(K)
    assert not torch.allclose(crit(other, label), crit(logits, label))


def test_raw_cityscapes_ids_mapped_to_ignore_carry_no_loss():
    raw = torch.tensor([[7, 0, 255, 26], [33, 1, 5, 8]], dtype=torch.uint8)  # 0, 1, 5, 255 are ignored ids
    label = convert_label(raw, ignore_label=IGNORE).unsqueeze(0)  # (1, 2, 4)
    assert label.tolist() == [[[0, IGNORE, IGNORE, 13], [18, IGNORE, IGNORE, 1]]]
    logits = torch.randn(1, K, 2, 4)
    crit = SegCrossEntropy(IGNORE)
    labelled = label != IGNORE
    expected = F.cross_entropy(logits.permute(0, 2, 3, 1)[labelled], label[labelled])
    assert torch.allclose(crit(logits, label), expected, atol=1e-6)


@pytest.mark.parametrize("align", [True, False])
def test_logits_are_upsampled_to_the_label_size(align):
    logits, _ = _batch(h=4, w=8)
    _, label = _batch(seed=1, h=16, w=32)
    crit = SegCrossEntropy(IGNORE, align_corners=align)
    up = F.interpolate(logits, size=(16, 32), mode="bilinear", align_corners=align)
    assert torch.allclose(crit(logits, label), F.cross_entropy(up, label, ignore_index=IGNORE), atol=1e-6)


def test_all_ignored_batch_gives_zero_not_nan():
    logits = torch.randn(1, K, 4, 4, requires_grad=True)
    label = torch.full((1, 4, 4), IGNORE)
    for crit in (SegCrossEntropy(IGNORE, torch.ones(K)), OhemCrossEntropy(IGNORE, 0.7, 10)):
        loss = crit(logits, label)
        assert float(loss.detach()) == 0.0
        loss.backward()
        assert torch.all(logits.grad == 0)


def _numpy_ohem(logits, label, thresh, min_kept, weight=None):
    """OHEM with the original's rule written directly in numpy (float64): k = min(min_kept, N - 1),
    threshold = max(thresh, k-th smallest true-class probability), keep the pixels strictly below it."""
    x = logits.double().numpy().transpose(0, 2, 3, 1).reshape(-1, K)  # (N, K)
    y = label.numpy().reshape(-1)
    valid = y != IGNORE
    x, y = x[valid], y[valid]
    x = x - x.max(axis=1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    p_true = np.exp(logp[np.arange(len(y)), y]).astype(np.float32)  # compared in float32, as the loss does
    w = np.ones(K) if weight is None else weight.double().numpy()
    losses = -logp[np.arange(len(y)), y] * w[y]
    k = min(min_kept, len(y) - 1)
    threshold = max(thresh, np.sort(p_true)[k])
    keep = p_true < threshold
    return losses[keep].mean(), int(keep.sum()), p_true


@pytest.mark.parametrize("thresh,min_kept", [(0.7, 5), (0.05, 40), (0.99, 1000)])
def test_ohem_matches_numpy(thresh, min_kept):
    logits, label = _batch(seed=3, h=8, w=12)
    # make a block of pixels easy: a huge logit for the true class
    easy = torch.zeros_like(label, dtype=torch.bool)
    easy[:, :3] = True
    easy &= label != IGNORE
    for b, i, j in torch.nonzero(easy).tolist():
        logits[b, label[b, i, j], i, j] = 30.0
    weight = torch.tensor(CITYSCAPES_CLASS_WEIGHTS)
    expected, kept, p_true = _numpy_ohem(logits, label, thresh, min_kept, weight)
    crit = OhemCrossEntropy(IGNORE, thresh, min_kept, weight)
    assert abs(float(crit(logits, label)) - expected) < 1e-5
    n_valid = int((label != IGNORE).sum())
    assert kept < n_valid  # easy pixels are dropped
    if min_kept < n_valid:
        assert kept >= min(min_kept, int((p_true < thresh).sum()))
    assert not np.isclose(expected, float(F.cross_entropy(logits, label, weight=weight, ignore_index=IGNORE)))


def test_ohem_with_min_kept_above_the_pixel_count_drops_the_easiest_like_the_original():
    logits, label = _batch(seed=4, h=4, w=4, ignore_fraction=0.0)
    prob = F.softmax(logits, 1).gather(1, label.unsqueeze(1)).reshape(-1)
    crit = OhemCrossEntropy(IGNORE, thresh=0.0, min_kept=10 ** 6)
    mask = crit.kept_mask(prob)
    assert int(mask.sum()) == prob.numel() - 1 and not bool(mask[torch.argmax(prob)])


def test_ohem_keeps_exactly_min_kept_hardest_when_the_threshold_is_low():
    logits, label = _batch(seed=5, h=8, w=8, ignore_fraction=0.0)
    crit = OhemCrossEntropy(IGNORE, thresh=1e-6, min_kept=7)
    prob = F.softmax(logits, 1).gather(1, label.unsqueeze(1)).reshape(-1)
    mask = crit.kept_mask(prob)
    assert int(mask.sum()) == 7
    assert set(torch.nonzero(mask).reshape(-1).tolist()) == set(torch.argsort(prob)[:7].tolist())
    losses = F.cross_entropy(logits, label, reduction="none").reshape(-1)
    assert torch.allclose(crit(logits, label), losses[torch.argsort(prob)[:7]].mean(), atol=1e-6)


def test_build_criterion_follows_the_config():
    cfg = get_default_config()
    cfg.TRAIN.IGNORE_LABEL = IGNORE
    weights = torch.tensor(CITYSCAPES_CLASS_WEIGHTS)
    crit = build_criterion(cfg, weights)
    assert type(crit) is SegCrossEntropy and torch.equal(crit.weight, weights)
    cfg.LOSS.CLASS_BALANCE = False
    assert build_criterion(cfg, weights).weight is None
    cfg.LOSS.USE_OHEM, cfg.LOSS.OHEMTHRES, cfg.LOSS.OHEMKEEP = True, 0.8, 123
    crit = build_criterion(cfg, weights)
    assert isinstance(crit, OhemCrossEntropy) and (crit.thresh, crit.min_kept, crit.ignore_label) == (0.8, 123, 255)
