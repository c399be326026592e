"""Saving and loading checkpoints: ours and every format of the original project.

Formats that load (see ARCHITECTURE.md):
- bare state dicts (``torch.save(model.state_dict())``, ``.pkl`` / ``.pth.tar``), including the original's
  duplicated equilibrium copies ``fullstage_copy.*``, ``deq.func.*``, ``deq.func_copy.*`` (ignored);
- state dicts under the prefixes ``model.`` (segmentation wrapper, with ``loss.*`` keys) and ``module.`` (DDP);
- training checkpoints: dicts with ``state_dict`` (+ ``epoch``, ``optimizer``, ``lr_scheduler``, ``perf`` /
  ``best_mIoU``).

Checkpoints come from strangers: every load goes through :func:`safe_load`, which unpickles tensors and plain
containers only (``weights_only``) and refuses anything that would run code.
"""
from __future__ import annotations

import contextlib
import logging
import os
import pickle
import shutil
import tempfile
import zipfile
from collections import OrderedDict
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

logger = logging.getLogger(__name__)

DUPLICATE_PREFIXES = ("fullstage_copy.", "deq.func.", "deq.func_copy.")
WRAPPER_PREFIXES = ("module.", "model.")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file, the problem and the fix."""


@contextlib.contextmanager
def _numpy_scalars_allowed() -> Iterator[None]:
    """Lets weights_only unpickling rebuild numpy scalars (old checkpoints store metrics as numpy floats).

    These reconstructors build plain numbers and dtypes only; they cannot run arbitrary code.
    """
    allowed: List[Any] = []
    try:
        import numpy as np

        core = getattr(np, "_core", None) or np.core
        allowed = [core.multiarray.scalar, np.dtype]
        allowed += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    except Exception:  # numpy missing or laid out differently: load without the extra allowance
        allowed = []
    ctx = getattr(torch.serialization, "safe_globals", None)
    if ctx is None or not allowed:
        yield
        return
    with ctx(allowed):
        yield


def safe_load(path: str) -> Any:
    """Loads a checkpoint file onto the CPU without executing code from it.

    Raises:
        FileNotFoundError: the file does not exist.
        CheckpointError: the file is not a checkpoint, is truncated or corrupted, or holds objects other than
            tensors and plain containers (a pickle that would run code is refused, never executed).
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist; check the path given to --testModel, "
                                f"TEST.MODEL_FILE, TRAIN.MODEL_FILE or MODEL.PRETRAINED")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} is a folder, not a file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); it was probably cut off while being "
                              f"written. Use an earlier checkpoint or download the file again.")
    try:
        with _numpy_scalars_allowed():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        detail = text.split("WeightsUnpickler error:", 1)[-1]
        if "Unsupported operand" in detail:  # an opcode the safe loader lacks: read the opcodes (runs nothing)
            damaged = _pickle_contents(path) == "damaged"
        else:
            damaged = "truncated" in detail or "EOF" in detail
        if not damaged and ("Weights only load failed" in text or "Unsupported global" in text or "GLOBAL" in text):
            raise CheckpointError(
                f"refused to load {path}: it contains Python objects other than tensors and plain containers, "
                f"and unpickling them could run code from the file. Only tensor checkpoints are accepted. If you "
                f"trust the file, convert it once in a separate Python session to a plain state dict "
                f"(torch.save(state_dict, 'clean.pth')).") from None
        raise CheckpointError(f"{path} is not a readable checkpoint ({_first_line(detail)}); it may be truncated, "
                              f"corrupted, or not a PyTorch file at all. Use an earlier checkpoint or download it "
                              f"again.") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, AttributeError, KeyError,
            IndexError, TypeError) as exc:
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(exc).__name__}: "
                              f"{_first_line(str(exc))}); it may be truncated, corrupted, or not a PyTorch file "
                              f"at all. Use an earlier checkpoint or download it again.") from None


# opcodes through which a pickle imports or calls something: only these can make unpickling run code
_CODE_OPCODES = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "BUILD", "EXT1", "EXT2",
                 "EXT4"}


def _pickle_contents(path: str) -> str:
    """What a file that the safe loader could not decode holds, found by decoding its opcodes without executing
    any: "objects" (a pickle that imports or calls something), "plain" (a pickle of plain values only), or
    "damaged" (not a pickle stream: random bytes, another file type, a truncated file)."""
    import pickletools

    try:
        with open(path, "rb") as fh:
            names = {op.name for op, _, _ in pickletools.genops(fh)}
    except Exception:  # any decoding failure means the bytes are not a whole pickle
        return "damaged"
    return "objects" if names & _CODE_OPCODES else "plain"


def _first_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[0][:200] if lines else "no details"


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


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


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
    net = _unwrap(model)
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
    net = _unwrap(model)
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


def previous_path(path: str) -> str:
    """Where :func:`save_checkpoint` keeps the file it replaces (``checkpoint.pth.tar`` ->
    ``checkpoint_prev.pth.tar``)."""
    folder, name = os.path.split(path)
    for ext in (".pth.tar", ".pth", ".pkl", ".tar"):
        if name.endswith(ext):
            return os.path.join(folder, name[: -len(ext)] + "_prev" + ext)
    return path + "_prev"


def _temporary_prefix(path: str) -> str:
    return "." + os.path.basename(path) + "."


def save_checkpoint(obj: Any, path: str) -> None:
    """Writes ``obj`` with torch.save atomically: a temporary file in the same folder, fsync, then rename.

    A crash at any moment leaves either the previous file or the new one, never a partial file under ``path``
    (a killed process can leave its temporary ``.<name>.*.tmp`` file behind; :func:`remove_partial_files` clears
    those).
    """
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=folder)
    except OSError as exc:
        raise _write_error(path, exc) from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        with contextlib.suppress(OSError):  # make the rename itself durable where the platform allows
            dfd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(exc, OSError):
            raise _write_error(path, exc) from exc
        raise


def _write_error(path: str, exc: OSError) -> CheckpointError:
    """The error of a checkpoint that could not be written (disk full, no permission, ...)."""
    reason = exc.strerror or str(exc)
    kept = "the previous file there is unchanged" if os.path.isfile(path) else "nothing was written there"
    return CheckpointError(
        f"could not write the checkpoint {path}: {reason}; {kept}. Free disk space or choose another output "
        f"folder (OUTPUT_DIR or --modelDir), then run the same command again with TRAIN.RESUME True (or "
        f"AUTO_RESUME True) to continue from the last checkpoint written.")


def keep_previous(path: str) -> None:
    """Gives the current ``path`` (if any) the second name :func:`previous_path`, before a new version is saved, so
    that a later corruption of ``path`` still leaves one good checkpoint (AUTO_RESUME falls back to it).

    A hard link: no copy, and the atomic rename of the next save leaves the old file under the second name.
    """
    if not os.path.isfile(path):
        return
    prev = previous_path(path)
    tmp = os.path.join(os.path.dirname(prev), _temporary_prefix(prev) + "link.tmp")  # see remove_partial_files
    with contextlib.suppress(FileNotFoundError):
        os.remove(tmp)
    try:
        os.link(path, tmp)
    except OSError:  # no hard links on this file system: a copy
        shutil.copyfile(path, tmp)
    os.replace(tmp, prev)  # atomic: the previous backup stays until the new one is complete


def remove_partial_files(folder: str, names: Sequence[str]) -> List[str]:
    """Deletes the temporary files that :func:`save_checkpoint` left in ``folder`` for the given file names when
    its process was killed mid-write (they are never a complete checkpoint). Call it only where no other process
    is saving into the folder (rank 0, before training). Returns the deleted paths."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    prefixes = tuple(_temporary_prefix(name) for name in names)
    for entry in sorted(os.listdir(folder)):
        if entry.startswith(prefixes) and entry.endswith(".tmp"):
            path = os.path.join(folder, entry)
            with contextlib.suppress(OSError):
                os.remove(path)
                removed.append(path)
                logger.warning("removed %s, a partial checkpoint left by a process that was stopped while "
                               "writing it", path)
    return removed


def load_training_checkpoint(path: str) -> Dict[str, Any]:
    """Loads one of our training checkpoints (for resume) and checks that it has what resuming needs."""
    obj = safe_load(path)
    if not isinstance(obj, Mapping) or "state_dict" not in obj:
        raise CheckpointError(f"{path} is not a training checkpoint (no 'state_dict' entry); to start from "
                              f"weights only, use TRAIN.MODEL_FILE instead of TRAIN.RESUME")
    return dict(obj)


def newest_valid_checkpoint(paths: List[str], set_aside: bool = False) -> Optional[Tuple[str, Dict[str, Any]]]:
    """Among existing ``paths``, the readable training checkpoint with the highest (epoch, step); None if none.

    Unreadable files are logged and skipped (AUTO_RESUME). With ``set_aside`` they are also renamed to
    ``<name>.unusable`` (bytes kept for a look, and out of the way of the next save, which would otherwise keep
    the unusable file as the previous checkpoint); only one process may do that.
    """
    best = None
    for path in paths:
        if not os.path.isfile(path):
            continue
        try:
            ckpt = load_training_checkpoint(path)
        except (CheckpointError, FileNotFoundError) as exc:
            logger.warning("skipping unusable checkpoint %s: %s", path, exc)
            if set_aside:
                with contextlib.suppress(OSError):
                    os.replace(path, path + ".unusable")
                    logger.warning("moved it to %s.unusable", path)
            continue
        key = (int(ckpt.get("epoch", 0)), int(ckpt.get("step", 0)))
        if best is None or key > best[0]:
            best = (key, path, ckpt)
    return None if best is None else (best[1], best[2])
