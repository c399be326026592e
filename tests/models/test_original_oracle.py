"""A shipped yaml computes the original's training step: loss and every gradient, against recorded numbers.

The numbers in tests/data/original_oracle_*.pt were computed by the two original implementations themselves
(``python tests/data/record_original.py /path/to/reference``, see tests/data/README.md): a tiny MDEQ built from a
shipped yaml (tiny widths, no dropout), fixed weights, one fixed batch, float64. Here this project builds the
model from the same yaml with its default keys, loads the same weights through its checkpoint loader, and must
reproduce the loss and the gradient of every parameter within 1e-4 relative.
"""
import os

import pytest
import torch

from mdeq.config import check_config, load_config
from mdeq.models import get_cls_net
from mdeq.utils.state_dict import load_strict
from original_format import DATA

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RTOL = 1e-4


def _oracle(name):
    return torch.load(os.path.join(DATA, f"original_oracle_{name}.pt"), weights_only=False)


def _stage_opts(stage, image):
    opts = []
    for key, value in stage.items():
        opts += [f"MODEL.EXTRA.FULL_STAGE.{key}", str(list(value) if isinstance(value, list) else value)]
    return opts + ["MODEL.DROPOUT", "0.0", "MODEL.NUM_CLASSES", "10", "MODEL.IMAGE_SIZE", f"[{image}, {image}]"]


def _model(tmp_path, record, extra=()):
    opts = _stage_opts(record["stage"], record.get("image", record["x"].shape[-1]))
    opts += ["TRAIN.PRETRAIN_STEPS", str(record["pretrain_steps"]), "DEQ.RAND_F_THRES_DELTA", "0"] + list(extra)
    cfg = check_config(load_config(os.path.join(ROOT, record["yaml"]), opts))
    model = get_cls_net(cfg).double()
    path = tmp_path / "weights.pt"
    torch.save(record["state_dict"], path)  # the original's own layout (weight_g / weight_v) and names
    load_strict(model, str(path))
    return model.train(), cfg


def _rel(a, b):
    return float((a - b).norm() / max(float(b.norm()), 1e-12))


def _check(model, case):
    params = dict(model.named_parameters())
    assert set(case["grads"]) == set(params)
    worst = {}
    for name, want in case["grads"].items():
        got = params[name].grad
        got = torch.zeros_like(params[name]) if got is None else got
        want = want.double().reshape(got.shape)
        if float(want.norm()) < 1e-8:  # zero but for rounding, e.g. a bias right before a BatchNorm
            assert float(got.norm()) < 1e-8, name
            continue
        worst[name] = _rel(got, want)
    bad = {k: v for k, v in worst.items() if v > RTOL}
    assert not bad, bad
    return worst


def test_first_original_tiny_cifar_equilibrium_step(tmp_path):
    record = _oracle("mdeq")
    model, _ = _model(tmp_path, record)
    case = record["cases"]["equilibrium"]
    x, y = record["x"].double(), record["y"]
    out, info = model(x, train_step=record["train_step"], return_info=True)
    assert info["mode"] == "equilibrium"
    loss = torch.nn.functional.cross_entropy(out, y)
    assert abs(loss.item() - float(case["loss"])) <= RTOL * abs(float(case["loss"]))
    loss.backward()
    worst = _check(model, case)
    # the recorded solves: the whole batch ran the 22 forward and the 22 backward steps (its backward solve
    # uses the forward cap), and the stem and f got a gradient (the adjoint solve improved on its zero start)
    forward, backward = case["solves"]
    assert forward["nstep"] == backward["nstep"] == 22
    assert int(info["forward"]["nstep"]) == 22 and int(info["backward"]["nstep"]) == 22
    assert worst["downsample.0.weight"] <= RTOL and float(case["grads"]["downsample.0.weight"].norm()) > 1.0


def test_the_project_choices_change_that_gradient(tmp_path):
    """The comparison above can fail: this project's adjoint (start at the gradient, J at z*) and per-sample
    stopping give another gradient for the stem and f (while the head's gradient is the same)."""
    record = _oracle("mdeq")
    case = record["cases"]["equilibrium"]
    for extra, same_forward in ((["DEQ.ADJOINT_INIT", "grad"], True), (["DEQ.ADJOINT_AT", "z"], True),
                                (["DEQ.STOP_SCOPE", "sample"], False)):
        model, _ = _model(tmp_path, record, extra)
        torch.nn.functional.cross_entropy(model(record["x"].double(), train_step=record["train_step"]),
                                          record["y"]).backward()
        params = dict(model.named_parameters())
        assert _rel(params["downsample.0.weight"].grad, case["grads"]["downsample.0.weight"].double()) > 1e-3, extra
        head = _rel(params["classifier.weight"].grad, case["grads"]["classifier.weight"].double())
        assert (head < RTOL) == same_forward, extra  # per-sample stopping also moves z* (each its own best)


@pytest.mark.parametrize("experiment", ["cifar_LARGE_reg", "imagenet_SMALL_reg"])
@pytest.mark.parametrize("mode", ["equilibrium", "pretrain"])
def test_second_generation_reg_yaml_step_with_jacobian_loss(tmp_path, experiment, mode):
    record = _oracle("vision")[experiment]
    model, _ = _model(tmp_path, record)
    case = record["cases"][mode]
    torch.manual_seed(2)  # the recorder drew the Jacobian loss's probe vectors right after this seed
    out, info = model(record["x"].double(), train_step=case["train_step"], compute_jac_loss=True, return_info=True)
    assert info["mode"] == ("equilibrium" if mode == "equilibrium" else "unrolled")
    loss = torch.nn.functional.cross_entropy(out, record["y"])
    total = loss + case["jac_weight"] * info["jac_loss"]
    assert abs(loss.item() - float(case["loss"])) <= RTOL * abs(float(case["loss"]))
    assert abs(total.item() - float(case["total"])) <= RTOL * abs(float(case["total"]))
    total.backward()
    _check(model, case)
