"""The fast paths compute what the default path computes: channels_last states, a compiled f_theta, bf16
autocast around the layer; the equilibrium layer evaluates f no more often than it must; limited-memory
Broyden's memory does not grow with the iteration cap; the CPU allocator setting respects the environment."""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F

from mdeq.config import check_config, load_config
from mdeq.models import get_cls_net
from mdeq.modules import optimizations
from mdeq.modules.deq import DEQLayer, is_channels_last, list2vec, vec2list
from mdeq.modules.solvers import broyden, lbroyden
from helpers.tiny import MODEL_4_8

TINY = MODEL_4_8 + [
        "MODEL.NUM_CLASSES", "3", "MODEL.WNORM", "True", "MODEL.DOWNSAMPLE_TIMES", "0", "MODEL.NUM_LAYERS", "3",
        "DATASET.DATASET", "cifar10", "TRAIN.PRETRAIN_STEPS", "1", "DEQ.F_THRES", "8", "DEQ.B_THRES", "8",
        "MODEL.DROPOUT", "0.0"]


def tiny_model(extra: Sequence[str] = (), dtype: torch.dtype = torch.float64, check: bool = True
               ) -> torch.nn.Module:
    cfg = load_config(None, TINY + list(extra))
    if check:
        check_config(cfg)
    torch.manual_seed(0)
    return get_cls_net(cfg).to(dtype).train()


def batch(dtype: torch.dtype = torch.float64) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, 8, 8, generator=g, dtype=dtype), torch.tensor([0, 1, 2])


def step(model: torch.nn.Module, train_step: int, **kw) -> Tuple[torch.Tensor, List[torch.Tensor], Dict]:
    """Logits and parameter gradients of one training step (no optimizer)."""
    x, y = batch(next(model.parameters()).dtype)
    model.zero_grad()
    out, info = model(x, train_step=train_step, return_info=True, **kw)
    loss = F.cross_entropy(out.float(), y)
    if info.get("jac_loss") is not None:
        loss = loss + info["jac_loss"]
    loss.backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()], info


def assert_close_lists(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], rtol: float, atol: float) -> None:
    assert len(a) == len(b)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------------------- channels_last
def test_nhwc_flattening_round_trips_and_keeps_channels_last() -> None:
    z = [torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last),
         torch.randn(2, 6, 2, 3).contiguous(memory_format=torch.channels_last)]
    assert is_channels_last(z) and not is_channels_last([e.contiguous() for e in z])
    v = list2vec(z, channels_last=True)
    assert v.shape == (2, 3 * 4 * 5 + 6 * 2 * 3)
    # (H, W, C) order: the first entries are the channels of pixel (0, 0)
    assert torch.equal(v[0, :3], z[0][0, :, 0, 0])
    back = vec2list(v, [e.shape for e in z], channels_last=True)
    for a, b in zip(back, z):
        assert torch.equal(a, b)
        assert a.stride(1) == 1, "the unflattened views must keep channels_last strides"


@pytest.mark.parametrize("train_step", [-1, 0])
def test_channels_last_gives_the_same_logits_and_gradients(train_step: int) -> None:
    ref = step(tiny_model(), train_step)
    fast_model = tiny_model(["MODEL.CHANNELS_LAST", "True"])
    fast = step(fast_model, train_step)
    assert fast_model.fullstage.branches[0].blocks[0].conv1.weight_v.is_contiguous(
        memory_format=torch.channels_last)
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-9, atol=1e-11)
    assert_close_lists(fast[1], ref[1], rtol=1e-7, atol=1e-10)
    if train_step < 0:
        assert fast[2]["forward"]["nstep"] == ref[2]["forward"]["nstep"]


def test_channels_last_states_reach_f_theta_without_layout_changes() -> None:
    model = tiny_model(["MODEL.CHANNELS_LAST", "True"])
    seen: List[bool] = []

    def nhwc_strides(e: torch.Tensor) -> bool:  # (C, W, H) innermost to outermost, as in channels_last
        _, c, _, w = e.shape
        return e.stride(1) == 1 and e.stride(3) == c and e.stride(2) == c * w

    model.fullstage.register_forward_pre_hook(lambda m, args: seen.append(all(map(nhwc_strides, args[0]))))
    step(model, -1)
    assert len(seen) > 3 and all(seen)


# ------------------------------------------------------------------------------------------------- compile
def test_compile_config_compiles_f_theta_only_and_keeps_the_state_dict(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: List[Tuple[torch.nn.Module, Dict]] = []

    def fake_compile(module: torch.nn.Module, **kwargs):
        calls.append((module, kwargs))
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    plain = tiny_model()
    compiled = tiny_model(["MODEL.COMPILE", "True"])
    assert len(calls) == 1 and calls[0][0] is compiled.fullstage and calls[0][1]["backend"] == "inductor"
    assert list(compiled.state_dict()) == list(plain.state_dict())


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_f_theta_gives_the_same_results(backend: str) -> None:
    # aot_eager goes through AOTAutograd as inductor does. An unrolled step (a plain backward through the
    # compiled graph), then an equilibrium step (the adjoint solve's repeated VJPs with retain_graph through
    # the same graph): AOTAutograd's donated buffers would make the second fail.
    torch._dynamo.reset()
    reference = tiny_model()
    step(reference, 0)
    ref = step(reference, -1)
    model = tiny_model()
    model.compile_f_theta(backend=backend)
    assert model.f_theta is not model.fullstage
    step(model, 0)
    got = step(model, -1)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-12, atol=1e-12)
    assert_close_lists(got[1], ref[1], rtol=1e-10, atol=1e-12)
    assert list(model.state_dict()) == list(tiny_model().state_dict())
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------------- AMP
def test_autocast_reaches_f_but_not_the_solver() -> None:
    layer = DEQLayer(f_solver="broyden", b_solver="broyden", f_thres=6, b_thres=6).train()
    weight = torch.nn.Parameter(torch.randn(6, 6) * 0.2)
    seen: Dict[str, List] = {"autocast": [], "dtype": []}

    def f(z: List[torch.Tensor]) -> List[torch.Tensor]:
        seen["autocast"].append(torch.is_autocast_enabled("cpu"))
        seen["dtype"].append(z[0].dtype)
        return [torch.tanh(z[0].flatten(1) @ weight).view_as(z[0]) + 1.0]

    solver_dtypes: List[torch.dtype] = []
    inner = layer.f_solver

    def recording(fn, x0, *args, **kwargs):
        solver_dtypes.append(x0.dtype)
        assert not torch.is_autocast_enabled("cpu")
        return inner(fn, x0, *args, **kwargs)

    layer.f_solver = recording
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, info = layer(f, [torch.zeros(2, 6, 1, 1)])
    assert solver_dtypes == [torch.float32]
    assert all(seen["autocast"]) and set(seen["dtype"]) == {torch.float32}
    assert z[0].dtype == torch.float32
    z[0].sum().backward()
    assert weight.grad is not None and torch.isfinite(weight.grad).all()
    assert info["backward"]["nstep"] > 0


def test_bf16_autocast_training_step_matches_float32_loosely() -> None:
    ref = step(tiny_model(dtype=torch.float32), -1)
    model = tiny_model(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = step(model, -1)
    assert got[0].dtype == torch.float32 or got[0].dtype == torch.bfloat16
    torch.testing.assert_close(got[0].float(), ref[0], rtol=0.1, atol=0.05)
    assert all(torch.isfinite(a).all() for a in got[1])
    # bf16 keeps about three significant digits, and this random tiny model has train-mode BatchNorms over a
    # batch of 3, so only the classifier's gradient (which the features decide) is compared, by direction
    cos = F.cosine_similarity(got[1][-2].flatten().double(), ref[1][-2].flatten().double(), dim=0)
    assert cos > 0.95
    assert int(got[2]["backward"]["nfev"]) == int(ref[2]["backward"]["nfev"])


# ------------------------------------------------------------------------------------ calls of f per step
class CountingProbe:
    """Counts the equilibrium layer's calls of f and VJPs."""

    def __init__(self) -> None:
        self.calls = {"f": 0, "vjp": 0, "f_backward": 0, "forward_solve": 0, "backward_solve": 0}

    def begin(self, kind: str) -> None:
        pass

    def end(self, kind: str) -> None:
        self.calls[kind] += 1


def count_f_theta(model: torch.nn.Module) -> List[int]:
    calls = [0]
    model.fullstage.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("extra", [[], ["DEQ.STOP_MODE", "rel", "DEQ.F_EPS", "1e-2", "DEQ.B_EPS", "1e-2"],
                                   ["DEQ.F_SOLVER", "anderson", "DEQ.B_SOLVER", "lbroyden", "DEQ.ADJOINT_AT", "z"]])
def test_training_step_calls_f_forward_nfev_plus_one_times_and_vjp_backward_nfev_times(extra) -> None:
    model = tiny_model(extra)
    calls = count_f_theta(model)
    probe = CountingProbe()
    model.deq.probe = probe
    _, _, info = step(model, -1)
    fwd, bwd = int(info["forward"]["nfev"]), int(info["backward"]["nfev"])
    # the original's adjoint (ADJOINT_AT f_z, the default) evaluates f once more, at f(z*)
    extra_f = 1 if model.deq.adjoint_at == "f_z" else 0
    assert calls[0] == fwd + 1 + extra_f
    assert probe.calls["f"] == fwd + 1 + extra_f
    assert probe.calls["vjp"] == bwd
    assert probe.calls["f_backward"] == 1 and probe.calls["forward_solve"] == probe.calls["backward_solve"] == 1
    assert 1 <= int(info["backward"]["nstep"]) + 1 == bwd


def test_evaluation_calls_f_exactly_nfev_times_and_phantom_reuses_f_of_z_star_for_the_jacobian_loss() -> None:
    model = tiny_model().eval()
    calls = count_f_theta(model)
    with torch.no_grad():
        _, info = model(batch()[0], return_info=True)
    assert calls[0] == int(info["forward"]["nfev"])

    model = tiny_model(["DEQ.BACKWARD", "phantom", "DEQ.PHANTOM_STEPS", "3"])
    calls = count_f_theta(model)
    _, _, info = step(model, -1, compute_jac_loss=True)
    assert info["jac_loss"] is not None
    assert calls[0] == int(info["forward"]["nfev"]) + 3


def test_unrolled_step_calls_f_num_layers_times() -> None:
    model = tiny_model()
    calls = count_f_theta(model)
    step(model, 0)
    assert calls[0] == 3


# --------------------------------------------------------------------------------- L-Broyden memory bound
def peak_allocated_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes of CPU tensor memory allocated (and not yet freed) while fn runs, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # An operator's allocations are its self memory; frees (and allocations outside operators) are the
    # "[memory]" events. Their running sum in time order is the live tensor memory.
    changes = sorted((e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
                     for e in prof.events())
    live = peak = 0
    for _, change in changes:
        live += change
        peak = max(peak, live)
    return peak


def test_lbroyden_memory_does_not_grow_with_the_iteration_cap() -> None:
    torch.manual_seed(0)
    bsz, dim = 4, 20000
    w = torch.randn(dim) * 0.5

    def f(z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(w * z + torch.roll(z, 1, dims=1) * 0.3) + 0.1

    x0 = torch.zeros(bsz, dim)
    peaks = {}
    for cap in (10, 40):
        for name, solve in (("lbroyden", lambda c: lbroyden(f, x0, c, 0.0, memory=8)),
                            ("broyden", lambda c: broyden(f, x0, c, 0.0))):
            peaks[name, cap] = peak_allocated_bytes(lambda: solve(cap))
    row = bsz * dim * 4
    assert peaks["lbroyden", 40] <= 1.1 * peaks["lbroyden", 10], peaks
    # the measurement can tell: full Broyden keeps every residual, so its memory grows with the cap
    assert peaks["broyden", 40] > peaks["broyden", 10] + 20 * row, peaks


# ------------------------------------------------------------------------------------------- CPU allocator
def test_cpu_allocator_setting_respects_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert optimizations.tune_cpu_allocator() is False
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setenv("MDEQ_CPU_ALLOCATOR", "default")
    assert optimizations.tune_cpu_allocator() is False


# ------------------------------------------------------------------- accelerator paths and chunked storage
def _mixed_problem(dtype: torch.dtype = torch.float64) -> Tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    """Four samples of different difficulty; sample 3 turns NaN after a few calls (a diverging sample)."""
    g = torch.Generator().manual_seed(3)
    dim = 30
    w = torch.randn(dim, dim, generator=g, dtype=dtype)
    w = w / torch.linalg.matrix_norm(w, ord=2)
    scale = torch.tensor([0.3, 0.7, 0.95, 0.9], dtype=dtype)[:, None]
    offset = torch.randn(4, dim, generator=g, dtype=dtype)
    calls = [0]

    def f(z: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        out = scale * torch.tanh(z @ w.T) + offset
        if calls[0] > 4:
            out = out.clone()
            out[3] = float("nan")
        return out

    return f, torch.zeros(4, dim, dtype=dtype)


SOLVE = {
    "broyden": lambda f, x0: broyden(f, x0, 60, 1e-9),
    "lbroyden_window": lambda f, x0: lbroyden(f, x0, 60, 1e-9, memory=4),
    "lbroyden_circular": lambda f, x0: lbroyden(f, x0, 60, 1e-9, memory=4, overflow="circular"),
    "broyden_rel_check3": lambda f, x0: broyden(f, x0, 60, 1e-6, stop_mode="rel", check_every=3),
}


@pytest.mark.parametrize("name", sorted(SOLVE))
def test_accelerator_code_paths_give_the_same_results(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    common = importlib.import_module("mdeq.modules.solvers.common")
    broyden_module = importlib.import_module("mdeq.modules.solvers.broyden")

    f, x0 = _mixed_problem()
    z_cpu, s_cpu = SOLVE[name](f, x0)
    monkeypatch.setattr(common, "host_checks_are_free", lambda t: False)
    monkeypatch.setattr(broyden_module, "host_checks_are_free", lambda t: False)
    f, x0 = _mixed_problem()
    z_acc, s_acc = SOLVE[name](f, x0)
    assert s_cpu["diverged"].tolist() == s_acc["diverged"].tolist() == [False, False, False, True]
    assert torch.equal(s_cpu["nstep"], s_acc["nstep"]) and torch.equal(s_cpu["best_step"], s_acc["best_step"])
    torch.testing.assert_close(z_acc, z_cpu, rtol=0, atol=1e-12)
    assert torch.isfinite(z_acc).all()


def test_residuals_stored_in_several_chunks_give_the_same_iterates(monkeypatch: pytest.MonkeyPatch) -> None:
    from mdeq.modules.solvers.broyden import _ResidualStore

    f, x0 = _mixed_problem()
    z_one, s_one = broyden(f, x0, 40, 1e-9)
    chunks: List[int] = []
    original_init = _ResidualStore.__init__

    def recording_init(self, like, capacity):
        original_init(self, like, capacity)
        chunks.append(len(self.chunks))

    monkeypatch.setattr(_ResidualStore, "CHUNK_BYTES", 41 * 30 * 8)  # one sample per chunk
    monkeypatch.setattr(_ResidualStore, "__init__", recording_init)
    f, x0 = _mixed_problem()
    z_many, s_many = broyden(f, x0, 40, 1e-9)
    assert chunks == [4]
    assert torch.equal(s_one["nstep"], s_many["nstep"])
    torch.testing.assert_close(z_many, z_one, rtol=0, atol=1e-12)
