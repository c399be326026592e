"""MODEL.CHANNELS_LAST true / false / auto: the config's tri-state value, the probe's decision and timings, and
the model's outputs after the choice."""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List

import pytest
import torch

from mdeq.config import ConfigError, check_config, get_default_config, load_config
from mdeq.models import get_cls_net
from mdeq.models.layout_probe import (apply_channels_last, apply_layout_setting, choose_channels_last,
                                      probe_input)

TINY = ["MODEL.EXTRA.FULL_STAGE.NUM_BRANCHES", "2", "MODEL.EXTRA.FULL_STAGE.NUM_CHANNELS", "[4, 8]",
        "MODEL.EXTRA.FULL_STAGE.NUM_BLOCKS", "[1, 1]", "MODEL.EXTRA.FULL_STAGE.HEAD_CHANNELS", "[2, 4]",
        "MODEL.EXTRA.FULL_STAGE.FINAL_CHANSIZE", "8", "MODEL.NUM_GROUPS", "2", "MODEL.EXPANSION_FACTOR", "2",
        "MODEL.NUM_CLASSES", "3", "MODEL.WNORM", "True", "MODEL.DOWNSAMPLE_TIMES", "0", "MODEL.NUM_LAYERS", "3",
        "MODEL.IMAGE_SIZE", "[8, 8]", "DATASET.DATASET", "cifar10", "TRAIN.PRETRAIN_STEPS", "0",
        "DEQ.F_THRES", "8", "DEQ.B_THRES", "8", "TRAIN.BATCH_SIZE_PER_GPU", "4", "DEVICE", "cpu"]


def tiny_cfg(setting: str = "false"):
    return check_config(load_config(None, TINY + ["MODEL.CHANNELS_LAST", setting]))


def tiny_model(setting: str = "false") -> torch.nn.Module:
    torch.manual_seed(0)
    return get_cls_net(tiny_cfg(setting)).eval()


def images() -> torch.Tensor:
    return torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def conv_weight(model: torch.nn.Module) -> torch.Tensor:
    return model.downsample[0].weight


def is_nhwc(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


# --------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("raw,expected", [("True", "true"), ("False", "false"), ("auto", "auto"), ("AUTO", "auto"),
                                          ("true", "true"), ("false", "false")])
def test_command_line_values_are_stored_as_true_false_or_auto(raw: str, expected: str) -> None:
    cfg = load_config(None, ["MODEL.CHANNELS_LAST", raw])
    assert cfg.MODEL.CHANNELS_LAST == expected
    check_config(cfg)


@pytest.mark.parametrize("text,expected", [("true", "true"), ("False", "false"), ("yes", "true"), ("auto", "auto"),
                                           ("'false'", "false")])
def test_yaml_booleans_and_strings_are_accepted(tmp_path, text: str, expected: str) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text(f"MODEL:\n  CHANNELS_LAST: {text}\n")
    assert check_config(load_config(str(path))).MODEL.CHANNELS_LAST == expected


def test_the_default_is_off_and_a_python_boolean_set_in_code_passes_the_check() -> None:
    cfg = get_default_config()
    assert cfg.MODEL.CHANNELS_LAST == "false"
    cfg.MODEL.CHANNELS_LAST = True
    check_config(cfg)


@pytest.mark.parametrize("raw", ["maybe", "1", "[true]"])
def test_other_values_are_rejected_with_the_valid_ones(raw: str) -> None:
    with pytest.raises(ConfigError, match=r"MODEL.CHANNELS_LAST: expected true, false or auto, got '.*'"):
        load_config(None, ["MODEL.CHANNELS_LAST", raw])


def test_a_bad_yaml_value_is_rejected(tmp_path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("MODEL:\n  CHANNELS_LAST: 1\n")
    with pytest.raises(ConfigError, match=r"MODEL.CHANNELS_LAST: expected true, false or auto, got 1\b"):
        load_config(str(path))


def test_check_config_rejects_a_bad_value_set_in_code() -> None:
    cfg = get_default_config()
    cfg.MODEL.CHANNELS_LAST = "fast"
    with pytest.raises(ConfigError, match=r"MODEL.CHANNELS_LAST: expected true, false or auto, got 'fast'"):
        check_config(cfg)


# ------------------------------------------------------------------------------------------- fixed settings
def test_false_keeps_the_model_contiguous_and_true_makes_it_channels_last() -> None:
    off = tiny_model("false")
    assert off.channels_last is False and conv_weight(off).is_contiguous()
    on = tiny_model("true")
    assert on.channels_last is True and is_nhwc(conv_weight(on))
    states = on.injection(images())
    assert all(is_nhwc(s) for s in states)


# ------------------------------------------------------------------------------------------------ the probe
def scripted_timer(seconds: Dict[str, List[float]], seen: List[str]) -> Callable[[Callable[[], Any], Any], float]:
    """A timer that runs the call, tells the layout from what f_theta returned, and answers the scripted time."""

    def timer(run: Callable[[], Any], device: Any) -> float:
        out = run()
        name = "channels_last" if all(is_nhwc(o) for o in out) else "contiguous"
        assert name == "channels_last" or all(o.is_contiguous() for o in out)
        seen.append(name)
        return seconds[name][sum(1 for s in seen if s == name) - 1]

    return timer


@pytest.mark.parametrize("contiguous,channels_last,expected", [
    ([1.0, 0.9, 0.95], [0.8, 0.85, 0.7], True),  # channels_last clearly faster (0.7 vs 0.9)
    ([1.0, 1.0, 1.0], [0.99, 0.98, 0.985], False),  # 2 % faster: within the 3 % margin
    ([1.0, 1.0, 1.0], [1.2, 1.3, 1.1], False),  # slower
])
def test_the_decision_follows_the_timings(contiguous: List[float], channels_last: List[float],
                                          expected: bool) -> None:
    model = tiny_model()
    seen: List[str] = []
    timer = scripted_timer({"contiguous": contiguous, "channels_last": channels_last}, seen)
    use, timings = choose_channels_last(model, images(), "cpu", repeats=3, timer=timer)
    assert use is expected
    assert timings == {"contiguous": min(contiguous), "channels_last": min(channels_last)}
    assert sorted(seen) == ["channels_last"] * 3 + ["contiguous"] * 3
    assert seen[:2] != [seen[0], seen[0]], "the formats alternate"


def test_the_margin_is_a_parameter() -> None:
    seen: List[str] = []
    timer = scripted_timer({"contiguous": [1.0], "channels_last": [0.98]}, seen)
    assert choose_channels_last(tiny_model(), images(), "cpu", repeats=1, margin=0.01, timer=timer)[0] is True


@pytest.mark.parametrize("seconds,max_rounds,rounds", [(0.02, 50, 3), (1e-4, 7, 7), (1.0, 50, 1)])
def test_fast_calls_are_timed_more_often(seconds: float, max_rounds: int, rounds: int) -> None:
    seen: List[str] = []
    timer = scripted_timer({"contiguous": [seconds] * 60, "channels_last": [seconds] * 60}, seen)
    choose_channels_last(tiny_model(), images(), "cpu", repeats=1, min_seconds=0.05, max_rounds=max_rounds,
                         timer=timer)
    assert len(seen) == 2 * rounds  # until each format has run 0.05 s, at most max_rounds times


def test_the_probe_leaves_the_model_and_the_random_generators_alone() -> None:
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    use, timings = choose_channels_last(model, images(), "cpu", repeats=2)
    assert isinstance(use, bool)
    assert set(timings) == {"contiguous", "channels_last"}
    assert all(0.0 < t < 10.0 for t in timings.values())
    assert torch.equal(torch.get_rng_state(), rng)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert conv_weight(model).is_contiguous() and model.channels_last is False and not model.training


@pytest.mark.parametrize("choice", [True, False])
def test_outputs_are_the_same_after_either_choice(choice: bool) -> None:
    model = tiny_model()
    x = images()
    with torch.no_grad():
        ref = model(x)
    timer = scripted_timer({"contiguous": [1.0] * 3, "channels_last": [0.5 if choice else 2.0] * 3}, [])
    cfg = tiny_cfg("auto")
    model = apply_layout_setting(cfg, model, timer=timer)
    assert model.channels_last is choice and is_nhwc(conv_weight(model)) is choice
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_auto_builds_a_model_logs_the_timings_and_keeps_the_outputs(caplog: pytest.LogCaptureFixture) -> None:
    ref_model = tiny_model("false")
    with caplog.at_level(logging.INFO, logger="mdeq.models.layout_probe"):
        auto_model = tiny_model("auto")
    lines = [r.getMessage() for r in caplog.records if "CHANNELS_LAST auto" in r.getMessage()]
    assert len(lines) == 1
    assert "ms contiguous" in lines[0] and "ms channels_last" in lines[0]
    chosen = "channels_last" if auto_model.channels_last else "contiguous"
    assert lines[0].endswith("-> " + chosen)
    with torch.no_grad():
        torch.testing.assert_close(auto_model(images()), ref_model(images()), rtol=0, atol=1e-5)


def test_probe_input_has_the_run_shape_and_a_capped_batch() -> None:
    cfg = tiny_cfg()
    x = probe_input(cfg, tiny_model())
    assert tuple(x.shape) == (4, 3, 8, 8)  # TRAIN.BATCH_SIZE_PER_GPU 4, 3 channels, MODEL.IMAGE_SIZE 8x8
    cfg.defrost()
    cfg.TRAIN.BATCH_SIZE_PER_GPU = 64
    cfg.MODEL.IMAGE_SIZE = [512, 1024]  # [width, height]: 2**19 pixels per image -> 2 images
    assert tuple(probe_input(cfg, tiny_model()).shape) == (2, 3, 1024, 512)


def test_apply_channels_last_round_trip() -> None:
    model = tiny_model()
    apply_channels_last(model, True)
    assert model.channels_last is True and is_nhwc(conv_weight(model))
    apply_channels_last(model, False)
    assert model.channels_last is False and conv_weight(model).is_contiguous()
