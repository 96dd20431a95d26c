"""TwoStageTraining in real Lightning Trainer runs on the CPU."""

import logging
from dataclasses import asdict

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy

from moe_mtl.training import TemperatureAnnealing, TwoStageTraining
from moe_mtl.training.schedules import warmup_steps_for

from ..conftest import tiny_data, tiny_module, tiny_trainer
from .conftest import STEPS, SWITCH, Recorder, assert_dense_weights, fit, routing_names

# --- TwoStageTraining -------------------------------------------------------------------------------------


def test_switch_fixes_argmax_routes_freezes_the_router_and_clears_only_its_optimizer_state(data, tmp_path):
    module = tiny_module(data)
    two_stage, before_switch = TwoStageTraining(switch_step=SWITCH), Recorder()
    recorder = fit(module, data, tmp_path, [TemperatureAnnealing(), before_switch, two_stage])
    routing = routing_names(module)
    before, at_switch = before_switch.steps[SWITCH], recorder.steps[SWITCH]  # the same batch, around the switch

    assert [s.stage for s in recorder.steps] == [1] * SWITCH + [2] * (STEPS - SWITCH)
    assert [s.selection for s in recorder.steps] == ["gumbel_st"] * SWITCH + ["argmax"] * (STEPS - SWITCH)
    assert (two_stage.switched_at, two_stage.stage) == (SWITCH, 2)
    # the options in effect, saved with checkpoints: `load_from_checkpoint` builds stage two from them
    assert module.hparams["moe"] == asdict(module.model.moe_options)
    assert module.hparams["moe"].items() >= {"selection": "argmax", "freeze_router": True}.items()
    assert routing <= before.trainable and not routing & at_switch.trainable
    assert at_switch.trainable == before.trainable - routing
    # Adam moments: cleared for the frozen router and task table, kept for everything else
    assert routing <= before.with_state
    assert at_switch.with_state == before.with_state - routing
    # frozen: bitwise unchanged by the later steps; the rest keeps training
    final = dict(module.model.named_parameters())
    assert all(torch.equal(final[name], at_switch.weights[name]) for name in routing)
    assert not torch.equal(final["model.shared.weight"], at_switch.weights["model.shared.weight"])
    # the routes are the router's argmax: one expert per task and layer
    routes = module.route_table()
    assert torch.equal(routes.sum(-1), torch.ones(routes.shape[:2])) and set(routes.unique().tolist()) == {0.0, 1.0}


def test_soft_stage_two_routes_are_what_evaluation_uses(data, tmp_path):
    """Stage two with softmax routes trains each task's soft mixture; validation, test and predict score that
    network, not the hard top-1 of its routes: at dropout 0, train- and eval-mode logits agree."""
    module = tiny_module(data)
    fit(module, data, tmp_path, [TwoStageTraining(switch_step=SWITCH, routes="softmax", temperature=3.0)])
    assert module.model.router.frozen and module.model.moe_options.freeze_router
    batch = next(iter(data.val_dataloader()))
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "labels", "task_ids")}
    training, evaluation = module.model.train()(**inputs), module.model.eval()(**inputs)
    torch.testing.assert_close(evaluation.logits, training.logits, rtol=0, atol=0)
    expected = module.route_table()[batch["task_ids"]]  # softmax(logits / 3), per example, layer and expert
    for j, record in enumerate(evaluation.routes.values()):
        torch.testing.assert_close(record.weights, expected[:, j])
        assert bool((record.weights > 0).all())


def test_switch_without_resetting_keeps_every_optimizer_state(data, tmp_path):
    before_switch = Recorder()
    callbacks = [before_switch, TwoStageTraining(switch_step=SWITCH, reset_optimizer_state=False)]
    recorder = fit(tiny_module(data), data, tmp_path, callbacks)
    assert recorder.steps[SWITCH].stage == 2
    assert recorder.steps[SWITCH].with_state == before_switch.steps[SWITCH].with_state


def test_switch_restarts_the_lr_warmup_and_decay_over_the_remaining_steps(data, tmp_path):
    module = tiny_module(data, optim={"warmup": 1, "lr": 1e-3})
    recorder = fit(module, data, tmp_path, [TwoStageTraining(switch_step=SWITCH)], max_steps=6)
    lrs = [s.lrs["backbone"] for s in recorder.steps]
    # stage one: warmup 1 step then decay over its 2 steps: factors 1/2, 1; stage two: warmup 1 of its 4 steps
    assert warmup_steps_for(1, 4) == 1
    assert lrs[:SWITCH] == pytest.approx([0.5e-3, 1e-3])
    assert lrs[SWITCH + 1 :] == pytest.approx([1e-3, 2 / 3 * 1e-3, 1 / 3 * 1e-3])
    assert module.lr_schedule.start_step == SWITCH and module.lr_schedule.total_steps == 4


def test_each_stage_has_its_own_warmup_and_decay(data, tmp_path):
    # warmup 0.5: 2 of stage one's 4 steps, then 2 of stage two's 4; factors (s+1)/3 in warmup, then linear decay
    module = tiny_module(data, optim={"warmup": 0.5, "lr": 1e-3})
    recorder = fit(module, data, tmp_path, [TwoStageTraining(switch_step=4)], max_steps=8)
    factors = [1 / 3, 2 / 3, 1, 1 / 2] * 2
    assert [s.lrs["backbone"] for s in recorder.steps] == pytest.approx([1e-3 * f for f in factors])


def test_without_restarts_one_schedule_spans_the_run(data, tmp_path):
    module = tiny_module(data, optim={"warmup": 0.25, "lr": 1e-3})
    recorder = fit(module, data, tmp_path, [TwoStageTraining(switch_step=4, restart_lr_schedule=False)], max_steps=8)
    factors = [1 / 3, 2 / 3, 1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6]  # warmup 2 of 8 steps, decay over 6
    assert [s.lrs["backbone"] for s in recorder.steps] == pytest.approx([1e-3 * f for f in factors])


def test_the_switch_step_itself_runs_at_the_warmup_start(data, tmp_path):
    module = tiny_module(data, optim={"warmup": 1, "lr": 1e-3})
    recorder = fit(module, data, tmp_path, [TwoStageTraining(switch_step=SWITCH)], max_steps=6)
    assert recorder.steps[SWITCH].lrs["backbone"] == pytest.approx(0.5e-3)


def test_switch_reinitialises_experts_from_the_dense_model_and_clears_all_optimizer_state(data, tmp_path, dense_dir):
    module = tiny_module(data)
    before_switch = Recorder()  # placed before TwoStageTraining: sees each batch's start before a switch
    callbacks = [before_switch, TwoStageTraining(switch_step=SWITCH, reinit_experts_from=dense_dir)]
    recorder = fit(module, data, tmp_path, callbacks)
    before, at_switch = before_switch.steps[SWITCH], recorder.steps[SWITCH]
    assert before.stage == 1 and at_switch.stage == 2
    assert before.with_state and not at_switch.with_state
    with pytest.raises(AssertionError, match=r"model\.shared\.weight"):  # stage one trained away from them
        assert_dense_weights(module, dense_dir, before.weights)
    assert_dense_weights(module, dense_dir, at_switch.weights)
    # router and task table are kept from stage one, and frozen from then on
    final = dict(module.model.named_parameters())
    for name in routing_names(module):
        assert torch.equal(at_switch.weights[name], before.weights[name])
        assert torch.equal(final[name], before.weights[name])
    with pytest.raises(AssertionError):  # the experts train on from the dense weights
        assert_dense_weights(module, dense_dir)


def test_switch_epoch_switches_at_the_start_of_that_epoch(data, tmp_path):
    recorder = fit(tiny_module(data), data, tmp_path, [TwoStageTraining(switch_epoch=1)], limit_train_batches=3)
    assert [s.stage for s in recorder.steps] == [1, 1, 1, 2, 2]


def test_a_run_resumed_in_stage_two_stays_there_and_matches_an_uninterrupted_run(data, tmp_path, dense_dir):
    def callbacks():
        return [TemperatureAnnealing(), TwoStageTraining(switch_step=SWITCH, reinit_experts_from=dense_dir)]

    checkpoints = ModelCheckpoint(tmp_path / "ckpt", filename="{step}", every_n_train_steps=4, save_top_k=-1)
    whole = tiny_module(data)
    whole_run = fit(whole, data, tmp_path, [*callbacks(), checkpoints], max_steps=6, enable_checkpointing=True)
    assert (tmp_path / "ckpt" / "step=4.ckpt").is_file()

    resumed_data = tiny_data(data.hparams.output_dir)
    resumed, resumed_callbacks = tiny_module(resumed_data, seed=1), callbacks()  # other initial weights
    recorder = Recorder()
    trainer = Trainer(**tiny_trainer(tmp_path, max_steps=6, callbacks=[*resumed_callbacks, recorder]))
    trainer.fit(resumed, datamodule=resumed_data, ckpt_path=tmp_path / "ckpt" / "step=4.ckpt")

    first, original = recorder.steps[0], whole_run.steps[4]
    assert (first.step, first.stage, first.selection) == (4, 2, "argmax")
    assert resumed_callbacks[1].switched_at == SWITCH and resumed.hparams["moe"]["freeze_task_table"]
    # not switched again: same trainable set, optimizer state kept, weights as saved (no re-initialisation)
    assert first.trainable == original.trainable and not routing_names(resumed) & first.trainable
    assert first.with_state == original.with_state and first.with_state
    assert first.lrs == original.lrs
    assert all(torch.equal(first.weights[name], original.weights[name]) for name in original.weights)
    with pytest.raises(AssertionError):  # experts trained since the switch differ from the dense weights
        assert_dense_weights(resumed, dense_dir, first.weights)
    # and it ends exactly where the uninterrupted run ended
    resumed_state = resumed.state_dict()
    assert resumed_state.keys() == whole.state_dict().keys()
    for name, tensor in whole.state_dict().items():
        assert torch.equal(resumed_state[name], tensor), name


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_run_resumed_in_stage_one_continues_exactly(data, tmp_path, accumulate):
    """Gumbel noise and dropout draw random numbers every micro-batch: seeded per step and micro-batch, a run
    resumed from any checkpoint ends bitwise where the uninterrupted run ends."""
    checkpoints = ModelCheckpoint(tmp_path / "ckpt", filename="{step}", every_n_train_steps=1, save_top_k=-1)
    whole = tiny_module(data, bart={"dropout": 0.3})
    options = dict(max_steps=STEPS, accumulate_grad_batches=accumulate)
    fit(whole, data, tmp_path, [TemperatureAnnealing(), checkpoints], enable_checkpointing=True, **options)
    for step in range(1, STEPS):
        resumed_data = tiny_data(data.hparams.output_dir)
        resumed = tiny_module(resumed_data, bart={"dropout": 0.3}, seed=1)  # other initial weights and seed
        trainer = Trainer(**tiny_trainer(tmp_path, callbacks=[TemperatureAnnealing()], **options))
        trainer.fit(resumed, datamodule=resumed_data, ckpt_path=tmp_path / "ckpt" / f"step={step}.ckpt")
        for name, tensor in whole.state_dict().items():
            assert torch.equal(resumed.state_dict()[name], tensor), (step, name)


def test_without_a_switch_training_has_one_stage_and_nothing_is_frozen(data, tmp_path, caplog):
    module = tiny_module(data)
    two_stage = TwoStageTraining()  # the default, as in the CLI's `two_stage` group without a switch
    with caplog.at_level(logging.INFO):
        recorder = fit(module, data, tmp_path, [TemperatureAnnealing(), two_stage])
    assert not two_stage.enabled and two_stage.switched_at is None
    assert [s.stage for s in recorder.steps] == [1] * STEPS
    assert [s.selection for s in recorder.steps] == ["gumbel_st"] * STEPS
    assert all(routing_names(module) <= s.trainable for s in recorder.steps)
    assert all(p.requires_grad for p in module.parameters())
    assert [r.getMessage() for r in caplog.records].count(
        "TwoStageTraining: no `switch_step` or `switch_epoch`: single-stage training"
    ) == 1
    assert module.trainer.logged_metrics["train/stage"] == 1.0  # truthful: learned routes, stage one throughout


def test_two_stage_training_constructor_errors_name_the_option():
    with pytest.raises(ValueError, match="TwoStageTraining: `switch_step` is 1 and `switch_epoch` 1; give at most one"):
        TwoStageTraining(switch_step=1, switch_epoch=1)
    with pytest.raises(ValueError, match="TwoStageTraining: `switch_epoch` is -1; it must be >= 0"):
        TwoStageTraining(switch_epoch=-1)
    with pytest.raises(ValueError, match="TwoStageTraining: `routes` is 'gumbel'; allowed: 'argmax', 'softmax'"):
        TwoStageTraining(switch_step=1, routes="gumbel")


@pytest.mark.parametrize("switch", [{"switch_step": 1}, {"switch_epoch": 0}])
def test_two_stage_training_needs_learned_routes_and_names_the_override_that_turns_it_off(data, tmp_path, switch):
    trainer = Trainer(**tiny_trainer(tmp_path))
    (option,) = switch
    with pytest.raises(
        ValueError,
        match=rf"TwoStageTraining needs learned task routes \(MoE options routing='task', routes='learned'\); this "
        rf"model has routing='task', routes='random'\. Turn two-stage training off with `--two_stage\.{option} null`",
    ):
        TwoStageTraining(**switch).setup(trainer, tiny_module(data, moe={"routes": "random"}), "fit")


def test_two_stage_training_under_ddp_needs_unused_parameter_detection(data, tmp_path):
    module = tiny_module(data)
    trainer = Trainer(**tiny_trainer(tmp_path, strategy="ddp"))
    assert isinstance(trainer.strategy, DDPStrategy)
    with pytest.raises(
        ValueError, match=r"TwoStageTraining fixes the routes .* `strategy: ddp_find_unused_parameters_true`"
    ):
        TwoStageTraining(switch_step=1).setup(trainer, module, "fit")
    TwoStageTraining(switch_step=1).setup(trainer, module, "validate")  # nothing trained, nothing to detect
    detecting = Trainer(**tiny_trainer(tmp_path, strategy="ddp_find_unused_parameters_true"))
    TwoStageTraining(switch_step=1).setup(detecting, module, "fit")
