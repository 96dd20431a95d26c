"""TemperatureAnnealing in real Lightning Trainer runs on the CPU."""

import pytest
import torch

from moe_mtl.training import TemperatureAnnealing, TemperaturePlan, TwoStageTraining
from moe_mtl.training.schedules import temperature_at

from ..conftest import tiny_module
from .conftest import STEPS, SWITCH, fit

# --- TemperatureAnnealing ---------------------------------------------------------------------------------


def test_annealing_sets_the_papers_temperature_before_every_optimizer_step(data, tmp_path):
    module = tiny_module(data)
    annealing = TemperatureAnnealing(rate=0.45)  # fast, so that the floor is reached at the last step
    recorder = fit(module, data, tmp_path, [annealing], max_steps=8)
    expected = [temperature_at(step, 2.0, 0.1, "exp", 0.45) for step in range(8)]
    assert [s.step for s in recorder.steps] == list(range(8))
    # step s runs at τ(s): the first step at τ0 = 2.0; the buffer is fp32
    assert [s.temperature for s in recorder.steps] == [torch.tensor(t).item() for t in expected]
    assert expected[-1] == 0.1 < expected[-2]
    # after N steps the router holds τ(N − 1), the temperature of the last step taken
    assert module.model.router.temperature.item() == torch.tensor(expected[-1]).item()
    assert annealing.temperature == expected[-1]


def test_linear_annealing_spans_the_runs_steps_by_default(data, tmp_path):
    recorder = fit(tiny_module(data), data, tmp_path, [TemperatureAnnealing(4.0, 1.0, "linear")], max_steps=4)
    assert [s.temperature for s in recorder.steps] == [4.0, 3.25, 2.5, 1.75]


@pytest.mark.parametrize("annealing_first", [True, False])
def test_stage_two_schedule_runs_from_the_switch_whatever_the_callback_order(data, tmp_path, annealing_first):
    plan = TemperaturePlan(start=300.0, end=1.0, rate=0.1)
    callbacks = [TemperatureAnnealing(stage_two=plan), TwoStageTraining(switch_step=SWITCH, routes="softmax")]
    recorder = fit(tiny_module(data), data, tmp_path, callbacks if annealing_first else callbacks[::-1])
    stage_one = [temperature_at(step, 2.0, 0.1) for step in range(SWITCH)]
    stage_two = [temperature_at(step, 300.0, 1.0, "exp", 0.1) for step in range(STEPS - SWITCH)]
    assert [s.temperature for s in recorder.steps] == [torch.tensor(t).item() for t in stage_one + stage_two]
    assert [s.selection for s in recorder.steps] == ["gumbel_st"] * SWITCH + ["softmax"] * (STEPS - SWITCH)


def test_without_a_stage_two_schedule_the_switch_temperature_is_kept(data, tmp_path):
    callbacks = [TemperatureAnnealing(), TwoStageTraining(switch_step=SWITCH, routes="softmax", temperature=300.0)]
    recorder = fit(tiny_module(data), data, tmp_path, callbacks)
    assert [s.temperature for s in recorder.steps[SWITCH:]] == [300.0] * (STEPS - SWITCH)


def test_annealing_state_round_trips_and_warns_about_a_changed_schedule():
    saved = TemperatureAnnealing(3.0, 0.5, "cosine", total_steps=10, stage_two=TemperaturePlan(300.0, 1.0, rate=1e-4))
    saved.temperature = 1.25
    state = saved.state_dict()
    assert state == {
        "plan": {"start": 3.0, "end": 0.5, "schedule": "cosine", "rate": 3e-4, "total_steps": 10},
        "stage_two": {"start": 300.0, "end": 1.0, "schedule": "exp", "rate": 1e-4, "total_steps": None},
        "temperature": 1.25,
    }
    same = TemperatureAnnealing(3.0, 0.5, "cosine", total_steps=10, stage_two=TemperaturePlan(300.0, 1.0, rate=1e-4))
    same.load_state_dict(state)
    assert same.state_dict() == state
    other = TemperatureAnnealing()
    with pytest.warns(UserWarning, match=r"the checkpoint's schedule .* differs from this run's"):
        other.load_state_dict(state)
    assert other.temperature == 1.25 and other.plan == TemperaturePlan()  # this run's schedule is followed


@pytest.mark.parametrize(
    "moe", [{"routes": "random"}, {"routes": "average"}, {"routing": "token", "expert_unit": "ffn"}]
)
def test_fixed_routes_and_token_routing_have_no_temperature_to_anneal_nor_stage_to_log(data, tmp_path, moe):
    module = tiny_module(data, moe={**moe, "temperature": 1.5})
    annealing = TemperatureAnnealing(rate=0.5)
    two_stage = TwoStageTraining()
    recorder = fit(module, data, tmp_path, [annealing, two_stage], max_steps=2)
    assert annealing.temperature is None and two_stage.stage == 1
    assert [s.temperature for s in recorder.steps] == [None if module.model.router is None else 1.5] * 2
    assert "train/loss" in module.trainer.logged_metrics
    assert not {"train/stage", "train/temperature"} & set(module.trainer.logged_metrics)


def test_temperature_annealing_constructor_errors_name_the_option():
    with pytest.raises(ValueError, match="TemperatureAnnealing: schedule is 'step'; allowed: exp, linear, cosine"):
        TemperatureAnnealing(schedule="step")
    with pytest.raises(ValueError, match=r"TemperatureAnnealing: start \(2.0\) and end \(0.0\) must be > 0"):
        TemperatureAnnealing(end=0.0)
