"""The training loop's arithmetic: how a step's global batch is split over processes and micro-batches, the
original's PERCENT, gradient accumulation against one large batch, and the trainer's hooks."""
import math

import pytest
import torch
from torch import nn

from mdeq.config import get_default_config
from mdeq.core.data import ShardSampler, TrainData, batch_plan, micro_batches, train_loader
from mdeq.core.run import RunContext
from mdeq.core.trainer import Hook, Phase, Task, Trainer


def cfg_with(**train):
    cfg = get_default_config()
    gpus = train.pop("gpus", (0,))
    cfg.GPUS = tuple(gpus)
    for key, value in train.items():
        setattr(cfg.TRAIN, key.upper(), value)
    return cfg


# ---------------------------------------------------------------------------------------------- batch plan
@pytest.mark.parametrize("gpus, per_gpu, world, accum, expected", [
    ((0, 1), 64, 1, 0, (128, 128, 2)),  # cifar TINY on one process: the original's two per-GPU batches of 64
    ((0, 1), 64, 2, 0, (128, 64, 1)),  # on two processes: 64 each, as the original's GPUs
    ((0, 1, 2, 3), 32, 1, 0, (128, 128, 4)),  # imagenet SMALL
    ((0, 1, 2, 3), 32, 2, 0, (128, 64, 2)),
    ((0, 1, 2, 3), 32, 4, 0, (128, 32, 1)),
    ((0, 1, 2, 3), 32, 8, 0, (128, 16, 1)),  # more processes than the original's GPUs
    (tuple(range(8)), 24, 1, 0, (192, 192, 8)),  # imagenet XL
    ((0, 1), 64, 1, 1, (128, 128, 1)),  # one batch of 128 where memory allows
    ((0, 1), 64, 1, 8, (128, 128, 8)),  # micro-batches of 16 where it does not
    ((0,), 128, 1, 0, (128, 128, 1)),  # this project's Fashion-MNIST yamls
])
def test_the_global_batch_is_the_originals_whatever_the_number_of_processes(gpus, per_gpu, world, accum, expected):
    plan = batch_plan(cfg_with(gpus=gpus, batch_size_per_gpu=per_gpu, accum_steps=accum), world)
    assert (plan.global_batch, plan.per_process, plan.accum_steps) == expected
    assert plan.per_process * world == plan.global_batch
    assert plan.micro_batch * plan.accum_steps == plan.per_process


def test_a_split_that_does_not_divide_is_refused_with_the_way_out():
    with pytest.raises(ValueError, match=r"global batch .* = 64 x 2 = 128 cannot be split evenly over 3 processes"):
        batch_plan(cfg_with(gpus=(0, 1), batch_size_per_gpu=64), 3)
    with pytest.raises(ValueError, match=r"TRAIN.ACCUM_STEPS 3 does not divide the 128 samples"):
        batch_plan(cfg_with(gpus=(0, 1), batch_size_per_gpu=64, accum_steps=3), 1)


def test_micro_batches_split_as_data_parallel_scatters():
    x = torch.arange(10)
    assert [p.tolist() for p in micro_batches(x, 3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert micro_batches(x, 1)[0] is x


# -------------------------------------------------------------------------------------- sharding of steps
@pytest.mark.parametrize("length", [16, 37, 64])
@pytest.mark.parametrize("world", [2, 4])
def test_each_rank_trains_on_the_micro_batch_one_process_would_take(length, world):
    """With ``block``, rank r's k-th batch is the r-th micro-batch of the one-process k-th batch."""
    per_process, global_batch = 4, 4 * world
    one = list(ShardSampler(length, shuffle=True, seed=3, pad=True, rank=0, world_size=1))
    ranks = [list(ShardSampler(length, shuffle=True, seed=3, pad=True, rank=r, world_size=world,
                               block=per_process)) for r in range(world)]
    assert len({len(r) for r in ranks}) == 1  # every rank runs the same number of steps
    for k in range(length // global_batch):  # the full steps
        batch = torch.tensor(one[k * global_batch:(k + 1) * global_batch])
        for r, piece in enumerate(micro_batches(batch, world)):
            assert ranks[r][k * per_process:(k + 1) * per_process] == piece.tolist()
    covered = sorted(i for r in ranks for i in r)
    assert set(covered) == set(range(length)) and len(covered) == math.ceil(length / world) * world


class _Dataset(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.tensor([float(i)]), i


def test_percent_per_epoch_is_the_originals_and_fixed_is_the_first_part():
    cfg = cfg_with(batch_size_per_gpu=10, percent_mode="per_epoch")
    cfg.SEED, cfg.WORKERS = 0, 0
    plan = batch_plan(cfg, 1)
    data = train_loader(_Dataset(100), cfg, torch.device("cpu"), plan, percent=0.35)
    # the original: int(0.35 x 10 batches) = 3 batches of a freshly shuffled full epoch; the schedule spans 10
    assert len(data.loader) == 3 and data.schedule_steps == 10
    seen = []
    for epoch in range(3):
        data.sampler.set_epoch(epoch)
        ids = [int(i) for _, target in data.loader for i in target]
        assert len(ids) == 30 and len(set(ids)) == 30
        seen.append(set(ids))
    assert seen[0] != seen[1] != seen[2] and len(set.union(*seen)) > 30  # a fresh part every epoch
    cfg.TRAIN.PERCENT_MODE = "fixed"
    data = train_loader(_Dataset(100), cfg, torch.device("cpu"), plan, percent=0.35)
    assert len(data.loader) == 4 and data.schedule_steps == 4  # the first 35 samples, batches of 10 (5 last)
    ids = {int(i) for _, target in data.loader for i in target}
    assert ids == set(range(35))
    cfg.TRAIN.PERCENT_MODE = "random"
    with pytest.raises(ValueError, match="TRAIN.PERCENT_MODE: unknown value 'random'"):
        train_loader(_Dataset(100), cfg, torch.device("cpu"), plan, percent=0.35)


# --------------------------------------------------------------------------------- accumulation, hooks
class _Net(nn.Module):
    """The interface the trainer drives (``train_step``, ``compute_jac_loss``, ``return_info``), with no
    batch-dependent layer, so that micro-batches and one large batch must give the same gradient."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4))

    def forward(self, x, train_step=-1, compute_jac_loss=False, return_info=False):
        out = self.body(x)
        return (out, {"mode": "unrolled", "jac_loss": None}) if return_info else out


class _ListTask(Task):
    def __init__(self, cfg, batches):
        self.cfg, self.data = cfg, TrainData(loader=batches, schedule_steps=len(batches))

    def phases(self):
        return [Phase("main", 1, self.data, self.cfg)]

    def loss(self, output, target):
        return nn.functional.cross_entropy(output, target)


def _trainer(tmp_path, accum, batches, hooks=(), model=None):
    cfg = cfg_with(batch_size_per_gpu=8, accum_steps=accum, optimizer="sgd", lr=0.5, momentum=0.0, wd=0.0,
                   lr_scheduler="none", pretrain_steps=100)
    cfg.PRINT_FREQ = 1
    cfg.freeze()
    ctx = RunContext(cfg=cfg, device=torch.device("cpu"), cfg_name="t", output_dir=str(tmp_path),
                     log_dir=str(tmp_path))
    return Trainer(ctx, _ListTask(cfg, batches), model or _Net(), batch_plan(cfg, 1), hooks)


def test_accumulated_micro_batches_give_the_update_of_one_large_batch(tmp_path):
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(7, 3, generator=g), torch.randint(0, 4, (7,), generator=g)) for _ in range(3)]
    whole, split = _trainer(tmp_path, 1, batches), _trainer(tmp_path, 4, batches)  # 7 -> 2, 2, 2, 1
    for t in (whole, split):
        t.train_epoch(t.phases[0], 0)
    for (name, a), (_, b) in zip(whole.model.named_parameters(), split.model.named_parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name
        assert not torch.equal(a, _Net().state_dict()[name])  # the steps did change the weights


def test_hooks_see_every_step_and_can_stop_the_run(tmp_path):
    class Recorder(Hook):
        def __init__(self):
            self.events = []

        def after_backward(self, trainer, epoch, batch, step):
            self.events.append(("backward", batch, step))

        def on_step_end(self, trainer, record):
            self.events.append(("step", record.batch, record.step, record.applied, record.report is not None))
            if record.batch == 1:
                trainer.request_stop("the test asked")

    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(8, 3, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(4)]
    recorder = Recorder()
    trainer = _trainer(tmp_path, 1, batches, [recorder])
    from mdeq.core.trainer import TrainingStopped
    with pytest.raises(TrainingStopped, match=r"the test asked at epoch 0, batch 2 \(step 2\)"):
        trainer.train_epoch(trainer.phases[0], 0)
    assert recorder.events == [("backward", 0, 0), ("step", 0, 0, True, True),
                               ("backward", 1, 1), ("step", 1, 1, True, True)]
    ckpt = torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)
    assert (ckpt["epoch"], ckpt["batch"], ckpt["step"]) == (0, 2, 2)  # resumes with the third batch


@pytest.mark.parametrize("scheduler, count, expected", [
    ("cosine", "scheduler", [0, 1, 2, 3, 4, 5]),  # per-step schedule: optimizer steps, as the original
    ("multistep", "scheduler", [1, 1, 1, 2, 2, 2]),  # the original's epoch + 1 with a per-epoch schedule
    ("step", "scheduler", [1, 1, 1, 2, 2, 2]),
    ("multistep", "steps", [0, 1, 2, 3, 4, 5]),
])
def test_pretraining_counts_what_the_original_counted(tmp_path, scheduler, count, expected):
    trainer = _trainer(tmp_path, 1, [(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))])
    trainer.cfg.defrost()
    trainer.cfg.TRAIN.LR_SCHEDULER, trainer.cfg.TRAIN.PRETRAIN_COUNT = scheduler, count
    assert [trainer.model_step(step, step // 3) for step in range(6)] == expected


class _BNNet(_Net):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x, train_step=-1, compute_jac_loss=False, return_info=False):
        return super().forward(self.bn(x), train_step, compute_jac_loss, return_info)


def test_micro_batches_keep_the_first_ones_batchnorm_statistics_as_data_parallel_did(tmp_path):
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 3, generator=g) * 3 + 1, torch.randint(0, 4, (8,), generator=g)
    model = _BNNet()
    trainer = _trainer(tmp_path, 2, [(x, y)], model=model)
    trainer.train_epoch(trainer.phases[0], 0)
    reference = _BNNet().train()
    reference(x[:4])  # the first micro-batch alone, as GPU 0 / rank 0 saw it
    assert torch.allclose(model.bn.running_mean, reference.bn.running_mean)
    assert torch.allclose(model.bn.running_var, reference.bn.running_var)
    assert int(model.bn.num_batches_tracked) == 1
