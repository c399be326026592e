"""The training checkpoint: what it holds, writing it, choosing and loading one to resume from, the random
generators' states of every rank, and the last good state of a run that diverged.

A training checkpoint is a dict (loads with ``weights_only``): ``epoch`` (epochs finished, or the epoch in
progress for a mid-epoch file), ``step`` (global step), ``batch`` (first batch of ``epoch`` still to run; 0 at an
epoch end), ``world_size``, ``model``, ``state_dict``, ``optimizer``, ``lr_scheduler``, ``perf``, ``best_perf``
(segmentation adds ``best_mIoU`` and ``phase``), ``rng`` (rank 0's generators), ``rng_per_rank``, ``config``
(the frozen yaml) and ``channels_last`` (the memory layout the run trained in). File writing is
:mod:`mdeq.utils.checkpoint`'s job (atomic, safe loading).
"""
from __future__ import annotations

import logging
import os
import random
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from mdeq.utils import distributed as du
from mdeq.utils.checkpoint import (CheckpointError, keep_previous, previous_path, remove_partial_files, safe_load,
                                   save_checkpoint)

logger = logging.getLogger(__name__)

LATEST = "checkpoint.pth.tar"
LAST_GOOD = "last_good.pth.tar"


# ------------------------------------------------------------------------------------------ random generators
def rng_state() -> Dict[str, Any]:
    """The random generators' states in a form that loads with weights_only (tensors and plain lists)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restores what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore_rng_state(ckpt: Mapping[str, Any]) -> None:
    """Restores this rank's random generators from a training checkpoint: its own state when the checkpoint
    holds one per rank for the same number of processes, else the state saved by rank 0."""
    per_rank, world, rank = ckpt.get("rng_per_rank"), du.get_world_size(), du.get_rank()
    if per_rank and len(per_rank) == world:
        set_rng_state(per_rank[rank])
    elif "rng" in ckpt:
        if world > 1:
            logger.warning("the checkpoint holds no random-generator state per process for %d processes; every "
                           "process continues from rank 0's (random augmentation and dropout will differ from "
                           "an uninterrupted run)", world)
        set_rng_state(ckpt["rng"])


# ---------------------------------------------------------------------------------------------- writing
def write_training_checkpoint(path: str, contents: Dict[str, Any], collective: bool = True) -> None:
    """Writes a training checkpoint to ``path``, keeping the file it replaces as ``<name>_prev``.

    With ``collective`` every rank must call this at the same point: every rank's random-generator states are
    gathered into ``rng_per_rank``, rank 0 writes, and every rank waits for the file. Without it (a process that stops alone) only this
    process's states are saved, and only rank 0 writes.
    """
    rngs = du.all_gather_object(rng_state()) if collective else [rng_state()]
    if du.is_main_process():
        ckpt = dict(contents, rng=rngs[0])
        if collective:
            ckpt["rng_per_rank"] = list(rngs)
        keep_previous(path)
        save_checkpoint(ckpt, path)
    if collective:  # no rank goes on (or exits, after a stop) while rank 0 is still writing
        du.barrier()


def write_weights(state_dict: Mapping[str, torch.Tensor], path: str) -> None:
    """Rank 0 writes a bare state dict (best and final weights), atomically."""
    if du.is_main_process():
        save_checkpoint(state_dict, path)


def clear_partial_files(output_dir: str, names: Sequence[str]) -> None:
    """Rank 0, before training: removes temporary files that a killed run left while writing ``names``."""
    if du.is_main_process():
        remove_partial_files(output_dir, list(names) + [LATEST, previous_path(LATEST), LAST_GOOD])
    du.barrier()


# ---------------------------------------------------------------------------------------------- reading
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
                try:
                    os.replace(path, path + ".unusable")
                    logger.warning("moved it to %s.unusable", path)
                except OSError:
                    pass
            continue
        key = (int(ckpt.get("epoch", 0)), int(ckpt.get("step", 0)))
        if best is None or key > best[0]:
            best = (key, path, ckpt)
    return None if best is None else (best[1], best[2])


def resume_path(cfg, output_dir: str) -> Optional[str]:
    """The checkpoint to resume from (TRAIN.CHECKPOINT, AUTO_RESUME, TRAIN.RESUME), or None to start afresh.

    AUTO_RESUME takes the readable candidate with the highest (epoch, step) among the latest checkpoint, the one
    it replaced and the last good state of a run that diverged; a candidate that cannot be read is skipped with
    a warning and renamed ``<name>.unusable``. Rank 0 chooses; every rank gets its choice.
    """
    latest = os.path.join(output_dir, LATEST)
    if cfg.TRAIN.CHECKPOINT:
        return cfg.TRAIN.CHECKPOINT
    if cfg.AUTO_RESUME:
        chosen = None
        if du.is_main_process():
            candidates = [latest, previous_path(latest), os.path.join(output_dir, LAST_GOOD)]
            found = newest_valid_checkpoint(candidates, set_aside=True)
            chosen = found[0] if found else None
            if chosen is None:
                logger.info("AUTO_RESUME: no readable checkpoint in %s; starting from scratch", output_dir)
        return du.broadcast_object(chosen)
    if cfg.TRAIN.RESUME and os.path.isfile(latest):
        return latest
    if cfg.TRAIN.RESUME:
        logger.info("TRAIN.RESUME is set but %s does not exist yet; starting from scratch", latest)
    return None


def recorded_layout(path: str) -> Optional[bool]:
    """The memory layout (True: channels_last) recorded in the training checkpoint ``path``; None when it cannot be
    read here (the resume reports why) or predates the record. The tensors are mapped, not loaded."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # unreadable here: the resume reports it
        return None
    value = ckpt.get("channels_last") if isinstance(ckpt, Mapping) else None
    return None if value is None else bool(value)


def resume_error(path: str, exc: Exception) -> CheckpointError:
    """The error for a checkpoint that cannot be resumed from: what is wrong and the ways out."""
    return CheckpointError(f"cannot resume from {path}: {str(exc).rstrip('.')}. The file is left as it is; delete "
                           f"or move it (or set TRAIN.RESUME False) to start afresh, or set AUTO_RESUME True to "
                           f"fall back to the newest readable checkpoint.")


def warn_if_resharded(ckpt: Mapping[str, Any], path: str) -> None:
    """A mid-epoch checkpoint counts batches per process; resumed by another number of processes, the rest of that
    epoch sees the samples in another order (some twice, some not at all). Says so."""
    world = du.get_world_size()
    saved = int(ckpt.get("world_size", world))
    if int(ckpt.get("batch", 0)) > 0 and saved != world:
        logger.warning("%s was written mid-epoch by %d process(es) and is resumed by %d: the rest of epoch %d does "
                       "not continue the same sample order (resume from an epoch-end checkpoint, or with %d "
                       "processes, for that)", path, saved, world, int(ckpt["epoch"]), saved)


def refuse_overwrite(output_dir: str, names: Sequence[str], allowed: bool) -> None:
    """Stops a fresh (not resuming) run whose output folder holds another run's checkpoints, so that nothing of
    that run is lost; TRAIN.OVERWRITE True allows it.

    Raises:
        ValueError: the folder holds checkpoints and overwriting is not allowed.
    """
    found = []
    if du.is_main_process():
        found = [n for n in [LATEST, LAST_GOOD, *names] if os.path.isfile(os.path.join(output_dir, n))]
    found = du.broadcast_object(found)
    if found and not allowed:
        raise ValueError(
            f"the output folder {output_dir} already holds the checkpoints of another run ({', '.join(found)}); "
            f"to continue that run pass AUTO_RESUME True (or TRAIN.RESUME True), to keep it and start afresh choose "
            f"another folder (--modelDir DIR or OUTPUT_DIR DIR), or pass TRAIN.OVERWRITE True to replace it")
