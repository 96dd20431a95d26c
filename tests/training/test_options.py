"""The module's option groups: each check names the option and what is valid, and the groups round-trip as the
plain dicts kept in the hyper-parameters."""

from dataclasses import asdict

import pytest

from moe_mtl.errors import UsageError
from moe_mtl.training.options import (
    OPTION_GROUPS,
    EvaluationOptions,
    LossOptions,
    OptimizationOptions,
    TransferOptions,
    module_options,
)

BAD_VALUES = [
    (OptimizationOptions, {"lr": -1e-3}, "model option `optim.lr` is -0.001; give a learning rate >= 0"),
    (OptimizationOptions, {"router_lr": -1.0}, "model option `optim.router_lr` is -1.0; give a learning rate >= 0"),
    (OptimizationOptions, {"task_lr": float("nan")}, "model option `optim.task_lr` is nan; give a learning rate >= 0"),
    (OptimizationOptions, {"weight_decay": -0.01}, "model option `optim.weight_decay` is -0.01; give a value >= 0"),
    (
        OptimizationOptions,
        {"warmup": -1.0},
        "model option `optim.warmup` is -1.0; give a fraction of the steps in [0, 1) or a step count >= 1",
    ),
    (
        OptimizationOptions,
        {"betas": (0.9, 1.5)},
        "model option `optim.betas` is [0.9, 1.5]; give two values in [0, 1), e.g. [0.9, 0.999]",
    ),
    (
        OptimizationOptions,
        {"betas": (0.9,)},
        "model option `optim.betas` is [0.9]; give two values in [0, 1), e.g. [0.9, 0.999]",
    ),
    (
        LossOptions,
        {"label_smoothing": 1.5},
        "model option `loss.label_smoothing` is 1.5; give a value in [0, 1) (0: none; the paper's 0.1)",
    ),
    (LossOptions, {"aux_loss_weight": -1.0}, "model option `loss.aux_loss_weight` is -1.0; give a weight >= 0"),
    (
        LossOptions,
        {"route_balance_weight": float("inf")},
        "model option `loss.route_balance_weight` is inf; give a weight >= 0",
    ),
    (
        EvaluationOptions,
        {"num_beams": 0},
        "model option `evaluation.num_beams` is 0; it must be >= 1 (1: greedy decoding)",
    ),
    (
        TransferOptions,
        {"unseen_routes": "closest"},
        "model option `transfer.unseen_routes` is 'closest'; allowed: 'representation', 'nearest', 'average', "
        "'random', 'learned'",
    ),
    (
        TransferOptions,
        {"finetune": "router"},
        "model option `transfer.finetune` is 'router'; allowed: 'all', 'task_table'",
    ),
]


@pytest.mark.parametrize(("cls", "values", "message"), BAD_VALUES, ids=lambda value: str(value)[:40])
def test_each_check_names_the_option_and_what_is_valid(cls, values, message):
    with pytest.raises(UsageError) as raised:
        cls(**values)
    assert str(raised.value) == message


def test_finetuning_the_task_table_alone_needs_a_trainable_table():
    with pytest.raises(UsageError) as raised:
        module_options({"freeze_task_table": True}, transfer={"finetune": "task_table"})
    assert str(raised.value) == (
        "model option `transfer.finetune` is 'task_table', but moe.freeze_task_table is true: nothing would train"
    )


def test_unknown_keys_of_a_group_are_named():
    with pytest.raises(UsageError, match=r"unknown `model\.optim` options \['learning_rate'\]; allowed: betas, lr"):
        module_options(None, optim={"learning_rate": 1e-3})


def test_groups_are_built_from_dicts_with_the_defaults_and_round_trip_through_asdict():
    groups = module_options(None, optim={"lr": 2e-5}, loss=LossOptions(label_smoothing=0.0))
    assert set(groups) == set(OPTION_GROUPS)
    assert groups["optim"] == OptimizationOptions(lr=2e-5) and groups["loss"].label_smoothing == 0.0
    assert groups["evaluation"] == EvaluationOptions() and groups["transfer"] == TransferOptions()
    for group, options in groups.items():  # the hyper-parameters' plain dicts build the same options back
        assert module_options(None, **{group: asdict(options)})[group] == options


def test_learning_rates_per_group_and_the_one_speed_ablation():
    options = OptimizationOptions(lr=1e-5, router_lr=1e-3, task_lr=1e-2)
    assert options.learning_rates() == {"backbone": 1e-5, "router": 1e-3, "task_table": 1e-2}
    one_speed = OptimizationOptions(lr=1e-5, router_lr=1e-3, task_lr=1e-2, two_speed_lr=False)
    assert one_speed.learning_rates() == {"backbone": 1e-5, "router": 1e-5, "task_table": 1e-5}
