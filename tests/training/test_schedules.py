"""The temperature schedules, the learning-rate warmup/decay and the warmup option."""

import math

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

from moe_mtl.training.schedules import WarmupLinearDecay, temperature_at, warmup_steps_for


@pytest.mark.parametrize(
    ("step", "expected"),
    [(0, 2.0), (1, 2.0 * math.exp(-3e-4)), (1000, 2.0 * math.exp(-0.3)), (9986, 0.1), (10_000, 0.1), (10**6, 0.1)],
)
def test_exp_temperature_is_the_papers_annealing_with_a_floor(step, expected):
    # max(2.0 · exp(−3e-4 · step), 0.1): the floor is reached at step ln(20) / 3e-4 ≈ 9986
    assert temperature_at(step, 2.0, 0.1) == pytest.approx(expected, rel=1e-12)
    assert temperature_at(step, 2.0, 0.1, "exp", 3e-4) == temperature_at(step, 2.0, 0.1)


def test_exp_temperature_floor_starts_where_the_curve_crosses_it():
    crossing = math.log(2.0 / 0.1) / 3e-4
    assert temperature_at(math.floor(crossing), 2.0, 0.1) > 0.1
    assert temperature_at(math.ceil(crossing), 2.0, 0.1) == 0.1


@pytest.mark.parametrize(
    ("schedule", "step", "expected"),
    [
        ("linear", 0, 300.0),
        ("linear", 25, 225.25),
        ("linear", 50, 150.5),
        ("linear", 100, 1.0),
        ("linear", 150, 1.0),
        ("cosine", 0, 300.0),
        ("cosine", 25, 1.0 + 299.0 * 0.5 * (1 + math.cos(math.pi / 4))),
        ("cosine", 50, 150.5),
        ("cosine", 100, 1.0),
        ("cosine", 150, 1.0),
    ],
)
def test_linear_and_cosine_go_from_start_to_end_and_stay_there(schedule, step, expected):
    assert temperature_at(step, 300.0, 1.0, schedule, total_steps=100) == pytest.approx(expected, rel=1e-12)


def test_rising_schedules_work_too():
    assert temperature_at(5, 1.0, 3.0, "linear", total_steps=10) == pytest.approx(2.0)
    assert temperature_at(10, 1.0, 3.0, "cosine", total_steps=10) == pytest.approx(3.0)


def test_temperature_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"step is -1; it must be >= 0"):
        temperature_at(-1, 2.0, 0.1)
    with pytest.raises(ValueError, match=r"temperature schedule is 'step'; allowed: exp, linear, cosine"):
        temperature_at(0, 2.0, 0.1, "step", total_steps=10)
    for total in (None, 0):
        with pytest.raises(ValueError, match=rf"the 'linear' temperature schedule needs total_steps >= 1, got {total}"):
            temperature_at(0, 2.0, 0.1, "linear", total_steps=total)


def test_warmup_linear_decay_ramps_peaks_and_decays_to_zero():
    schedule = WarmupLinearDecay(warmup_steps=3, total_steps=11)
    factors = [schedule(step) for step in range(13)]
    # warmup (step + 1) / (warmup + 1); peak 1 at step 3; then (11 − step) / 8 down to 0 at step 11, 0 after
    expected = [0.25, 0.5, 0.75, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8, 0.0, 0.0]
    assert factors == pytest.approx(expected, abs=1e-15)


def test_warmup_linear_decay_without_warmup_starts_at_the_peak():
    schedule = WarmupLinearDecay(warmup_steps=0, total_steps=4)
    assert [schedule(step) for step in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_a_restarted_schedule_counts_from_its_start_step():
    schedule = WarmupLinearDecay(warmup_steps=2, total_steps=10)
    schedule.restart(start_step=6, total_steps=4, warmup_steps=1)
    assert (schedule.start_step, schedule.total_steps, schedule.warmup_steps) == (6, 4, 1)
    assert [schedule(step) for step in range(6, 12)] == pytest.approx([0.5, 1.0, 2 / 3, 1 / 3, 0.0, 0.0])


def test_warmup_linear_decay_rejects_inconsistent_lengths():
    for warmup, total in ((5, 4), (-1, 4), (0, 0)):
        with pytest.raises(ValueError, match=rf"need 0 <= warmup_steps <= total_steps .* got {warmup}, {total}"):
            WarmupLinearDecay(warmup, total)


def _optimizer() -> torch.optim.Optimizer:
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    return torch.optim.SGD([{"params": params[:1], "lr": 1.0}, {"params": params[1:], "lr": 0.1}])


def _advance(scheduler: LambdaLR, steps: int) -> None:
    for _ in range(steps):
        scheduler.optimizer.step()
        scheduler.step()


def test_lambda_lr_state_dict_round_trips_a_restarted_schedule():
    original = WarmupLinearDecay(warmup_steps=2, total_steps=10)
    scheduler = LambdaLR(_optimizer(), original)
    _advance(scheduler, 4)
    original.restart(start_step=4, total_steps=6, warmup_steps=3)
    _advance(scheduler, 1)
    state = scheduler.state_dict()

    fresh = WarmupLinearDecay(warmup_steps=2, total_steps=10)  # as a resumed run builds it
    resumed = LambdaLR(_optimizer(), fresh)
    resumed.load_state_dict(state)
    assert vars(fresh) == {"warmup_steps": 3, "total_steps": 6, "start_step": 4}
    assert resumed.get_last_lr() == scheduler.get_last_lr() == pytest.approx([0.5, 0.05])
    _advance(scheduler, 3)
    _advance(resumed, 3)
    # step 8 is step 4 of the restarted schedule, past its warmup of 3: (6 − 4) / (6 − 3)
    assert resumed.get_last_lr() == scheduler.get_last_lr() == pytest.approx([2 / 3, 2 / 30])


@pytest.mark.parametrize(
    ("warmup", "total", "expected"),
    [(0.06, 1000, 60), (0.06, 30_000, 1800), (0.0, 100, 0), (0.5, 7, 4), (100, 1000, 100), (1, 50, 1), (500, 40, 40)],
)
def test_warmup_is_a_fraction_below_one_else_a_step_count(warmup, total, expected):
    assert warmup_steps_for(warmup, total) == expected


def test_negative_warmup_is_an_error():
    with pytest.raises(ValueError, match=r"`warmup` is -0.1; give a fraction .* or a step count >= 1"):
        warmup_steps_for(-0.1, 100)
