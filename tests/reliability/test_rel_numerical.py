"""Numerical faults: a NaN/Inf loss, NaN activations or a diverged solve make the training step be skipped, so no
NaN reaches the weights, the BatchNorm running statistics (and batch counters) or the optimizer state; each skip
is logged with a counter and written to TensorBoard; after TRAIN.MAX_BAD_STEPS consecutive bad steps training
stops with a message naming the file of the last good state (exit code 2), and that file resumes. Classification
and segmentation training share the protection (one implementation, the trainer's BadStepGuard); both are checked.

Faults are injected deterministically: NaN images on chosen training forwards (through a forward pre-hook, so
the NaN flows through every BatchNorm), a NaN or infinite loss, or a forward whose solver reports divergence.
"""
import copy
import os

import pytest
import torch

from mdeq.config import check_config, load_config
from mdeq.core import classification, hooks, segmentation, trainer
from mdeq.core.data import TrainData, batch_plan
from mdeq.core.run import RunContext
from mdeq.models import get_cls_net
from mdeq.core.checkpointing import load_training_checkpoint


# ------------------------------------------------------------------------------------------------ helpers
def all_finite(obj):
    if isinstance(obj, torch.Tensor):
        return bool(torch.isfinite(obj.float()).all()) if obj.is_floating_point() else True
    if isinstance(obj, dict):
        return all(all_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(all_finite(v) for v in obj)
    return not isinstance(obj, float) or obj == obj and abs(obj) != float("inf")


def same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return set(a) == set(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


class Injector:
    """Counts the model's training forwards (from 1) and turns the images of the chosen ones into NaN; records
    the model (and optimizer) state at the start of every training forward."""

    def __init__(self, bad, record=False):
        self.bad, self.record = set(bad), record
        self.calls, self.states, self.optimizer = 0, {}, None

    def attach(self, model):
        def pre_hook(module, args):
            if not module.training:
                return None
            self.calls += 1
            if self.record:
                self.states[self.calls] = (copy.deepcopy(module.state_dict()),
                                           copy.deepcopy(self.optimizer.state_dict()) if self.optimizer else None)
            if self.calls in self.bad:
                return (args[0] * float("nan"),) + tuple(args[1:])
            return None

        model.register_forward_pre_hook(pre_hook)
        return model


def inject(monkeypatch, module, builder_name, injector):
    real = getattr(module, builder_name)

    def build(*args, **kwargs):
        return injector.attach(real(*args, **kwargs))

    monkeypatch.setattr(module, builder_name, build)
    real_optimizer = trainer.build_optimizer

    def optimizer(cfg, model):
        injector.optimizer = real_optimizer(cfg, model)
        return injector.optimizer

    monkeypatch.setattr(trainer, "build_optimizer", optimizer)


@pytest.fixture
def fm(kit, tmp_path):
    root = kit.write_fashion_mnist(str(tmp_path / "fmnist"), n_train=24, n_test=8)
    out, log = str(tmp_path / "output"), str(tmp_path / "log")
    argv = ["--cfg", kit.FASHION_CFG] + kit.TINY_MODEL + [
        "DATASET.ROOT", root, "OUTPUT_DIR", out, "LOG_DIR", log, "TRAIN.BATCH_SIZE_PER_GPU", "8",
        "TEST.BATCH_SIZE_PER_GPU", "8", "TRAIN.PRETRAIN_STEPS", "2", "SEED", "0"]
    return {"argv": argv, "out": os.path.join(out, "fashion_mnist", "cls_mdeq_quick"),
            "log": os.path.join(log, "fashion_mnist", "cls_mdeq_quick"), "tmp": tmp_path}


@pytest.fixture
def cs(rel, tmp_path):
    root = str(tmp_path / "cityscapes")
    rel.make_cityscapes(root)  # 3 training images, batch 2: one step per epoch (a batch of one is dropped)
    out, log = str(tmp_path / "output"), str(tmp_path / "log")
    argv = ["--cfg", rel.SEG_CFG] + rel.SEG_TINY + ["DATASET.ROOT", root, "OUTPUT_DIR", out, "LOG_DIR", log,
                                                    "TRAIN.RESUME", "False"]
    return {"argv": argv, "out": os.path.join(out, "cityscapes", "seg_mdeq_SMALL"),
            "log": os.path.join(log, "cityscapes", "seg_mdeq_SMALL")}


# ---------------------------------------------------------------------------------- the step, in isolation
@pytest.mark.parametrize("fault", ["nan images", "nan loss", "inf loss"])
def test_a_skipped_step_changes_no_weight_statistic_counter_or_optimizer_state(kit, tmp_path, fault):
    cfg = check_config(load_config(kit.FASHION_CFG, kit.TINY_MODEL + ["TRAIN.PRETRAIN_STEPS", "1",
                                                                      "TRAIN.MAX_BAD_STEPS", "10"]))
    cfg.freeze()
    ctx = RunContext(cfg=cfg, device=torch.device("cpu"), cfg_name="t", output_dir=str(tmp_path),
                     log_dir=str(tmp_path))
    torch.manual_seed(0)
    model = get_cls_net(cfg, in_channels=1)
    criterion = torch.nn.CrossEntropyLoss()
    batches = [(torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))) for _ in range(4)]

    class ListTask(trainer.Task):  # a task over a list of batches: only what differs from the others
        def __init__(self):
            self.data = TrainData(loader=batches[:1], schedule_steps=4)
            self.criterion = criterion

        def phases(self):
            return [trainer.Phase("main", 1, self.data, cfg)]

        def loss(self, output, target):
            return self.criterion(output, target)

    task = ListTask()
    run = trainer.Trainer(ctx, task, model, batch_plan(cfg, 1))
    phase = run.phases[0]
    run.train_epoch(phase, 0)  # Adam has state
    optimizer, scheduler, guard = run.optimizer, run.scheduler, run.guard
    before_model, before_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    assert before_opt["state"], "the optimizer has moments to protect"

    if fault == "nan images":
        phase.data.loader = [(x * float("nan"), y) for x, y in batches[1:]]
    else:
        phase.data.loader = batches[1:]
        value = float("nan") if fault == "nan loss" else float("inf")
        task.criterion = lambda logits, target: criterion(logits, target) * value  # noqa: E731
    run.state.batch = 0
    run.train_epoch(phase, 0)
    assert guard.total == 3 and guard.consecutive == 3
    assert same(model.state_dict(), before_model), "a skipped step changed the model's tensors"
    assert same(optimizer.state_dict()["state"], before_opt["state"]), "a skipped step changed the optimizer state"
    assert run.state.step == 4 and scheduler.last_epoch == 4  # the schedule goes on (resume stays aligned)


# --------------------------------------------------------------------------------------------- the tools
def test_cls_train_skips_a_nan_step_counts_it_and_writes_it_to_tensorboard(kit, fm, monkeypatch, capsys):
    injector = Injector(bad={2}, record=True)
    inject(monkeypatch, classification, "get_cls_net", injector)
    scalars = []
    real_writer = hooks.tensorboard_writer

    def writer(ctx):
        w = real_writer(ctx)
        add = w.add_scalar

        def add_scalar(tag, value, step):
            scalars.append((tag, value, step))
            return add(tag, value, step)

        w.add_scalar = add_scalar
        return w

    monkeypatch.setattr(hooks, "tensorboard_writer", writer)
    assert kit.call_tool("cls_train", fm["argv"] + ["TRAIN.END_EPOCH", "1", "TENSORBOARD", "True"]) == 0
    out = capsys.readouterr().out
    assert "epoch 0 step 1: skipped a step" in out and "(1 in a row, 1 skipped steps in total)" in out
    assert out.count("skipped a step") == 1
    # the state at the start of forward 3 is the state at the start of forward 2: the bad step left no trace
    model_2, opt_2 = injector.states[2]
    model_3, opt_3 = injector.states[3]
    assert same(model_3, model_2) and same(opt_3["state"], opt_2["state"])
    assert ("train/skipped_steps", 1, 1) in scalars
    events = [f for f in os.listdir(fm["log"]) if f.startswith("events.out.tfevents")]
    assert len(events) == 1
    with open(os.path.join(fm["log"], events[0]), "rb") as fh:
        assert b"train/skipped_steps" in fh.read()
    ckpt = load_training_checkpoint(os.path.join(fm["out"], "checkpoint.pth.tar"))
    assert all_finite(ckpt["state_dict"]) and all_finite(ckpt["optimizer"])


def test_cls_train_stops_after_max_bad_steps_with_the_last_good_state(kit, fm, monkeypatch, capsys):
    inject(monkeypatch, classification, "get_cls_net", Injector(bad=range(4, 100)))  # all of epoch 1 on
    code = kit.call_tool("cls_train", fm["argv"] + ["TRAIN.END_EPOCH", "3", "TRAIN.MAX_BAD_STEPS", "2"])
    err = capsys.readouterr().err
    last_good = os.path.join(fm["out"], "last_good.pth.tar")
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err
    for needle in ("2 consecutive bad steps", "epoch 1, step 4", "TRAIN.MAX_BAD_STEPS is 2", "Lower TRAIN.LR",
                   f"last good state (weights, optimizer, schedule) is in {last_good}",
                   f"TRAIN.CHECKPOINT {last_good}"):
        assert needle in err, (needle, err)
    good = load_training_checkpoint(last_good)
    assert (good["epoch"], good["step"], good["batch"]) == (1, 4, 1)  # resumes at the batch that failed
    assert all_finite(good["state_dict"]) and all_finite(good["optimizer"])
    epoch_end = load_training_checkpoint(os.path.join(fm["out"], "checkpoint.pth.tar"))
    assert epoch_end["epoch"] == 1  # the last checkpoint before the faults ...
    assert same(good["state_dict"], epoch_end["state_dict"])  # ... holds exactly the last good weights
    assert same(good["optimizer"]["state"], epoch_end["optimizer"]["state"])  # the learning rate moved on
    assert not os.path.exists(os.path.join(fm["out"], "final_state.pth.tar"))

    # the advice works: without the fault, training goes on from the file to the end
    monkeypatch.undo()
    assert kit.call_tool("cls_train", fm["argv"] + ["TRAIN.END_EPOCH", "3", "TRAIN.CHECKPOINT", last_good]) == 0
    out = capsys.readouterr().out
    assert f"resumed from {last_good}: epoch 1, step 4, batch 1" in out
    final = torch.load(os.path.join(fm["out"], "final_state.pth.tar"), weights_only=True)
    assert all_finite(final)


@pytest.mark.parametrize("skip_diverged", [True, False])
def test_a_diverged_solve_is_skipped_when_asked(kit, fm, monkeypatch, capsys, skip_diverged):
    real = classification.get_cls_net
    calls = [0]

    def build(*args, **kwargs):
        model = real(*args, **kwargs)
        forward = model.forward

        def diverging_forward(*a, **k):
            logits, info = forward(*a, **k)
            if model.training:
                calls[0] += 1
                if calls[0] == 2 and info.get("forward"):
                    info["forward"] = dict(info["forward"], diverged=torch.tensor(3))
            return logits, info

        model.forward = diverging_forward
        return model

    monkeypatch.setattr(classification, "get_cls_net", build)
    argv = fm["argv"] + ["TRAIN.END_EPOCH", "1", "TRAIN.PRETRAIN_STEPS", "0", "TRAIN.SKIP_DIVERGED",
                         str(skip_diverged)]
    assert kit.call_tool("cls_train", argv) == 0
    out = capsys.readouterr().out
    assert ("step 1: skipped a step" in out) == skip_diverged


def test_seg_train_has_the_same_protection(kit, cs, monkeypatch, capsys):
    # one bad step (epoch 1): skipped, counted, training goes on
    inject(monkeypatch, segmentation, "get_seg_net", Injector(bad={2}))
    assert kit.call_tool("seg_train", cs["argv"] + ["TRAIN.END_EPOCH", "3"]) == 0
    out = capsys.readouterr().out
    assert "epoch 1 step 1: skipped a step" in out and out.count("skipped a step") == 1
    ckpt = load_training_checkpoint(os.path.join(cs["out"], "checkpoint.pth.tar"))
    assert ckpt["epoch"] == 3 and all_finite(ckpt["state_dict"]) and all_finite(ckpt["optimizer"])
    monkeypatch.undo()

    # bad from the second step on: stops after MAX_BAD_STEPS, last good state written, exit code 2
    for name in os.listdir(cs["out"]):
        os.remove(os.path.join(cs["out"], name))
    inject(monkeypatch, segmentation, "get_seg_net", Injector(bad=range(2, 100)))
    code = kit.call_tool("seg_train", cs["argv"] + ["TRAIN.END_EPOCH", "4", "TRAIN.MAX_BAD_STEPS", "2"])
    err = capsys.readouterr().err
    last_good = os.path.join(cs["out"], "last_good.pth.tar")
    assert code == 2 and "2 consecutive bad steps" in err and f"TRAIN.CHECKPOINT {last_good}" in err, err
    good = load_training_checkpoint(last_good)
    assert all_finite(good["state_dict"]) and all_finite(good["optimizer"])
    epoch_end = load_training_checkpoint(os.path.join(cs["out"], "checkpoint.pth.tar"))
    assert (good["epoch"], good["step"]) == (2, 2) and epoch_end["epoch"] == 2
    assert same(good["state_dict"], epoch_end["state_dict"])
    assert same(good["optimizer"]["state"], epoch_end["optimizer"]["state"])


def test_exit_code_two_from_the_command_line(kit, rel, fm):
    code, output = kit.run_subprocess(rel.hooked("cls_train", fm["argv"] + [
        "TRAIN.END_EPOCH", "2", "TRAIN.MAX_BAD_STEPS", "2"]), timeout=180, env={"REL_NAN_STEPS": "2,3,4,5,6"})
    lines = [line for line in output.splitlines() if line.strip()]
    assert code == 2, output[-3000:]
    assert "Traceback" not in output
    assert lines[-1].startswith("error: 2 consecutive bad steps") and "last_good.pth.tar" in lines[-1]
    assert all_finite(load_training_checkpoint(os.path.join(fm["out"], "last_good.pth.tar"))["state_dict"])
