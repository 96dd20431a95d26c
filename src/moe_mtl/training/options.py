"""The module's options, in groups (`--model.optim.lr`, `--model.loss.*`, `--model.evaluation.*`,
`--model.transfer.*`): dataclasses whose field docstrings are the `--help`, each checked when built."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Literal, TypeVar

from ..data import METRICS, PARTITIONS
from ..data.tasks import options_from_dict
from ..errors import UsageError
from ..models import MoEOptions
from ..representations.unseen_routes import UNSEEN_ROUTES

FINETUNE = ("all", "task_table")


def _check_number(option: str, value: Any, valid: Callable[[float], bool], allowed: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or not valid(value):
        raise UsageError(f"model option `{option}` is {value}; give {allowed}")


def _check_choice(option: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UsageError(f"model option `{option}` is {value!r}; allowed: {', '.join(map(repr, allowed))}")


@dataclass
class OptimizationOptions:
    """AdamW with a learning rate per parameter group (backbone, router, task table), warmup then linear decay."""

    lr: float = 1e-5
    """Learning rate of the backbone (experts and every other BART weight)."""
    router_lr: float = 1e-3
    """Learning rate of the router networks and token gates."""
    task_lr: float = 1e-2
    """Learning rate of the task table."""
    two_speed_lr: bool = True
    """Ye et al.'s two learning-rate speeds: router and task table train at `router_lr` and `task_lr`, faster than
    the experts (released: 1e-3 and 1e-2 vs 1e-5, INK-USC/CrossTaskMoE example_scripts/train_routing_bart.sh).
    False (the ablation): every group at `lr`."""
    weight_decay: float = 0.01
    """AdamW weight decay of matrices (none on biases and LayerNorm weights)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    warmup: float = 0.06
    """Warmup before the linear decay: a fraction of the training steps if below 1, else a step count."""

    def __post_init__(self) -> None:
        # torch would say only "Invalid learning rate", at the first step; 0 holds a group where it is (e.g. routes
        # pinned while the experts train)
        for option in ("lr", "router_lr", "task_lr"):
            _check_number(f"optim.{option}", getattr(self, option), lambda v: v >= 0, "a learning rate >= 0")
        _check_number("optim.weight_decay", self.weight_decay, lambda v: v >= 0, "a value >= 0")
        allowed = "a fraction of the steps in [0, 1) or a step count >= 1"
        _check_number("optim.warmup", self.warmup, lambda v: v >= 0, allowed)
        betas = list(self.betas)
        if len(betas) != 2 or not all(0 <= beta < 1 for beta in betas):
            raise UsageError(f"model option `optim.betas` is {betas}; give two values in [0, 1), e.g. [0.9, 0.999]")
        self.betas = (betas[0], betas[1])

    def learning_rates(self) -> dict[str, float]:
        """The learning rate of each parameter group (`optim.PARAMETER_GROUPS`)."""
        if not self.two_speed_lr:  # the ablation: routing learns at the experts' speed
            return dict.fromkeys(("backbone", "router", "task_table"), self.lr)
        return {"backbone": self.lr, "router": self.router_lr, "task_table": self.task_lr}


@dataclass
class LossOptions:
    """The training loss: label-smoothed NLL plus weighted auxiliary terms."""

    label_smoothing: float = 0.1
    """ε of the label-smoothed training loss."""
    aux_loss_weight: float = 0.01
    """Weight of the token-routing load-balancing loss in the training loss."""
    route_balance_weight: float = 0.0
    """Weight of the task-level balance term while routes are learned (stage one): KL(mean route of the seen tasks
    ‖ uniform) per routed layer, from softmax(router logits) over the whole task table, so that tasks spread over
    the experts instead of sharing the expert that every task's gradient favours; 0: off (the paper has no such
    term)."""

    def __post_init__(self) -> None:
        allowed = "a value in [0, 1) (0: none; the paper's 0.1)"
        _check_number("loss.label_smoothing", self.label_smoothing, lambda v: 0 <= v < 1, allowed)
        for option in ("aux_loss_weight", "route_balance_weight"):
            _check_number(f"loss.{option}", getattr(self, option), lambda v: v >= 0, "a weight >= 0")


@dataclass
class EvaluationOptions:
    """Generation and result files of validation, test and predict."""

    num_beams: int = 4
    """Beams of generation in validation, test and predict."""
    results_dir: str | None = None
    """Folder of evaluation files, route tables and predictions; None: the logger's run folder."""

    def __post_init__(self) -> None:
        if isinstance(self.num_beams, bool) or not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise UsageError(
                f"model option `evaluation.num_beams` is {self.num_beams}; it must be >= 1 (1: greedy decoding)"
            )


@dataclass
class TransferOptions:
    """Starting from the weights of an upstream run (`init_from`), and which weights train."""

    init_from: str | None = None
    """Start from the weights of an upstream `moe-mtl fit` run: its Lightning checkpoint (.ckpt), or its run folder
    (its single checkpoints/best-step*.ckpt, else checkpoints/last.ckpt). Not a resume: the optimizer, step counter
    and lr schedule are new. The architecture (bart sizes, pretrained, MoE shape options) is the upstream run's;
    the configured non-shape MoE options apply. Task-table rows are mapped by task name: a task the upstream run
    trained on keeps its row, the others get `unseen_routes`. With `moe-mtl test` and no `--ckpt_path`, this is
    zero-shot evaluation."""
    unseen_routes: Literal["representation", "nearest", "average", "random", "learned"] = "nearest"
    """Route of a task the upstream run did not train on (`init_from`): "representation" (its representation as its
    row, through the trained router), "nearest" (the row of the nearest trained task by cosine similarity of
    representations), "average" (uniform weights over experts), "random" (seeded by moe.route_seed: top_k random
    experts per routed layer), "learned" (a new row, the mean of the trained rows, trained on the task's data; the
    router is frozen). See `moe_mtl.representations.unseen_routes`."""
    representation: str = "text"
    """Task representations of "representation" and "nearest": "text" or "fisher" (computed with the model's own
    encoder), "text:<folder>" (text representations from a local Hugging Face encoder folder and its tokenizer, e.g.
    the pretrained sentence encoder all-MiniLM-L6-v2: `moe_mtl.representations.pretrained.minilm_folder`), each
    cached in `<data output_dir>/representations`; or a representation file (`moe-mtl represent`)."""
    finetune: Literal["all", "task_table"] = "all"
    """Which weights train: "all", or "task_table" only (everything else frozen, e.g. with `unseen_routes:
    learned`)."""

    def __post_init__(self) -> None:
        _check_choice("transfer.unseen_routes", self.unseen_routes, UNSEEN_ROUTES)
        _check_choice("transfer.finetune", self.finetune, FINETUNE)


# the option groups of the module: its argument name → the dataclass
OPTION_GROUPS = {
    "optim": OptimizationOptions,
    "loss": LossOptions,
    "evaluation": EvaluationOptions,
    "transfer": TransferOptions,
}
Options = TypeVar("Options")


def options_group(cls: type[Options], value: Options | dict[str, Any] | None, group: str) -> Options:
    """`value` as the dataclass `cls` of the option group `group`: as given, or built from its dict form (a config,
    a checkpoint's hyper-parameters), naming unknown keys."""
    return value if isinstance(value, cls) else options_from_dict(cls, value, f"model.{group}")


def module_options(moe: MoEOptions | dict[str, Any] | None, **groups: Any) -> dict[str, Any]:
    """The option groups `groups` of the module (`OPTION_GROUPS`: each a dataclass, its dict form or None for the
    defaults), built and so checked, and checked together with the MoE options `moe`: what needs no data or model.
    The CLI checks them before the data are prepared, the module when it is built."""
    built = {group: options_group(cls, groups.get(group), group) for group, cls in OPTION_GROUPS.items()}
    moe = moe or {}
    frozen_table = moe.freeze_task_table if isinstance(moe, MoEOptions) else moe.get("freeze_task_table", False)
    if built["transfer"].finetune == "task_table" and frozen_table:
        raise UsageError(
            "model option `transfer.finetune` is 'task_table', but moe.freeze_task_table is true: nothing would train"
        )
    return built


def grouped_hyperparameters(hparams: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The option groups of a checkpoint's hyper-parameters. A checkpoint written before the groups existed holds
    their fields at the top level (`lr`, `num_beams`, `init_from`, …): they are put in their groups, so that such a
    checkpoint loads with its own values, not the defaults (Lightning drops keys the constructor does not name)."""
    groups = {group: dict(hparams.get(group) or {}) for group in OPTION_GROUPS}
    for group, cls in OPTION_GROUPS.items():
        for option in (field.name for field in fields(cls)):
            if option in hparams:
                groups[group].setdefault(option, hparams[option])
    return groups


def task_lists(
    num_tasks: int, names: list[str] | None, metrics: list[str] | None, partitions: list[str] | None
) -> tuple[list[str], list[str], list[str]]:
    """One name, CrossFit metric and partition per task of the model's task table (None: `task<i>`, "EM",
    "train"), each one that exists: found when the module is built rather than at the end of the first
    validation."""
    names = names or [f"task{i}" for i in range(num_tasks)]
    metrics = metrics or ["EM"] * num_tasks
    partitions = partitions or ["train"] * num_tasks
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
    return names, metrics, partitions


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
