"""The checkpoints released by the original MDEQ project: where they are, what they should be, how to fetch one.

The registry holds facts only: a size or SHA-256 that has not been published is ``None`` ("unknown"), never a
guess. A download goes to a temporary file next to its destination and is renamed only after its size and hash
check out, so a failed or corrupted download never leaves a file under the final name.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

logger = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes read per step while downloading or hashing


class DownloadError(RuntimeError):
    """A download failed, or a file does not match what the registry (or the user) expects."""


def _drive(file_id: str) -> Tuple[str, str]:
    """(direct download URL, page URL for a browser) of a Google Drive file."""
    return (f"https://drive.usercontent.google.com/download?id={file_id}&export=download&confirm=t",
            f"https://drive.google.com/file/d/{file_id}/view?usp=sharing")


@dataclass(frozen=True)
class ReleasedWeights:
    """One released checkpoint.

    Attributes:
        name: the registry name (also the file name without its extension).
        description: model and task, as the original project's README names them.
        task: "cls" (evaluated with cls_valid) or "seg" (evaluated with seg_test).
        cfg: the experiment file that builds the matching model, relative to the repository root.
        file_name: the name the file gets in the destination folder.
        url: where the file is fetched from.
        page_url: the page that offers the file in a browser.
        size: expected size in bytes; None: unknown (not published).
        sha256: expected SHA-256 (hex); None: unknown (not published).
    """

    name: str
    description: str
    task: str
    cfg: str
    file_name: str
    url: str
    page_url: str
    size: Optional[int] = None
    sha256: Optional[str] = None


def _entry(name: str, description: str, task: str, cfg: str, drive_id: str) -> ReleasedWeights:
    url, page = _drive(drive_id)
    return ReleasedWeights(name=name, description=description, task=task, cfg=cfg, file_name=name + ".pkl",
                           url=url, page_url=page, size=None, sha256=None)


# The four files linked from the original project's README (https://github.com/locuslab/mdeq). Neither their
# sizes nor their hashes were published: both stay unknown until someone records them from a download.
RELEASED: Dict[str, ReleasedWeights] = {e.name: e for e in (
    _entry("MDEQ_Small_Cls", "MDEQ-Small, ImageNet classification", "cls",
           "experiments/imagenet/cls_mdeq_SMALL.yaml", "12ANsUdJJ3_qb5nfiBVPOoON2GQ2v4W1g"),
    _entry("MDEQ_XL_Cls", "MDEQ-XL, ImageNet classification", "cls",
           "experiments/imagenet/cls_mdeq_XL.yaml", "1MBUFBOAAI8m2eccNbHePrukpOiAzPbji"),
    _entry("MDEQ_Small_Seg", "MDEQ-Small, Cityscapes (val) segmentation", "seg",
           "experiments/cityscapes/seg_mdeq_SMALL.yaml", "11DZfYhHNK_XC6-Uob1Pp2pStS5EhP5dF"),
    _entry("MDEQ_XL_Seg", "MDEQ-XL, Cityscapes (val) segmentation", "seg",
           "experiments/cityscapes/seg_mdeq_XL.yaml", "1Gu7pJLGvXBbU_sPxNfjiaROJwEwak2Z8"),
)}


def get_weights(name: str) -> ReleasedWeights:
    """The registry entry called ``name`` (a file name with its extension is accepted too).

    Raises:
        ValueError: no such entry; the message lists the valid names.
    """
    key = name[:-len(".pkl")] if name.endswith(".pkl") else name
    if key not in RELEASED:
        raise ValueError(f"unknown released checkpoint {name!r}; choose one of {', '.join(RELEASED)} "
                         f"(python -m mdeq.download --list)")
    return RELEASED[key]


def _check_sha256(value: Optional[str]) -> Optional[str]:
    if value is None:
        return None
    value = value.strip().lower()
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ValueError(f"{value!r} is not a SHA-256 (64 hexadecimal digits)")
    return value


def file_digest(path: str) -> Tuple[int, str]:
    """(size in bytes, SHA-256 hex) of a file."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def check_digest(what: str, size: int, sha256: str, expected_size: Optional[int],
                 expected_sha256: Optional[str]) -> None:
    """Raises DownloadError when a known size or hash differs from the measured one."""
    if expected_size is not None and size != expected_size:
        raise DownloadError(f"{what} has {size} bytes, expected {expected_size}")
    if expected_sha256 is not None and sha256 != expected_sha256:
        raise DownloadError(f"{what} has SHA-256 {sha256}, expected {expected_sha256}")


def download(entry: ReleasedWeights, dest: str, url: Optional[str] = None, sha256: Optional[str] = None,
             progress: Optional[Callable[[int, Optional[int]], None]] = None, timeout: float = 60.0
             ) -> Tuple[str, int, str]:
    """Fetches a released checkpoint into ``dest/entry.file_name``, checking its size and SHA-256 when known.

    Args:
        entry: the registry entry.
        dest: the destination folder (created if missing).
        url: fetch from here instead of ``entry.url`` (a mirror, or a ``file://`` URL).
        sha256: the expected SHA-256, overriding the registry's (which may be unknown).
        progress: called as ``progress(bytes_so_far, total_or_None)`` after every block.
        timeout: seconds to wait for the server at each step.

    Returns:
        (path of the file, its size, its SHA-256).

    Raises:
        DownloadError: the download failed, the server sent a web page instead of the file, or the size or hash
            differs (nothing is left behind under the final name or as a temporary file).
    """
    expected = _check_sha256(sha256) or entry.sha256
    source = url or entry.url
    os.makedirs(dest, exist_ok=True)
    target = os.path.join(dest, entry.file_name)
    fd, tmp = tempfile.mkstemp(dir=dest, prefix=f".{entry.file_name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                response = urllib.request.urlopen(source, timeout=timeout)  # noqa: S310 (the URL is the user's)
            except (urllib.error.URLError, OSError, ValueError) as exc:
                reason = getattr(exc, "reason", None) or exc
                raise DownloadError(f"could not download {entry.name} from {source}: {reason}") from exc
            with response:
                ctype = response.headers.get("Content-Type", "") or ""
                if source.startswith(("http://", "https://")) and ctype.startswith("text/html"):
                    raise DownloadError(
                        f"{source} sent a web page instead of {entry.file_name} (the file host wants a browser); "
                        f"download it in a browser from {entry.page_url} and check it with "
                        f"python -m mdeq.download {entry.name} --verify PATH")
                total = response.headers.get("Content-Length")
                total_bytes = int(total) if total and total.isdigit() else None
                digest, size = hashlib.sha256(), 0
                try:
                    for block in iter(lambda: response.read(CHUNK), b""):
                        out.write(block)
                        digest.update(block)
                        size += len(block)
                        if progress is not None:
                            progress(size, total_bytes)
                except OSError as exc:
                    raise DownloadError(f"the download of {entry.name} from {source} broke off after "
                                        f"{size} bytes: {exc}") from exc
            if total_bytes is not None and size != total_bytes:
                raise DownloadError(f"the download of {entry.name} from {source} ended after {size} of "
                                    f"{total_bytes} bytes")
            out.flush()
            os.fsync(out.fileno())
        sha = digest.hexdigest()
        try:
            check_digest(f"the downloaded {entry.file_name}", size, sha, entry.size, expected)
        except DownloadError as exc:
            raise DownloadError(f"{exc}; the file was removed (a corrupted or different file); try again, or "
                                f"download it in a browser from {entry.page_url}") from None
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    logger.info("downloaded %s to %s (%d bytes, SHA-256 %s)", entry.name, target, size, sha)
    return target, size, sha


def verify(entry: ReleasedWeights, path: str, sha256: Optional[str] = None) -> Dict[str, object]:
    """Checks a file obtained some other way (e.g. in a browser) against the registry and reads its weights.

    Args:
        entry: the registry entry the file should be.
        path: the file.
        sha256: the expected SHA-256, overriding the registry's.

    Returns:
        {"size", "sha256", "known" (whether a hash was compared), "tensors", "format"}.

    Raises:
        FileNotFoundError: no such file.
        DownloadError: a known size or hash differs (the file is left where it is).
        mdeq.utils.checkpoint.CheckpointError: the file is not a weights-only checkpoint.
    """
    from mdeq.utils.checkpoint import safe_load
    from mdeq.utils.state_dict import extract_state_dict

    expected = _check_sha256(sha256) or entry.sha256
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist; give the path of the downloaded {entry.file_name}")
    size, sha = file_digest(path)
    check_digest(path, size, sha, entry.size, expected)
    state, fmt = extract_state_dict(safe_load(path), source=path)
    return {"size": size, "sha256": sha, "known": expected is not None, "tensors": len(state), "format": fmt}


def evaluation_command(entry: ReleasedWeights, path: str, in_clone: Optional[bool] = None) -> str:
    """The command that evaluates the file at ``path``: the tools/ script in a clone, the module otherwise."""
    tool = "cls_valid" if entry.task == "cls" else "seg_test"
    if in_clone is None:
        in_clone = os.path.isfile(os.path.join("tools", tool + ".py"))
    if in_clone:
        return f"python tools/{tool}.py --cfg {entry.cfg} --testModel {path}"
    return f"python -m mdeq.tools.{tool} --cfg {entry.cfg[len('experiments/'):]} --testModel {path}"
