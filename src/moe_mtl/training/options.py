"""The module's options that need no data or model, and what each allows."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..data import METRICS, PARTITIONS
from ..errors import UsageError
from ..models import MoEOptions

FINETUNE = ("all", "task_table")
NUMERIC_OPTIONS = {
    # 0 holds a group where it is (e.g. routes pinned while the experts train)
    "lr": (lambda v: v >= 0, "a learning rate >= 0"),
    "router_lr": (lambda v: v >= 0, "a learning rate >= 0"),
    "task_lr": (lambda v: v >= 0, "a learning rate >= 0"),
    "label_smoothing": (lambda v: 0 <= v < 1, "a value in [0, 1) (0: none; the paper's 0.1)"),
    "weight_decay": (lambda v: v >= 0, "a value >= 0"),
    "aux_loss_weight": (lambda v: v >= 0, "a weight >= 0"),
    "route_balance_weight": (lambda v: v >= 0, "a weight >= 0"),
    "warmup": (lambda v: v >= 0, "a fraction of the steps in [0, 1) or a step count >= 1"),
}


def check_module_options(options: Mapping[str, Any]) -> None:
    """The module's options that need no data or model, against what they allow: the CLI checks them before the data
    are prepared, the module when it is built (torch would say only "Invalid learning rate", at the first step)."""
    for name, (valid, allowed) in NUMERIC_OPTIONS.items():
        value = options.get(name)
        if value is not None and (not math.isfinite(value) or not valid(value)):
            raise UsageError(f"model option `{name}` is {value}; give {allowed}")
    betas = options.get("betas")
    if betas is not None and (len(betas) != 2 or not all(0 <= beta < 1 for beta in betas)):
        raise UsageError(f"model option `betas` is {list(betas)}; give two values in [0, 1), e.g. [0.9, 0.999]")
    if options.get("num_beams") is not None and options["num_beams"] < 1:
        raise UsageError(f"model option `num_beams` is {options['num_beams']}; it must be >= 1 (1: greedy decoding)")
    finetune = options.get("finetune", "all")
    if finetune not in FINETUNE:
        raise UsageError(f"model option `finetune` is {finetune!r}; allowed: {', '.join(map(repr, FINETUNE))}")
    moe = options.get("moe") or {}
    frozen_table = moe.freeze_task_table if isinstance(moe, MoEOptions) else moe.get("freeze_task_table", False)
    if finetune == "task_table" and frozen_table:
        raise UsageError(
            "model option `finetune` is 'task_table', but moe.freeze_task_table is true: nothing would train"
        )


def check_task_lists(num_tasks: int, names: list[str], metrics: list[str], partitions: list[str]) -> None:
    """One name, CrossFit metric and partition per task of the model's task table, each one that exists: found when
    the module is built rather than at the end of the first validation."""
    for option, values, allowed in (
        ("task_names", names, None),
        ("task_metrics", metrics, METRICS),
        ("task_partitions", partitions, PARTITIONS),
    ):
        if len(values) != num_tasks:
            raise UsageError(f"`{option}` names {len(values)} tasks; the model's task table has {num_tasks}")
        unknown = sorted(set(values) - set(allowed)) if allowed else []
        if unknown:
            raise UsageError(f"`{option}` has {unknown}; allowed: {', '.join(map(repr, allowed))}")


def check_checkpoint_tasks(saved: list[str] | None, names: list[str]) -> None:
    """A checkpoint's tasks (`saved`, None: unknown) are the data's `names`, in order: task ids index the task table."""
    if saved is None or list(saved) == list(names):
        return
    pairs = zip(saved, names, strict=False)
    first = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(saved), len(names)))
    raise UsageError(
        f"the checkpoint's {len(saved)} tasks differ from the data's {len(names)} from task id {first} on; task ids "
        "index the task table, so use the data options (source, partition) of training"
    )
