"""Full-image inference: the original fusion against numbers recorded from the original code
(tests/data/original_seg_oracle.json, see tests/data/README_seg.md), and the prob fusion's multi-scale, flip and
sliding windows against single-scale whole-image inference."""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mdeq.config import check_config, load_config
from mdeq.core.seg_inference import (InferenceSettings, forward_probs, original_window_spans, predict_labels,
                                     predict_probs, predict_scores, scaled_size, settings_from_cfg,
                                     single_scale_probs, sliding_window_probs, window_starts)
from mdeq.models import get_seg_net

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
with open(os.path.join(ROOT, "tests", "data", "original_seg_oracle.json")) as _fh:
    ORACLE = json.load(_fh)["inference"]
K = 5
TINY = ["MODEL.EXTRA.FULL_STAGE.NUM_BRANCHES", "2", "MODEL.EXTRA.FULL_STAGE.NUM_CHANNELS", "[8, 16]",
        "MODEL.EXTRA.FULL_STAGE.NUM_BLOCKS", "[1, 1]", "MODEL.EXPANSION_FACTOR", "1", "MODEL.NUM_GROUPS", "2",
        "MODEL.F_THRES", "4", "MODEL.B_THRES", "4", "DATASET.NUM_CLASSES", str(K)]


class PointwiseNet(nn.Module):
    """A 1x1-convolution stand-in: every output pixel depends on its input pixel only (translation- and
    flip-equivariant)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Tanh(), nn.Conv2d(8, K, 1))

    def forward(self, x):
        return self.net(x)


class SkewedNet(nn.Module):
    """Not flip-equivariant: a 3x3 convolution with a one-sided kernel, then a stride-2 pooling."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, K, 3, padding=1)
        with torch.no_grad():
            self.conv.weight[:, :, :, 0] = 0

    def forward(self, x):
        return F.avg_pool2d(self.conv(x), 2, ceil_mode=True)


class CountingNet(nn.Module):
    """Records the crops it sees."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def forward(self, x):
        self.shapes.append(tuple(x.shape[-2:]))
        return torch.zeros(x.shape[0], K, x.shape[2], x.shape[3])


def _image(h, w, seed=0):
    return torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _tiny_mdeq():
    cfg = check_config(load_config(os.path.join(ROOT, "experiments/cityscapes/seg_mdeq_SMALL.yaml"), TINY))
    torch.manual_seed(0)
    return get_seg_net(cfg).eval()


def test_scale_one_without_flip_equals_whole_image_inference_of_the_mdeq():
    model = _tiny_mdeq()
    image = _image(24, 40)
    with torch.no_grad():
        whole = F.softmax(F.interpolate(model(image), size=(24, 40), mode="bilinear", align_corners=False), 1)
    settings = InferenceSettings(scales=(1.0,), flip=False, crop_size=(32, 64))
    assert torch.allclose(predict_probs(model, image, settings), whole, atol=1e-6)
    # scale 1 relative to a base size equal to the long side: no resampling either
    settings = InferenceSettings(scales=(1.0,), flip=False, crop_size=(32, 64), base_size=40)
    assert torch.allclose(predict_probs(model, image, settings), whole, atol=1e-6)


def test_sliding_windows_cover_every_pixel_and_match_whole_image_for_a_pointwise_net():
    assert window_starts(10, 10, 6) == [0]
    for length, crop in ((50, 16), (33, 32), (100, 7)):
        stride = max(1, int(crop * 2 / 3))
        starts = window_starts(length, crop, stride)
        covered = torch.zeros(length)
        for s in starts:
            assert 0 <= s and s + crop <= length
            covered[s:s + crop] += 1
        assert torch.all(covered > 0)
        assert all(b - a <= stride for a, b in zip(starts, starts[1:]))

    model = PointwiseNet().eval()
    image = _image(45, 70)
    with torch.no_grad():
        whole = forward_probs(model, image)
        slid = sliding_window_probs(model, image, (16, 24))
        assert slid.shape == whole.shape
        assert torch.allclose(slid, whole, atol=1e-6)
        # predict_probs switches to windows because the image is larger than the crop, with the same result
        assert torch.allclose(predict_probs(model, image, InferenceSettings(crop_size=(16, 24))), whole, atol=1e-6)

    counter = CountingNet()
    sliding_window_probs(counter, image, (16, 24))
    assert set(counter.shapes) == {(16, 24)}
    assert len(counter.shapes) == len(window_starts(45, 16, 10)) * len(window_starts(70, 24, 16))


def test_sliding_windows_pad_an_image_smaller_than_the_crop_in_one_direction():
    model = PointwiseNet().eval()
    image = _image(10, 50)  # shorter than the crop, wider than it
    with torch.no_grad():
        slid = sliding_window_probs(model, image, (16, 24))
        assert slid.shape[-2:] == (10, 50)
        assert torch.allclose(slid, forward_probs(model, image), atol=1e-6)


def test_sliding_windows_average_overlaps():
    class PositionNet(nn.Module):  # output depends on the window, not only the pixel
        def forward(self, x):
            return torch.zeros(1, 2, *x.shape[-2:]) + torch.tensor([0.0, 1.0]).view(1, 2, 1, 1) * x.mean()

    image = torch.zeros(1, 3, 10, 20)
    image[..., 10:] = 1.0
    got = sliding_window_probs(PositionNet(), image, (10, 12))  # windows at x = 0 and 8
    p = [F.softmax(torch.tensor([0.0, image[..., x0:x0 + 12].mean()]), 0)[1] for x0 in (0, 8)]
    assert torch.allclose(got[0, 1, 0, :8], p[0].expand(8))
    assert torch.allclose(got[0, 1, 0, 8:12], ((p[0] + p[1]) / 2).expand(4))
    assert torch.allclose(got[0, 1, 0, 12:], p[1].expand(8))


def test_flip_is_averaged_with_the_prediction_flipped_back():
    model = SkewedNet().eval()
    image = _image(16, 20)
    with torch.no_grad():
        plain = forward_probs(model, image)
        flipped_back = forward_probs(model, image.flip(-1)).flip(-1)
        assert not torch.allclose(plain, flipped_back, atol=1e-3)
        got = single_scale_probs(model, image, (32, 32), flip=True)
        assert torch.allclose(got, 0.5 * (plain + flipped_back), atol=1e-6)


def test_flip_changes_nothing_for_a_flip_equivariant_model():
    model = PointwiseNet().eval()
    symmetric = _image(12, 10)
    symmetric = torch.cat([symmetric, symmetric.flip(-1)], dim=-1)  # (1, 3, 12, 20), mirror symmetric
    for image in (symmetric, _image(12, 20)):
        no_flip = predict_probs(model, image, InferenceSettings(crop_size=(32, 32)))
        flip = predict_probs(model, image, InferenceSettings(flip=True, crop_size=(32, 32)))
        assert torch.allclose(flip, no_flip, atol=1e-6)


def test_multi_scale_is_the_average_of_the_resized_back_scales():
    model = SkewedNet().eval()
    image = _image(20, 30)
    settings = InferenceSettings(scales=(0.5, 1.0, 1.5), crop_size=(64, 64))
    got = predict_probs(model, image, settings)
    parts = []
    with torch.no_grad():
        for s in (0.5, 1.0, 1.5):
            size = (int(20 * s + 0.5), int(30 * s + 0.5))
            p = forward_probs(model, F.interpolate(image, size=size, mode="bilinear", align_corners=False))
            parts.append(F.interpolate(p, size=(20, 30), mode="bilinear", align_corners=False))
    assert torch.allclose(got, sum(parts) / 3, atol=1e-6)
    assert torch.allclose(got.sum(1), torch.ones(1, 20, 30), atol=1e-5)  # still distributions


def test_scaled_size_uses_the_long_side_with_a_base_size():
    assert scaled_size(1024, 2048, 0.75, 2048) == (768, 1536)
    assert scaled_size(1024, 2048, 1.0, None) == (1024, 2048)
    assert scaled_size(30, 20, 0.5, 40) == (20, 13)


@pytest.mark.parametrize("multi", [False, True])
def test_settings_from_cfg_prob_fusion(multi):
    opts = ["TEST.FUSION", "prob", "TEST.MULTI_SCALE", str(multi), "TEST.SCALE_LIST", "[0.5, 1.0]",
            "TEST.FLIP_TEST", "True", "TEST.IMAGE_SIZE", "[64, 32]", "TEST.BASE_SIZE", "64"]
    cfg = check_config(load_config(os.path.join(ROOT, "experiments/cityscapes/seg_mdeq_SMALL.yaml"), opts))
    s = settings_from_cfg(cfg)
    assert s.crop_size == (32, 64) and s.flip and s.fusion == "prob" and not s.align_corners
    assert s.scales == ((0.5, 1.0) if multi else (1.0,))
    assert s.base_size == (64 if multi else None)
    t = settings_from_cfg(cfg, training=True)
    assert t.scales == (1.0,) and not t.flip and t.base_size is None and t.crop_size == (32, 64)


@pytest.mark.parametrize("name", ["SMALL", "LARGE", "XL"])
def test_shipped_yamls_default_to_the_original_protocol(name):
    opts = ["TEST.SCALE_LIST", "[0.75, 1.25]", "TEST.FLIP_TEST", "True"]  # MULTI_SCALE stays false
    cfg = check_config(load_config(os.path.join(ROOT, f"experiments/cityscapes/seg_mdeq_{name}.yaml"), opts))
    s = settings_from_cfg(cfg)
    # the original read TEST.SCALE_LIST whatever TEST.MULTI_SCALE said, relative to TEST.BASE_SIZE
    assert s.fusion == "original" and s.scales == (0.75, 1.25) and s.base_size == 2048 and s.flip
    assert s.crop_size == (1024, 2048) and not s.align_corners and s.flip_train_step == 0
    t = settings_from_cfg(cfg, training=True)  # the original's validation: one whole-image forward
    assert t.fusion == "original" and t.crop_size is None and t.scales == (1.0,) and not t.flip
    assert t.align_corners and t.base_size is None


def test_unknown_fusion_is_a_clear_error():
    with pytest.raises(ValueError, match="TEST.FUSION: unknown fusion 'mean'; valid names are original, prob"):
        InferenceSettings(fusion="mean")


# ------------------------------------------------------------------------------------------ original fusion
class OracleNet(nn.Module):
    """The recording script's fixed network (a 3x3 convolution with stride 2), recording its train_step."""

    def __init__(self):
        super().__init__()
        k = ORACLE["num_classes"]
        self.conv = nn.Conv2d(3, k, 3, stride=2, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor(ORACLE["conv_weight"]))
            self.conv.bias.copy_(torch.tensor(ORACLE["conv_bias"]))
        self.steps = []

    def forward(self, x, train_step=-1):
        self.steps.append(train_step)
        return self.conv(x)


@pytest.mark.parametrize("case", range(len(ORACLE["cases"])))
def test_original_fusion_equals_the_original_code(case):
    """Two and three scales, with and without flip; scales above 1 slide end-aligned windows (recorded)."""
    rec = ORACLE["cases"][case]
    image = torch.tensor(ORACLE["image"], dtype=torch.float32)
    net = OracleNet().eval()
    settings = InferenceSettings(scales=tuple(rec["scales"]), flip=rec["flip"], crop_size=tuple(ORACLE["crop_size"]),
                                 base_size=ORACLE["base_size"], fusion="original", align_corners=False,
                                 flip_train_step=0)
    got = predict_scores(net, image, settings)
    expected = torch.tensor(rec["pred"], dtype=torch.float32)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    # the same network calls in the same order: plain passes at -1, flipped ones at train_step 0
    assert net.steps == rec["train_steps"]
    assert torch.equal(predict_labels(net, image, settings), expected.argmax(1))
    # the original's test-time upsampling (F.upsample) had align_corners False: True would not match
    aligned = predict_scores(net, image, InferenceSettings(**{**settings.__dict__, "align_corners": True}))
    assert (aligned - expected).abs().max() > 1e-3 * float(expected.abs().max())


def test_original_fusion_differs_from_probability_averaging():
    rec = next(c for c in ORACLE["cases"] if c["flip"] and len(c["scales"]) == 2)
    image = torch.tensor(ORACLE["image"], dtype=torch.float32)
    kw = dict(scales=tuple(rec["scales"]), flip=True, crop_size=tuple(ORACLE["crop_size"]),
              base_size=ORACLE["base_size"])
    prob = predict_scores(OracleNet().eval(), image, InferenceSettings(fusion="prob", **kw))
    expected = torch.tensor(rec["pred"])
    assert (prob - expected).abs().max() > 1.0  # not even the same kind of numbers
    assert torch.allclose(prob.sum(1), torch.ones_like(prob.sum(1)), atol=1e-5)


def test_original_window_layout():
    # stride one crop, the last window moved back to end at the border; a short axis gets one short window
    assert original_window_spans(18, 8) == [(0, 8), (8, 16), (10, 18)]
    assert original_window_spans(30, 12) == [(0, 12), (12, 24), (18, 30)]
    assert original_window_spans(24, 12) == [(0, 12), (12, 24)]
    assert original_window_spans(5, 8) == [(0, 5)]
    counter = CountingNet()
    settings = InferenceSettings(scales=(1.5,), crop_size=(8, 12), base_size=20, fusion="original")
    predict_scores(counter, _image(12, 20), settings)  # 18 x 30 at scale 1.5
    assert counter.shapes == [(8, 12)] * 9
    counter.shapes = []
    predict_scores(counter, _image(12, 20), InferenceSettings(scales=(1.0,), crop_size=(8, 12), base_size=20))
    assert counter.shapes == [(12, 20)]  # scales up to 1 run the whole image, even when larger than the crop


def test_original_flip_averages_logits_and_takes_exp():
    model = SkewedNet().eval()
    image = _image(16, 20)
    with torch.no_grad():
        a = F.interpolate(model(image), size=(16, 20), mode="bilinear", align_corners=False)
        b = F.interpolate(model(image.flip(-1)), size=(16, 20), mode="bilinear", align_corners=False).flip(-1)
    settings = InferenceSettings(flip=True, crop_size=(32, 32), fusion="original")
    assert torch.allclose(predict_scores(model, image, settings), ((a + b) * 0.5).exp(), rtol=1e-5)


def test_flip_train_step_reaches_the_mdeq():
    """The original's flipped pass ran the MDEQ unrolled (its default train_step 0): with TEST.FLIP_TRAIN_STEP 0
    and PRETRAIN_STEPS > 0 the flipped pass here is the unrolled one; -1 solves it to equilibrium."""
    model = _tiny_mdeq()  # TRAIN.PRETRAIN_STEPS of the SMALL yaml, > 0
    image = _image(16, 24)
    with torch.no_grad():
        plain = F.interpolate(model(image), size=(16, 24), mode="bilinear", align_corners=False)
        unrolled = F.interpolate(model(image.flip(-1), train_step=0), size=(16, 24), mode="bilinear",
                                 align_corners=False).flip(-1)
        solved = F.interpolate(model(image.flip(-1)), size=(16, 24), mode="bilinear",
                               align_corners=False).flip(-1)
    assert not torch.allclose(unrolled, solved, atol=1e-4)
    for step, other in ((0, unrolled), (-1, solved)):
        settings = InferenceSettings(flip=True, crop_size=(32, 32), fusion="original", flip_train_step=step)
        got = predict_scores(model, image, settings)
        assert torch.allclose(got, ((plain + other) * 0.5).exp(), rtol=1e-4, atol=1e-6)


def test_validation_pass_is_the_argmax_of_upsampled_logits_with_align_corners():
    model = SkewedNet().eval()
    image = _image(15, 21)
    settings = InferenceSettings(crop_size=None, fusion="original", align_corners=True)
    with torch.no_grad():
        logits = model(image)
        expected = F.interpolate(logits, size=(15, 21), mode="bilinear", align_corners=True).argmax(1)
        other = F.interpolate(logits, size=(15, 21), mode="bilinear", align_corners=False).argmax(1)
    assert not torch.equal(expected, other)  # the choice matters on this input
    assert torch.equal(predict_labels(model, image, settings), expected)
