"""Every original experiment builds a model with the original's parameter count, key names and shapes."""
import json
import os

import pytest

from mdeq.config import check_config, load_config
from mdeq.models import get_cls_net, get_seg_net
from original_format import DATA, spec

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
with open(os.path.join(DATA, "original_experiments.json")) as fh:
    ORIGINAL = json.load(fh)


@pytest.mark.parametrize("experiment", sorted(ORIGINAL))
def test_original_experiment_matches_recorded_state_dict(experiment):
    cfg = load_config(os.path.join(ROOT, experiment), ["MODEL.INIT_WEIGHTS", "False"])
    check_config(cfg)
    builder = get_seg_net if "cityscapes" in experiment else get_cls_net
    model = builder(cfg)
    layout = spec(experiment.replace("experiments/", "").replace("/", "__").replace(".yaml", ""))

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == layout["trainable_params"] == ORIGINAL[experiment]["trainable_params_in_original"]

    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    expected = {k: s for k, s in layout["state_dict"].items()
                if not k.startswith(("fullstage_copy.", "deq."))}
    assert set(expected) - set(ours) == set()
    assert {k: ours[k] for k in expected} == expected
    # nothing of ours is missing from the original layout either (the duplicates aside)
    assert set(ours) - set(expected) == set()
