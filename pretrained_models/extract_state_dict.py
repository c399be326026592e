"""Extract a bare state dict from a classification checkpoint, for MODEL.PRETRAINED (ImageNet -> Cityscapes).

    python pretrained_models/extract_state_dict.py INPUT OUTPUT [--drop-head]

INPUT is one of our training checkpoints (a dict whose ``state_dict`` entry holds the weights, such as
``output/imagenet/cls_mdeq_SMALL/checkpoint.pth.tar``), one of our bare state dicts (``final_state.pth.tar``), or
a file released by the original project (a bare state dict in a ``.pkl``, with the duplicated equilibrium copies
``fullstage_copy.*`` / ``deq.func*``). Wrapper prefixes (``module.``, ``model.``) and the duplicates are removed,
so OUTPUT holds exactly the keys of our model. ``--drop-head`` also removes the classification head
(``incre_modules``, ``downsamp_modules``, ``final_layer``, ``classifier``), leaving the trunk that a segmentation
model shares. The file is read with weights-only unpickling (nothing in it is executed) and written atomically.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import torch

from mdeq.utils.state_dict import extract_state_dict as normalise_state_dict
from mdeq.utils.checkpoint import safe_load, save_checkpoint
from mdeq.utils.cli import run_tool

logger = logging.getLogger(__name__)

CLS_HEAD_MODULES = ("incre_modules", "downsamp_modules", "final_layer", "classifier")


def extract(path: str, drop_head: bool = False) -> Dict[str, object]:
    """Reads a checkpoint and returns its weights in our layout.

    Args:
        path: the checkpoint file.
        drop_head: remove the classification head's modules.

    Returns:
        ``{"state_dict": OrderedDict of tensors, "format": detected format, "dropped": removed head modules}``.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: unreadable file, no weights in it, or objects other than tensors (refused unread).
    """
    sd, fmt = normalise_state_dict(safe_load(path), path)
    dropped: List[str] = []
    if drop_head:
        dropped = sorted({k.split(".")[0] for k in sd if k.split(".")[0] in CLS_HEAD_MODULES})
        sd = OrderedDict((k, v) for k, v in sd.items() if k.split(".")[0] not in CLS_HEAD_MODULES)
    return {"state_dict": sd, "format": fmt, "dropped": dropped}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Extract a bare state dict (for MODEL.PRETRAINED) from a "
                                                 "classification checkpoint")
    parser.add_argument("input", help="training checkpoint, bare state dict, or an original .pkl")
    parser.add_argument("output", help="where to write the bare state dict (e.g. MDEQ_Small_Imagenet.pth)")
    parser.add_argument("--drop-head", action="store_true",
                        help="remove the classification head (incre_modules, downsamp_modules, final_layer, "
                             "classifier)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out: Dict[str, object] = {}

    def run() -> None:
        out.update(extract(args.input, args.drop_head))
        sd = out["state_dict"]
        assert isinstance(sd, dict)
        save_checkpoint(sd, args.output)
        count = sum(int(v.numel()) for v in sd.values() if isinstance(v, torch.Tensor))
        logger.info("read %s (%s)", args.input, out["format"])
        if out["dropped"]:
            logger.info("dropped the classification head: %s", ", ".join(out["dropped"]))  # type: ignore[arg-type]
        out["summary"] = f"wrote {len(sd)} tensors ({count:,} values) to {args.output}"

    code = run_tool(run)
    if code == 0:
        print(out["summary"], flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
