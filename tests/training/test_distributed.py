"""training/distributed.py: the strategy checks, on strategies built as a Trainer builds them (no processes start)."""

import pytest
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy

from moe_mtl.errors import UsageError
from moe_mtl.training.distributed import gradients_are_local, require_unused_parameter_detection


def trainer(strategy) -> Trainer:
    return Trainer(accelerator="cpu", devices=1, strategy=strategy, logger=False, enable_checkpointing=False)


@pytest.mark.parametrize("strategy", ["ddp", DDPStrategy(find_unused_parameters=False)])
def test_ddp_without_unused_parameter_detection_is_a_usage_error_naming_the_fix(strategy):
    with pytest.raises(UsageError, match=r"^routes are hard, so some .*`strategy: ddp_find_unused_parameters_true`"):
        require_unused_parameter_detection(trainer(strategy), "routes are hard")


@pytest.mark.parametrize(
    "strategy", ["ddp_find_unused_parameters_true", DDPStrategy(find_unused_parameters=True), "auto"]
)
def test_ddp_told_of_unused_parameters_and_one_device_pass(strategy):
    assert require_unused_parameter_detection(trainer(strategy), "routes are hard") is None  # no error


def test_gradients_are_local_on_one_device_and_under_ddp_not_under_fsdp():
    assert gradients_are_local(SingleDeviceStrategy("cpu"))
    assert gradients_are_local(DDPStrategy())
    assert not gradients_are_local(FSDPStrategy())
