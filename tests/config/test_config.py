"""Config loading, merging of the original flags, aliases, and the clear errors of check_config."""
import argparse
import glob
import json
import os

import pytest
import torch
import yaml

from mdeq.config import ConfigError, check_config, get_default_config, load_config, update_config
from original_format import DATA

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXPERIMENTS = sorted(glob.glob(os.path.join(ROOT, "experiments", "**", "*.yaml"), recursive=True))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[os.path.relpath(p, ROOT) for p in EXPERIMENTS])
def test_every_shipped_experiment_loads_and_checks(path):
    check_config(load_config(path))


def _spec_files():
    out = []
    for name in ("original_experiments.json", "mdeq_vision_experiments.json"):
        with open(os.path.join(DATA, name)) as fh:
            for exp, value in json.load(fh).items():
                out.append((name.split("_")[0] + ":" + exp, value["hyperparameters"]))
    return out


@pytest.mark.parametrize("name,hparams", _spec_files(), ids=[n for n, _ in _spec_files()])
def test_files_of_both_generations_load_unchanged(tmp_path, name, hparams):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(hparams))
    cfg = check_config(load_config(str(path)))
    thres = hparams.get("DEQ", hparams["MODEL"]).get("F_THRES")
    assert cfg.MODEL.F_THRES == cfg.DEQ.F_THRES == thres


def test_every_default_key_has_a_comment():
    src = open(os.path.join(ROOT, "lib", "config", "default.py")).read().splitlines()
    assignments = [l for l in src if l.startswith("_C.") and "= CN()" not in l]
    assert len(assignments) > 150
    missing = [l for l in assignments if "#" not in l]
    assert missing == []


def _args(**kw):
    base = dict(cfg=None, modelDir="", logDir="", dataDir="", testModel="", percent=1.0, opts=[])
    base.update(kw)
    return argparse.Namespace(**base)


def test_update_config_merges_file_flags_and_options_in_order(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text("MODEL:\n  F_THRES: 12\nTRAIN:\n  LR: 0.1\nOUTPUT_DIR: from_yaml\n")
    cfg = update_config(get_default_config(), _args(
        cfg=str(path), modelDir="out_flag", logDir="log_flag", dataDir="/data", testModel="m.pth", percent=0.25,
        opts=["TRAIN.LR", "0.5", "DEQ.F_THRES", "7"]))
    assert cfg.OUTPUT_DIR == "out_flag" and cfg.LOG_DIR == "log_flag" and cfg.DATA_DIR == "/data"
    assert cfg.TEST.MODEL_FILE == "m.pth" and cfg.PERCENT == 0.25 and cfg.TRAIN.LR == 0.5
    assert cfg.MODEL.F_THRES == cfg.DEQ.F_THRES == 7  # the option came last
    check_config(cfg)


def test_integer_given_for_float_is_accepted():
    assert load_config(None, ["TRAIN.LR", "1"]).TRAIN.LR == 1.0


def test_yaml_that_does_not_parse(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("MODEL:\n  NAME: mdeq\n   F_THRES: 3\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line 3"):
        load_config(str(path))


def test_missing_yaml_names_the_path():
    with pytest.raises(ConfigError, match="nothere.yaml does not exist"):
        load_config("nothere.yaml")


def test_misspelled_key_suggests_the_closest(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("MODEL:\n  F_THRESS: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key MODEL.F_THRESS\. Did you mean MODEL.F_THRES"):
        load_config(str(path))
    with pytest.raises(ConfigError, match=r"unknown config key TRAIN.LRR.*Did you mean TRAIN.LR"):
        load_config(None, ["TRAIN.LRR", "0.1"])


def test_wrong_type_names_key_and_types(tmp_path):
    with pytest.raises(ConfigError, match=r"TRAIN.END_EPOCH: expected a value of type int.*'ten'"):
        load_config(None, ["TRAIN.END_EPOCH", "ten"])
    path = tmp_path / "t.yaml"
    path.write_text("MODEL:\n  WNORM: 3\n")
    with pytest.raises(ConfigError, match=r"MODEL.WNORM: expected a value of type bool"):
        load_config(str(path))
    cfg = get_default_config()
    cfg.TRAIN.LR = "fast"
    with pytest.raises(ConfigError, match=r"TRAIN.LR: expected a value of type float"):
        check_config(cfg)


@pytest.mark.parametrize("opts,message", [
    (["MODEL.EXTRA.FULL_STAGE.NUM_CHANNELS", "[32, 64]"], r"NUM_BRANCHES is 4 but .*NUM_CHANNELS has 2"),
    (["MODEL.EXTRA.FULL_STAGE.NUM_BLOCKS", "[1, 1, 1]"], r"NUM_BRANCHES is 4 but .*NUM_BLOCKS has 3"),
    (["MODEL.EXTRA.FULL_STAGE.HEAD_CHANNELS", "[8, 16]"], r"NUM_BRANCHES is 4 but .*HEAD_CHANNELS has 2"),
    (["MODEL.NUM_GROUPS", "3"], r"NUM_CHANNELS\[0\] = 32 .* divisible by MODEL.NUM_GROUPS = 3"),
    (["DEQ.STOP_SCOPE", "global"], r"DEQ.STOP_SCOPE: unknown name 'global'; valid names are batch, sample"),
    (["DEQ.ADJOINT_AT", "zstar"], r"DEQ.ADJOINT_AT: unknown name 'zstar'; valid names are f_z, z"),
    (["DEQ.LBROYDEN_OVERFLOW", "ring"], r"DEQ.LBROYDEN_OVERFLOW: unknown name 'ring'"),
    (["LOSS.PRETRAIN_JAC_AT", "first"], r"LOSS.PRETRAIN_JAC_AT: unknown name 'first'"),
    (["MODEL.F_THRES", "0"], r"F_THRES must be a positive number of iterations, got 0"),
    (["DEQ.B_THRES", "-3"], r"B_THRES must be a positive number of iterations, got -3"),
    (["DEQ.F_EPS", "0.0"], r"DEQ.F_EPS must be positive"),
])
def test_check_config_names_the_key(opts, message):
    cfg = load_config(None, opts)
    with pytest.raises(ConfigError, match=message):
        check_config(cfg)


def test_compile_is_accepted_where_torch_has_it(monkeypatch):
    cfg = load_config(None, ["MODEL.COMPILE", "True"])
    assert check_config(cfg).MODEL.COMPILE is True
    monkeypatch.delattr(torch, "compile")
    with pytest.raises(ConfigError, match=r"MODEL.COMPILE needs torch.compile \(PyTorch 2.0 or newer"):
        check_config(cfg)


def test_odd_number_of_options():
    with pytest.raises(ConfigError, match="KEY VALUE pairs"):
        load_config(None, ["TRAIN.LR"])


def test_config_imports_nothing_from_higher_floors():
    """Registries of higher floors (solvers, optimizers) are checked where they are built, not in config."""
    import ast

    for name in ("check.py", "loader.py", "default.py", "__init__.py"):
        tree = ast.parse(open(os.path.join(ROOT, "lib", "config", name)).read())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                module = getattr(node, "module", None) or ""
                names = [module] + [a.name for a in node.names]
                assert not any(n.startswith(("mdeq.core", "mdeq.modules", "mdeq.models")) for n in names), name


def test_unknown_solver_is_reported_with_its_key_when_the_model_is_built():
    from mdeq.models.mdeq import deq_kwargs

    cfg = check_config(load_config(None, ["DEQ.B_SOLVER", "bryoden"]))  # config itself accepts any name
    with pytest.raises(ConfigError, match=r"config key DEQ.B_SOLVER: unknown name 'bryoden'; valid names are "
                                          r"anderson, broyden, fixed_point, lbroyden"):
        deq_kwargs(cfg)


TINY = os.path.join(ROOT, "experiments", "cifar", "cls_mdeq_TINY.yaml")
LARGE_REG = os.path.join(ROOT, "experiments", "cifar", "cls_mdeq_LARGE_reg.yaml")


@pytest.mark.parametrize("path,f_thres,b_thres", [(TINY, 22, 24), (LARGE_REG, 8, 7)])
def test_caps_reach_the_solver_whichever_way_the_yaml_was_merged(path, f_thres, b_thres):
    """The original idiom (yacs' own merge_from_file on the module-level default config) and this project's
    loader give the equilibrium layer the same caps: the yaml's."""
    from mdeq.config import config as module_config
    from mdeq.models.mdeq import deq_kwargs

    plain = module_config.clone()
    plain.merge_from_file(path)  # yacs only: MODEL.* and DEQ.* are not made equal here
    ours = load_config(path)
    for cfg in (plain, ours):
        kwargs = deq_kwargs(cfg)
        assert kwargs["f_thres"] == f_thres
    # the original's backward solve runs with the forward cap (B_CAP forward); the second generation's with B_THRES
    expected_b = None if path == TINY else b_thres
    assert deq_kwargs(plain)["b_thres"] == deq_kwargs(ours)["b_thres"] == expected_b
    cfg = plain.clone()
    cfg.DEQ.B_CAP = "b_thres"
    assert deq_kwargs(cfg)["b_thres"] == b_thres


def test_two_different_values_for_one_cap_are_an_error():
    cfg = get_default_config()
    cfg.MODEL.F_THRES, cfg.DEQ.F_THRES = 12, 14
    with pytest.raises(ConfigError, match=r"MODEL.F_THRES is 12 but DEQ.F_THRES is 14: .* set only one"):
        check_config(cfg)


ORIGINAL_YAMLS = [p for p in EXPERIMENTS if "fashion_mnist" not in p and not p.endswith("_reg.yaml")]
REG_YAMLS = [p for p in EXPERIMENTS if p.endswith("_reg.yaml")]
FM_YAMLS = [p for p in EXPERIMENTS if "fashion_mnist" in p]
ORIGINAL_CHOICES = dict(stop_scope="batch", stall=30, keep_start=True, adjoint_init="zeros", adjoint_at="f_z",
                        b_thres=None, f_eps=None, b_eps=None, jac_vecs=2, pretrain_jac_at="detached")
VISION_CHOICES = dict(stop_scope="batch", stall=30, keep_start=False, adjoint_init="zeros", adjoint_at="z",
                      f_eps=1e-3, b_eps=1e-3, rand_f_thres_delta=2, rand_f_thres_mode="jac_steps", jac_vecs=2,
                      pretrain_jac_at="detached")
PROJECT_CHOICES = dict(stop_scope="sample", stall=0, keep_start=True, adjoint_init="grad", adjoint_at="z",
                       rand_f_thres_delta=0, rand_f_thres_mode="every_step", jac_vecs=1, pretrain_jac_at="last")


@pytest.mark.parametrize("path,choices", [(p, ORIGINAL_CHOICES) for p in ORIGINAL_YAMLS]
                         + [(p, VISION_CHOICES) for p in REG_YAMLS] + [(p, PROJECT_CHOICES) for p in FM_YAMLS],
                         ids=[os.path.relpath(p, ROOT) for p in ORIGINAL_YAMLS + REG_YAMLS + FM_YAMLS])
def test_each_shipped_yaml_selects_its_generations_solver_choices(path, choices):
    from mdeq.models.mdeq import deq_kwargs

    kwargs = deq_kwargs(check_config(load_config(path)))
    assert {k: kwargs[k] for k in choices} == choices
    overflow = "window" if path in FM_YAMLS else "circular"
    assert kwargs["f_options"] == kwargs["b_options"] == {"memory": 27, "overflow": overflow}
    if path in REG_YAMLS + FM_YAMLS:  # B_THRES itself caps the backward solve (DEQ.B_CAP b_thres)
        assert kwargs["b_thres"] == load_config(path).DEQ.B_THRES
