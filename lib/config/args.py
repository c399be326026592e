"""The tools' command line: the original project's options plus trailing KEY VALUE config overrides."""
from __future__ import annotations

import argparse
from typing import Optional, Sequence


def parse_args(description: str, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parses --cfg, --modelDir, --logDir, --dataDir, --testModel, --percent, the legacy launcher's
    --local_rank / --local-rank, and trailing ``KEY VALUE`` overrides (merged by :func:`update_config`).

    Args:
        description: the tool's one-line description for ``--help``.
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The parsed namespace (``opts`` holds the overrides).
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--cfg", required=True, type=str, help="experiment yaml file")
    parser.add_argument("--modelDir", default="", type=str, help="overrides OUTPUT_DIR (checkpoints)")
    parser.add_argument("--logDir", default="", type=str, help="overrides LOG_DIR (logs, TensorBoard)")
    parser.add_argument("--dataDir", default="", type=str, help="overrides DATA_DIR (prefix of DATASET.ROOT)")
    parser.add_argument("--testModel", default="", type=str, help="overrides TEST.MODEL_FILE")
    parser.add_argument("--percent", default=1.0, type=float, help="fraction of the training set to use")
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", default=None, type=int,
                        help="set by python -m torch.distributed.launch; torchrun uses LOCAL_RANK instead")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides as KEY VALUE pairs, e.g. TRAIN.LR 0.01 DEQ.F_THRES 20")
    return parser.parse_args(argv)
