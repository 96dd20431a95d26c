"""What the training needs to know about the distributed strategy, checked before it would fail or mislead."""

from __future__ import annotations

from lightning.pytorch import Trainer
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy, Strategy

from ..errors import UsageError


def require_unused_parameter_detection(trainer: Trainer, why: str) -> None:
    """DDP must be told that some parameters (experts, the task table) get no gradient in a step, or it stops
    with "Expected to have finished reduction in the prior iteration"."""
    strategy = trainer.strategy
    plain_ddp = isinstance(strategy, DDPStrategy) and not isinstance(strategy, DeepSpeedStrategy)
    # read, not written: DDPStrategy (Lightning 2.6) keeps its DistributedDataParallel kwargs only in `_ddp_kwargs`.
    # The public `DistributedDataParallel.find_unused_parameters` exists once `strategy.setup` has wrapped the
    # model, after the callbacks' `setup` that calls this
    if plain_ddp and not strategy._ddp_kwargs.get("find_unused_parameters", False):
        raise UsageError(
            f"{why}, so some parameters get no gradient in a step; DDP needs to know: use trainer option "
            "`strategy: ddp_find_unused_parameters_true` (or DDPStrategy(find_unused_parameters=True))"
        )


def gradients_are_local(strategy: Strategy) -> bool:
    """Whether each rank's parameters hold the step's whole gradients in `.grad` (one device, DDP), which the
    optimizer then reads: not so under strategies that keep them in their own buffers or shards (DeepSpeed, FSDP)."""
    return isinstance(strategy, SingleDeviceStrategy | DDPStrategy) and not isinstance(strategy, DeepSpeedStrategy)
