"""What the training needs to know about the distributed strategy, checked before it would fail or mislead."""

from __future__ import annotations

from lightning.pytorch import Trainer
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy, Strategy

from ..errors import UsageError
from ..models import MoEBartForConditionalGeneration
from ..models.routing import SPARSE_SELECTIONS


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


def check_unused_parameters(trainer: Trainer, model: MoEBartForConditionalGeneration) -> None:
    """`require_unused_parameter_detection` where the model's routing leaves parameters without a gradient in a
    step: token routing, hard routes (random, given, argmax or sparse selections) and average routes over a task
    table that trains. Called at fit start: the routes of a run resumed in stage two are restored after `setup`."""
    options, router = model.moe_options, model.router
    if options.routing == "token":
        require_unused_parameter_detection(trainer, "token routing sends a rank's tokens to some experts")
    elif options.routes in ("random", "given") or router.selection in ("argmax", *SPARSE_SELECTIONS):
        hard = f"{router.selection} selection" if options.routes == "learned" else f"{options.routes} routes"
        require_unused_parameter_detection(trainer, f"routes are hard ({hard}), unchosen experts idle")
    elif options.routes == "average" and not options.freeze_task_table:
        require_unused_parameter_detection(trainer, "average routes leave the task table unused")


def gradients_are_local(strategy: Strategy) -> bool:
    """Whether each rank's parameters hold the step's whole gradients in `.grad` (one device, DDP), which the
    optimizer then reads: not so under strategies that keep them in their own buffers or shards (DeepSpeed, FSDP)."""
    return isinstance(strategy, SingleDeviceStrategy | DDPStrategy) and not isinstance(strategy, DeepSpeedStrategy)
