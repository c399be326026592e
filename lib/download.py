"""Fetch or check the original MDEQ project's released checkpoints.

    python -m mdeq.download --list
    python -m mdeq.download MDEQ_Small_Cls [--dest pretrained_models] [--url URL] [--sha256 HEX] [--force]
    python -m mdeq.download MDEQ_Small_Cls --verify pretrained_models/MDEQ_Small_Cls.pkl

A download is written atomically into ``--dest`` (``pretrained_models/`` by default) and checked against the
registry's size and SHA-256 where they are known; where they are not, the computed SHA-256 is printed. The
last line printed is the command that evaluates the file. Errors (an unknown name, a failed download, a hash
that does not match, after which the file is removed) print one line ``error: ...`` and exit with code 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from mdeq.utils.checkpoint import CheckpointError
from mdeq.utils.pretrained import RELEASED, DownloadError, download, evaluation_command, get_weights, verify


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mdeq.download",
                                     description="Fetch or check a checkpoint released by the original MDEQ project.")
    parser.add_argument("name", nargs="?", help=f"one of {', '.join(RELEASED)}")
    parser.add_argument("--list", action="store_true", help="list the released checkpoints and exit")
    parser.add_argument("--dest", default="pretrained_models", help="destination folder (default: %(default)s)")
    parser.add_argument("--url", default=None, help="fetch from this URL instead (a mirror, or file:///path)")
    parser.add_argument("--sha256", default=None, help="the expected SHA-256, when the registry does not know it")
    parser.add_argument("--force", action="store_true", help="download again even if the file is already there")
    parser.add_argument("--verify", metavar="PATH", default=None,
                        help="do not download: check a file you fetched yourself (e.g. in a browser)")
    return parser


def _listing() -> str:
    rows = []
    for e in RELEASED.values():
        rows.append(f"{e.name:16s} {e.description}\n"
                    f"{'':16s} experiment: {e.cfg}\n"
                    f"{'':16s} size: {e.size if e.size is not None else 'unknown'}   "
                    f"SHA-256: {e.sha256 or 'unknown'}\n"
                    f"{'':16s} page: {e.page_url}")
    return "\n".join(rows)


class _Progress:
    """A single progress line on stderr when it is a terminal (nothing otherwise)."""

    def __init__(self) -> None:
        self.enabled = sys.stderr.isatty()
        self.shown = -1

    def __call__(self, done: int, total: Optional[int]) -> None:
        if not self.enabled:
            return
        mib = done >> 20
        if mib == self.shown:
            return
        self.shown = mib
        of = f" of {total >> 20}" if total else ""
        sys.stderr.write(f"\r{mib}{of} MiB")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.shown >= 0:
            sys.stderr.write("\n")


def run(args: argparse.Namespace) -> None:
    """Does what the parsed command line asks; user errors are raised (see main)."""
    if args.list:
        print(_listing())
        return
    if not args.name:
        raise ValueError(f"name a checkpoint: one of {', '.join(RELEASED)} (or --list)")
    entry = get_weights(args.name)
    if args.verify:
        report = verify(entry, args.verify, args.sha256)
        check = ("matches the expected SHA-256" if report["known"]
                 else "no published SHA-256 to compare with; keep this one to check copies later")
        print(f"{args.verify}: {report['size']} bytes, SHA-256 {report['sha256']} ({check})")
        print(f"{args.verify}: {report['tensors']} weight tensors ({report['format']})")
        print("evaluate it with:")
        print(f"  {evaluation_command(entry, args.verify)}")
        return
    target = os.path.join(args.dest, entry.file_name)
    if os.path.exists(target) and not args.force:
        try:
            report = verify(entry, target, args.sha256)
        except DownloadError as exc:
            raise DownloadError(f"{exc}; the file was left as it is, --force replaces it") from None
        print(f"{target} is already there ({report['size']} bytes, SHA-256 {report['sha256']}); "
              f"--force downloads it again")
    else:
        progress = _Progress()
        try:
            path, size, sha = download(entry, args.dest, url=args.url, sha256=args.sha256, progress=progress)
        finally:
            progress.close()
        known = (args.sha256 or entry.sha256) is not None
        print(f"saved {path}: {size} bytes, SHA-256 {sha}"
              + ("" if known else " (no published SHA-256 to compare with; keep this one to check copies later)"))
    print("evaluate it with:")
    print(f"  {evaluation_command(entry, target)}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the command line ``argv`` (``sys.argv[1:]`` when None); returns the exit code (2 on a user error)."""
    args = _parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError, DownloadError, CheckpointError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
