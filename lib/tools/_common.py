"""What the four tools share before their own work starts: finding the experiment file that ``--cfg`` names."""
from __future__ import annotations

import os
import sys
from typing import List, Optional, Sequence

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))


def experiment_dirs() -> List[str]:
    """The folders that hold the shipped experiment files, most specific first.

    An installed package carries them as ``mdeq/experiments``; in a clone (editable install, or the package
    folder ``lib/`` used directly) they are the repository's ``experiments/`` next to ``lib/``.
    """
    candidates = [os.path.join(_PACKAGE_DIR, "experiments"),
                  os.path.join(os.path.dirname(_PACKAGE_DIR), "experiments")]
    return [d for d in candidates if os.path.isdir(d)]


def resolve_cfg(path: str) -> str:
    """The experiment file that ``path`` names.

    A path that exists (relative to the working directory, or absolute) is returned unchanged. Otherwise a
    shipped experiment is looked up by its name relative to the experiments folder, with or without the
    leading ``experiments/``: ``cifar/cls_mdeq_TINY.yaml`` and ``experiments/cifar/cls_mdeq_TINY.yaml`` both
    name the shipped CIFAR-10 TINY file. A name that matches nothing is returned unchanged, so that loading it
    reports the missing file as it always does.

    Args:
        path: the value given to ``--cfg``.

    Returns:
        An existing file's path, or ``path`` itself.
    """
    if not path or os.path.exists(path):
        return path
    rel = os.path.normpath(path).replace(os.sep, "/")
    if rel.startswith("experiments/"):
        rel = rel[len("experiments/"):]
    if os.path.isabs(rel) or rel.startswith("../"):
        return path
    for folder in experiment_dirs():
        candidate = os.path.join(folder, *rel.split("/"))
        if os.path.isfile(candidate):
            return candidate
    return path


def resolve_cfg_argv(argv: Optional[Sequence[str]]) -> List[str]:
    """A copy of the command line (``sys.argv[1:]`` when None) whose ``--cfg`` value went through resolve_cfg."""
    args = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if arg == "--cfg" and i + 1 < len(args):
            args[i + 1] = resolve_cfg(args[i + 1])
            break
        if arg.startswith("--cfg="):
            args[i] = "--cfg=" + resolve_cfg(arg[len("--cfg="):])
            break
    return args
