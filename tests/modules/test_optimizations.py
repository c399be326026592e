"""Copies of a model in training: ``copy.deepcopy`` (EMA and SWA models) and pickling after a training step, with
weight-normalised convolutions and variational dropout whose per-forward state carries an autograd graph."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F

from mdeq.config import check_config, load_config
from mdeq.models import get_cls_net
from mdeq.modules.optimizations import VariationalDropout2d, WNConv2d

# Two branches of 8 and 16 channels, weight norm and variational dropout on, equilibrium mode from step 1 on.
TINY = [
    "MODEL.EXTRA.FULL_STAGE.NUM_BRANCHES", "2", "MODEL.EXTRA.FULL_STAGE.NUM_CHANNELS", "[8, 16]",
    "MODEL.EXTRA.FULL_STAGE.NUM_BLOCKS", "[1, 1]", "MODEL.EXTRA.FULL_STAGE.HEAD_CHANNELS", "[4, 8]",
    "MODEL.EXTRA.FULL_STAGE.FINAL_CHANSIZE", "32", "MODEL.NUM_GROUPS", "4", "MODEL.EXPANSION_FACTOR", "2",
    "MODEL.NUM_CLASSES", "10", "MODEL.WNORM", "True", "MODEL.DROPOUT", "0.25", "MODEL.DOWNSAMPLE_TIMES", "0",
    "MODEL.NUM_LAYERS", "2", "TRAIN.PRETRAIN_STEPS", "1", "DEQ.F_THRES", "4", "DEQ.B_THRES", "4",
    "DATASET.DATASET", "cifar10",
]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model():
    torch.manual_seed(0)
    return get_cls_net(check_config(load_config(None, TINY))).train()


def train_step(model, optimizer, step, seed):
    """One forward (unrolled at step 0, equilibrium after), backward and SGD step on a random batch; the dropout
    masks come from the global generator, seeded here."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x, train_step=step), y).backward()
    optimizer.step()


def eval_logits(model):
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(123))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(x)
    model.train(was_training)
    return out


def test_the_cached_kernel_and_mask_carry_a_graph_after_a_step_and_deepcopy_still_works():
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(2):
        train_step(model, optimizer, step, seed=step)
    convs = [m for m in model.modules() if isinstance(m, WNConv2d)]
    drops = [m for m in model.modules() if isinstance(m, VariationalDropout2d)]
    assert convs and drops
    # the situation that made deepcopy fail: a non-leaf kernel with a graph kept on the module, a mask drawn
    assert all(c._weight is not None and c._weight.grad_fn is not None for c in convs)
    assert all(d.mask is not None for d in drops)
    with pytest.raises(RuntimeError, match="graph leaves"):
        copy.deepcopy(convs[0]._weight)  # what torch refuses, and the copy below must avoid

    twin = copy.deepcopy(model)

    # the copy holds no per-forward state, and the original keeps its own (copying does not disturb training)
    assert all(m._weight is None for m in twin.modules() if isinstance(m, WNConv2d))
    assert all(m.mask is None for m in twin.modules() if isinstance(m, VariationalDropout2d))
    assert all(c._weight is not None for c in convs) and all(d.mask is not None for d in drops)
    # same parameters and buffers, in separate storage
    ours, theirs = model.state_dict(), twin.state_dict()
    assert list(ours) == list(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
        assert ours[key].data_ptr() != theirs[key].data_ptr() or ours[key].numel() == 0, key
    # the original's cache holds the kernel of the weights before the optimizer step; the copy's kernel comes
    # afresh from the current g and v
    for original, copied in zip(convs, (m for m in twin.modules() if isinstance(m, WNConv2d))):
        assert not torch.equal(original._weight.detach(), original.compute_weight().detach())
        assert torch.equal(copied.weight, original.compute_weight())
    # identical evaluation output (the original's stale training cache must not leak into either)
    assert torch.equal(eval_logits(twin), eval_logits(model))


def test_a_copy_trains_on_its_own_and_leaves_the_original_alone():
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    train_step(model, optimizer, 0, seed=0)
    train_step(model, optimizer, 1, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    twin = copy.deepcopy(model)
    train_step(twin, torch.optim.SGD(twin.parameters(), lr=0.05), 2, seed=2)
    assert any(not torch.equal(before[k], v) for k, v in twin.state_dict().items())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # and the original, trained the same way, reaches exactly the copy's weights
    train_step(model, optimizer, 2, seed=2)
    assert all(torch.equal(v, twin.state_dict()[k]) for k, v in model.state_dict().items())


def test_ema_of_deep_copies_follows_the_running_average():
    """An EMA model made by deepcopy after a step and updated after every later step, and an SWA-style list of
    snapshots, both taken while the model is mid-training (caches holding graphs)."""
    decay = 0.8
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train_step(model, optimizer, 0, seed=0)
    ema = copy.deepcopy(model).eval()
    expected = {k: v.detach().clone().double() for k, v in model.state_dict().items() if v.is_floating_point()}
    snapshots = []
    for step in range(1, 4):
        train_step(model, optimizer, step, seed=step)
        snapshots.append(copy.deepcopy(model))
        with torch.no_grad():
            for (name, e), p in zip(ema.state_dict().items(), model.state_dict().values()):
                if e.is_floating_point():
                    e.mul_(decay).add_(p.detach(), alpha=1 - decay)
                    expected[name] = decay * expected[name] + (1 - decay) * p.detach().double()
    for name, value in ema.state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(value.double(), expected[name], rtol=1e-6, atol=1e-7), name
    # the EMA model's normalised kernels are those of its averaged g and v (no stale cache from the copy)
    for m in ema.modules():
        if isinstance(m, WNConv2d):
            assert torch.equal(m.weight, m.compute_weight())
    logits = eval_logits(ema)
    assert torch.isfinite(logits).all() and not torch.equal(logits, eval_logits(model))
    # the snapshots are the weights at each step: the last one is the model now, the first one is not
    assert all(torch.equal(v, snapshots[-1].state_dict()[k]) for k, v in model.state_dict().items())
    assert any(not torch.equal(v, snapshots[0].state_dict()[k]) for k, v in model.state_dict().items())


def test_a_whole_model_pickles_after_a_step():
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    train_step(model, optimizer, 0, seed=0)
    train_step(model, optimizer, 1, seed=1)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(eval_logits(loaded), eval_logits(model))


def test_weight_norm_convolution_on_its_own():
    torch.manual_seed(0)
    conv = WNConv2d(3, 4, 3, padding=1)
    conv.refresh()
    x = torch.randn(2, 3, 5, 5)
    conv(x).square().sum().backward()
    twin = copy.deepcopy(conv)
    assert conv._weight is not None and twin._weight is None
    # the kernel is g * v / ||v|| per output filter
    v = conv.weight_v.detach()
    by_hand = conv.weight_g.detach() * v / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    assert torch.allclose(twin.weight, by_hand, atol=1e-7)
    assert torch.equal(twin(x), F.conv2d(x, twin.compute_weight(), None, 1, 1))
