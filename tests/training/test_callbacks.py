"""TemperatureAnnealing, TwoStageTraining and RoutingMonitor in real Lightning Trainer runs on the CPU.

A `Recorder` placed after the callbacks under test snapshots the module at the start of every training
batch, i.e. what the coming optimizer step runs with; `steps[s]` is the state before optimizer step s + 1.
"""

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import BartConfig, BartForConditionalGeneration

from moe_mtl.analysis.plots import route_heatmap_figure
from moe_mtl.models.conversion import dense_name
from moe_mtl.training import RoutingMonitor, TemperatureAnnealing, TemperaturePlan, TwoStageTraining
from moe_mtl.training.schedules import temperature_at, warmup_steps_for

from .conftest import TINY_BART, tiny_data, tiny_module, tiny_trainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Lightning's hints about workers and logging

SWITCH = 2  # the stage switch of the two-stage runs
STEPS = 5


@dataclass
class Snapshot:
    step: int
    tasks: list[int]  # task ids of the batch
    stage: int
    selection: str | None  # None without a task router (token routing)
    temperature: float | None
    lrs: dict[str, float]  # per optimizer group name ("backbone", "router.no_decay", …)
    weights: dict[str, torch.Tensor]
    trainable: set[str]  # names of the parameters with requires_grad
    with_state: set[str]  # names of the parameters that have optimizer state


class Recorder(Callback):
    """Snapshots of the module at the start of every training batch."""

    def __init__(self):
        self.steps: list[Snapshot] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        optimizer = trainer.optimizers[0]
        params = dict(pl_module.model.named_parameters())
        router = pl_module.model.router
        self.steps.append(
            Snapshot(
                step=trainer.global_step,
                tasks=batch["task_ids"].unique().tolist(),
                stage=pl_module.stage,
                selection=None if router is None else router.selection,
                temperature=None if router is None else router.temperature.item(),
                lrs={group["name"]: group["lr"] for group in optimizer.param_groups},
                weights={name: p.detach().clone() for name, p in params.items()},
                trainable={name for name, p in params.items() if p.requires_grad},
                with_state={name for name, p in params.items() if optimizer.state.get(p)},
            )
        )


def routing_names(module) -> set[str]:
    return {name for name, _ in module.model.named_parameters() if ".router." in name or ".task_table." in name}


def fit(module, data, root, callbacks, **trainer_options) -> Recorder:
    recorder = Recorder()
    options = tiny_trainer(root, **{"max_steps": STEPS, **trainer_options}, callbacks=[*callbacks, recorder])
    Trainer(**options).fit(module, datamodule=data)
    return recorder


@pytest.fixture
def dense_dir(data, tmp_path) -> str:
    """A saved dense BART of the tiny modules' sizes and vocabulary (the stage-two re-initialisation source)."""
    config = BartConfig(vocab_size=data.vocab_size, pad_token_id=data.pad_token_id, **TINY_BART)
    BartForConditionalGeneration(config).save_pretrained(tmp_path / "dense")
    return str(tmp_path / "dense")


def assert_dense_weights(module, dense_dir: str, where: dict[str, torch.Tensor] | None = None) -> None:
    """Every MoE weight with a dense counterpart (every expert, embeddings, layer norms) equals it."""
    dense = BartForConditionalGeneration.from_pretrained(dense_dir).state_dict()
    weights = where if where is not None else dict(module.model.named_parameters())
    compared = 0
    for name, tensor in weights.items():
        if dense_name(name) in dense:
            assert torch.equal(tensor, dense[dense_name(name)]), name
            compared += 1
    assert compared == len(weights) - len(routing_names(module))


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


# --- TwoStageTraining -------------------------------------------------------------------------------------


def test_switch_fixes_argmax_routes_freezes_the_router_and_clears_only_its_optimizer_state(data, tmp_path):
    module = tiny_module(data)
    two_stage, before_switch = TwoStageTraining(switch_step=SWITCH), Recorder()
    recorder = fit(module, data, tmp_path, [TemperatureAnnealing(), before_switch, two_stage])
    routing = routing_names(module)
    before, at_switch = before_switch.steps[SWITCH], recorder.steps[SWITCH]  # the same batch, around the switch

    assert [s.stage for s in recorder.steps] == [1] * SWITCH + [2] * (STEPS - SWITCH)
    assert [s.selection for s in recorder.steps] == ["gumbel_st"] * SWITCH + ["argmax"] * (STEPS - SWITCH)
    assert (two_stage.switched_at, module.stage_info) == (SWITCH, {"routes": "argmax", "switch_step": SWITCH})
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
    module = tiny_module(data, warmup=1, lr=1e-3)
    recorder = fit(module, data, tmp_path, [TwoStageTraining(switch_step=SWITCH)], max_steps=6)
    lrs = [s.lrs["backbone"] for s in recorder.steps]
    # stage one: warmup 1 step then decay over its 2 steps: factors 1/2, 1; stage two: warmup 1 of its 4 steps
    assert warmup_steps_for(1, 4) == 1
    assert lrs[:SWITCH] == pytest.approx([0.5e-3, 1e-3])
    assert lrs[SWITCH + 1 :] == pytest.approx([1e-3, 2 / 3 * 1e-3, 1 / 3 * 1e-3])
    assert module.lr_schedule.start_step == SWITCH and module.lr_schedule.total_steps == 4


def test_each_stage_has_its_own_warmup_and_decay(data, tmp_path):
    # warmup 0.5: 2 of stage one's 4 steps, then 2 of stage two's 4; factors (s+1)/3 in warmup, then linear decay
    module = tiny_module(data, warmup=0.5, lr=1e-3)
    recorder = fit(module, data, tmp_path, [TwoStageTraining(switch_step=4)], max_steps=8)
    factors = [1 / 3, 2 / 3, 1, 1 / 2] * 2
    assert [s.lrs["backbone"] for s in recorder.steps] == pytest.approx([1e-3 * f for f in factors])


def test_without_restarts_one_schedule_spans_the_run(data, tmp_path):
    module = tiny_module(data, warmup=0.25, lr=1e-3)
    recorder = fit(module, data, tmp_path, [TwoStageTraining(switch_step=4, restart_lr_schedule=False)], max_steps=8)
    factors = [1 / 3, 2 / 3, 1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6]  # warmup 2 of 8 steps, decay over 6
    assert [s.lrs["backbone"] for s in recorder.steps] == pytest.approx([1e-3 * f for f in factors])


def test_the_switch_step_itself_runs_at_the_warmup_start(data, tmp_path):
    module = tiny_module(data, warmup=1, lr=1e-3)
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
    assert resumed_callbacks[1].switched_at == SWITCH and resumed.stage_info["switch_step"] == SWITCH
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


# --- RoutingMonitor ---------------------------------------------------------------------------------------


def _events(log_dir) -> EventAccumulator:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def test_routing_monitor_logs_entropies_utilisation_and_route_maps_and_saves_route_tables(data, tmp_path):
    module = tiny_module(data)
    logger = TensorBoardLogger(tmp_path, name="tb")
    options = dict(logger=logger, max_steps=4, val_check_interval=2, limit_val_batches=1)
    fit(module, data, tmp_path, [RoutingMonitor(every_n_steps=2, heatmap_every_n_steps=2)], **options)

    layers = module.model.routed_layer_names
    events = _events(logger.log_dir)
    scalars = set(events.Tags()["scalars"])
    expected = {"routing/entropy_per_task/mean", "routing/entropy_task_avg/mean"}
    for layer in layers:
        expected |= {f"routing/entropy_per_task/{layer}", f"routing/entropy_task_avg/{layer}"}
        expected |= {f"routing/utilisation/{layer}/expert{e}" for e in range(2)}
    assert expected <= scalars
    assert [e.step for e in events.Scalars("routing/entropy_per_task/encoder.0")] == [2, 4]
    assert [e.step for e in events.Images("routing/route_map")] == [2, 4]
    # with matplotlib (the `analysis` extra, in dev): the labelled figure of moe_mtl.analysis.plots, at its size
    image = events.Images("routing/route_map")[-1]
    figure = route_heatmap_figure(module.route_table(), data.task_names, layers, data.task_partitions)
    width, height = figure.get_size_inches() * figure.dpi
    assert (image.height, image.width) == (round(height), round(width))

    # the last logged values are those of the final route table, over the seen (training) tasks
    seen = module.route_table()[module.seen_tasks]  # (T_seen, L, E) learned softmax probabilities
    for j, layer in enumerate(layers):
        per_task = -(seen[:, j] * seen[:, j].log()).sum(-1).mean()
        share = seen[:, j].mean(0)
        averaged = -(share * share.log()).sum()
        assert events.Scalars(f"routing/entropy_per_task/{layer}")[-1].value == pytest.approx(per_task.item(), 1e-5)
        assert events.Scalars(f"routing/entropy_task_avg/{layer}")[-1].value == pytest.approx(averaged.item(), 1e-5)
        for e in range(2):
            value = events.Scalars(f"routing/utilisation/{layer}/expert{e}")[-1].value
            assert value == pytest.approx(share[e].item(), 1e-5)

    folder = Path(logger.log_dir) / "routes"
    assert sorted(p.name for p in folder.iterdir()) == ["step2.json", "step4.json"]
    record = json.loads((folder / "step4.json").read_text())
    assert (record["step"], record["tasks"], record["layers"], record["num_experts"]) == (4, data.task_names, layers, 2)
    routes = torch.tensor(record["routes"])
    assert routes.shape == (data.num_tasks, len(layers), 2)
    torch.testing.assert_close(routes, module.route_table(), atol=1e-6, rtol=0)


def test_uniform_routes_have_entropy_log_e_and_equal_utilisation(data, tmp_path):
    module = tiny_module(data, moe={"routes": "average"})
    logger = TensorBoardLogger(tmp_path, name="tb")
    fit(module, data, tmp_path, [RoutingMonitor(every_n_steps=1, heatmap=False)], logger=logger, max_steps=2)
    events = _events(logger.log_dir)
    assert "routing/route_map" not in events.Tags()["images"]
    for layer in [*module.model.routed_layer_names, "mean"]:
        for kind in ("entropy_per_task", "entropy_task_avg"):
            values = [e.value for e in events.Scalars(f"routing/{kind}/{layer}")]
            assert values == pytest.approx([math.log(2)] * 2, rel=1e-6)
    shares = [e.value for e in events.Scalars("routing/utilisation/decoder.1/expert1")]
    assert shares == pytest.approx([0.5, 0.5], rel=1e-6)


def test_token_routes_saved_at_a_logged_step_are_the_logged_ones(data, tmp_path):
    # token routing's route table averages the gate weights since it was last read; a validation at a step the
    # monitor has just logged must not save the empty (uniform) table of a second read
    module = tiny_module(data, moe={"routing": "token", "expert_unit": "ffn"})
    logger = TensorBoardLogger(tmp_path, name="tb")
    options = dict(logger=logger, max_steps=2, val_check_interval=2, limit_val_batches=1)
    recorder = fit(module, data, tmp_path, [RoutingMonitor(every_n_steps=2, heatmap=False)], **options)
    routes = torch.tensor(json.loads((Path(logger.log_dir) / "routes" / "step2.json").read_text())["routes"])
    trained = sorted({task for s in recorder.steps for task in s.tasks})
    assert (routes != 0.5).any(-1).any(-1).nonzero().flatten().tolist() == trained  # the others: uniform
    events = _events(logger.log_dir)
    share = routes[module.seen_tasks].mean(0)  # (L, E)
    for j, layer in enumerate(module.model.routed_layer_names):
        logged = [events.Scalars(f"routing/utilisation/{layer}/expert{e}")[-1].value for e in range(2)]
        assert logged == pytest.approx(share[j].tolist(), abs=1e-5)


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


@pytest.mark.parametrize(
    "moe", [{"routes": "random"}, {"routes": "average"}, {"routing": "token", "expert_unit": "ffn"}]
)
def test_fixed_routes_and_token_routing_have_no_temperature_to_anneal_nor_stage_to_log(data, tmp_path, moe):
    module = tiny_module(data, moe={**moe, "temperature": 1.5})
    annealing = TemperatureAnnealing(rate=0.5)
    recorder = fit(module, data, tmp_path, [annealing, TwoStageTraining()], max_steps=2)
    assert annealing.temperature is None and module.stage == 1
    assert [s.temperature for s in recorder.steps] == [None if module.model.router is None else 1.5] * 2
    assert "train/loss" in module.trainer.logged_metrics
    assert not {"train/stage", "train/temperature"} & set(module.trainer.logged_metrics)


# --- errors -----------------------------------------------------------------------------------------------


def test_constructor_errors_name_the_option():
    with pytest.raises(ValueError, match="TwoStageTraining: `switch_step` is 1 and `switch_epoch` 1; give at most one"):
        TwoStageTraining(switch_step=1, switch_epoch=1)
    with pytest.raises(ValueError, match="TwoStageTraining: `switch_epoch` is -1; it must be >= 0"):
        TwoStageTraining(switch_epoch=-1)
    with pytest.raises(ValueError, match="TwoStageTraining: `routes` is 'gumbel'; allowed: 'argmax', 'softmax'"):
        TwoStageTraining(switch_step=1, routes="gumbel")
    with pytest.raises(ValueError, match="RoutingMonitor: `every_n_steps` is 0; it must be >= 1"):
        RoutingMonitor(every_n_steps=0)
    with pytest.raises(ValueError, match="`heatmap_every_n_steps` is 75; it must be a positive multiple of"):
        RoutingMonitor(every_n_steps=50, heatmap_every_n_steps=75)
    with pytest.raises(ValueError, match="TemperatureAnnealing: schedule is 'step'; allowed: exp, linear, cosine"):
        TemperatureAnnealing(schedule="step")
    with pytest.raises(ValueError, match=r"TemperatureAnnealing: start \(2.0\) and end \(0.0\) must be > 0"):
        TemperatureAnnealing(end=0.0)


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
