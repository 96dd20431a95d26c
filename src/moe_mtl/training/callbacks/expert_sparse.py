"""ExpertSparseUpdates: an expert that no example of the global batch routed to is left exactly as it is."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from ...errors import UsageError
from ..distributed import gradients_are_local
from ..optim import drop_unrouted_expert_grads, expert_usage


class ExpertSparseUpdates(Callback):
    """An expert that got zero routing weight from every example of the global batch (all ranks, all accumulated
    micro-batches) is left exactly as it is by the optimizer step: its grads are set to None, so AdamW skips it (no
    weight decay, no step from stale moments; a zero grad would still move it).

    How: a forward hook on the model, added at fit start, ORs each training forward pass's experts used
    (`out.expert_mask`); before the optimizer step one all-reduce (DDP) combines the ranks'. Needs the gradients in
    each parameter's `.grad`: one device or DDP (refused at fit start under FSDP and DeepSpeed).

    The `moe-mtl` command always has it, in its `expert_sparse_updates` group (`--expert_sparse_updates.enabled
    false` turns it off). A module trained without it is plain AdamW: every expert gets its weight decay and moments.
    Nothing to save: the usage is reset at every optimizer step, and checkpoints are taken between steps.

    Args:
        enabled: False leaves every expert to the optimizer.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._used: torch.Tensor | None = None  # (L, E) experts used since the last optimizer step
        self._hook = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or not self.enabled:
            return
        strategy = trainer.strategy
        if not gradients_are_local(strategy):
            raise UsageError(
                f"expert_sparse_updates cannot keep unrouted experts unchanged under {type(strategy).__name__}: "
                "it holds the gradients in its own buffers. Set `--expert_sparse_updates.enabled false`, or train "
                "with strategy 'ddp' or one device"
            )
        if self._hook is None:
            self._hook = pl_module.model.register_forward_hook(self._record_usage)

    def _record_usage(self, model, args, output) -> None:
        if model.training and torch.is_grad_enabled() and output.routes:  # training forward passes only
            used = expert_usage(model, output.expert_mask)
            self._used = used if self._used is None else self._used | used

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        if self._used is None:
            return
        used = self._used.float()
        self._used = None
        if trainer.world_size > 1:  # an expert used on any rank was updated there, so keep it
            used = trainer.strategy.reduce(used, reduce_op="sum")
        drop_unrouted_expert_grads(pl_module.model, used > 0)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._used = None

    def state_dict(self) -> dict[str, Any]:
        return {}  # nothing outlives an optimizer step

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass
