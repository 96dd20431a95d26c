"""Parameter groups (backbone / router / task table), and the expert masks of expert-sparse updates."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..errors import UsageError
from ..models import MoEBartForConditionalGeneration

PARAMETER_GROUPS = ("backbone", "router", "task_table")


def parameter_group(name: str) -> str:
    """The group of a parameter by its name: the task table, the router (task routers and token gates),
    or the backbone (experts and every other BART weight)."""
    parts = name.split(".")
    if "task_table" in parts:
        return "task_table"
    if "router" in parts or "gate" in parts:
        return "router"
    return "backbone"


def decays(name: str, param: nn.Parameter) -> bool:
    """Weight decay applies to matrices only: biases and LayerNorm weights (all 1-d) are left alone."""
    return param.ndim >= 2


def build_param_groups(model: nn.Module, lrs: Mapping[str, float], weight_decay: float) -> list[dict[str, object]]:
    """AdamW groups: each of `PARAMETER_GROUPS` split into decayed and not decayed parameters.

    Frozen parameters are kept (their grads stay None, so the optimizer skips them): the group layout
    is the same before and after a stage switch freezes the router, and a resumed run loads it.
    Each group carries "group" (its `PARAMETER_GROUPS` name) and "name" (e.g. "router.no_decay"), so that the
    `GroupGradientClipping` key "router" clips "router" and "router.no_decay": the parameters of group "router".
    """
    missing = set(PARAMETER_GROUPS) - set(lrs)
    if missing:
        raise UsageError(f"learning rates missing for parameter groups {sorted(missing)}")
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        buckets.setdefault((parameter_group(name), decays(name, param)), []).append(param)
    groups = []
    for group in PARAMETER_GROUPS:
        for decay in (True, False):
            params = buckets.get((group, decay))
            if params:
                groups.append(
                    {
                        "params": params,
                        "lr": lrs[group],
                        "weight_decay": weight_decay if decay else 0.0,
                        "group": group,
                        "name": group if decay else f"{group}.no_decay",
                    }
                )
    return groups


def build_optimizer(
    model: nn.Module, lrs: Mapping[str, float], weight_decay: float, betas: tuple[float, float], mixed_precision: bool
) -> torch.optim.AdamW:
    """AdamW over `build_param_groups(model, lrs, weight_decay)`, fused on the CPU unless under mixed precision."""
    groups = build_param_groups(model, lrs, weight_decay)
    # fused on the CPU: one vectorised kernel for every tensor, ~4x faster than torch's CPU default (a Python loop
    # per tensor); about a tenth of a quick-start step. Not under mixed precision: a fused optimizer unscales
    # 16-mixed grads itself, after `GroupGradientClipping` would have read them scaled, and Lightning's
    # mixed-precision plugin (bf16 too) refuses `gradient_clip_val` with it. Elsewhere torch's default (foreach)
    on_cpu = all(param.device.type == "cpu" for group in groups for param in group["params"])
    fused = True if on_cpu and not mixed_precision else None
    return torch.optim.AdamW(groups, lr=lrs["backbone"], betas=tuple(betas), fused=fused)


def applied_learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The learning rate each parameter group's step applies, by group name (its decayed half's, from
    `build_param_groups`): 0 for a frozen group (router, task table in stage two), which moves nothing."""
    return {
        group["name"]: group["lr"] if any(p.requires_grad for p in group["params"]) else 0.0
        for group in optimizer.param_groups
        if not group["name"].endswith("no_decay")
    }


def group_parameters(optimizer: torch.optim.Optimizer) -> dict[str, list[torch.Tensor]]:
    """Parameters per `PARAMETER_GROUPS` name, over the optimizer's groups (decayed and not)."""
    params: dict[str, list[torch.Tensor]] = {}
    for group in optimizer.param_groups:
        params.setdefault(group.get("group", "backbone"), []).extend(group["params"])
    return params


def routed_experts(model: MoEBartForConditionalGeneration) -> Iterable[tuple[str, int]]:
    """(routed layer name, expert index) of every expert in the model."""
    for layer in model.routed_layer_names:
        for expert in range(model.moe_options.num_experts):
            yield layer, expert


def expert_usage(model: MoEBartForConditionalGeneration, expert_mask: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The per-layer `used` masks of a forward pass (`out.expert_mask`) as one (L, E) bool tensor, in
    `routed_layer_names` order, so a single all-reduce combines them across ranks."""
    return torch.stack([expert_mask[layer].bool() for layer in model.routed_layer_names])


def drop_unrouted_expert_grads(model: MoEBartForConditionalGeneration, used: torch.Tensor) -> int:
    """Set the grads of experts not in `used` (L, E) to None, so the optimizer skips them entirely:
    no weight decay and no step from stale Adam moments (a zero grad would still move them).

    Returns the number of experts dropped.
    """
    dropped = 0
    for (layer, expert), was_used in zip(routed_experts(model), used.flatten().tolist(), strict=True):
        if not was_used:
            for param in model.expert_parameters(layer, expert):
                param.grad = None
            dropped += 1
    return dropped
