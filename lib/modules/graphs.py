"""CUDA graphs for the calls of f inside the forward solve (``DEQ.CUDA_GRAPH``).

On a GPU, one call of f_theta at the original per-GPU batches is a few milliseconds of many small kernels, and
its cost is mostly kernel launches. A CUDA graph records the kernels of one call once and replays them with one
launch. The forward solve calls f 10-30 times per batch on states of one fixed shape, without autograd, which is
what a graph can replay.

What a graph replays reads and writes the *memory* it saw at capture, not Python objects. f reads, besides its
input z:

* its parameters, updated in place by the optimizer (the graph sees the new values; a parameter moved to new
  memory, e.g. by ``model.to(...)``, makes a new capture, since the parameters' addresses are part of the key);
* tensors that change with every batch: the injected image features, the weight-normalised kernels and the
  dropout masks of the current forward pass. These are named as *slots*: ``(owner, key)`` pairs, where the
  tensor is ``owner[key]`` for a list or dict and ``getattr(owner, key)`` otherwise. For the duration of a solve
  every slot is pointed at a tensor owned by the graph (its *static* copy), after the current values have been
  copied into it, and put back afterwards.

One graph is kept per key (input shape and dtype, the slots' shapes, dtypes and strides, the parameters'
addresses, the autocast state); the least recently used is dropped beyond ``max_graphs``. The solver receives
``f_graphed(v)``: copy v into the static input, replay, return a copy of the static output (the solver keeps
earlier outputs, which the next replay would overwrite).

The capture itself is a small interface (:class:`Recorder`): :class:`CudaRecorder` uses ``torch.cuda.CUDAGraph``
(warm-up on a side stream, then capture into a shared memory pool); :class:`ReplayRecorder` has the same
contract on any device, replaying by calling the recorded function on the static tensors, which is how the
slot and cache logic is tested without a GPU.
"""
from __future__ import annotations

import collections
import contextlib
from typing import Any, Callable, Dict, Hashable, Iterator, List, Optional, Sequence, Tuple

import torch

Slot = Tuple[Any, Any]  # (owner, key): owner[key] for lists and dicts, getattr(owner, key) otherwise
VecFn = Callable[[torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------------------------ slots
def read_slot(slot: Slot) -> Any:
    owner, key = slot
    return owner[key] if isinstance(owner, (list, dict)) else getattr(owner, key)


def write_slot(slot: Slot, value: Any) -> None:
    owner, key = slot
    if isinstance(owner, (list, dict)):
        owner[key] = value
    else:
        setattr(owner, key, value)


def module_slots(module: torch.nn.Module) -> List[Slot]:
    """The per-forward tensors of a module tree: for every submodule that names them in a class attribute
    ``PER_FORWARD`` (attribute names; see ``mdeq.modules.optimizations.PerForward``), those attributes that
    currently hold a tensor."""
    slots: List[Slot] = []
    for m in module.modules():
        for name in getattr(type(m), "PER_FORWARD", ()):
            if isinstance(getattr(m, name, None), torch.Tensor):
                slots.append((m, name))
    return slots


# ------------------------------------------------------------------------------------------------ recorders
Replay = Callable[[Callable[[], torch.Tensor]], None]


class Recorder:
    """Records ``fn`` (no arguments; reads only memory that stays put) and returns ``(replay, output)``:
    ``replay(fn_now)`` recomputes ``fn`` from what that memory then holds and leaves the result in ``output``.

    ``fn_now`` is the same computation as built for the current solve (the Python objects around f change from
    batch to batch; the memory it reads does not): a CUDA graph ignores it and replays the recorded kernels; a
    recorder that cannot record kernels runs it.
    """

    def record(self, fn: Callable[[], torch.Tensor]) -> Tuple[Replay, torch.Tensor]:
        raise NotImplementedError


class ReplayRecorder(Recorder):
    """Any device: replay runs the current solve's ``fn_now`` and copies its result into the output of the
    recorded call. f then reads what a graph would read: the static copies the slots point at."""

    def __init__(self) -> None:
        self.records = 0

    def record(self, fn: Callable[[], torch.Tensor]) -> Tuple[Replay, torch.Tensor]:
        self.records += 1
        out = fn()

        def replay(fn_now: Callable[[], torch.Tensor]) -> None:
            out.copy_(fn_now())

        return replay, out


class CudaRecorder(Recorder):
    """``torch.cuda.CUDAGraph``: a few warm-up calls on a side stream (cuDNN algorithm choice, allocator), then
    the capture; all graphs share one memory pool."""

    def __init__(self, warmup: int = 2) -> None:
        self.warmup = int(warmup)
        self.pool: Any = None
        self.records = 0
        self.graphs: List[Any] = []

    def record(self, fn: Callable[[], torch.Tensor]) -> Tuple[Replay, torch.Tensor]:
        self.records += 1
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn()
        self.graphs.append(graph)

        def replay(fn_now: Callable[[], torch.Tensor]) -> None:
            graph.replay()

        return replay, out


def recorder_for(device: torch.device) -> Optional[Recorder]:
    """A CudaRecorder on CUDA devices; None (no graphs) elsewhere."""
    return CudaRecorder() if device.type == "cuda" else None


# ------------------------------------------------------------------------------------------------ the cache
class _Entry:
    def __init__(self, x: torch.Tensor, slot_values: Sequence[torch.Tensor]) -> None:
        self.x = torch.empty_like(x)
        self.statics = [t.detach().clone() for t in slot_values]
        self.replay: Optional[Replay] = None
        self.out: Optional[torch.Tensor] = None


class GraphedF:
    """Captured graphs of one f, reused across batches (see the module docstring).

    Args:
        recorder: how graphs are captured and replayed.
        max_graphs: graphs kept (one per input shape and memory layout); the least recently used goes first.
    """

    def __init__(self, recorder: Recorder, max_graphs: int = 4) -> None:
        self.recorder = recorder
        self.max_graphs = int(max_graphs)
        self._entries: "collections.OrderedDict[Hashable, _Entry]" = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Drops every graph (and the memory its static tensors hold)."""
        self._entries.clear()

    @staticmethod
    def _key(x: torch.Tensor, values: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
             tag: Hashable) -> Hashable:
        return (tuple(x.shape), x.dtype, str(x.device),
                tuple((tuple(t.shape), t.dtype, t.stride()) for t in values),
                tuple(p.data_ptr() for p in params), tag)

    @contextlib.contextmanager
    def bind(self, fvec: VecFn, x: torch.Tensor, slots: Sequence[Slot], params: Sequence[torch.Tensor] = (),
             tag: Hashable = None) -> Iterator[VecFn]:
        """For one solve: yields ``f_graphed`` with ``f_graphed(v) == fvec(v)`` for v shaped like x.

        Must be entered under ``torch.no_grad()``. The slots hold the current forward pass's tensors; they point at
        the graph's static copies until the block ends. ``tag`` is part of the key: anything else that changes
        what fvec computes (the autocast setting).
        """
        if torch.is_grad_enabled():
            raise RuntimeError("GraphedF.bind: graphs replay f without autograd; enter it under torch.no_grad()")
        values = [read_slot(s) for s in slots]
        for s, v in zip(slots, values):
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"GraphedF.bind: slot {s[1]!r} of {type(s[0]).__name__} holds "
                                f"{type(v).__name__}, not a tensor")
        key = self._key(x, values, params, tag)
        entry = self._entries.get(key)
        if entry is None:
            entry = _Entry(x, values)
            self._entries[key] = entry
            while len(self._entries) > self.max_graphs:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
        for static, value in zip(entry.statics, values):
            static.copy_(value)
        for s, static in zip(slots, entry.statics):
            write_slot(s, static)
        try:
            def call() -> torch.Tensor:
                return fvec(entry.x)

            if entry.replay is None:
                entry.x.copy_(x)
                entry.replay, entry.out = self.recorder.record(call)

            def f_graphed(v: torch.Tensor) -> torch.Tensor:
                entry.x.copy_(v)
                entry.replay(call)
                return entry.out.clone()

            yield f_graphed
        finally:
            for s, value in zip(slots, values):
                write_slot(s, value)
