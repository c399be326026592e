"""State dicts of every format the original project wrote, and strict or transfer loading into a model.

Formats that load (see docs/architecture.md):
- bare state dicts (``torch.save(model.state_dict())``, ``.pkl`` / ``.pth.tar``), including the original's
  duplicated equilibrium copies ``fullstage_copy.*``, ``deq.func.*``, ``deq.func_copy.*`` (ignored);
- state dicts under the prefixes ``model.`` (segmentation wrapper, with ``loss.*`` keys) and ``module.`` (DDP);
- training checkpoints: dicts with ``state_dict`` (+ ``epoch``, ``optimizer``, ``lr_scheduler``, ``perf`` /
  ``best_mIoU``);
- weight-normalised kernels (``weight_g`` / ``weight_v``) and plain ``weight`` kernels, converted either way.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Tuple

import torch
from torch import nn

from mdeq.utils.checkpoint import CheckpointError, safe_load
from mdeq.utils.distributed import unwrap_model

logger = logging.getLogger(__name__)

DUPLICATE_PREFIXES = ("fullstage_copy.", "deq.func.", "deq.func_copy.")
WRAPPER_PREFIXES = ("module.", "model.")


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def extract_state_dict(obj: Any, source: str = "checkpoint") -> Tuple["OrderedDict[str, torch.Tensor]", str]:
    """Finds the model weights in a loaded checkpoint and normalises their names.

    Returns:
        (state_dict, description of the detected format).
    """
    fmt = []
    if isinstance(obj, Mapping) and not _is_state_dict(obj):
        for key in ("state_dict", "model_state", "model"):
            if key in obj and _is_state_dict(obj[key]):
                fmt.append(f"training checkpoint (weights under '{key}'" +
                           (f", epoch {obj['epoch']}" if "epoch" in obj else "") + ")")
                obj = obj[key]
                break
    if not _is_state_dict(obj):
        kind = type(obj).__name__
        keys = list(obj.keys())[:8] if isinstance(obj, Mapping) else []
        raise CheckpointError(f"{source} holds no model weights (a {kind}" + (f" with keys {keys}" if keys else "")
                              + "); expected a state dict or a training checkpoint with a 'state_dict' entry")
    sd: "OrderedDict[str, torch.Tensor]" = OrderedDict(obj)
    if not fmt:
        fmt.append("bare state dict")
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) or k.startswith("loss.") for k in sd) and any(k.startswith(prefix) for k in sd):
            dropped_loss = [k for k in sd if k.startswith("loss.")]
            sd = OrderedDict((k[len(prefix):], v) for k, v in sd.items() if k.startswith(prefix))
            fmt.append(f"prefix '{prefix}' removed" + (f", {len(dropped_loss)} loss keys ignored"
                                                       if dropped_loss else ""))
    dups = [k for k in sd if k.startswith(DUPLICATE_PREFIXES)]
    if dups:
        sd = OrderedDict((k, v) for k, v in sd.items() if not k.startswith(DUPLICATE_PREFIXES))
        fmt.append(f"original MDEQ layout ({len(dups)} duplicate equilibrium copies ignored)")
    return sd, "; ".join(fmt)


def _adapt_weight_norm(sd: "OrderedDict[str, torch.Tensor]", target: Mapping[str, torch.Tensor]
                       ) -> "OrderedDict[str, torch.Tensor]":
    """Converts between weight-normalised (weight_g / weight_v) and plain (weight) kernels where the model and
    the file disagree, so that a WNORM model loads a plain file and vice versa."""
    out = OrderedDict(sd)
    for key in list(sd.keys()):
        if key.endswith(".weight_v"):
            base = key[: -len("_v")]
            g_key = base + "_g"
            if base in target and key not in target and g_key in sd:
                v, g = sd[key], sd[g_key]
                out[base] = v * (g / v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1))))
                del out[key], out[g_key]
        elif key.endswith(".weight"):
            v_key, g_key = key + "_v", key + "_g"
            if key not in target and v_key in target and g_key in target:
                w = sd[key]
                out[v_key] = w.clone()
                out[g_key] = w.flatten(1).norm(dim=1).view(-1, *([1] * (w.dim() - 1)))
                del out[key]
    return out


def compare_state_dicts(sd: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
                        ) -> Tuple[List[str], List[str], List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]]]:
    """(missing keys, unexpected keys, [(key, shape in file, shape in model)])."""
    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    misshapen = [(k, tuple(sd[k].shape), tuple(target[k].shape)) for k in sd
                 if k in target and tuple(sd[k].shape) != tuple(target[k].shape)]
    return missing, unexpected, misshapen


def _listing(title: str, items: List[str], limit: int = 30) -> str:
    if not items:
        return ""
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"\n  {title} ({len(items)}):\n    " + "\n    ".join(items[:limit]) + more


def load_strict(model: nn.Module, path: str) -> str:
    """Loads every parameter and buffer of ``model`` from ``path`` (TEST.MODEL_FILE, TRAIN.MODEL_FILE).

    Returns:
        A description of the detected format, for the log.

    Raises:
        CheckpointError: listing missing, unexpected and misshapen keys (with both shapes) when the file does
            not fit the model exactly.
    """
    net = unwrap_model(model)
    obj = safe_load(path)
    sd, fmt = extract_state_dict(obj, path)
    target = net.state_dict()
    sd = _adapt_weight_norm(sd, target)
    missing, unexpected, misshapen = compare_state_dicts(sd, target)
    if missing or unexpected or misshapen:
        raise CheckpointError(
            f"checkpoint {path} ({fmt}) does not fit the model built from this config; was it trained with "
            f"another experiment file (channels, branches, classes)? Use the matching --cfg, or MODEL.PRETRAINED "
            f"for a partial (transfer) initialisation."
            + _listing("missing in the file", missing)
            + _listing("unexpected in the file", unexpected)
            + _listing("shape in file vs model", [f"{k}: {a} vs {b}" for k, a, b in misshapen]))
    net.load_state_dict(sd, strict=True)
    logger.info("=> loaded %s (%s)", path, fmt)
    return fmt


def load_pretrained(model: nn.Module, path: str) -> Dict[str, List[str]]:
    """Transfer initialisation (MODEL.PRETRAINED): loads what the model shares with the file.

    Keys the model lacks, and keys whose shapes differ, are dropped; both are logged by top-level module, as are
    the model's keys that the file does not provide.

    Returns:
        {"loaded": [...], "dropped": [...], "misshapen": [...], "not_in_file": [...]} (key names).
    """
    net = unwrap_model(model)
    sd, fmt = extract_state_dict(safe_load(path), path)
    target = net.state_dict()
    sd = _adapt_weight_norm(sd, target)
    missing, unexpected, misshapen = compare_state_dicts(sd, target)
    bad = {k for k, _, _ in misshapen}
    keep = OrderedDict((k, v) for k, v in sd.items() if k in target and k not in bad)
    merged = OrderedDict(target)
    merged.update(keep)
    net.load_state_dict(merged, strict=True)

    def modules(keys: List[str]) -> List[str]:
        return sorted({k.split(".")[0] for k in keys})

    logger.info("=> transfer-initialised from %s (%s): %d tensors loaded", path, fmt, len(keep))
    if unexpected:
        logger.info("   in the file but not in this model (dropped): %s", modules(unexpected))
    if misshapen:
        logger.info("   shape differs (dropped): %s", [f"{k}: {a} vs {b}" for k, a, b in misshapen])
    if missing:
        logger.info("   in this model but not in the file (kept as initialised): %s", modules(missing))
    return {"loaded": list(keep), "dropped": unexpected, "misshapen": sorted(bad), "not_in_file": missing}
