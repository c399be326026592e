"""Checkpoint files: loading without running code, and atomic writing.

Checkpoints come from strangers: every load goes through :func:`safe_load`, which unpickles tensors and plain
containers only (``weights_only``) and refuses anything that would run code. Every write goes through
:func:`save_checkpoint`: a temporary file, fsync, rename, so that a crash never leaves a partial file under the
checkpoint's name. What a checkpoint holds is not this module's business: the state-dict formats are in
:mod:`mdeq.utils.state_dict`, the training checkpoint in :mod:`mdeq.core.checkpointing`.
"""
from __future__ import annotations

import contextlib
import logging
import os
import pickle
import shutil
import tempfile
import zipfile
from typing import Any, Iterator, List, Sequence

import torch

from mdeq.utils.errors import UserError

logger = logging.getLogger(__name__)


class CheckpointError(UserError, RuntimeError):
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
