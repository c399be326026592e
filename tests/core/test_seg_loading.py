"""Loading the original project's files into segmentation models: TEST.MODEL_FILE and MODEL.PRETRAINED."""
import logging
import os

import torch

from mdeq.config import check_config, load_config
from mdeq.core.segmentation import build_model, load_test_model
from mdeq.models import get_cls_net, get_seg_net
from original_format import spec, write_original_cls, write_original_seg

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEAD = {"classifier", "incre_modules", "downsamp_modules", "final_layer"}


def _cfg(experiment, opts=()):
    return check_config(load_config(os.path.join(ROOT, "experiments", experiment), list(opts)))


def _randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if "running_var" in name
                        else torch.randn(t.shape, generator=g) * 0.05)
    return model


def test_original_cityscapes_file_loads_in_the_test_model_loader(tmp_path):
    cfg = _cfg("cityscapes/seg_mdeq_SMALL.yaml", ["MODEL.INIT_WEIGHTS", "False"])
    source = _randomise(get_seg_net(cfg), 0).eval()
    path = write_original_seg(source, spec("cityscapes__seg_mdeq_SMALL"), str(tmp_path / "MDEQ_Small_Seg.pkl"))
    raw = torch.load(path, weights_only=True)
    assert all(k.startswith(("model.", "loss.")) for k in raw) and "loss.criterion.weight" in raw
    model, fmt = load_test_model(cfg, path)
    assert "prefix 'model.' removed" in fmt and "loss keys ignored" in fmt and "original MDEQ layout" in fmt
    assert not model.training
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x, train_step=0), source(x, train_step=0))


def test_imagenet_file_as_pretrained_loads_the_trunk_and_names_dropped_modules(tmp_path, caplog):
    cls_cfg = _cfg("imagenet/cls_mdeq_SMALL.yaml", ["MODEL.INIT_WEIGHTS", "False"])
    source = _randomise(get_cls_net(cls_cfg), 1)
    path = write_original_cls(source, spec("imagenet__cls_mdeq_SMALL"), str(tmp_path / "MDEQ_Small_Cls.pkl"))
    seg_cfg = _cfg("cityscapes/seg_mdeq_SMALL.yaml", ["MODEL.PRETRAINED", path])
    with caplog.at_level(logging.INFO):
        model, report = build_model(seg_cfg)
    dropped = {k.split(".")[0] for k in report["dropped"]}
    assert dropped == HEAD
    assert report["misshapen"] == []
    assert {k.split(".")[0] for k in report["not_in_file"]} == {"last_layer"}
    for module in HEAD:
        assert module in caplog.text
    src = source.state_dict()
    trunk = [k for k in model.state_dict() if not k.startswith("last_layer.")]
    assert trunk and set(report["loaded"]) == set(trunk)
    for key in trunk:
        assert torch.equal(model.state_dict()[key], src[key]), key
