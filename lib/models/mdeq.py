"""MDEQ classification and segmentation networks, and their builders from a config."""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from yacs.config import CfgNode as CN

from mdeq.config import ConfigError, resolve_alias
from mdeq.datasets.common import dataset_channels
from mdeq.models.mdeq_core import MDEQNet
from mdeq.modules.solvers import SOLVERS


class Bottleneck(nn.Module):
    """The head's bottleneck (expansion 4); its BatchNorms are not affine, as in the original."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, bn_momentum: float) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, momentum=bn_momentum, affine=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, momentum=bn_momentum, affine=False)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out, momentum=bn_momentum, affine=False)
        self.downsample = None
        if inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, bias=False),
                                            nn.BatchNorm2d(out, momentum=bn_momentum))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = self.downsample(x) if self.downsample is not None else x
        return F.relu(out + residual)


class MDEQClsNet(MDEQNet):
    """MDEQ for classification: the equilibrium states go through a bottleneck per resolution, are downsampled
    and summed into the lowest resolution, pooled, and classified.

    Args:
        head_channels: bottleneck width per resolution.
        final_chansize: channels of the final 1x1 layer.
        num_classes: classifier outputs.
        **kwargs: arguments of :class:`MDEQNet`.
    """

    def __init__(self, head_channels: Sequence[int], final_chansize: int, num_classes: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        bn_momentum = kwargs.get("bn_momentum", 0.1)
        if len(head_channels) != self.num_branches:
            raise ValueError(f"HEAD_CHANNELS has {len(head_channels)} entries but there are "
                             f"{self.num_branches} branches")
        exp = Bottleneck.expansion
        self.incre_modules = nn.ModuleList([
            nn.Sequential(Bottleneck(ch, head_channels[i], bn_momentum)) for i, ch in enumerate(self.num_channels)])
        self.downsamp_modules = nn.ModuleList([
            nn.Sequential(nn.Conv2d(head_channels[i] * exp, head_channels[i + 1] * exp, 3, stride=2, padding=1,
                                    bias=True),
                          nn.BatchNorm2d(head_channels[i + 1] * exp, momentum=bn_momentum),
                          nn.ReLU(inplace=True))
            for i in range(self.num_branches - 1)])
        self.final_layer = nn.Sequential(nn.Conv2d(head_channels[-1] * exp, final_chansize, 1),
                                         nn.BatchNorm2d(final_chansize, momentum=bn_momentum),
                                         nn.ReLU(inplace=True))
        self.classifier = nn.Linear(final_chansize, num_classes)

    def head(self, ys: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-resolution states -> logits (B, num_classes)."""
        y = self.incre_modules[0](ys[0])
        for i, down in enumerate(self.downsamp_modules):
            y = self.incre_modules[i + 1](ys[i + 1]) + down(y)
        y = self.final_layer(y)
        return self.classifier(y.mean(dim=(2, 3)))


class MDEQSegNet(MDEQNet):
    """MDEQ for segmentation: all resolutions upsampled to the highest, concatenated, and a 1x1 head.

    Args:
        num_classes: output classes.
        final_conv_kernel: kernel of the last convolution (1 or 3).
        **kwargs: arguments of :class:`MDEQNet`.
    """

    def __init__(self, num_classes: int, final_conv_kernel: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        bn_momentum = kwargs.get("bn_momentum", 0.01)
        ch = sum(self.num_channels)
        self.last_layer = nn.Sequential(
            nn.Conv2d(ch, ch, 1),
            nn.BatchNorm2d(ch, momentum=bn_momentum),
            nn.ReLU(inplace=True),
            nn.Conv2d(ch, num_classes, final_conv_kernel, padding=final_conv_kernel // 2))

    def head(self, ys: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-resolution states -> logits at the highest state resolution (B, num_classes, H0, W0)."""
        size = ys[0].shape[-2:]
        ups = [ys[0]] + [F.interpolate(y, size=size, mode="bilinear", align_corners=True) for y in ys[1:]]
        return self.last_layer(torch.cat(ups, dim=1))


def input_channels(cfg: CN) -> int:
    """MODEL.IN_CHANNELS, or what the dataset provides (see ``mdeq.datasets.common.dataset_channels``)."""
    if cfg.MODEL.IN_CHANNELS > 0:
        return int(cfg.MODEL.IN_CHANNELS)
    return dataset_channels(cfg)


def solver_name(cfg: CN, key: str) -> str:
    """The registered solver named by DEQ.<key>; an unknown name is a ConfigError naming the key."""
    value = str(cfg.DEQ[key]).lower()
    if value not in SOLVERS:
        raise ConfigError(f"config key DEQ.{key}: unknown name {cfg.DEQ[key]!r}; valid names are "
                          f"{', '.join(sorted(SOLVERS))}")
    return value


def deq_kwargs(cfg: CN) -> Dict[str, Any]:
    """The equilibrium-layer arguments of a config.

    The iteration caps are read through :func:`mdeq.config.resolve_alias`, so MODEL.F_THRES / B_THRES (the
    original's keys) and DEQ.F_THRES / B_THRES give the same model however the config was merged (this
    project's loader, or yacs' ``merge_from_file`` as in the original's scripts).
    """
    d = cfg.DEQ
    f_solver, b_solver = solver_name(cfg, "F_SOLVER"), solver_name(cfg, "B_SOLVER")
    f_options: Dict[str, Any] = {}
    b_options: Dict[str, Any] = {}
    for name, options in ((f_solver, f_options), (b_solver, b_options)):
        if name in ("broyden", "lbroyden"):
            options.update(memory=d.LBROYDEN_MEM, overflow=d.LBROYDEN_OVERFLOW.lower())
        elif name == "anderson":
            options.update(m=d.ANDERSON_M, beta=d.ANDERSON_BETA, lam=d.ANDERSON_LAM)
    b_thres = resolve_alias(cfg, "B_THRES") if d.B_CAP.lower() == "b_thres" else None
    return dict(f_solver=f_solver, b_solver=b_solver, f_thres=resolve_alias(cfg, "F_THRES"), b_thres=b_thres,
                stop_mode=d.STOP_MODE.lower(), f_eps=d.F_EPS if d.F_EPS > 0 else None,
                b_eps=d.B_EPS if d.B_EPS > 0 else None, eval_f_thres=d.EVAL_F_THRES or None,
                rand_f_thres_delta=d.RAND_F_THRES_DELTA, rand_f_thres_mode=d.RAND_F_THRES_MODE.lower(),
                backward=d.BACKWARD.lower(), phantom_steps=d.PHANTOM_STEPS, phantom_tau=d.PHANTOM_TAU,
                f_options=f_options, b_options=b_options, spectral_radius=d.SPECTRAL_RADIUS_MODE,
                warm_start=d.WARM_START, check_every=d.CHECK_EVERY, stop_scope=d.STOP_SCOPE.lower(),
                stall=d.STALL_STEPS, keep_start=d.KEEP_START, adjoint_init=d.ADJOINT_INIT.lower(),
                adjoint_at=d.ADJOINT_AT.lower(), jac_vecs=cfg.LOSS.JAC_LOSS_VECS,
                pretrain_jac_at=cfg.LOSS.PRETRAIN_JAC_AT.lower(), cuda_graph=bool(d.CUDA_GRAPH))


def _trunk_kwargs(cfg: CN, bn_momentum: float, in_channels: Optional[int]) -> Dict[str, Any]:
    stage = cfg.MODEL.EXTRA.FULL_STAGE
    return dict(num_channels=list(stage.NUM_CHANNELS), num_blocks=list(stage.NUM_BLOCKS),
                in_channels=in_channels if in_channels else input_channels(cfg),
                downsample_times=cfg.MODEL.DOWNSAMPLE_TIMES, expansion=cfg.MODEL.EXPANSION_FACTOR,
                num_groups=cfg.MODEL.NUM_GROUPS, dropout=cfg.MODEL.DROPOUT, wnorm=cfg.MODEL.WNORM,
                big_kernels=list(stage.BIG_KERNELS) or None, block_gn_affine=cfg.MODEL.BLOCK_GN_AFFINE,
                fuse_gn_affine=cfg.MODEL.FUSE_GN_AFFINE, post_gn_affine=cfg.MODEL.POST_GN_AFFINE,
                num_layers=cfg.MODEL.NUM_LAYERS, pretrain_steps=cfg.TRAIN.PRETRAIN_STEPS,
                bn_momentum=cfg.MODEL.BN_MOMENTUM if cfg.MODEL.BN_MOMENTUM >= 0 else bn_momentum,
                deq=deq_kwargs(cfg), channels_last=False)  # MODEL.CHANNELS_LAST: _performance_options


def get_cls_net(cfg: CN, in_channels: Optional[int] = None) -> MDEQClsNet:
    """The classification MDEQ described by cfg, initialised as the original does."""
    stage = cfg.MODEL.EXTRA.FULL_STAGE
    model = MDEQClsNet(head_channels=list(stage.HEAD_CHANNELS), final_chansize=stage.FINAL_CHANSIZE,
                       num_classes=cfg.MODEL.NUM_CLASSES, **_trunk_kwargs(cfg, 0.1, in_channels))
    if cfg.MODEL.INIT_WEIGHTS:
        model.init_weights()
    return _performance_options(cfg, model)


def _performance_options(cfg: CN, model: MDEQNet) -> MDEQNet:
    """Applies MODEL.CHANNELS_LAST (true, false or auto: a short probe picks the faster layout) and MODEL.COMPILE
    (neither changes what the model computes).

    The builder changes nothing outside the model: the process-wide allocator setting for CPU runs
    (:func:`mdeq.modules.optimizations.tune_cpu_allocator`) is the run set-up's to apply.
    """
    from mdeq.models.layout_probe import apply_layout_setting  # true / false / auto (probe)

    model = apply_layout_setting(cfg, model)
    if cfg.MODEL.COMPILE:
        model.compile_f_theta()
    return model


def get_seg_net(cfg: CN, in_channels: Optional[int] = None) -> MDEQSegNet:
    """The segmentation MDEQ described by cfg (MODEL.PRETRAINED is loaded by the caller, see utils.checkpoint)."""
    model = MDEQSegNet(num_classes=cfg.DATASET.NUM_CLASSES, final_conv_kernel=cfg.MODEL.EXTRA.FINAL_CONV_KERNEL,
                       **_trunk_kwargs(cfg, 0.01, in_channels))
    if cfg.MODEL.INIT_WEIGHTS:
        model.init_weights()
    return _performance_options(cfg, model)
