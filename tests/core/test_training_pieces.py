"""The training engine's pieces: the resumable distributed sampler, random-state round trips, the bad-step guard,
optimizers and schedulers by name, and the Jacobian-loss weight schedule."""
import io
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from mdeq.config import get_default_config
from mdeq.core.checkpointing import rng_state, set_rng_state
from mdeq.core.data import ShardSampler
from mdeq.core.guard import BadStepGuard
from mdeq.core.trainer import jacobian_weight
from mdeq.core.optim import OPTIMIZERS, SCHEDULERS, build_optimizer, build_scheduler


# -------------------------------------------------------------------------------------------- ShardSampler
def shards(length, world_size, shuffle, pad, seed=0, epoch=0):
    out = []
    for rank in range(world_size):
        s = ShardSampler(length, shuffle=shuffle, seed=seed, pad=pad, rank=rank, world_size=world_size)
        s.set_epoch(epoch)
        out.append(list(s))
        assert len(s) == len(out[-1])
    return out


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("length", [1, 2, 5, 7, 10, 13, 101])
def test_eval_shards_cover_the_dataset_exactly_once(length, world_size, shuffle):
    parts = shards(length, world_size, shuffle, pad=False)
    everything = [i for part in parts for i in part]
    assert sorted(everything) == list(range(length))  # no index missing, none repeated
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("length", [1, 5, 7, 13, 101])
def test_train_shards_have_equal_length_and_cover_the_dataset(length, world_size):
    parts = shards(length, world_size, shuffle=True, pad=True, epoch=3)
    assert {len(p) for p in parts} == {math.ceil(length / world_size)}  # every rank runs the same steps
    assert set(i for p in parts for i in p) == set(range(length))
    assert sum(map(len, parts)) - length < world_size  # padding only to the next multiple


def test_order_depends_on_seed_and_epoch_only():
    def order(seed, epoch):
        s = ShardSampler(50, shuffle=True, seed=seed, pad=True, rank=0, world_size=1)
        s.set_epoch(epoch)
        return list(s)

    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    a = order(3, 2)
    torch.manual_seed(12345)  # the global generators play no part
    torch.rand(7)
    random.seed(999)
    np.random.seed(999)
    assert order(3, 2) == a
    assert order(3, 2) == order(3, 2)  # iterating again gives the same order
    assert order(3, 3) != a and order(4, 2) != a
    assert sorted(a) == list(range(50)) and a != list(range(50))
    s = ShardSampler(10, shuffle=False, seed=3, pad=True, rank=0, world_size=1)
    assert list(s) == list(range(10))


def test_rank_shards_of_one_epoch_come_from_one_permutation():
    s0 = ShardSampler(12, shuffle=True, seed=5, pad=False, rank=0, world_size=3)
    s1 = ShardSampler(12, shuffle=True, seed=5, pad=False, rank=1, world_size=3)
    s2 = ShardSampler(12, shuffle=True, seed=5, pad=False, rank=2, world_size=3)
    whole = list(ShardSampler(12, shuffle=True, seed=5, pad=False, rank=0, world_size=1))
    assert list(s0) == whole[0::3] and list(s1) == whole[1::3] and list(s2) == whole[2::3]


@pytest.mark.parametrize("world_size,rank", [(1, 0), (2, 1), (3, 2)])
def test_set_start_skips_this_ranks_first_samples(world_size, rank):
    s = ShardSampler(23, shuffle=True, seed=7, pad=True, rank=rank, world_size=world_size)
    s.set_epoch(4)
    full = list(s)
    for start in (0, 1, 5, len(full)):
        s.set_start(start)
        assert list(s) == full[start:] and len(s) == len(full) - start
    s.set_start(len(full) + 3)
    assert list(s) == [] and len(s) == 0
    s.set_start(0)
    assert list(s) == full


# ------------------------------------------------------------------------------------------ random states
def draws():
    return (torch.rand(4), torch.randn(3), np.random.rand(3), np.random.standard_normal(), random.random(),
            random.gauss(0, 1), random.randint(0, 10 ** 9))


def assert_same_draws(a, b):
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y)
        else:
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("through_file", [False, True])
def test_rng_state_round_trip(through_file):
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    random.gauss(0, 1)  # and in python's
    state = rng_state()
    if through_file:  # as in a checkpoint, loaded with weights_only
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)
    first = draws()
    draws()  # move on
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    set_rng_state(state)
    assert_same_draws(draws(), first)


# ----------------------------------------------------------------------------------------- BadStepGuard
def model_with_grad(value):
    model = nn.Linear(3, 2)
    for p in model.parameters():
        p.grad = torch.full_like(p, value)
    return model


def test_guard_accepts_finite_steps():
    guard = BadStepGuard(max_bad=3)
    assert guard.check(torch.tensor(1.5), model_with_grad(0.1))
    assert guard.check(torch.tensor(0.0), nn.Linear(2, 2))  # no gradients at all
    assert guard.consecutive == 0 and guard.total == 0 and not guard.exhausted


@pytest.mark.parametrize("bad", ["nan_loss", "inf_loss", "nan_grad", "inf_grad", "diverged"])
def test_guard_rejects_non_finite_loss_gradient_or_diverged_solve(bad):
    guard = BadStepGuard(max_bad=5)
    loss = {"nan_loss": torch.tensor(float("nan")), "inf_loss": torch.tensor(float("inf"))}.get(bad,
                                                                                             torch.tensor(1.0))
    model = model_with_grad(1.0)
    if bad in ("nan_grad", "inf_grad"):
        model.weight.grad[0, 1] = float("nan") if bad == "nan_grad" else float("-inf")
    assert not guard.check(loss, model, diverged=bad == "diverged")
    assert guard.consecutive == 1 and guard.total == 1


def test_guard_counts_consecutive_bad_steps_and_is_exhausted_after_max():
    guard = BadStepGuard(max_bad=3)
    nan, good = torch.tensor(float("nan")), torch.tensor(1.0)
    model = model_with_grad(0.5)
    assert not guard.check(nan, model) and not guard.check(nan, model)
    assert guard.consecutive == 2 and not guard.exhausted
    assert guard.check(good, model)  # a good step resets the run of bad ones
    assert guard.consecutive == 0 and guard.total == 2
    for n in range(1, 4):
        assert not guard.check(nan, model)
        assert guard.consecutive == n and guard.exhausted == (n >= 3)
    assert guard.total == 5


# ------------------------------------------------------------------------------- optimizers and schedulers
def make_cfg(**train):
    cfg = get_default_config()
    for key, value in train.items():
        cfg.TRAIN[key] = value
    return cfg


@pytest.mark.parametrize("name,cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                      ("adamw", torch.optim.AdamW), ("rmsprop", torch.optim.RMSprop),
                                      ("SGD", torch.optim.SGD)])
def test_optimizer_by_name(name, cls):
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    model[1].weight.requires_grad_(False)
    opt = build_optimizer(make_cfg(OPTIMIZER=name, LR=0.03, WD=1e-4, NESTEROV=True), model)
    assert type(opt) is cls
    group = opt.param_groups[0]
    assert group["lr"] == 0.03 and group["weight_decay"] == 1e-4
    assert len(group["params"]) == 3  # frozen parameters are left out
    if cls is torch.optim.SGD:
        assert group["momentum"] == 0.9 and group["nesterov"]


def test_unknown_optimizer_and_scheduler_list_the_valid_names():
    with pytest.raises(ValueError) as err:
        build_optimizer(make_cfg(OPTIMIZER="lamb"), nn.Linear(2, 2))
    assert "lamb" in str(err.value) and all(name in str(err.value) for name in OPTIMIZERS)
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError) as err:
        build_scheduler(make_cfg(LR_SCHEDULER="onecycle"), opt, 10)
    assert "onecycle" in str(err.value) and all(name in str(err.value) for name in SCHEDULERS)


def lrs(cfg, steps_per_epoch):
    """The learning rate used at each step of the whole schedule (scheduler stepped after every step)."""
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=cfg.TRAIN.LR)
    sched = build_scheduler(cfg, opt, steps_per_epoch)
    out = []
    for _ in range(steps_per_epoch * cfg.TRAIN.END_EPOCH):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out, opt.param_groups[0]["lr"]


def test_cosine_is_per_step_and_ends_at_1e_minus_6():
    lr, spe, epochs = 0.01, 5, 3
    used, final = lrs(make_cfg(LR=lr, LR_SCHEDULER="cosine", END_EPOCH=epochs), spe)
    total = spe * epochs
    assert used[0] == pytest.approx(lr)
    assert all(a > b for a, b in zip(used, used[1:]))  # changes at every step, not once per epoch
    for step, value in enumerate(used):
        assert value == pytest.approx(1e-6 + (lr - 1e-6) * 0.5 * (1 + math.cos(math.pi * step / total)))
    assert final == pytest.approx(1e-6, rel=1e-6)


def test_multistep_drops_by_lr_factor_at_epoch_milestones():
    lr, spe = 0.1, 4
    used, final = lrs(make_cfg(LR=lr, LR_SCHEDULER="multistep", LR_STEP=[1, 3], LR_FACTOR=0.2, END_EPOCH=4), spe)
    expected = [lr] * spe + [lr * 0.2] * 2 * spe + [lr * 0.04] * spe
    assert used == pytest.approx(expected)
    assert final == pytest.approx(lr * 0.04)


def test_warmup_scales_the_first_steps():
    used, _ = lrs(make_cfg(LR=0.1, LR_SCHEDULER="none", WARMUP_STEPS=4, END_EPOCH=2), 3)
    assert used == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1])


# ------------------------------------------------------------------------------------- Jacobian-loss weight
def jac_cfg(incremental=4, stop_epoch=3):
    cfg = get_default_config()
    cfg.TRAIN.PRETRAIN_STEPS = 10
    cfg.LOSS.PRETRAIN_JAC_LOSS_WEIGHT = 0.3
    cfg.LOSS.JAC_LOSS_WEIGHT = 0.5
    cfg.LOSS.JAC_INCREMENTAL = incremental
    cfg.LOSS.JAC_STOP_EPOCH = stop_epoch
    return cfg


def test_jacobian_weight_schedule():
    cfg = jac_cfg()
    assert [jacobian_weight(cfg, s, 0) for s in range(10)] == [0.3] * 10  # unrolled pretraining
    after = [jacobian_weight(cfg, s, 1) for s in range(10, 23)]
    expected = [0.5 + 0.1 * ((s - 10) // 4) for s in range(10, 23)]  # +0.1 every JAC_INCREMENTAL steps
    assert after == pytest.approx(expected)
    assert after[0] == pytest.approx(0.5) and after[4] == pytest.approx(0.6) and after[12] == pytest.approx(0.8)
    assert jacobian_weight(cfg, 5, 3) == 0.0 and jacobian_weight(cfg, 50, 7) == 0.0  # from JAC_STOP_EPOCH on
    assert jacobian_weight(cfg, 50, 2) > 0


def test_jacobian_weight_constant_without_increment():
    cfg = jac_cfg(incremental=0)
    assert jacobian_weight(cfg, 9, 0) == 0.3
    assert {jacobian_weight(cfg, s, 1) for s in range(10, 1000, 37)} == {0.5}


@pytest.mark.parametrize("key, value, pattern", [
    ("LR_SCHEDULER", "cosin", r"TRAIN.LR_SCHEDULER: unknown name 'cosin'; valid names are .*cosine"),
    ("OPTIMIZER", "adagrad", r"TRAIN.OPTIMIZER: unknown name 'adagrad'; valid names are .*adam"),
])
def test_unknown_optimizer_or_scheduler_names_are_refused_with_the_valid_ones(key, value, pattern):
    from mdeq.config import ConfigError
    from mdeq.core.optim import check_names

    cfg = get_default_config()
    check_names(cfg)  # the defaults are valid
    cfg.TRAIN[key] = value
    with pytest.raises(ConfigError, match=pattern):
        check_names(cfg)
