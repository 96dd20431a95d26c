"""NanGuard: the policy for a non-finite training loss or gradient, stop with an error or skip the step and count it."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from ...errors import UsageError
from ..optim import PARAMETER_GROUPS, group_parameters
from .clipping import NORMS_ATTRIBUTE, group_grad_norms

log = logging.getLogger(__name__)

NAN_POLICIES = ("stop", "skip")


def optimizer_grad_norms(
    optimizer: torch.optim.Optimizer, known: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Each of the optimizer's `PARAMETER_GROUPS` gradient L2 norm over the grads present (`group_grad_norms` of its
    parameters; groups without a grad are left out). A norm is non-finite when a grad holds inf or nan.

    `known`: norms of some groups already computed from these grads, by `PARAMETER_GROUPS` name (those that
    `GroupGradientClipping` leaves in `pre_clip_grad_norms`), taken as they are instead of read again; other keys
    (e.g. a clipping key "backbone.no_decay", part of a group) are ignored.
    """
    norms = {group: norm for group, norm in (known or {}).items() if group in PARAMETER_GROUPS}
    unread = {group: params for group, params in group_parameters(optimizer).items() if group not in norms}
    return {**norms, **group_grad_norms(unread)}


class NanGuard(Callback):
    """A non-finite training loss, or non-finite gradients after a finite loss: "stop" with an error naming the step
    and the task, or "skip" the whole optimizer step on every rank, counted (logged as train/skipped_batches; the
    step counter, lr schedule and temperature still advance).

    When: the loss in `on_before_backward` (one all-reduce under DDP, so that every rank decides alike: a skip on one
    rank alone hangs DDP); the gradients in `on_before_optimizer_step`, complete there (accumulated, all-reduced).
    A skipped step's grads are all set to None, so the optimizer leaves every parameter and its AdamW state as it
    is; under 16-mixed the GradScaler skips non-finite gradients itself. The group norms left by
    `GroupGradientClipping` in the module's `pre_clip_grad_norms` are used as they are: one read of the grads
    instead of two.

    The `moe-mtl` command always has it, in its `nan_guard` group (`--nan_guard.policy skip`). A module trained
    without it has Lightning's default: a non-finite loss is trained on.

    Args:
        policy: "stop" or "skip".
    """

    def __init__(self, policy: Literal["stop", "skip"] = "stop"):
        if policy not in NAN_POLICIES:
            raise UsageError(f"NanGuard: `policy` is {policy!r}; allowed: {', '.join(map(repr, NAN_POLICIES))}")
        self.policy = policy
        self.skipped_batches = 0
        self._skip_step = False  # a batch since the last optimizer step had a non-finite loss
        self._tasks: list[str] = []  # of the running batch
        self._size = 1

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._tasks, self._size = sorted(set(batch["task_names"])), len(batch["task_ids"])

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach())
        bad = (~finite).float()
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce(bad, reduce_op="sum")
        if bad.item() == 0:
            return
        where = f"task {', '.join(self._tasks)}" if not finite else f"another rank (this rank: {self._tasks})"
        message = f"non-finite training loss at step {trainer.global_step} (epoch {trainer.current_epoch}), {where}"
        if self.policy == "stop":
            raise FloatingPointError(f"{message}; set `--nan_guard.policy skip` to skip such batches")
        # the backward still runs, on every rank (DDP's all-reduce); its grads are dropped before the step
        self.skipped_batches += 1
        self._skip_step = True
        log.warning("%s: batch skipped (%d so far)", message, self.skipped_batches)
        pl_module.log("train/skipped_batches", float(self.skipped_batches), batch_size=self._size)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        if not self._skip_step and not self._grads_are_finite(trainer, pl_module, optimizer):
            message = f"non-finite gradients at step {trainer.global_step} (epoch {trainer.current_epoch}), finite loss"
            if self.policy == "stop":
                raise FloatingPointError(f"{message}; set `--nan_guard.policy skip` to skip such steps")
            self.skipped_batches += 1
            log.warning("%s: step skipped (%d so far)", message, self.skipped_batches)
            self._skip_step = True
        if self._skip_step:  # a non-finite loss or gradient: the whole step is skipped
            self._skip_step = False
            for param in pl_module.parameters():
                param.grad = None

    @staticmethod
    def _grads_are_finite(trainer: Trainer, pl_module: LightningModule, optimizer) -> bool:
        if getattr(trainer.precision_plugin, "scaler", None) is not None:  # 16-mixed: GradScaler skips such steps
            return True
        # the clipped groups' norms come from the clipping callback: one read of the grads instead of two (the
        # check was ~7% of a quick-start step on the CPU as a pair of kernels per tensor)
        norms = optimizer_grad_norms(optimizer, known=getattr(pl_module, NORMS_ATTRIBUTE, None))
        return not norms or bool(torch.stack(list(norms.values())).isfinite().all())  # one device sync

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_batches": self.skipped_batches}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_batches = state_dict["skipped_batches"]
