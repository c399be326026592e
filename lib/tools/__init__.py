"""The four command-line tools as modules of the package, so that an installed copy runs them without a clone.

``python -m mdeq.tools.cls_train --cfg ...`` (or the console script ``mdeq-cls-train``) is the same program as
``python tools/cls_train.py --cfg ...``; likewise ``cls_valid``, ``seg_train`` and ``seg_test``. Each module has
``main(argv=None) -> int``.
"""
