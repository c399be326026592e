"""cls_train.py and cls_valid.py end to end on tiny fixtures in the real on-disk formats.

Covers: ImageNet (ImageFolder) and CIFAR-10 (cifar-10-batches-py) training runs with both the unrolled and the
equilibrium phase, the files they write, the original's log format, evaluation of our own and of an
original-format checkpoint against a direct forward pass, distributed training and evaluation on CPU (torchrun
and the legacy launcher) against single-process evaluation, and one-line errors for bad input.
"""
import csv
import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from mdeq.config import load_config, parse_args
from mdeq.datasets import dataset_info, get_cls_dataset
from mdeq.models import get_cls_net
from original_format import spec, write_original_cls

CHECKPOINT_KEYS = {"epoch", "model", "state_dict", "perf", "optimizer", "lr_scheduler"}


# ------------------------------------------------------------------------------------------------ helpers
def direct_eval(cfg_file, opts, state_dict):
    """Accuracy@1 (percent), mean loss and image count of ``state_dict`` on the test split, computed without
    the tools: the weights go straight into get_cls_net and the split through the model in order."""
    cfg = load_config(cfg_file, opts)
    model = get_cls_net(cfg, in_channels=dataset_info(cfg)["in_channels"])
    model.load_state_dict(state_dict, strict=True)
    model.eval()
    loader = DataLoader(get_cls_dataset(cfg, train=False), batch_size=cfg.TEST.BATCH_SIZE_PER_GPU, shuffle=False)
    correct, loss, count, preds = 0, 0.0, 0, []
    with torch.no_grad():
        for images, target in loader:
            logits = model(images)
            loss += float(F.cross_entropy(logits, target, reduction="sum"))
            pred = logits.argmax(dim=1)
            correct += int((pred == target).sum())
            count += target.numel()
            preds += pred.tolist()
    return {"top1": 100.0 * correct / count, "loss": loss / count, "count": count, "preds": preds}


def assert_same_result(reported, expected):
    """A parsed Test line against a direct evaluation (the log rounds to 3 and 4 decimals)."""
    assert float(reported["top1"]) == pytest.approx(expected["top1"], abs=1e-3)
    assert float(reported["loss"]) == pytest.approx(expected["loss"], abs=2e-4)
    assert int(reported["count"]) == expected["count"]


def train_then_validate(kit, tmp_path, cfg_file, dataset, data_opts, n_val, steps_per_epoch):
    """Runs cls_train (2 epochs, unrolled then equilibrium steps) and cls_valid on its final state; checks the
    files, the log format and the evaluation against a direct forward pass."""
    cfg_name = os.path.splitext(os.path.basename(cfg_file))[0]
    out, log = str(tmp_path / "output"), str(tmp_path / "log")
    opts = kit.TINY_MODEL + data_opts + ["TRAIN.END_EPOCH", "2", "TRAIN.PRETRAIN_STEPS", str(steps_per_epoch + 1),
                                         "TRAIN.BATCH_SIZE_PER_GPU", "4", "TEST.BATCH_SIZE_PER_GPU", "4"]
    assert kit.call_tool("cls_train", ["--cfg", cfg_file, "OUTPUT_DIR", out, "LOG_DIR", log] + opts) == 0

    out_dir = os.path.join(out, dataset, cfg_name)
    for name in ("checkpoint.pth.tar", "model_best.pth.tar", "final_state.pth.tar"):
        assert os.path.isfile(os.path.join(out_dir, name)), name
    ckpt = torch.load(os.path.join(out_dir, "checkpoint.pth.tar"), map_location="cpu", weights_only=True)
    assert CHECKPOINT_KEYS <= set(ckpt)
    assert ckpt["epoch"] == 2 and ckpt["model"] == "mdeq"
    assert ckpt["optimizer"]["state"], "the optimizer state is saved"
    assert ckpt["lr_scheduler"]["last_epoch"] == 2 * steps_per_epoch  # per-step scheduler
    final = torch.load(os.path.join(out_dir, "final_state.pth.tar"), map_location="cpu", weights_only=True)
    assert set(final) == set(ckpt["state_dict"])
    assert all(torch.equal(final[k], ckpt["state_dict"][k]) for k in final)

    text = kit.read_log(os.path.join(log, dataset, cfg_name), "train")
    steps = kit.train_lines(text)
    assert [(int(s["epoch"]), int(s["i"]), int(s["total"])) for s in steps] == [
        (e, i, steps_per_epoch) for e in range(2) for i in range(steps_per_epoch)]  # PRINT_FREQ 1: every step
    assert [s["mode"] for s in steps] == ["unrolled"] * (steps_per_epoch + 1) + ["equilibrium"] * (
        steps_per_epoch - 1)
    tests = kit.test_lines(text)
    assert len(tests) == 2 and all(int(t["count"]) == n_val for t in tests)
    # the run's metrics files: one row per epoch with the accuracy the log printed, and the results
    with open(os.path.join(out_dir, "metrics.csv")) as fh:
        rows = list(csv.DictReader(fh))
    assert [(int(r["epoch"]), int(r["step"])) for r in rows] == [(1, steps_per_epoch), (2, 2 * steps_per_epoch)]
    assert [float(r["valid_top1"]) for r in rows] == pytest.approx([float(t["top1"]) for t in tests], abs=1e-3)
    assert [r["phase"] for r in rows] == ["unrolled", "mixed"] and rows[0]["forward_nstep"] == ""
    assert int(rows[1]["f_calls_forward"]) > int(rows[0]["f_calls_forward"]) == 2 * steps_per_epoch
    with open(os.path.join(out_dir, "results.json")) as fh:
        results = json.load(fh)
    assert results["metric"] == "top1" and results["epochs"] == 2
    assert results["best"] == pytest.approx(max(float(r["valid_top1"]) for r in rows), abs=1e-4)
    assert os.path.getsize(os.path.join(out_dir, "metrics.png")) > 1000
    for t in tests:
        assert float(t["err1"]) == pytest.approx(100 - float(t["top1"]), abs=1.5e-3)
        assert float(t["err5"]) == pytest.approx(100 - float(t["top5"]), abs=1.5e-3)
    assert ckpt["perf"] == pytest.approx(float(tests[-1]["top1"]), abs=1e-3)

    valid_log = str(tmp_path / "valid_log")
    final_path = os.path.join(out_dir, "final_state.pth.tar")
    assert kit.call_tool("cls_valid", ["--cfg", cfg_file, "--testModel", final_path, "OUTPUT_DIR", out,
                                       "LOG_DIR", valid_log] + opts) == 0
    vtext = kit.read_log(os.path.join(valid_log, dataset, cfg_name), "valid")
    assert final_path in vtext
    (reported,) = kit.test_lines(vtext)
    expected = direct_eval(cfg_file, opts, final)
    assert_same_result(reported, expected)
    assert_same_result(tests[-1], expected)  # the last validation of training saw the same weights
    return expected


# ------------------------------------------------------------------------------------ training end to end
@pytest.mark.filterwarnings("error:Converting a tensor with requires_grad")  # no warning from every step
def test_imagenet_folder_train_then_valid(kit, tmp_path):
    root = kit.write_imagenet(str(tmp_path / "imagenet"), train_per_class=4, val_per_class=2)
    data_opts = ["DATASET.ROOT", root, "MODEL.IMAGE_SIZE", "[32, 32]", "MODEL.NUM_CLASSES", "3"]
    train_then_validate(kit, tmp_path, kit.IMAGENET_CFG, "imagenet", data_opts, n_val=6, steps_per_epoch=3)


def test_cifar_batches_train_then_valid(kit, tmp_path, skip_cifar_md5):
    root = kit.write_cifar(str(tmp_path / "cifar"), per_batch=2, n_test=6)
    train_then_validate(kit, tmp_path, kit.CIFAR_CFG, "cifar10", ["DATASET.ROOT", root], n_val=6,
                        steps_per_epoch=3)


# ------------------------------------------------------------------------------ original-format checkpoint
def randomise_(model, seed=0):
    """Perturbs every weight and running statistic so that the images get different, non-trivial logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            else:
                t.mul_(1 + 0.3 * torch.randn(t.shape, generator=g)).add_(0.05 * torch.randn(t.shape, generator=g))
    return model


def spread_logits_(model, images, seed=0):
    """Rescales the classifier so that its inputs, standardised over ``images``, decide the class: random
    weights then give each image its own prediction (instead of one class picked by the bias for all)."""
    seen = []
    hook = model.classifier.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        model.eval()(images)
        hook.remove()
        pooled = torch.cat(seen)  # (B, FINAL_CHANSIZE)
        mean, std = pooled.mean(dim=0), pooled.std(dim=0) + 1e-6
        weight = torch.randn(model.classifier.weight.shape, generator=torch.Generator().manual_seed(seed)) / std
        model.classifier.weight.copy_(weight)
        model.classifier.bias.copy_(-weight @ mean)
    return model


def test_valid_original_tiny_file(kit, tmp_path, skip_cifar_md5):
    root = str(tmp_path / "cifar")
    n_test = 8
    kit.write_cifar(root, per_batch=1, n_test=n_test)
    opts = ["DATASET.ROOT", root, "DEQ.F_THRES", "3", "DEQ.B_THRES", "3", "WORKERS", "0", "TENSORBOARD", "False",
            "TEST.BATCH_SIZE_PER_GPU", "4"]
    cfg = load_config(kit.CIFAR_CFG, opts)
    images = torch.stack([x for x, _ in get_cls_dataset(cfg, train=False)])
    model = spread_logits_(randomise_(get_cls_net(cfg)), images)
    # Labels chosen from the model's own predictions: right for the even images, wrong for the odd ones, so a
    # faithful evaluation reports exactly 50 %.
    preds = direct_eval(kit.CIFAR_CFG, opts, model.state_dict())["preds"]
    assert len(set(preds)) > 1, "randomised weights should not predict one class for every image"
    labels = [p if i % 2 == 0 else (p + 1) % 10 for i, p in enumerate(preds)]
    kit.write_cifar(root, per_batch=1, n_test=n_test, test_labels=labels)
    expected = direct_eval(kit.CIFAR_CFG, opts, model.state_dict())
    assert expected["top1"] == 50.0

    path = write_original_cls(model, spec("cifar__cls_mdeq_TINY"), str(tmp_path / "cls_mdeq_TINY.pkl"))
    assert any(k.startswith("fullstage_copy.") for k in torch.load(path, weights_only=True))
    log = str(tmp_path / "log")
    rc = kit.call_tool("cls_valid", ["--cfg", kit.CIFAR_CFG, "--testModel", path, "OUTPUT_DIR",
                                     str(tmp_path / "output"), "LOG_DIR", log] + opts)
    assert rc == 0
    text = kit.read_log(os.path.join(log, "cifar10", "cls_mdeq_TINY"), "valid")
    evaluating = [line for line in text.splitlines() if "=> evaluating" in line]
    assert len(evaluating) == 1 and path in evaluating[0] and "original MDEQ layout" in evaluating[0]
    (reported,) = kit.test_lines(text)
    assert_same_result(reported, expected)
    assert float(reported["top1"]) == 50.0


# ---------------------------------------------------------------------------------------- several processes
def fashion_opts(kit, root, out, log):
    return kit.TINY_MODEL + ["DATASET.ROOT", root, "OUTPUT_DIR", out, "LOG_DIR", log, "TRAIN.BATCH_SIZE_PER_GPU",
                             "8", "TEST.BATCH_SIZE_PER_GPU", "16"]


def test_torchrun_two_cpu_processes_match_single_process_valid(kit, tmp_path):
    n_test = 101  # odd: the two evaluation shards are uneven, and padding would show as 102 images
    root = kit.write_fashion_mnist(str(tmp_path / "fmnist"), n_train=40, n_test=n_test)
    out, log = str(tmp_path / "output"), str(tmp_path / "log")
    opts = fashion_opts(kit, root, out, log) + ["TRAIN.END_EPOCH", "1", "TRAIN.PRETRAIN_STEPS", "1",
                                                "TENSORBOARD", "True", "GPUS", "(0,1)"]  # global batch 16 = 2 x 8
    rc, output = kit.run_subprocess(["-m", "torch.distributed.run", "--nproc_per_node=2",
                                     f"--master_port={kit.free_port()}", os.path.join("tools", "cls_train.py"),
                                     "--cfg", kit.FASHION_CFG] + opts, timeout=300)
    assert rc == 0, output[-4000:]
    assert "2 process(es)" in output

    log_dir = os.path.join(log, "fashion_mnist", "cls_mdeq_quick")
    logs = sorted(os.listdir(log_dir))
    assert len(kit.log_files(log_dir, "train")) == 1, logs  # rank 0 alone writes the log ...
    assert len([f for f in logs if f.endswith("_config.yaml")]) == 1, logs
    assert len([f for f in logs if f.startswith("events.out.tfevents")]) == 1, logs  # ... and TensorBoard
    out_dir = os.path.join(out, "fashion_mnist", "cls_mdeq_quick")
    assert sorted(os.listdir(out_dir)) == ["checkpoint.pth.tar", "final_state.pth.tar", "metrics.csv",
                                           "metrics.png", "model_best.pth.tar", "results.json"]

    text = kit.read_log(log_dir, "train")
    steps = kit.train_lines(text)
    assert steps and all(int(s["total"]) == 3 for s in steps)  # 40 images / 2 ranks / batch 8 -> 3 steps a rank
    assert {s["mode"] for s in steps} == {"unrolled", "equilibrium"}
    last = kit.test_lines(text)[-1]
    assert int(last["count"]) == n_test

    final = os.path.join(out_dir, "final_state.pth.tar")
    valid_log = str(tmp_path / "valid_log")
    assert kit.call_tool("cls_valid", ["--cfg", kit.FASHION_CFG, "--testModel", final]
                         + fashion_opts(kit, root, out, valid_log)) == 0
    (single,) = kit.test_lines(kit.read_log(os.path.join(valid_log, "fashion_mnist", "cls_mdeq_quick"), "valid"))
    assert int(single["count"]) == n_test
    assert float(single["top1"]) == pytest.approx(float(last["top1"]), abs=1e-3)
    assert float(single["loss"]) == pytest.approx(float(last["loss"]), abs=2e-4)


def test_legacy_launcher_valid_matches_single_process(kit, tmp_path):
    n_test = 101
    root = kit.write_fashion_mnist(str(tmp_path / "fmnist"), n_train=4, n_test=n_test, seed=1)
    out = str(tmp_path / "output")
    cfg = load_config(kit.FASHION_CFG, fashion_opts(kit, root, out, str(tmp_path / "log")))
    images = torch.stack([x for x, _ in get_cls_dataset(cfg, train=False)])
    model = spread_logits_(randomise_(get_cls_net(cfg), seed=1), images, seed=1)
    weights = str(tmp_path / "weights.pth.tar")
    torch.save(model.state_dict(), weights)
    expected = direct_eval(kit.FASHION_CFG, fashion_opts(kit, root, out, str(tmp_path / "log")),
                           model.state_dict())
    assert len(set(expected["preds"])) > 1

    log = str(tmp_path / "launch_log")
    rc, output = kit.run_subprocess(["-m", "torch.distributed.launch", "--nproc_per_node=2",
                                     f"--master_port={kit.free_port()}", os.path.join("tools", "cls_valid.py"),
                                     "--cfg", kit.FASHION_CFG, "--testModel", weights]
                                    + fashion_opts(kit, root, out, log), timeout=300)
    assert rc == 0, output[-4000:]
    assert "2 process(es)" in output
    log_dir = os.path.join(log, "fashion_mnist", "cls_mdeq_quick")
    (reported,) = kit.test_lines(kit.read_log(log_dir, "valid"))
    assert_same_result(reported, expected)


@pytest.mark.parametrize("form", [["--local_rank=0"], ["--local-rank", "0"], ["--local-rank=1"]])
def test_parse_args_accepts_legacy_local_rank(form):
    args = parse_args("t", form + ["--cfg", "x.yaml", "TRAIN.LR", "0.1"])
    assert args.local_rank == int(form[-1][-1]) and args.cfg == "x.yaml" and args.opts == ["TRAIN.LR", "0.1"]


# ------------------------------------------------------------------------------------------ bad user input
def assert_one_line_error(capsys, *needles):
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    for needle in needles:
        assert needle in err[0], (needle, err[0])
    return err[0]


@pytest.mark.parametrize("tool", ["cls_train", "cls_valid"])
def test_missing_cfg_file(kit, tmp_path, capsys, tool):
    missing = str(tmp_path / "no_such_experiment.yaml")
    assert kit.call_tool(tool, ["--cfg", missing]) == 2
    assert_one_line_error(capsys, missing, "does not exist")


def test_unknown_override_key_suggests(kit, tmp_path, capsys):
    rc = kit.call_tool("cls_train", ["--cfg", kit.FASHION_CFG, "OUTPUT_DIR", str(tmp_path / "o"), "LOG_DIR",
                                     str(tmp_path / "l"), "TRAIN.LRR", "0.1"])
    assert rc == 2
    assert_one_line_error(capsys, "TRAIN.LRR", "Did you mean TRAIN.LR")


def test_missing_test_model(kit, tmp_path, capsys):
    missing = str(tmp_path / "nowhere" / "final_state.pth.tar")
    rc = kit.call_tool("cls_valid", ["--cfg", kit.FASHION_CFG, "--testModel", missing, "OUTPUT_DIR",
                                     str(tmp_path / "o"), "LOG_DIR", str(tmp_path / "l")] + kit.TINY_MODEL)
    assert rc == 2
    assert_one_line_error(capsys, missing, "does not exist")


@pytest.mark.parametrize("tool", ["cls_train", "cls_valid"])
def test_imagefolder_root_without_data(kit, tmp_path, capsys, tool):
    root = str(tmp_path / "no_imagenet_here")
    extra = []
    if tool == "cls_valid":
        cfg = load_config(kit.IMAGENET_CFG, kit.TINY_MODEL + ["MODEL.NUM_CLASSES", "3"])
        extra = ["--testModel", str(tmp_path / "w.pth")]
        torch.save(get_cls_net(cfg).state_dict(), extra[1])
    rc = kit.call_tool(tool, ["--cfg", kit.IMAGENET_CFG] + extra + [
        "OUTPUT_DIR", str(tmp_path / "o"), "LOG_DIR", str(tmp_path / "l"), "DATASET.ROOT", root,
        "MODEL.NUM_CLASSES", "3", "MODEL.IMAGE_SIZE", "[32, 32]"] + kit.TINY_MODEL)
    assert rc == 2
    split = "train" if tool == "cls_train" else "val"
    assert_one_line_error(capsys, os.path.join(root, "images", split), "does not exist")


def test_missing_resume_checkpoint(kit, tmp_path, capsys):
    root = kit.write_fashion_mnist(str(tmp_path / "fmnist"), n_train=4, n_test=3)
    missing = str(tmp_path / "gone.pth.tar")
    rc = kit.call_tool("cls_train", ["--cfg", kit.FASHION_CFG, "TRAIN.CHECKPOINT", missing]
                       + fashion_opts(kit, root, str(tmp_path / "o"), str(tmp_path / "l")))
    assert rc == 2
    assert_one_line_error(capsys, missing)


def test_exit_code_and_message_from_the_command_line(kit, tmp_path):
    missing = str(tmp_path / "absent.yaml")
    rc, output = kit.run_subprocess([os.path.join("tools", "cls_valid.py"), "--cfg", missing], timeout=120)
    assert rc == 2
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and missing in lines[-1]
    assert "Traceback" not in output
