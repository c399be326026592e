"""The bad-step guard: no non-finite loss or gradient (or, on request, a diverged solve) reaches the weights,
the BatchNorm statistics or the optimizer state, and training stops after too many bad steps in a row."""
from __future__ import annotations

import logging
from typing import List

import torch
from torch import nn

from mdeq.utils import distributed as du
from mdeq.utils.errors import UserError

logger = logging.getLogger(__name__)


class TrainingDiverged(UserError, RuntimeError):
    """Raised after too many consecutive bad steps; the last good state has been checkpointed."""


class BadStepGuard:
    """Skips steps whose loss or gradients are not finite and stops after ``max_bad`` consecutive bad steps.

    Use: :meth:`snapshot` before the forward pass, then :meth:`apply` after the backward pass.
    """

    def __init__(self, max_bad: int, skip_diverged: bool = False) -> None:
        self.max_bad = max_bad
        self.skip_diverged = skip_diverged
        self.consecutive = 0
        self.total = 0
        self._buffers: List[torch.Tensor] = []

    def gradients_finite(self, model: nn.Module) -> bool:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads:
            return True
        norms = torch._foreach_norm(grads)
        return bool(torch.isfinite(torch.stack(norms)).all())

    def check(self, loss: torch.Tensor, model: nn.Module, diverged: bool = False) -> bool:
        """True when the step may be applied. All ranks agree: DDP has already averaged the gradients, so a bad
        loss on any rank makes every rank's gradients non-finite."""
        ok = bool(torch.isfinite(loss.detach()).all()) and self.gradients_finite(model) and not diverged
        ok = not du.any_rank(not ok, loss.device)
        if ok:
            self.consecutive = 0
        else:
            self.consecutive += 1
            self.total += 1
        return ok

    @property
    def exhausted(self) -> bool:
        return self.consecutive >= self.max_bad

    def snapshot(self, model: nn.Module) -> None:
        """Copies every buffer of the model (BatchNorm running statistics and batch counters) before a step."""
        self._buffers = [b.detach().clone() for b in model.buffers()]

    def _restore(self, model: nn.Module) -> None:
        with torch.no_grad():
            for b, saved in zip(model.buffers(), self._buffers):
                b.copy_(saved)

    def apply(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor, diverged: bool,
              epoch: int, step: int) -> bool:
        """Applies the optimizer step of a finished backward pass, or skips it.

        A step is skipped when the loss or a gradient is not finite, or (``skip_diverged``) when the forward solve
        diverged: the gradients are dropped, the buffers are restored from :meth:`snapshot` and the optimizer
        state is left untouched. Each skip is logged with the running counts.

        Returns:
            True when the step was applied.

        Raises:
            TrainingDiverged: after ``max_bad`` consecutive skipped steps.
        """
        if self.check(loss, model, self.skip_diverged and diverged):
            optimizer.step()
            return True
        self._restore(model)
        optimizer.zero_grad(set_to_none=True)
        logger.warning("epoch %d step %d: skipped a step with a non-finite loss or gradient or a diverged solve "
                       "(%d in a row, %d skipped steps in total)", epoch, step, self.consecutive, self.total)
        if self.exhausted:
            raise TrainingDiverged(
                f"{self.consecutive} consecutive bad steps (non-finite loss or gradients, or diverged solves) at "
                f"epoch {epoch}, step {step}; training stopped (TRAIN.MAX_BAD_STEPS is {self.max_bad}). Lower "
                f"TRAIN.LR, set TRAIN.CLIP, or raise TRAIN.MAX_BAD_STEPS.")
        return False
