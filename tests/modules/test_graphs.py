"""DEQ.CUDA_GRAPH: the capture and replay logic of mdeq.modules.graphs, exercised on the CPU.

A CUDA graph replays the memory it saw at capture. ``ReplayRecorder`` keeps that contract on the CPU (replay =
the recorded function run again on the same static tensors), so these tests show that the per-batch tensors
(injection, weight-normalised kernels, dropout masks) reach the graph through its static copies, that the
parameters' in-place updates are seen, and that a training run and an evaluation with graphs compute exactly what
they compute without. The CUDA recorder itself needs a GPU (benchmarks/gpu_suite.sh measures it there).
"""
from __future__ import annotations

import copy
import logging
from typing import List, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F

from mdeq.config import check_config, load_config
from mdeq.models import get_cls_net
from mdeq.modules.graphs import GraphedF, ReplayRecorder, module_slots, read_slot
from helpers.tiny import MODEL_4_8

TINY = MODEL_4_8 + [
    "MODEL.NUM_CLASSES", "3", "MODEL.WNORM", "True", "MODEL.DOWNSAMPLE_TIMES", "0", "MODEL.NUM_LAYERS", "3",
    "DATASET.DATASET", "cifar10", "TRAIN.PRETRAIN_STEPS", "0", "DEQ.F_THRES", "6", "DEQ.B_THRES", "6",
    "MODEL.DROPOUT", "0.2", "MODEL.CHANNELS_LAST", "false"]


def tiny_model(graph: bool) -> torch.nn.Module:
    cfg = load_config(None, TINY + ["DEQ.CUDA_GRAPH", str(graph)])
    check_config(cfg)
    torch.manual_seed(0)
    model = get_cls_net(cfg).double()
    if graph:
        model.deq.graph_recorder = ReplayRecorder()
    return model


def batches(n: int, size: int = 3) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 3, 8, 8, generator=g, dtype=torch.float64), torch.arange(size) % 3)
            for _ in range(n)]


def train_and_eval(model: torch.nn.Module, train: Sequence, test: Sequence) -> Tuple[List, List, List]:
    """Adam steps on ``train`` (dropout on), then logits on ``test`` in evaluation mode."""
    torch.manual_seed(5)  # dropout masks
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses, nsteps = [], []
    model.train()
    for x, y in train:
        opt.zero_grad()
        out, info = model(x, train_step=10, return_info=True)
        loss = F.cross_entropy(out, y)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
        nsteps.append(info["forward"]["nstep"])
    model.eval()
    with torch.no_grad():
        logits = [model(x) for x, _ in test]
    return losses, nsteps, logits


def test_training_and_evaluation_with_replayed_graphs_compute_what_eager_computes():
    data = batches(5)
    eager = train_and_eval(tiny_model(False), data[:3], data[3:])
    graphed_model = tiny_model(True)
    graphed = train_and_eval(graphed_model, data[:3], data[3:])
    for a, b in zip(eager, graphed):
        for u, v in zip(a, b):
            torch.testing.assert_close(u, v, rtol=0, atol=0)
    recorder = graphed_model.deq.graph_recorder
    # one capture for the training shape (dropout masks), one for evaluation (no masks); later batches replay
    assert recorder.records == 2
    assert len(graphed_model.deq._graphs) == 2
    assert all(m.mask is None for m in graphed_model.modules() if hasattr(type(m), "PER_FORWARD")
               and "mask" in type(m).PER_FORWARD)


def test_graphs_are_left_out_of_copies_and_a_new_memory_layout_captures_anew():
    model = tiny_model(True)
    x, y = batches(1)[0]
    model.eval()
    with torch.no_grad():
        first = model(x)
        clone = copy.deepcopy(model)  # an EMA copy: no graphs travel with it
        assert clone.deq._graphs is None
        for p in model.fullstage.parameters():  # new memory for every parameter (as model.to(...) would give)
            p.data = p.data.clone()
        again = model(x)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert model.deq.graph_recorder.records == 2


def test_without_a_cuda_device_the_key_warns_once_and_f_runs_eagerly(caplog):
    model = tiny_model(False)
    reference = tiny_model(False)
    model.deq.cuda_graph = True  # DEQ.CUDA_GRAPH on a CPU model, no recorder given
    x, _ = batches(1)[0]
    model.eval()
    reference.eval()
    with caplog.at_level(logging.WARNING), torch.no_grad():
        out = [model(x) for _ in range(2)]
    notes = [r for r in caplog.records if "DEQ.CUDA_GRAPH" in r.getMessage()]
    assert len(notes) == 1 and "f runs eagerly" in notes[0].getMessage()
    assert model.deq._graphs is None
    with torch.no_grad():
        torch.testing.assert_close(out[1], reference(x), rtol=0, atol=0)


class _Scale(torch.nn.Module):
    """f(v) = tanh(W v + x) with a per-call input x held as an attribute (a slot)."""
    PER_FORWARD = ("x",)

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.x = None

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(v) + self.x)


def test_bind_points_slots_at_static_copies_during_the_solve_and_restores_them():
    f = _Scale()
    f.x = torch.randn(2, 4)
    slots = module_slots(f)
    assert slots == [(f, "x")]
    graphs = GraphedF(ReplayRecorder())
    v = torch.randn(2, 4)
    original = f.x
    with torch.no_grad():
        with graphs.bind(f, v, slots, list(f.parameters())) as g:
            inside = read_slot(slots[0])
            assert inside is not original  # f reads the graph's static copy during the solve
            out1 = g(v)
            out2 = g(v)
        assert f.x is original  # put back
        # the graph's copy held the values of this forward pass
        torch.testing.assert_close(inside, f.x, rtol=0, atol=0)
        torch.testing.assert_close(out1, f(v), rtol=0, atol=0)
        assert out1 is not out2 and out1.data_ptr() != out2.data_ptr()  # results are copies, not the static output
        # a new forward pass: new slot values and an in-place parameter update, same graph (no new capture)
        f.x = torch.randn(2, 4)
        f.lin.weight.add_(0.5)
        with graphs.bind(f, v, slots, list(f.parameters())) as g:
            assert read_slot(slots[0]) is inside
            out3 = g(v)
        torch.testing.assert_close(out3, f(v), rtol=0, atol=0)
    assert graphs.recorder.records == 1


def test_bind_refuses_autograd_and_keeps_at_most_max_graphs():
    f = _Scale()
    f.x = torch.zeros(1, 4)
    graphs = GraphedF(ReplayRecorder(), max_graphs=2)
    with pytest.raises(RuntimeError, match="no_grad"):
        with graphs.bind(f, torch.zeros(1, 4), module_slots(f)):
            pass
    with torch.no_grad():
        for batch in (1, 2, 3, 1):
            f.x = torch.zeros(batch, 4)
            with graphs.bind(f, torch.zeros(batch, 4), module_slots(f)) as g:
                g(torch.ones(batch, 4))
    # shapes 1, 2, 3 captured; 1 was dropped when 3 came (least recently used), so the last 1 captured again
    assert graphs.recorder.records == 4 and len(graphs) == 2
