"""Builds checkpoint files in the original project's layout from one of our models (test helper).

The original stored the equilibrium module four times: ``fullstage.*`` (real parameters; weight-normalised
convolutions as weight_g / weight_v), ``fullstage_copy.*`` (plain ``weight`` tensors), ``deq.func.*`` (same as
fullstage) and ``deq.func_copy.*`` (same as fullstage_copy). The key layout is taken from the recorded state
dicts in tests/data/original_state_dicts/.
"""
import json
import os
from collections import OrderedDict

import torch

DATA = os.path.join(os.path.dirname(__file__), "data")


def spec(name):
    """The recorded state dict of an original experiment, e.g. 'cifar__cls_mdeq_TINY'."""
    with open(os.path.join(DATA, "original_state_dicts", name + ".json")) as fh:
        return json.load(fh)


def _plain(sd, key):
    if key in sd:
        return sd[key]
    v, g = sd[key + "_v"], sd[key + "_g"]
    return v * (g / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1))


def original_state_dict(model, layout):
    """Our model's weights renamed into the original layout; every key and shape of ``layout`` is produced."""
    ours = model.state_dict()
    out = OrderedDict()
    for key, shape in layout["state_dict"].items():
        if key.startswith("fullstage_copy."):
            value = _plain(ours, "fullstage." + key[len("fullstage_copy."):])
        elif key.startswith("deq.func_copy."):
            value = _plain(ours, "fullstage." + key[len("deq.func_copy."):])
        elif key.startswith("deq.func."):
            value = ours["fullstage." + key[len("deq.func."):]]
        else:
            value = ours[key]
        assert list(value.shape) == list(shape), (key, value.shape, shape)
        out[key] = value.detach().clone()
    return out


def write_original_cls(model, layout, path):
    """A bare original classification state dict (as the released .pkl files)."""
    torch.save(original_state_dict(model, layout), path)
    return path


def write_original_seg(model, layout, path, num_classes=19):
    """An original segmentation file: the net under 'model.' plus the loss's class weights under 'loss.'."""
    sd = OrderedDict(("model." + k, v) for k, v in original_state_dict(model, layout).items())
    sd["loss.criterion.weight"] = torch.ones(num_classes)
    torch.save(sd, path)
    return path
