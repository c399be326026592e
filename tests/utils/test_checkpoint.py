"""Checkpoint loading: original formats, strict errors, transfer loading, refusing code, atomic writes."""
import os
import pickle

import pytest
import torch

from mdeq.config import check_config, load_config
from mdeq.models import get_cls_net, get_seg_net
from mdeq.core.checkpointing import newest_valid_checkpoint
from mdeq.utils.checkpoint import CheckpointError, safe_load, save_checkpoint
from mdeq.utils.state_dict import load_pretrained, load_strict
from original_format import spec, write_original_cls, write_original_seg

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cfg_for(experiment, extra=()):
    return check_config(load_config(os.path.join(ROOT, "experiments", experiment), list(extra)))


def _randomise(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                if "running_var" in name:
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                else:
                    t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return model


def test_original_tiny_file_loads_and_gives_identical_outputs(tmp_path):
    cfg = cfg_for("cifar/cls_mdeq_TINY.yaml")
    torch.manual_seed(0)
    source = _randomise(get_cls_net(cfg)).eval()
    path = write_original_cls(source, spec("cifar__cls_mdeq_TINY"), str(tmp_path / "tiny.pkl"))
    raw = torch.load(path, weights_only=True)
    assert any(k.startswith("fullstage_copy.") for k in raw) and any(k.startswith("deq.func_copy.") for k in raw)

    target = get_cls_net(cfg).eval()
    fmt = load_strict(target, path)
    assert "original MDEQ layout" in fmt
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(source(x, train_step=0), target(x, train_step=0))


def test_original_segmentation_file_with_model_prefix_and_loss_keys(tmp_path):
    cfg = cfg_for("cityscapes/seg_mdeq_SMALL.yaml", ["MODEL.INIT_WEIGHTS", "False", "MODEL.PRETRAINED", ""])
    torch.manual_seed(1)
    source = _randomise(get_seg_net(cfg)).eval()
    path = write_original_seg(source, spec("cityscapes__seg_mdeq_SMALL"), str(tmp_path / "seg.pkl"))
    target = get_seg_net(cfg).eval()
    fmt = load_strict(target, path)
    assert "prefix 'model.' removed" in fmt and "loss keys ignored" in fmt
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(source(x, train_step=0), target(x, train_step=0))


def test_ddp_prefix_and_training_checkpoint(tmp_path):
    cfg = cfg_for("cifar/cls_mdeq_TINY.yaml")
    source = _randomise(get_cls_net(cfg))
    ckpt = {"epoch": 3, "model": "mdeq", "perf": 0.5,
            "state_dict": {"module." + k: v for k, v in source.state_dict().items()}}
    save_checkpoint(ckpt, str(tmp_path / "c.pth.tar"))
    target = get_cls_net(cfg)
    fmt = load_strict(target, str(tmp_path / "c.pth.tar"))
    assert "training checkpoint" in fmt and "epoch 3" in fmt and "'module.'" in fmt
    for k, v in source.state_dict().items():
        assert torch.equal(v, target.state_dict()[k])


def test_wrong_shape_is_refused_naming_key_and_both_shapes(tmp_path):
    cfg = cfg_for("cifar/cls_mdeq_TINY.yaml")
    sd = get_cls_net(cfg).state_dict()
    sd["classifier.weight"] = torch.zeros(7, 200)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as err:
        load_strict(get_cls_net(cfg), str(tmp_path / "bad.pth"))
    assert "classifier.weight: (7, 200) vs (10, 200)" in str(err.value)


def test_checkpoint_of_another_architecture_lists_missing_and_unexpected(tmp_path):
    small = get_cls_net(cfg_for("cifar/cls_mdeq_TINY.yaml"))
    torch.save(small.state_dict(), tmp_path / "tiny.pth")
    large = get_cls_net(cfg_for("cifar/cls_mdeq_LARGE.yaml", ["MODEL.INIT_WEIGHTS", "False"]))
    with pytest.raises(CheckpointError) as err:
        load_strict(large, str(tmp_path / "tiny.pth"))
    msg = str(err.value)
    assert "missing in the file" in msg and "stage0.0.weight" in msg and "shape in file vs model" in msg
    assert "another experiment file" in msg


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_pickle_that_would_run_code_is_refused_and_does_not_run(tmp_path, writer):
    marker = str(tmp_path / "pwned")
    path = str(tmp_path / "evil.pkl")
    obj = {"state_dict": {"a": torch.zeros(1)}, "x": _Payload(marker)}
    if writer == "torch":
        torch.save(obj, path)
    else:
        with open(path, "wb") as fh:
            pickle.dump(obj, fh)
    with pytest.raises(CheckpointError, match="refused to load"):
        safe_load(path)
    model = get_cls_net(cfg_for("cifar/cls_mdeq_TINY.yaml"))
    with pytest.raises(CheckpointError):
        load_strict(model, path)
    with pytest.raises(CheckpointError):
        load_pretrained(model, path)
    assert not os.path.exists(marker)


def test_truncated_empty_and_non_checkpoint_files(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"w": torch.randn(100, 100)}, good)
    data = good.read_bytes()
    (tmp_path / "trunc.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "text.pth").write_text("hello, I am not a checkpoint\n")
    for name, message in [("trunc.pth", "not a readable checkpoint"), ("empty.pth", "is empty"),
                          ("text.pth", "not a readable checkpoint")]:
        with pytest.raises(CheckpointError, match=message):
            safe_load(str(tmp_path / name))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        safe_load(str(tmp_path / "missing.pth"))


def test_transfer_loading_drops_what_the_model_lacks(tmp_path):
    cls_cfg = cfg_for("imagenet/cls_mdeq_SMALL.yaml", ["MODEL.INIT_WEIGHTS", "False"])
    cls_model = _randomise(get_cls_net(cls_cfg))
    path = write_original_cls(cls_model, spec("imagenet__cls_mdeq_SMALL"), str(tmp_path / "imagenet.pkl"))
    seg_cfg = cfg_for("cityscapes/seg_mdeq_SMALL.yaml", ["MODEL.INIT_WEIGHTS", "False", "MODEL.PRETRAINED", ""])
    seg_model = get_seg_net(seg_cfg)
    before = {k: v.clone() for k, v in seg_model.state_dict().items()}
    report = load_pretrained(seg_model, path)
    sd = seg_model.state_dict()
    assert torch.equal(sd["fullstage.branches.0.blocks.0.conv1.weight_v"],
                       cls_model.state_dict()["fullstage.branches.0.blocks.0.conv1.weight_v"])
    assert torch.equal(sd["stage0.0.weight"], cls_model.state_dict()["stage0.0.weight"])
    assert torch.equal(sd["last_layer.0.weight"], before["last_layer.0.weight"])  # not in the file
    assert any(k.startswith("classifier.") for k in report["dropped"])
    assert any(k.startswith("last_layer.") for k in report["not_in_file"])


def test_weight_norm_and_plain_kernels_convert(tmp_path):
    wn = _randomise(get_cls_net(cfg_for("cifar/cls_mdeq_TINY.yaml"))).eval()
    torch.save(wn.state_dict(), tmp_path / "wn.pth")
    plain = get_cls_net(cfg_for("cifar/cls_mdeq_TINY.yaml", ["MODEL.WNORM", "False"])).eval()
    load_strict(plain, str(tmp_path / "wn.pth"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(wn(x, train_step=0), plain(x, train_step=0), atol=1e-5)


def test_save_is_atomic_and_newest_valid_is_found(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pth.tar")
    save_checkpoint({"epoch": 1, "state_dict": {"w": torch.ones(2)}}, path)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"epoch": 2, "state_dict": {"w": torch.zeros(2)}}, path)
    monkeypatch.undo()
    assert safe_load(path)["epoch"] == 1
    assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == []
    other = str(tmp_path / "model_best.pth.tar")
    save_checkpoint({"epoch": 5, "state_dict": {"w": torch.ones(2)}}, other)
    (tmp_path / "broken.pth.tar").write_bytes(b"\x00garbage")
    found = newest_valid_checkpoint([path, other, str(tmp_path / "broken.pth.tar")])
    assert found[0] == other and found[1]["epoch"] == 5
