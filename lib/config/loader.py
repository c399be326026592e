"""Merging experiment files and command-line options into the defaults, with clear errors."""
from __future__ import annotations

import argparse
import ast
import difflib
import os
from typing import Any, Iterable, List, Sequence, Tuple

import yaml
from yacs.config import CfgNode as CN

# Keys that exist twice: the original files name the solver caps under MODEL, the second generation under DEQ.
# This loader makes both equal, taking the one set last; a config merged some other way (yacs' own
# merge_from_file, as the original's scripts do) is resolved by resolve_alias() where the value is used.
ALIASES = (("MODEL.F_THRES", "DEQ.F_THRES"), ("MODEL.B_THRES", "DEQ.B_THRES"))

# Keys that take "true", "false" or "auto"; yaml and command-line booleans are accepted and stored as "true"/"false".
TRISTATE_KEYS = ("MODEL.CHANNELS_LAST",)


class ConfigError(ValueError):
    """A configuration problem; the message names the key and how to fix it."""


def _all_keys(node: CN, prefix: str = "") -> List[str]:
    keys = []
    for k, v in node.items():
        full = prefix + k
        if isinstance(v, CN):
            keys.extend(_all_keys(v, full + "."))
        else:
            keys.append(full)
    return keys


def _suggest(key: str, node: CN, prefix: str) -> str:
    """A ' Did you mean ...?' hint for a misspelled key, searched among all keys and among its siblings."""
    everything = _all_keys(node)
    full = prefix + key
    close = difflib.get_close_matches(full, everything, n=3, cutoff=0.6)
    if not close:
        close = difflib.get_close_matches(key, [k.rsplit(".", 1)[-1] for k in everything], n=3, cutoff=0.6)
        close = [k for k in everything if k.rsplit(".", 1)[-1] in close][:3]
    return f" Did you mean {' or '.join(close)}?" if close else ""


def tristate(key: str, value: Any) -> str:
    """The value of a true/false/auto key as "true", "false" or "auto"; booleans (yaml or Python) are accepted.

    Raises:
        ConfigError: any other value, naming the key and the valid values.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "auto"):
        return value.strip().lower()
    raise ConfigError(f"config key {key}: expected true, false or auto, got {value!r}. "
                      f"Fix the value in the yaml file or the command line.")


def _coerce(key: str, default: Any, value: Any) -> Any:
    """Converts value to the type of default, or raises ConfigError naming the key and both types."""
    if key in TRISTATE_KEYS:
        return tristate(key, value)
    if isinstance(value, str) and not isinstance(default, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
    elif isinstance(default, (list, tuple)):
        if isinstance(value, (list, tuple)):
            return type(default)(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # a single number where a list is expected, e.g. "TEST.SCALE_LIST 1"
            return type(default)([value])
    raise ConfigError(
        f"config key {key}: expected a value of type {type(default).__name__} (like {default!r}), "
        f"got {value!r} of type {type(value).__name__}. Fix the value in the yaml file or the command line."
    )


def _merge_dict(node: CN, data: dict, prefix: str, source: str, root: CN) -> List[str]:
    """Merges a nested dict into node; returns the full names of the keys it set."""
    set_keys = []
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of config keys at {prefix or 'the top level'}, "
                          f"got {type(data).__name__}")
    for key, value in data.items():
        full = prefix + str(key)
        if key not in node:
            raise ConfigError(
                f"{source}: unknown config key {full}.{_suggest(str(key), root, prefix)} "
                f"Every valid key is listed with its meaning in lib/config/default.py."
            )
        current = node[key]
        if isinstance(current, CN):
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: config key {full} is a section; give it nested keys, "
                                  f"not the value {value!r}")
            set_keys.extend(_merge_dict(current, value, full + ".", source, root))
        else:
            node[key] = _coerce(full, current, value)
            set_keys.append(full)
    return set_keys


def merge_file(cfg: CN, path: str) -> List[str]:
    """Merges a yaml file into cfg; returns the keys it set. Errors name the file and the problem."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist. Pass an existing yaml file with --cfg, "
                          f"e.g. experiments/fashion_mnist/cls_mdeq_quick.yaml")
    with open(path, "r", encoding="utf-8") as fh:
        text = fh.read()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}. "
                          f"Check the indentation and the ':' after each key.") from None
    if data is None:
        return []
    return _merge_dict(cfg, data, "", f"config file {path}", cfg)


def merge_list(cfg: CN, opts: Sequence[str]) -> List[str]:
    """Merges trailing ``KEY VALUE`` pairs; returns the keys they set."""
    opts = list(opts or [])
    if len(opts) % 2 != 0:
        raise ConfigError(f"command-line options must come in KEY VALUE pairs; got an odd number: {opts}")
    set_keys = []
    for key, raw in zip(opts[0::2], opts[1::2]):
        parts = key.split(".")
        node = cfg
        for depth, part in enumerate(parts):
            prefix = ".".join(parts[:depth]) + ("." if depth else "")
            if not isinstance(node, CN) or part not in node:
                raise ConfigError(f"command line: unknown config key {key}.{_suggest(part, cfg, prefix)} "
                                  f"Every valid key is listed in lib/config/default.py.")
            if depth < len(parts) - 1:
                node = node[part]
        if isinstance(node[parts[-1]], CN):
            raise ConfigError(f"command line: config key {key} is a section; name one of its keys")
        node[parts[-1]] = _coerce(key, node[parts[-1]], raw)
        set_keys.append(key)
    return set_keys


def _get(cfg: CN, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _set(cfg: CN, key: str, value: Any) -> None:
    parts = key.split(".")
    node = cfg
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = value


def resolve_alias(cfg: CN, name: str) -> Any:
    """The value of an aliased key however the config was merged (``name``: "F_THRES" or "B_THRES").

    Equal values are the value; otherwise the key that differs from its default wins (a yaml or a
    ``merge_from_file`` set it). Two keys set to two different values are an error.

    Raises:
        ConfigError: MODEL.<name> and DEQ.<name> were both changed, to different values.
    """
    from .default import get_default_config

    pair = [pair for pair in ALIASES if pair[0].endswith("." + name)]
    if not pair:
        raise KeyError(f"{name} is not an aliased key; aliased keys are {[p[0] for p in ALIASES]}")
    first, second = pair[0]
    a, b = _get(cfg, first), _get(cfg, second)
    if a == b:
        return a
    default = get_default_config()
    changed = [key for key in (first, second) if _get(cfg, key) != _get(default, key)]
    if len(changed) == 1:
        return _get(cfg, changed[0])
    raise ConfigError(f"{first} is {a} but {second} is {b}: the two keys name the same iteration cap; set only one "
                      f"of them (or both to the same value)")


def resolve_aliases(cfg: CN, set_keys: Iterable[str]) -> None:
    """Makes each pair of alias keys equal, taking the value of the one set last."""
    set_keys = list(set_keys)
    for pair in ALIASES:
        last = None
        for key in set_keys:
            if key in pair:
                last = key
        source = last or pair[0]
        value = _get(cfg, source)
        for key in pair:
            _set(cfg, key, value)


def load_config(path: str | None = None, opts: Sequence[str] = (), cfg: CN | None = None) -> CN:
    """Defaults, then the yaml file, then KEY VALUE options; unfrozen and not yet checked."""
    from .default import get_default_config

    cfg = get_default_config() if cfg is None else cfg
    cfg.defrost()
    set_keys: List[str] = []
    if path:
        set_keys += merge_file(cfg, path)
    set_keys += merge_list(cfg, opts)
    resolve_aliases(cfg, set_keys)
    return cfg


def update_config(cfg: CN, args: argparse.Namespace) -> CN:
    """Merges ``--cfg``, the original flags and the trailing options into cfg (in place) and returns it.

    Order: yaml file, then ``--modelDir``/``--logDir``/``--dataDir``/``--testModel``/``--percent``, then the
    ``KEY VALUE`` options (so an explicit option always wins). The result is not frozen; call
    :func:`check_config` and then ``cfg.freeze()``.
    """
    cfg.defrost()
    set_keys: List[str] = []
    if getattr(args, "cfg", None):
        set_keys += merge_file(cfg, args.cfg)
    flags: List[Tuple[str, Any]] = [
        ("OUTPUT_DIR", getattr(args, "modelDir", "")),
        ("LOG_DIR", getattr(args, "logDir", "")),
        ("DATA_DIR", getattr(args, "dataDir", "")),
        ("TEST.MODEL_FILE", getattr(args, "testModel", "")),
    ]
    for key, value in flags:
        if value:
            _set(cfg, key, value)
    percent = getattr(args, "percent", 1.0)
    if percent is not None and percent < 1:
        cfg.PERCENT = float(percent)
    set_keys += merge_list(cfg, getattr(args, "opts", []) or [])
    resolve_aliases(cfg, set_keys)
    return cfg
