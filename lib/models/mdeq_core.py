"""The multiscale f_theta of an MDEQ and the trunk shared by classification and segmentation.

State-dict names follow the original project so that its checkpoints load: ``downsample.*`` (stem),
``stage0.*`` (injection), ``fullstage.*`` (f_theta: ``branches``, ``fuse_layers``, ``post_fuse_layers``).
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mdeq.modules.deq import DEQLayer
from mdeq.modules.graphs import module_slots
from mdeq.modules.optimizations import VariationalDropout2d, WNConv2d, clear_per_forward, make_conv

logger = logging.getLogger(__name__)


class BasicBlock(nn.Module):
    """The residual block of one resolution stream (Figure 2 of the paper).

    out = GN3(ReLU(GN2(drop(conv2(ReLU(GN1(conv1(x))))) + injection) + x))
    conv1 widens the channels by the expansion factor; conv1/conv2 are 5x5 when ``big_kernels`` >= 1 / 2.
    """

    def __init__(self, channels: int, expansion: int, num_groups: int, dropout: float, wnorm: bool,
                 big_kernels: int = 0, gn_affine: bool = True) -> None:
        super().__init__()
        inner = expansion * channels
        self.conv1 = make_conv(channels, inner, 5 if big_kernels >= 1 else 3, wnorm)
        self.gn1 = nn.GroupNorm(num_groups, inner, affine=gn_affine)
        self.conv2 = make_conv(inner, channels, 5 if big_kernels >= 2 else 3, wnorm)
        self.gn2 = nn.GroupNorm(num_groups, channels, affine=gn_affine)
        self.gn3 = nn.GroupNorm(num_groups, channels, affine=gn_affine)
        self.drop = VariationalDropout2d(dropout)

    def forward(self, x: torch.Tensor, injection: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = F.relu(self.gn1(self.conv1(x)))
        out = self.drop(self.conv2(out))
        if injection is not None:
            out = out + injection
        out = self.gn2(out) + x
        return self.gn3(F.relu(out))


class BranchNet(nn.Module):
    """The residual blocks of one resolution; only the first block receives the injection."""

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, injection: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = self.blocks[0](x, injection)
        for block in self.blocks[1:]:
            y = block(y)
        return y


class DownsampleModule(nn.Module):
    """Resolution j -> i (i > j): i - j stride-2 3x3 convolutions with GroupNorm (ReLU between them)."""

    def __init__(self, channels: Sequence[int], in_res: int, out_res: int, num_groups: int, affine: bool) -> None:
        super().__init__()
        steps = []
        diff = out_res - in_res
        for k in range(diff):
            last = k == diff - 1
            out_ch = channels[out_res] if last else channels[in_res]
            parts = [("conv", nn.Conv2d(channels[in_res], out_ch, 3, stride=2, padding=1, bias=False)),
                     ("gnorm", nn.GroupNorm(num_groups, out_ch, affine=affine))]
            if not last:
                parts.append(("relu", nn.ReLU(inplace=True)))
            steps.append(nn.Sequential(OrderedDict(parts)))
        self.net = nn.Sequential(*steps)

    def forward(self, x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        return self.net(x)


class UpsampleModule(nn.Module):
    """Resolution j -> i (i < j): a 1x1 convolution, GroupNorm, then nearest upsampling to the target size."""

    def __init__(self, channels: Sequence[int], in_res: int, out_res: int, num_groups: int, affine: bool) -> None:
        super().__init__()
        self.net = nn.Sequential(OrderedDict([
            ("conv", nn.Conv2d(channels[in_res], channels[out_res], 1, bias=False)),
            ("gnorm", nn.GroupNorm(num_groups, channels[out_res], affine=affine)),
        ]))

    def forward(self, x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        # Nearest upsampling to an explicit size equals the original's scale_factor=2**diff for even sizes and
        # also works for odd ones (e.g. 28 -> 14 -> 7 -> 4).
        return F.interpolate(self.net(x), size=size, mode="nearest")


class PostFuse(nn.Module):
    """ReLU, 1x1 convolution (weight-normalised with WNORM) and GroupNorm after the fusion of one resolution."""

    def __init__(self, channels: int, num_groups: int, wnorm: bool, affine: bool) -> None:
        super().__init__()
        self.conv = make_conv(channels, channels, 1, wnorm)
        self.gnorm = nn.GroupNorm(num_groups, channels, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gnorm(self.conv(F.relu(x)))


class MDEQModule(nn.Module):
    """f_theta: per-resolution residual blocks, then simultaneous multiscale fusion.

    Args:
        num_channels: channels of each resolution's state, highest resolution first.
        num_blocks: residual blocks per resolution.
        expansion: width multiplier inside the blocks.
        num_groups: GroupNorm groups (post-fusion norms use num_groups // 2).
        dropout: variational dropout rate inside the blocks.
        wnorm: weight-normalise the block and post-fusion convolutions.
        big_kernels: per branch, how many of the two block convolutions are 5x5.
        block_gn_affine, fuse_gn_affine, post_gn_affine: affine GroupNorms in each part.
    """

    def __init__(self, num_channels: Sequence[int], num_blocks: Sequence[int], expansion: int, num_groups: int,
                 dropout: float = 0.0, wnorm: bool = False, big_kernels: Optional[Sequence[int]] = None,
                 block_gn_affine: bool = True, fuse_gn_affine: bool = True, post_gn_affine: bool = True) -> None:
        super().__init__()
        n = len(num_channels)
        if len(num_blocks) != n:
            raise ValueError(f"NUM_BLOCKS has {len(num_blocks)} entries but there are {n} branches")
        big_kernels = list(big_kernels) if big_kernels else [0] * n
        self.num_branches = n
        self.num_channels = list(num_channels)
        self.branches = nn.ModuleList([
            BranchNet([BasicBlock(num_channels[i], expansion, num_groups, dropout, wnorm, big_kernels[i],
                                  block_gn_affine) for _ in range(num_blocks[i])])
            for i in range(n)])
        self.fuse_layers: Optional[nn.ModuleList] = None
        if n > 1:
            rows = []
            for i in range(n):
                row = []
                for j in range(n):
                    if i == j:
                        row.append(None)
                    elif j > i:
                        row.append(UpsampleModule(num_channels, j, i, num_groups, fuse_gn_affine))
                    else:
                        row.append(DownsampleModule(num_channels, j, i, num_groups, fuse_gn_affine))
                rows.append(nn.ModuleList(row))
            self.fuse_layers = nn.ModuleList(rows)
        self.post_fuse_layers = nn.ModuleList([
            PostFuse(num_channels[i], max(num_groups // 2, 1), wnorm, post_gn_affine) for i in range(n)])

    def prepare(self, shapes: Sequence[torch.Size], device: torch.device, dtype: torch.dtype) -> None:
        """Fixes what must not change between calls of one forward pass: normalised kernels, dropout masks."""
        for m in self.modules():
            if isinstance(m, WNConv2d):
                m.refresh()
        for i, branch in enumerate(self.branches):
            for block in branch.blocks:
                block.drop.reset_mask(shapes[i], device, dtype)

    def release(self) -> None:
        """Drops cached kernels and masks (so that a module kept around holds no autograd graph)."""
        clear_per_forward(self)

    def forward(self, z: List[torch.Tensor], injection: Optional[List[Optional[torch.Tensor]]] = None
                ) -> List[torch.Tensor]:
        """One application of f_theta to the list of per-resolution states (B, C_i, H_i, W_i).

        ``injection`` holds one tensor per resolution, shaped like its state, or None where it is zero.
        """
        injection = injection if injection is not None else [None] * self.num_branches
        blocks = [self.branches[i](z[i], injection[i]) for i in range(self.num_branches)]
        if self.fuse_layers is None:
            # One resolution: nothing to fuse, and (as in the original) the post-fusion layers are skipped
            # (their parameters exist, so that state dicts match the original's, but get no gradient).
            return blocks
        out = []
        for i in range(self.num_branches):
            size = blocks[i].shape[-2:]
            y = blocks[i]
            for j in range(self.num_branches):
                if j != i:
                    y = y + self.fuse_layers[i][j](blocks[j], size)
            out.append(self.post_fuse_layers[i](y))
        return out


def _stem(in_channels: int, channels: int, downsample_times: int, bn_momentum: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, 3, stride=2 if downsample_times >= 1 else 1, padding=1, bias=False),
        nn.BatchNorm2d(channels, momentum=bn_momentum),
        nn.ReLU(inplace=True),
        nn.Conv2d(channels, channels, 3, stride=2 if downsample_times >= 2 else 1, padding=1, bias=False),
        nn.BatchNorm2d(channels, momentum=bn_momentum),
        nn.ReLU(inplace=True),
    )


class MDEQNet(nn.Module):
    """Stem, injection and the equilibrium of f_theta; heads are added by the subclasses.

    Args:
        num_channels, num_blocks, expansion, num_groups, dropout, wnorm, big_kernels, *_gn_affine: f_theta.
        in_channels: image channels.
        downsample_times: stride-2 convolutions in the stem (0, 1 or 2).
        num_layers: applications of f_theta in the unrolled (pretraining) mode.
        pretrain_steps: the model runs unrolled while ``0 <= train_step < pretrain_steps``.
        bn_momentum: momentum of the BatchNorms outside f_theta.
        deq: keyword arguments of :class:`mdeq.modules.deq.DEQLayer` (solvers, caps, tolerances).
        channels_last: run in channels_last memory format. The equilibrium states are then created and kept
            channels_last, and the equilibrium layer flattens them in (H, W, C) order, so no call of f_theta
            converts between layouts.
    """

    def __init__(self, num_channels: Sequence[int], num_blocks: Sequence[int], in_channels: int = 3,
                 downsample_times: int = 2, expansion: int = 5, num_groups: int = 8, dropout: float = 0.0,
                 wnorm: bool = False, big_kernels: Optional[Sequence[int]] = None, block_gn_affine: bool = True,
                 fuse_gn_affine: bool = True, post_gn_affine: bool = True, num_layers: int = 5,
                 pretrain_steps: int = 0, bn_momentum: float = 0.1, deq: Optional[Dict[str, Any]] = None,
                 channels_last: bool = False) -> None:
        super().__init__()
        self.num_branches = len(num_channels)
        self.num_channels = list(num_channels)
        self.num_layers = num_layers
        self.pretrain_steps = pretrain_steps
        self.channels_last = channels_last
        init = num_channels[0]
        self.downsample = _stem(in_channels, init, downsample_times, bn_momentum)
        # With no downsampling and at most two branches the stem itself is the injection (original behaviour).
        if downsample_times == 0 and self.num_branches <= 2:
            self.stage0: Optional[nn.Module] = None
        else:
            self.stage0 = nn.Sequential(nn.Conv2d(init, init, 1, bias=False),
                                        nn.BatchNorm2d(init, momentum=bn_momentum),
                                        nn.ReLU(inplace=False))
        self.fullstage = MDEQModule(num_channels, num_blocks, expansion, num_groups, dropout, wnorm, big_kernels,
                                    block_gn_affine, fuse_gn_affine, post_gn_affine)
        self.deq = DEQLayer(**(deq or {}))

    def init_weights(self) -> None:
        """The original initialisation: plain convolutions ~ N(0, 0.01), affine BatchNorms 1 / 0.

        Weight-normalised convolutions keep PyTorch's default initialisation, as they did in the original
        (whose normal_() call reached only a temporary copy of their weight).
        """
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.01)
                if m.bias is not None:
                    nn.init.normal_(m.bias, 0, 0.01)
            elif isinstance(m, nn.BatchNorm2d) and m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def compile_f_theta(self, backend: str = "inductor", **options: Any) -> None:
        """Runs f_theta through ``torch.compile`` from now on (``MODEL.COMPILE``); the outputs stay the same.

        The compiled wrapper is kept outside the module tree, so parameter names, state dicts and checkpoints
        are unchanged. Each input shape and grad mode compiles once (the solver's calls, the differentiable
        call at z*, evaluation batches).

        Args:
            backend: A ``torch.compile`` backend ("inductor" generates fused kernels; "eager" only traces,
                which tests use to check the wiring quickly).
            **options: Further keyword arguments of ``torch.compile`` (e.g. ``mode``, ``dynamic``).
        """
        logger.info("compiling f_theta with torch.compile(backend=%r, %s)", backend, options)
        # The adjoint solve takes many VJPs through one graph of f (autograd.grad with retain_graph=True).
        # AOTAutograd's donated buffers (on by default) make such a VJP fail once the same compiled graph has
        # had a plain backward, as in an unrolled pretraining step ("compiled with non-empty donated
        # buffers"); keep the buffers.
        try:
            import torch._functorch.config as functorch_config
        except ImportError:  # (a torch without AOTAutograd has no donated buffers either)
            functorch_config = None
        if functorch_config is not None and hasattr(functorch_config, "donated_buffer"):
            functorch_config.donated_buffer = False
        self.__dict__["_f_theta_compiled"] = torch.compile(self.fullstage, backend=backend, **options)

    @property
    def f_theta(self) -> Callable[..., List[torch.Tensor]]:
        """f_theta as called inside the equilibrium layer: the compiled wrapper if any, else the module."""
        compiled = self.__dict__.get("_f_theta_compiled")
        return self.fullstage if compiled is None else compiled

    def injection(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Stem + injection: the image goes to the highest resolution, zeros to the others."""
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        if self.channels_last:
            x = x.contiguous(memory_format=fmt)
        x = self.downsample(x)
        x0 = self.stage0(x) if self.stage0 is not None else x
        xs = [x0]
        b, _, h, w = x0.shape
        for i in range(1, self.num_branches):
            h, w = (h + 1) // 2, (w + 1) // 2  # what a stride-2, padding-1 3x3 convolution produces
            xs.append(torch.zeros((b, self.num_channels[i], h, w), dtype=x0.dtype, device=x0.device)
                      .contiguous(memory_format=fmt))
        return xs

    def head(self, ys: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-resolution states -> the task's output; defined by the subclasses."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, train_step: int = -1, compute_jac_loss: bool = False,
                return_info: bool = False) -> Any:
        """The head's output for a batch of images (B, C, H, W); with ``return_info`` also the info dict.

        Args:
            x: Images, shape (B, C, H, W).
            train_step: Training step (unrolled mode while ``0 <= train_step < pretrain_steps``); -1 in
                evaluation.
            compute_jac_loss: Estimate the Jacobian loss (``info["jac_loss"]``) in this step.
            return_info: Return ``(output, info)`` instead of the output (see :meth:`equilibrium`).
        """
        ys, info = self.equilibrium(x, train_step, compute_jac_loss)
        out = self.head(ys)
        return (out, info) if return_info else out

    def equilibrium(self, x: torch.Tensor, train_step: int = -1, compute_jac_loss: bool = False,
                    ) -> Tuple[List[torch.Tensor], Dict[str, Any]]:
        """Returns the per-resolution states (unrolled or at equilibrium) and an info dict.

        info holds ``mode`` ("unrolled" or "equilibrium"), ``forward`` (solver statistics, equilibrium mode),
        ``jac_loss`` (a scalar tensor or None) and, after ``backward()``, ``backward`` statistics.
        """
        xs = self.injection(x)
        z0 = [torch.zeros_like(e) for e in xs]
        self.fullstage.prepare([e.shape for e in xs], xs[0].device, xs[0].dtype)
        # Only the highest resolution receives the image; the others' injections are zero, so they are skipped
        # (adding a zero tensor in every call of f changes nothing).
        injection: List[Optional[torch.Tensor]] = [xs[0]] + [None] * (self.num_branches - 1)
        f_theta = self.f_theta

        def f(z: List[torch.Tensor]) -> List[torch.Tensor]:
            return f_theta(z, injection)

        if 0 <= train_step < self.pretrain_steps:
            z, info = self.deq.unrolled(f, z0, self.num_layers, compute_jac_loss=compute_jac_loss)
        else:
            graph_slots, graph_params = None, []
            if self.deq.cuda_graph:  # what f reads: the injection and f_theta's per-batch and in-place tensors
                graph_slots = [(injection, 0)] + module_slots(self.fullstage)
                graph_params = list(self.fullstage.parameters()) + list(self.fullstage.buffers())
            z, info = self.deq(f, z0, compute_jac_loss=compute_jac_loss, graph_slots=graph_slots,
                               graph_params=graph_params)
        if not torch.is_grad_enabled():
            self.fullstage.release()
        return z, info
