"""Configuration: yacs defaults (``default.py``), merging (``loader.py``) and semantic checks (``check.py``)."""
from .args import parse_args
from .check import check_config
from .default import get_default_config
from .loader import ConfigError, load_config, merge_file, merge_list, resolve_alias, update_config

config = get_default_config()  # a fresh copy for scripts that want the original's module-level name

__all__ = ["ConfigError", "check_config", "config", "get_default_config", "load_config", "merge_file",
           "merge_list", "parse_args", "resolve_alias", "update_config"]
