"""A short textual summary of a model: parameter counts per top-level module."""
from __future__ import annotations

from collections import OrderedDict

from torch import nn


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def describe_model(model: nn.Module) -> str:
    """'Trainable parameters: N' followed by one line per top-level module."""
    per_module: "OrderedDict[str, int]" = OrderedDict()
    for name, p in model.named_parameters():
        if p.requires_grad:
            top = name.split(".")[0]
            per_module[top] = per_module.get(top, 0) + p.numel()
    lines = [f"Trainable parameters: {count_parameters(model):,}"]
    lines += [f"  {name:<20s} {n:>14,}" for name, n in per_module.items()]
    return "\n".join(lines)
