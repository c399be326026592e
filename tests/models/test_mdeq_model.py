"""Model behaviour: unrolled mode, weight normalisation once per forward, fixed dropout masks, input channels."""
import pytest
import torch

from mdeq.config import check_config, load_config
from mdeq.models import get_cls_net, get_seg_net
from mdeq.modules.optimizations import WNConv2d

TINY = [
    "MODEL.EXTRA.FULL_STAGE.NUM_BRANCHES", "2", "MODEL.EXTRA.FULL_STAGE.NUM_CHANNELS", "[8, 16]",
    "MODEL.EXTRA.FULL_STAGE.NUM_BLOCKS", "[1, 1]", "MODEL.EXTRA.FULL_STAGE.HEAD_CHANNELS", "[4, 8]",
    "MODEL.EXTRA.FULL_STAGE.FINAL_CHANSIZE", "32", "MODEL.NUM_GROUPS", "4", "MODEL.EXPANSION_FACTOR", "2",
    "MODEL.NUM_CLASSES", "10", "MODEL.WNORM", "True", "MODEL.DOWNSAMPLE_TIMES", "0", "MODEL.NUM_LAYERS", "3",
    "TRAIN.PRETRAIN_STEPS", "100", "DATASET.DATASET", "cifar10",
]


def tiny_cfg(extra=()):
    cfg = load_config(None, TINY + list(extra))
    return check_config(cfg)


def test_unrolled_mode_is_num_layers_applications_of_f():
    torch.manual_seed(0)
    model = get_cls_net(tiny_cfg()).eval()
    x = torch.randn(2, 3, 16, 16)
    calls = []
    model.fullstage.register_forward_hook(lambda m, i, o: calls.append(1))
    out, info = model(x, train_step=0, return_info=True)
    assert info["mode"] == "unrolled" and len(calls) == 3
    # the same computation by hand
    xs = model.injection(x)
    z = [torch.zeros_like(e) for e in xs]
    for _ in range(3):
        z = model.fullstage(z, xs)
    assert torch.allclose(out, model.head(z), atol=1e-6)


def test_weight_norm_is_computed_once_per_forward(monkeypatch):
    model = get_cls_net(tiny_cfg()).eval()
    counts = []
    original = WNConv2d.compute_weight

    def counting(self):
        counts.append(1)
        return original(self)

    monkeypatch.setattr(WNConv2d, "compute_weight", counting)
    model(torch.randn(1, 3, 16, 16), train_step=0)
    n_wn = sum(isinstance(m, WNConv2d) for m in model.modules())
    assert n_wn == 2 * 2 + 2  # two per block, one per post-fusion layer
    assert len(counts) == n_wn  # once each, although f ran three times


def test_weight_norm_gradient_reaches_g_and_v():
    model = get_cls_net(tiny_cfg()).train()
    model(torch.randn(2, 3, 16, 16), train_step=0).sum().backward()
    conv = model.fullstage.branches[0].blocks[0].conv1
    assert conv.weight_g.grad is not None and conv.weight_g.grad.abs().sum() > 0
    assert conv.weight_v.grad is not None and conv.weight_v.grad.abs().sum() > 0


def test_dropout_mask_is_fixed_within_a_forward_and_redrawn_between():
    model = get_cls_net(tiny_cfg(["MODEL.DROPOUT", "0.5"])).train()
    drop = model.fullstage.branches[0].blocks[0].drop
    masks = []
    orig_forward = drop.forward
    drop.forward = lambda x: (masks.append(drop.mask.clone()), orig_forward(x))[1]
    x = torch.randn(4, 3, 16, 16)
    model(x, train_step=0)
    assert len(masks) == 3 and all(torch.equal(masks[0], m) for m in masks)
    assert masks[0].shape == (4, 8, 1, 1)
    model(x, train_step=0)
    assert not torch.equal(masks[0], masks[-1])  # 32 Bernoulli(0.5) draws agree by chance with p = 2**-32


@pytest.mark.parametrize("dataset,channels", [("fashion_mnist", 1), ("cifar10", 3), ("imagenet", 3)])
def test_input_channels_follow_the_dataset(dataset, channels):
    model = get_cls_net(tiny_cfg(["DATASET.DATASET", dataset]))
    assert model.downsample[0].weight.shape[1] == channels


@pytest.mark.parametrize("size", [28, 32, 17])
@pytest.mark.parametrize("branches", [2, 3])
def test_odd_resolutions_work(size, branches):
    extra = ["MODEL.EXTRA.FULL_STAGE.NUM_BRANCHES", str(branches),
             "MODEL.EXTRA.FULL_STAGE.NUM_CHANNELS", str([8, 16, 16][:branches]),
             "MODEL.EXTRA.FULL_STAGE.NUM_BLOCKS", str([1] * branches),
             "MODEL.EXTRA.FULL_STAGE.HEAD_CHANNELS", str([4, 8, 8][:branches]), "DATASET.DATASET", "fashion_mnist"]
    model = get_cls_net(tiny_cfg(extra)).eval()
    assert model(torch.randn(2, 1, size, size), train_step=0).shape == (2, 10)


def test_segmentation_output_shape():
    cfg = tiny_cfg(["MODEL.DOWNSAMPLE_TIMES", "2", "DATASET.NUM_CLASSES", "5"])
    model = get_seg_net(cfg).eval()
    out = model(torch.randn(1, 3, 32, 48), train_step=0)
    assert out.shape == (1, 5, 8, 12)


def test_second_generation_options_change_the_model():
    plain = get_cls_net(tiny_cfg())
    cfg = tiny_cfg(["MODEL.BLOCK_GN_AFFINE", "False", "MODEL.FUSE_GN_AFFINE", "False",
                    "MODEL.POST_GN_AFFINE", "False", "MODEL.EXTRA.FULL_STAGE.BIG_KERNELS", "[2, 1]"])
    model = get_cls_net(cfg)
    keys = set(model.state_dict())
    assert "fullstage.branches.0.blocks.0.gn1.weight" not in keys
    assert "fullstage.post_fuse_layers.0.gnorm.weight" not in keys
    assert "fullstage.fuse_layers.0.1.net.gnorm.weight" not in keys
    assert model.fullstage.branches[0].blocks[0].conv2.weight_v.shape[-1] == 5
    assert model.fullstage.branches[1].blocks[0].conv1.weight_v.shape[-1] == 5
    assert model.fullstage.branches[1].blocks[0].conv2.weight_v.shape[-1] == 3
    assert sum(p.numel() for p in model.parameters()) != sum(p.numel() for p in plain.parameters())


def test_single_branch_f_skips_the_post_fusion_layers():
    """The original's f with one resolution is the residual block alone; the post-fusion layers exist (their
    parameters are in its state dicts) but are not applied, so they get no gradient."""
    extra = ["MODEL.EXTRA.FULL_STAGE.NUM_BRANCHES", "1", "MODEL.EXTRA.FULL_STAGE.NUM_CHANNELS", "[8]",
             "MODEL.EXTRA.FULL_STAGE.NUM_BLOCKS", "[1]", "MODEL.EXTRA.FULL_STAGE.HEAD_CHANNELS", "[4]"]
    torch.manual_seed(0)
    model = get_cls_net(tiny_cfg(extra)).train()
    x = torch.randn(2, 3, 8, 8)
    xs = model.injection(x)
    model.fullstage.prepare([e.shape for e in xs], x.device, x.dtype)
    z = [torch.randn_like(xs[0])]
    assert torch.equal(model.fullstage(z, xs)[0], model.fullstage.branches[0](z[0], xs[0]))
    model(x, train_step=0).sum().backward()
    post = [p.grad for p in model.fullstage.post_fuse_layers.parameters()]
    assert post and all(g is None for g in post)
    assert model.fullstage.branches[0].blocks[0].conv1.weight_v.grad.abs().sum() > 0


def test_the_model_builder_leaves_the_allocator_alone(monkeypatch):
    """Building a model changes nothing outside it (the run set-up tunes the CPU allocator)."""
    from mdeq.modules import optimizations

    called = []
    monkeypatch.setattr(optimizations, "tune_cpu_allocator", lambda *a, **k: called.append(1))
    get_cls_net(tiny_cfg(["DEVICE", "cpu"]))
    assert called == []
