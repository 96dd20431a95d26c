"""Per-group gradient clipping: `GroupGradientClipping`, a callback for any LightningModule whose optimizer parameter
groups carry a "name", and the pure functions it is made of.

Lightning clips one norm over all parameters (`Trainer(gradient_clip_val=...)`); a limit per group of parameters is
its issue #4767. Here a group is named by the "name" key of the optimizer's parameter groups, the key
`LearningRateMonitor` reads too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    SingleDeviceStrategy,
    Strategy,
    XLAStrategy,
)
from lightning.pytorch.utilities import rank_zero_warn

from ...errors import UsageError

# where a LightningModule may declare a dict to receive the norms (`GroupGradientClipping`, "Norms for the module")
NORMS_ATTRIBUTE = "pre_clip_grad_norms"


def in_group(name: str | None, key: str) -> bool:
    """Whether a parameter group named `name` belongs to the clipping group `key`: named `key` or `key.<anything>`
    (e.g. "backbone" holds "backbone" and "backbone.no_decay")."""
    return name is not None and (name == key or name.startswith(f"{key}."))


def clipping_groups(param_groups: Sequence[Mapping[str, Any]], keys: Iterable[str]) -> dict[str, list[torch.Tensor]]:
    """The parameters of each clipping group `key`: those of every optimizer parameter group in it (`in_group`),
    in the optimizer's order. A key that no parameter group belongs to gets an empty list."""
    return {
        key: [param for group in param_groups if in_group(group.get("name"), key) for param in group["params"]]
        for key in keys
    }


def group_grad_norms(
    groups: Mapping[str, Sequence[torch.Tensor]],
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    device: torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """Each group's gradient L2 norm over the grads present, as `torch.nn.utils.clip_grad_norm_` computes it. A group
    with no grad (on any rank) is left out; a grad holding inf or nan makes its group's norm non-finite.

    all_reduce: None when each rank holds whole gradients (one device; DDP, whose grads are all-reduced by now).
        Else it sums a tensor over the ranks, each of which holds a shard of the gradients (FSDP): the norm is
        then the square root of the summed squared norms of the shards, one all-reduce of a (G, 2) tensor for the
        G groups (squared norm, whether the rank holds a grad), on `device`.
    """
    grads = {key: [param.grad for param in params if param.grad is not None] for key, params in groups.items()}
    if all_reduce is None:
        return {key: torch.nn.utils.get_total_norm(present) for key, present in grads.items() if present}
    rows = [
        torch.stack([torch.nn.utils.get_total_norm(present).float().to(device) ** 2, torch.ones((), device=device)])
        if present
        else torch.zeros(2, device=device)
        for present in grads.values()
    ]
    sums = all_reduce(torch.stack(rows))  # (G, 2), summed over the ranks
    holders = sums[:, 1].tolist()
    return {key: sums[i, 0].sqrt() for i, key in enumerate(grads) if holders[i] > 0}


def clip_to_max_norms(
    groups: Mapping[str, Sequence[torch.Tensor]], max_norms: Mapping[str, float], norms: Mapping[str, torch.Tensor]
) -> None:
    """Scale each group's grads in place by min(1, max_norm / (norm + 1e-6)), as `clip_grad_norm_` does, `norms` being
    the groups' norms (`group_grad_norms`; a shard's grads are scaled by the norm of the whole gradient)."""
    for key, norm in norms.items():
        with_grad = [param for param in groups[key] if param.grad is not None]  # it scales each one's `.grad`
        torch.nn.utils.clip_grads_with_norm_(with_grad, max_norms[key], norm)


def gradients_are_sharded(strategy: Strategy) -> bool:
    """Whether each rank holds only a shard of the gradients at `on_before_optimizer_step` (FSDP), rather than all of
    them (one device; DDP after its all-reduce). Raises where this callback cannot see the gradients it would clip."""
    name = type(strategy).__name__
    if isinstance(strategy, FSDPStrategy):
        sharding = strategy.sharding_strategy.name
        if "HYBRID" in sharding:
            raise UsageError(
                f"GroupGradientClipping: FSDP sharding_strategy {sharding} shards gradients within a node and "
                "replicates them across nodes, which this callback cannot sum correctly; use FULL_SHARD, "
                "SHARD_GRAD_OP or NO_SHARD"
            )
        return sharding != "NO_SHARD"
    if isinstance(strategy, DeepSpeedStrategy):
        raise UsageError(
            f"GroupGradientClipping cannot clip under {name}: DeepSpeed keeps gradients in its engine's buffers and "
            "clips them itself (its `gradient_clipping` setting); train with one device, DDP or FSDP"
        )
    if isinstance(strategy, XLAStrategy):
        raise UsageError(
            f"GroupGradientClipping cannot clip under {name}: XLA all-reduces gradients inside its optimizer step, "
            "after `on_before_optimizer_step`; train with one device, DDP or FSDP"
        )
    if isinstance(strategy, SingleDeviceStrategy | DDPStrategy):
        return False
    raise UsageError(
        f"GroupGradientClipping supports one device, DDP and FSDP, not {name} (whose gradients may be sharded or "
        "reduced elsewhere)"
    )


def optimizer_unscales_itself(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer unscales 16-mixed grads inside its step (fused Adam(W), SGD), as torch's GradScaler and
    Lightning's mixed-precision plugin read it; its grads are then still scaled at `on_before_optimizer_step`."""
    return getattr(optimizer, "_step_supports_amp_scaling", False)


class GroupGradientClipping(Callback):
    """Clip the gradients of each named group of parameters to its own max L2 norm, before every optimizer step.

    Works with any LightningModule whose `configure_optimizers` names its parameter groups, e.g.
    `AdamW([{"params": body, "name": "backbone"}, {"params": head, "name": "head", "lr": 1e-3}])`, and
    `GroupGradientClipping(max_norms={"backbone": 1.0, "head": 5.0})`. A key clips every parameter group named
    `key` or `key.<anything>` as one: "backbone" holds "backbone" and "backbone.no_decay" (the decayed and not decayed
    halves of one group). Its norm is the L2 norm of all their grads together, as `torch.nn.utils.clip_grad_norm_`
    computes it, and its grads are scaled by min(1, max_norm / (norm + 1e-6)). Groups no key names are not clipped.
    A key that no parameter group belongs to is warned about at fit start, naming the groups the optimizer has
    (a config's "router" limit over a model without a router group); groups without any name are an error.

    When: in `on_before_optimizer_step`, where Lightning hands over complete, unscaled gradients: after the last
    accumulated backward, whose DDP all-reduce or FSDP reduce-scatter is done, and after a 16-mixed GradScaler has
    unscaled them. The Trainer's `gradient_clip_val` (`configure_gradient_clipping`) still applies, after this.
    A fused optimizer unscales 16-mixed grads inside its own step, after this hook: refused, as Lightning refuses
    `gradient_clip_val` with it.

    Logs `grad_norm/<key>`: each group's norm before clipping, every step (groups without a gradient are left out).

    Strategies: one device and DDP (complete grads on every rank); FSDP (FULL_SHARD, SHARD_GRAD_OP, NO_SHARD, with
    `use_orig_params=True`, Lightning's default): each rank sums the squares of its shards and one all-reduce gives
    every group's norm. DeepSpeed, XLA, hybrid FSDP and `ModelParallelStrategy` are refused at fit start.

    Norms for the module: a LightningModule that declares an attribute `pre_clip_grad_norms` (a dict) gets the norms
    there too, {key: norm before clipping}, from this hook until the end of the training batch, so that a later
    `on_before_optimizer_step` (the module's, or `NanGuard`'s after this callback) can check them for inf and nan
    without reading the gradients again. Other modules are left alone.

    Args:
        max_norms: Max gradient L2 norm per group: a key clips the optimizer's parameter groups named `key` or
            `key.<anything>` together, e.g. {"backbone": 1.0, "router": 1.0}; None or {}: nothing is clipped or
            logged.
    """

    def __init__(self, max_norms: dict[str, float] | None = None):
        self.max_norms = dict(max_norms or {})
        for key, max_norm in self.max_norms.items():
            if not max_norm > 0:  # 0 would zero the grads, a negative limit flip them
                raise UsageError(f"GroupGradientClipping: max_norms[{key!r}] is {max_norm}; give a max norm > 0")
        for outer in self.max_norms:
            for inner in self.max_norms:
                if inner != outer and in_group(inner, outer):  # a parameter group in both would be clipped twice
                    raise UsageError(
                        f"GroupGradientClipping: max_norms has {outer!r} and {inner!r}, and {outer!r} holds {inner!r}; "
                        "give one of them"
                    )
        self._sharded = False

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.max_norms:
            return
        self._sharded = gradients_are_sharded(trainer.strategy)
        names = [group.get("name") for optimizer in trainer.optimizers for group in optimizer.param_groups]
        unknown = [key for key in self.max_norms if not any(in_group(name, key) for name in names)]
        named = [name for name in names if name is not None]
        if not named:
            raise UsageError(
                f"GroupGradientClipping: max_norms names {list(self.max_norms)}, but the optimizer's parameter groups "
                "have no 'name' (set one per group in `configure_optimizers`)"
            )
        if unknown:  # e.g. `router` under routes that are not learned (a baseline overlay): said, not an error
            rank_zero_warn(
                f"GroupGradientClipping: max_norms names {unknown}, which no parameter group is (or is under, as "
                f"'<key>.<anything>'): not clipped; the optimizer's parameter groups are named {named}"
            )
        scaled = getattr(trainer.precision_plugin, "scaler", None) is not None
        fused = [type(optimizer).__name__ for optimizer in trainer.optimizers if optimizer_unscales_itself(optimizer)]
        if scaled and fused:
            raise UsageError(
                f"GroupGradientClipping: {fused[0]} unscales 16-mixed gradients inside its step, after this callback "
                "would read them scaled; use it without `fused=True`, or bf16-mixed"
            )

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        # Lightning 2.6, plugins/precision/precision.py `_wrap_closure`: the closure (training step and backward: DDP
        # all-reduces, FSDP reduce-scatters, in the backward of the last accumulated batch) runs, then `_after_closure`
        # calls this hook, the module's, then `configure_gradient_clipping`. amp.py and fsdp.py (16-mixed) call
        # `scaler.unscale_` between the closure and `_after_closure`. So the grads here are complete and unscaled.
        if not self.max_norms:
            return
        groups = clipping_groups(optimizer.param_groups, self.max_norms)
        strategy = trainer.strategy
        all_reduce = (lambda sums: strategy.reduce(sums, reduce_op="sum")) if self._sharded else None
        norms = group_grad_norms(groups, all_reduce, strategy.root_device)
        clip_to_max_norms(groups, self.max_norms, norms)
        for key, norm in norms.items():  # the same on every rank: no sync_dist
            pl_module.log(f"grad_norm/{key}", norm, batch_size=1)
        if hasattr(pl_module, NORMS_ATTRIBUTE):
            setattr(pl_module, NORMS_ATTRIBUTE, norms)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        if self.max_norms and hasattr(pl_module, NORMS_ATTRIBUTE):  # this step's norms, not read in a later one
            setattr(pl_module, NORMS_ATTRIBUTE, {})
