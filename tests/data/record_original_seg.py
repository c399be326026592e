"""Records what the ORIGINAL MDEQ segmentation code computes on tiny inputs, for this project's tests.

Usage (from the repository root; the argument is the folder that holds the original checkout ``mdeq/``)::

    python tests/data/record_original_seg.py /work/shared/reference

It imports the original's own modules (its ``lib``, ``lib/models`` and ``lib/modules`` on this script's path,
``np.int = int`` for today's numpy, ``Tensor.cuda`` made a no-op so that everything runs on the CPU) and writes
``tests/data/original_seg_oracle.json`` next to this file:

* ``losses``: the original CrossEntropy and OhemCrossEntropy (class weights, ignore label, logits at a lower
  resolution than the label so that its align_corners=True upsampling matters) on a fixed logits / label pair,
  with the gradient of each loss with respect to the logits;
* ``crops``: the original training sample transform (random rescale, pad, random crop, normalise, flip, label
  downsampling) of a fixed tiny image and label after ``random.seed(s); np.random.seed(s)``;
* ``label_mapping`` and ``class_weights``: the original Cityscapes raw-id mapping and loss weights;
* ``inference``: the original Cityscapes multi-scale / flip / sliding-window fusion of a tiny fixed network
  (a 3x3 convolution with stride 2), for a few scale lists, and the ``train_step`` values it called the network
  with;
* ``lr``: the learning rate that each optimizer step of the original segmentation training loop used, for the
  three shipped Cityscapes yamls at 25/50/75 % of training (and a few other steps), and every step of a tiny run.

The recorded inputs are stored with the outputs, so the tests never need the original code.
"""
import argparse
import importlib
import importlib.util
import json
import os
import random
import sys
import tempfile
import types

import numpy as np
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "original_seg_oracle.json")
CITYSCAPES_TRAIN_IMAGES = 2975  # lines of the original's list/cityscapes/train.lst
YAMLS = ("seg_mdeq_SMALL", "seg_mdeq_LARGE", "seg_mdeq_XL")


def import_original(checkout: str):
    """Puts the original's lib folders on the path and returns its modules (seg criterion, seg function,
    base dataset, cityscapes dataset, config)."""
    lib = os.path.join(checkout, "mdeq", "lib")
    if not os.path.isdir(lib):
        raise SystemExit(f"error: {lib} does not exist; pass the folder that holds the original checkout mdeq/")
    for sub in ("", "models", "modules"):
        sys.path.insert(0, os.path.join(lib, sub))
    np.int = int  # the original uses the alias removed from numpy
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # CPU only
    if importlib.util.find_spec("tqdm") is None:  # the original's seg_function imports it; a pass-through will do
        sys.modules["tqdm"] = types.SimpleNamespace(tqdm=lambda it, *a, **k: it)
    from config import config
    from core import seg_criterion, seg_function
    base_dataset = importlib.import_module("datasets.base_dataset")
    cityscapes = importlib.import_module("datasets.cityscapes")  # the package attribute is the class
    return types.SimpleNamespace(criterion=seg_criterion, function=seg_function, base=base_dataset,
                                 cityscapes=cityscapes, config=config)


def as_list(t) -> list:
    return t.detach().cpu().double().numpy().tolist() if isinstance(t, torch.Tensor) else np.asarray(t).tolist()


# --------------------------------------------------------------------------------------------------- losses
def record_losses(orig) -> dict:
    g = torch.Generator().manual_seed(1234)
    k = 5
    logits = torch.randn(2, k, 3, 4, generator=g) * 2  # (B, K, h, w): a quarter-ish of the label size
    label = torch.randint(0, k, (2, 7, 9), generator=g)
    label[torch.rand(2, 7, 9, generator=g) < 0.25] = 255
    weight = torch.rand(k, generator=g) + 0.5
    out = {"logits": as_list(logits), "label": label.tolist(), "weight": as_list(weight), "ignore_label": 255,
           "cases": []}
    cases = [("ce", None, {}), ("ce", weight, {}),
             ("ohem", weight, {"thres": 0.7, "min_kept": 20}),
             ("ohem", None, {"thres": 0.7, "min_kept": 20}),
             ("ohem", weight, {"thres": 0.3, "min_kept": 5}),
             ("ohem", weight, {"thres": 0.9, "min_kept": 100000})]
    for kind, w, kw in cases:
        x = logits.clone().requires_grad_(True)
        if kind == "ce":
            crit = orig.criterion.CrossEntropy(ignore_label=255, weight=w)
        else:
            crit = orig.criterion.OhemCrossEntropy(ignore_label=255, weight=w, **kw)
        loss = crit(x, label)
        loss.backward()
        out["cases"].append({"kind": kind, "weighted": w is not None, **kw, "loss": loss.item(),
                             "grad": as_list(x.grad)})
    return out


# ---------------------------------------------------------------------------------------------------- crops
def record_crops(orig) -> dict:
    rs = np.random.RandomState(7)
    rgb = rs.randint(0, 256, (12, 20, 3)).astype(np.uint8)  # (H, W, 3) RGB
    label = rs.randint(0, 5, (12, 20)).astype(np.uint8)
    label[rs.rand(12, 20) < 0.2] = 255
    out = {"image_rgb": rgb.tolist(), "label": label.tolist(), "ignore_label": 255, "cases": []}
    settings = [
        {"base_size": 20, "crop_size": [10, 16], "scale_factor": 16, "downsample_rate": 1, "multi_scale": True,
         "flip": True, "seeds": list(range(8))},
        {"base_size": 20, "crop_size": [9, 14], "scale_factor": 16, "downsample_rate": 2, "multi_scale": True,
         "flip": True, "seeds": [0, 3, 5]},
        {"base_size": 20, "crop_size": [10, 16], "scale_factor": 16, "downsample_rate": 1, "multi_scale": False,
         "flip": True, "seeds": [0, 1]},
    ]
    for s in settings:
        ds = orig.base.BaseDataset(ignore_label=255, base_size=s["base_size"], crop_size=tuple(s["crop_size"]),
                                   downsample_rate=s["downsample_rate"], scale_factor=s["scale_factor"])
        for seed in s["seeds"]:
            random.seed(seed)
            np.random.seed(seed)
            # the original reads images with OpenCV, i.e. in BGR order
            image, lab = ds.gen_sample(rgb[:, :, ::-1].copy(), label.astype(np.int32).copy(),
                                       multi_scale=s["multi_scale"], is_flip=s["flip"])
            case = {k: v for k, v in s.items() if k != "seeds"}
            case.update(seed=seed, image=np.asarray(image, dtype=np.float64).tolist(),
                        label_out=np.asarray(lab).astype(np.int64).tolist())
            out["cases"].append(case)
    return out


# -------------------------------------------------------------------------------------------- cityscapes
def make_cityscapes(orig, tmp: str, crop_size=(1024, 2048), base_size=2048, num_classes=19):
    """An original Cityscapes dataset object over a one-line list file (its files are never read)."""
    with open(os.path.join(tmp, "one.lst"), "w") as fh:
        fh.write("leftImg8bit/val/a/a_leftImg8bit.png gtFine/val/a/a_gtFine_labelIds.png\n")
    return orig.cityscapes.Cityscapes(root=tmp + "/", list_path="one.lst", num_classes=num_classes,
                                      multi_scale=False, flip=False, ignore_label=255, base_size=base_size,
                                      crop_size=crop_size)


def record_mapping(orig, tmp: str) -> dict:
    ds = make_cityscapes(orig, tmp)
    raw = np.arange(256, dtype=np.uint8).reshape(16, 16)
    mapped = ds.convert_label(raw.copy())
    return {"raw_to_train": np.asarray(mapped).reshape(-1).astype(int).tolist(),
            "class_weights": as_list(ds.class_weights)}


class TinyNet(nn.Module):
    """A fixed network with the original segmentation net's call interface: logits at half resolution."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, num_classes, 3, stride=2, padding=1)
        g = torch.Generator().manual_seed(99)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.5)
            self.conv.bias.copy_(torch.randn(self.conv.bias.shape, generator=g) * 0.1)
        self.train_steps = []

    def forward(self, x, train_step=0, **kwargs):  # the original MDEQSegNet's default train_step is 0
        self.train_steps.append(train_step)
        return self.conv(x)


def record_inference(orig, tmp: str) -> dict:
    k = 4
    crop = (8, 12)  # (h, w) = TEST.IMAGE_SIZE [12, 8]
    base = 20  # TEST.BASE_SIZE
    g = torch.Generator().manual_seed(5)
    image = torch.randn(1, 3, 12, 20, generator=g)  # a normalised image, long side = base size
    net = TinyNet(k).eval()
    out = {"image": as_list(image), "conv_weight": as_list(net.conv.weight), "conv_bias": as_list(net.conv.bias),
           "crop_size": list(crop), "base_size": base, "num_classes": k, "cases": []}
    ds = make_cityscapes(orig, tmp, crop_size=crop, base_size=base, num_classes=k)
    for scales, flip in (((0.75, 1.5), True), ((0.75, 1.5), False), ((1.0,), False), ((0.5, 1.0, 1.75), True)):
        net.train_steps = []
        with torch.no_grad():
            pred = ds.multi_scale_inference(net, image.clone(), scales=list(scales), flip=flip)
        out["cases"].append({"scales": list(scales), "flip": flip, "pred": as_list(pred),
                             "train_steps": list(net.train_steps)})
    return out


# ------------------------------------------------------------------------------------------ learning rate
class _Writer:
    def add_scalar(self, *args, **kwargs) -> None:
        pass


class _LossNet(nn.Module):
    """Stands in for the original FullModel: (losses (1,), outputs) from one parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, images, labels, train_step=-1, **kwargs):
        return (self.w * 0.5).pow(2), None


def original_lr_run(orig, cfg, num_images: int, gpus: int, record_steps=None) -> dict:
    """Runs the original segmentation train() epoch by epoch (as its seg_train.py does, rank 0 of ``gpus``
    processes) and returns the learning rate each optimizer step used."""
    batch = cfg.TRAIN.BATCH_SIZE_PER_GPU
    sampler = torch.utils.data.distributed.DistributedSampler(range(num_images), num_replicas=gpus, rank=0,
                                                              shuffle=False)
    loader_len = len(torch.utils.data.DataLoader(range(num_images), batch_size=batch, sampler=sampler,
                                                 drop_last=True))
    epoch_iters = int(num_images / batch / gpus)  # the original's epoch_iters
    dummy = (torch.zeros(1), torch.zeros(1), None, None)
    loader = [dummy] * loader_len
    model = _LossNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.TRAIN.LR, momentum=cfg.TRAIN.MOMENTUM,
                                weight_decay=cfg.TRAIN.WD, nesterov=cfg.TRAIN.NESTEROV)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, loader_len * cfg.TRAIN.END_EPOCH,
                                                           eta_min=1e-6)
    used = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: used.append(opt.param_groups[0]["lr"]))
    writer = {"writer": _Writer(), "train_global_steps": 0}
    num_iters = cfg.TRAIN.END_EPOCH * epoch_iters
    for epoch in range(cfg.TRAIN.END_EPOCH):
        orig.function.train(cfg, epoch, cfg.TRAIN.END_EPOCH, epoch_iters, cfg.TRAIN.LR, num_iters, loader,
                            optimizer, scheduler, model, writer, torch.device("cpu"))
    total = len(used)
    out = {"num_images": num_images, "gpus": gpus, "batch_per_gpu": batch, "end_epoch": cfg.TRAIN.END_EPOCH,
           "base_lr": cfg.TRAIN.LR, "loader_len": loader_len, "epoch_iters": epoch_iters, "total_steps": total}
    if record_steps is None:
        out["lr"] = used
    else:
        steps = sorted({s for s in record_steps(total, loader_len) if 0 <= s < total})
        out["lr_at"] = {str(s): used[s] for s in steps}
        out["quarters"] = {str(q): used[q * total // 4] for q in (1, 2, 3)}
    return out


def record_lr(orig, checkout: str) -> dict:
    import logging

    logging.disable(logging.CRITICAL)  # the original logs every PRINT_FREQ steps
    out = {}
    for name in YAMLS:
        cfg = orig.config.clone()
        cfg.defrost()
        cfg.merge_from_file(os.path.join(checkout, "mdeq", "experiments", "cityscapes", name + ".yaml"))
        cfg.PRINT_FREQ = 10 ** 9
        gpus = len(eval(cfg.GPUS)) if isinstance(cfg.GPUS, str) else len(cfg.GPUS)
        out[name] = original_lr_run(
            orig, cfg, CITYSCAPES_TRAIN_IMAGES, gpus,
            lambda total, spe: [0, 1, 2, spe - 1, spe, spe + 1, 2 * spe, 1000, total - 2, total - 1]
            + [total * q // 4 + d for q in (1, 2, 3) for d in (-1, 0, 1)])
        print(f"{name}: {out[name]['total_steps']} steps, quarters {out[name]['quarters']}", flush=True)
    tiny = orig.config.clone()
    tiny.defrost()
    tiny.TRAIN.update(LR=0.1, END_EPOCH=4, BATCH_SIZE_PER_GPU=2, MOMENTUM=0.9, WD=0.0, NESTEROV=False,
                      LR_SCHEDULER="cosine")
    tiny.PRINT_FREQ = 10 ** 9
    out["tiny"] = original_lr_run(orig, tiny, 11, 2)  # 3 batches per rank, but epoch_iters 2
    logging.disable(logging.NOTSET)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", help="folder that holds the original checkout mdeq/ (e.g. /work/shared/reference)")
    parser.add_argument("--skip-lr", action="store_true", help="keep the lr entry of an existing oracle file")
    args = parser.parse_args()
    checkout = os.path.abspath(args.checkout)
    orig = import_original(checkout)
    torch.set_num_threads(1)
    result = {"source": "locuslab/mdeq (lib/core/seg_criterion.py, lib/core/seg_function.py, "
                        "lib/datasets/base_dataset.py, lib/datasets/cityscapes.py)",
              "command": "python tests/data/record_original_seg.py /work/shared/reference"}
    result["losses"] = record_losses(orig)
    result["crops"] = record_crops(orig)
    with tempfile.TemporaryDirectory() as tmp:
        result["label_mapping"] = record_mapping(orig, tmp)
        result["inference"] = record_inference(orig, tmp)
    if args.skip_lr and os.path.isfile(OUT):
        with open(OUT) as fh:
            result["lr"] = json.load(fh)["lr"]
    else:
        result["lr"] = record_lr(orig, checkout)
    with open(OUT, "w") as fh:
        json.dump(result, fh)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
