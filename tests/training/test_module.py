"""MoEMultiTaskModule in real Lightning Trainer runs on the CPU (one process, and 2-process DDP over gloo).

Tiny models (d_model 16, 2+2 layers) on two skill-suite tasks: "is_sorted" (labels yes/no,
Classification-F1) and "count" (numbers, ACC).
"""

import csv
import json
import warnings
from collections import defaultdict
from dataclasses import asdict

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from transformers import BartConfig, BartForConditionalGeneration

from moe_mtl.evaluation.metrics import score
from moe_mtl.models.compilation import compile_units
from moe_mtl.training import MoEMultiTaskModule, NanGuard, TemperatureAnnealing, TwoStageTraining
from moe_mtl.training.losses import label_smoothed_nll, route_balance
from moe_mtl.training.schedules import temperature_at

from ..models.conftest import TINY_BART
from .conftest import (
    SIZES,
    TASKS,
    MetricsLogger,
    expert_state,
    f32,
    make_data,
    make_module,
    make_trainer,
    same,
    tiny_data,
    tiny_module,
    tiny_trainer,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

# --- 1. training step: loss and logged values ----------------------------------------------------------


class LossProbe(Callback):
    """Before each training step, the loss of its batch computed outside Lightning on the same weights."""

    def __init__(self):
        self.expected: list[float] = []
        self.unsmoothed: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        with torch.no_grad():
            logits = pl_module(batch).logits
        self.expected.append(label_smoothed_nll(logits, batch["labels"], pl_module.loss.label_smoothing).item())
        self.unsmoothed.append(F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten()).item())


def test_training_step_logs_the_label_smoothed_loss_learning_rates_and_temperature(two_tasks):
    # softmax selection and no dropout: the training forward pass is deterministic
    module = make_module(
        two_tasks, moe={"selection": "softmax"}, loss={"label_smoothing": 0.2}, optim={"warmup": 0.5, "router_lr": 3e-3}
    )
    logger, probe = MetricsLogger(), LossProbe()
    annealing = TemperatureAnnealing(start=2.0, end=0.5, rate=0.5)
    callbacks = [annealing, TwoStageTraining(), probe]  # TwoStageTraining logs the stage: one, as the CLI's default
    make_trainer(logger=logger, log_every_n_steps=1, callbacks=callbacks).fit(module, datamodule=two_tasks)

    logged = logger.metrics
    assert logged["train/loss"] == [f32(v) for v in probe.expected]
    # ε is applied (not at step 0: a fresh model is near uniform, where smoothing barely changes the loss)
    assert all(abs(s - u) > 1e-2 for s, u in zip(probe.expected[1:], probe.unsmoothed[1:], strict=True))
    # warmup 0.5 of 4 steps = 2 steps: factors 1/3, 2/3, then linear decay 1, 1/2
    factors = [1 / 3, 2 / 3, 1.0, 0.5]
    for name, lr in (("backbone", 1e-2), ("router", 3e-3), ("task_table", 1e-2)):
        assert logged[f"lr/{name}"] == [f32(lr * f) for f in factors], name
    assert not any(key.endswith("no_decay") for key in logged)
    assert logged["train/temperature"] == [f32(temperature_at(s, 2.0, 0.5, rate=0.5)) for s in range(4)]
    assert logged["train/stage"] == [1.0] * 4


@pytest.mark.parametrize(
    ("moe", "why"),
    [
        ({"routes": "given", "given_routes": [[0] * 4, [1] * 4]}, r"routes are hard \(given routes\)"),
        ({"routes": "random"}, r"routes are hard \(random routes\)"),
        ({"selection": "argmax"}, r"routes are hard \(argmax selection\)"),
        ({"selection": "switch"}, r"routes are hard \(switch selection\)"),  # an expert may get no example
        ({"selection": "reinforce"}, r"routes are hard \(reinforce selection\)"),
        ({"routes": "average"}, "average routes leave the task table unused"),
        ({"routing": "token", "expert_unit": "ffn"}, "token routing"),
        ({"routes": "average", "freeze_task_table": True}, None),  # every trainable parameter gets a gradient
        ({}, None),  # learned soft or straight-through routes run every expert
    ],
)
def test_fit_start_asks_ddp_for_unused_parameter_detection_where_parameters_idle(two_tasks, moe, why):
    module = make_module(two_tasks, moe=moe)
    module.trainer = make_trainer(strategy=DDPStrategy())
    if why is None:
        module.on_fit_start()
    else:
        with pytest.raises(ValueError, match=f"{why}.*`strategy: ddp_find_unused_parameters_true`"):
            module.on_fit_start()
    module.trainer = make_trainer(strategy="ddp_find_unused_parameters_true")
    module.on_fit_start()


@pytest.mark.parametrize(
    "checkpoint",
    [
        {"callbacks": {"TwoStageTraining": {"switched_at": 3, "routes": "argmax"}}},
        {"moe_mtl": {"stage": 2, "stage_info": {"routes": "argmax", "switch_step": 3}}},  # an earlier moe-mtl's
    ],
    ids=["callback-state", "earlier-checkpoint"],
)
def test_a_run_resumed_in_stage_two_asks_ddp_for_unused_parameter_detection(two_tasks, checkpoint):
    # the checkpoint's stage-two routes are restored after `setup`, so the check must see them
    module = make_module(two_tasks)
    module.trainer = make_trainer(strategy=DDPStrategy())
    two_stage = TwoStageTraining(switch_step=3)
    two_stage.on_load_checkpoint(module.trainer, module, checkpoint)
    assert two_stage.switched_at == 3 and module.hparams["moe"]["selection"] == "argmax"
    with pytest.raises(ValueError, match="argmax selection"):
        module.on_fit_start()


# --- 5, 6. validation, test and predict ----------------------------------------------------------------


def always_yes(module: MoEMultiTaskModule) -> None:
    """Make the model generate "yes" for every input (a large bias on its token; max_target_length 2: "yes", EOS),
    so scores are not trivially 0: Classification-F1 on balanced yes/no labels is 1/3, ACC on numbers 0."""
    (yes,) = module.tokenizer("yes", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        module.model.final_logits_bias[0, yes] = 50.0


def expected_evaluation(module: MoEMultiTaskModule, loader) -> dict[str, dict[str, float]]:
    """Per task: generated predictions scored by the task's metric, and the token-weighted NLL, by hand."""
    module.eval()
    predictions, references = defaultdict(list), defaultdict(list)
    nll, tokens = defaultdict(float), defaultdict(int)
    with torch.no_grad():
        for batch in loader:
            (task,) = set(batch["task_names"])
            predictions[task] += module.generate(batch)
            references[task] += batch["references"]
            logits = module(batch).logits
            nll[task] += F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum").item()
            tokens[task] += int((batch["labels"] != -100).sum())
    metric = dict(zip(module.task_names, module.task_metrics, strict=True))
    return {
        task: {
            "score": score(metric[task], predictions[task], references[task]),
            "nll": nll[task],
            "tokens": tokens[task],
            "examples": len(predictions[task]),
        }
        for task in predictions
    }


@pytest.mark.parametrize("stage", ["val", "test"])
def test_evaluation_logs_scores_and_loss_and_writes_csv_and_json(two_tasks, tmp_path, stage):
    module = make_module(two_tasks, evaluation={"results_dir": str(tmp_path / "results")}, max_target_length=2)
    always_yes(module)
    trainer = make_trainer(limit_val_batches=None)
    run = trainer.validate if stage == "val" else trainer.test
    (logged,) = run(module, datamodule=two_tasks)
    expected = expected_evaluation(
        module, two_tasks.val_dataloader() if stage == "val" else two_tasks.test_dataloader()
    )

    assert sorted(expected) == sorted(TASKS)
    assert expected["is_sorted"]["score"] == pytest.approx(1 / 3) and expected["count"]["score"] == 0.0
    for task, values in expected.items():
        assert logged[f"{stage}/score/{task}"] == f32(values["score"])
        assert logged[f"{stage}/loss/{task}"] == pytest.approx(values["nll"] / values["tokens"], rel=1e-5)
    average = sum(v["score"] for v in expected.values()) / len(expected)
    assert logged[f"{stage}/score"] == f32(average)
    token_weighted = sum(v["nll"] for v in expected.values()) / sum(v["tokens"] for v in expected.values())
    assert logged[f"{stage}/loss"] == pytest.approx(token_weighted, rel=1e-5)

    folder = tmp_path / "results" / "evaluation"
    assert sorted(p.name for p in folder.iterdir()) == [f"{stage}-epoch0-step0.csv", f"{stage}-epoch0-step0.json"]
    with open(folder / f"{stage}-epoch0-step0.csv") as file:
        rows = list(csv.DictReader(file))
    assert [row["task"] for row in rows] == [*TASKS, "average"]
    for row in rows[:-1]:
        assert float(row["score"]) == expected[row["task"]]["score"]
        assert int(row["examples"]) == SIZES["dev_size" if stage == "val" else "test_size"]
    assert float(rows[-1]["score"]) == average
    report = json.loads((folder / f"{stage}-epoch0-step0.json").read_text())
    assert report["stage"] == stage and report["average"]["score"] == average
    assert {t["task"]: (t["metric"], t["examples"], t["score"]) for t in report["tasks"]} == {
        task: (metric, 4, expected[task]["score"]) for task, metric in zip(TASKS, two_tasks.task_metrics, strict=True)
    }


def test_predict_writes_one_jsonl_per_task_in_example_order(data_dir, tmp_path):
    data = make_data(data_dir, eval_batch_size=3)  # batches that split a task
    module = make_module(data, evaluation={"results_dir": str(tmp_path)}, max_target_length=2)
    always_yes(module)
    make_trainer().predict(module, datamodule=data)

    assert sorted(p.name for p in (tmp_path / "predictions").iterdir()) == sorted(f"{t}.jsonl" for t in TASKS)
    for task in data.tasks:
        lines = (tmp_path / "predictions" / f"{task.name}.jsonl").read_text().splitlines()
        rows = [json.loads(line) for line in lines]
        examples = task.examples("test")
        assert [row["example_id"] for row in rows] == list(range(len(examples))) == list(range(4))
        for row, example in zip(rows, examples, strict=True):
            assert row == {
                "task": task.name,
                "example_id": row["example_id"],
                "input": example.input,
                "prediction": "yes",
                "references": list(example.targets),
            }


# --- 7. stage-two checkpoints --------------------------------------------------------------------------


@pytest.mark.parametrize(("routes", "temperature"), [("argmax", None), ("softmax", 3.0)])
def test_stage_two_survives_a_checkpoint_round_trip(two_tasks, tmp_path, routes, temperature):
    module = make_module(two_tasks)
    switch, guard = TwoStageTraining(switch_step=1, routes=routes, temperature=temperature), NanGuard()
    trainer = make_trainer(max_steps=2, callbacks=[switch, guard])
    trainer.fit(module, datamodule=two_tasks)
    assert switch.stage == 2
    guard.skipped_batches = 2  # kept with the stage
    trainer.save_checkpoint(tmp_path / "stage2.ckpt")

    loaded = MoEMultiTaskModule.load_from_checkpoint(tmp_path / "stage2.ckpt")
    saved = torch.load(tmp_path / "stage2.ckpt", weights_only=False)
    assert saved["callbacks"][guard.state_key] == {"skipped_batches": 2}
    assert saved["callbacks"][switch.state_key] == {"switched_at": 1, "routes": routes}
    assert loaded.hparams["moe"] == saved["hyper_parameters"]["moe"] == asdict(loaded.model.moe_options)
    router = loaded.model.router
    assert router.selection == routes and loaded.model.config.moe["selection"] == routes
    assert not any(p.requires_grad for p in router.parameters())
    assert loaded.model.task_table.frozen and not loaded.model.task_table.embedding.weight.requires_grad
    if temperature is not None:
        assert router.temperature.item() == temperature
    saved = module.state_dict()
    assert saved.keys() == loaded.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in loaded.state_dict().items())
    assert torch.equal(loaded.route_table(), module.route_table())

    # a resumed fit goes on in stage two, its routes as they were
    resumed = make_module(two_tasks)
    switch, guard = TwoStageTraining(switch_step=1, routes=routes, temperature=temperature), NanGuard()
    trainer = make_trainer(max_steps=3, callbacks=[switch, guard])
    trainer.fit(resumed, datamodule=two_tasks, ckpt_path=tmp_path / "stage2.ckpt")
    assert trainer.global_step == 3 and switch.stage == 2 and switch.switched_at == 1
    assert guard.skipped_batches == 2 and resumed.model.router.selection == routes
    assert torch.equal(resumed.route_table(), module.route_table())


# --- 8. construction errors ----------------------------------------------------------------------------


def test_construction_errors_name_the_option(two_tasks, tmp_path):
    with pytest.raises(ValueError, match="`task_names` names 1 tasks; the model's task table has 2"):
        make_module(two_tasks, task_names=["only"])
    with pytest.raises(ValueError, match="`task_metrics` names 3 tasks"):
        make_module(two_tasks, task_metrics=["EM"] * 3)
    with pytest.raises(ValueError, match="`task_partitions` names 1 tasks"):
        make_module(two_tasks, task_partitions=["train"])
    with pytest.raises(ValueError, match=r"`task_metrics` has \['F1'\]; allowed: 'EM', 'ACC'"):
        make_module(two_tasks, task_metrics=["EM", "F1"])
    with pytest.raises(ValueError, match=r"`task_partitions` has \['seen'\]; allowed: 'train', 'dev', 'test'"):
        make_module(two_tasks, task_partitions=["seen", "train"])
    with pytest.raises(ValueError, match=r"policy.*'stop', 'skip'"):
        NanGuard("ignore")
    with pytest.raises(ValueError, match="leave it unset with `pretrained`"):
        make_module(two_tasks, pretrained=str(tmp_path))

    dense = BartForConditionalGeneration(BartConfig(vocab_size=64, **{**TINY_BART, "max_position_embeddings": 32}))
    dense.save_pretrained(tmp_path / "dense")
    options = dict(pretrained=str(tmp_path / "dense"), bart=None, pad_token_id=1, max_target_length=32)
    with pytest.raises(ValueError, match=f"the tokenizer has {two_tasks.vocab_size} tokens but the model .* only 64"):
        make_module(two_tasks, **options)
    upcycled = make_module(two_tasks, tokenizer_size=64, **options)  # a tokenizer that fits
    assert upcycled.model.config.vocab_size == 64


def test_a_saved_moe_bart_fine_tunes_in_train_mode_with_the_configured_non_shape_options(two_tasks, tmp_path):
    frozen = {"freeze_task_table": True, "selection": "argmax", "freeze_router": True}
    make_module(two_tasks, moe=frozen).model.save_pretrained(tmp_path / "moe")
    options = dict(pretrained=str(tmp_path / "moe"), bart=None)
    module = make_module(two_tasks, moe={"selection": "softmax", "temperature": 0.5, "top_k": 2}, **options)
    router, table = module.model.router, module.model.task_table
    assert (router.selection, router.top_k, router.temperature.item(), router.frozen) == ("softmax", 2, 0.5, False)
    assert not table.frozen and table.embedding.weight.requires_grad
    assert module.hparams.moe["selection"] == "softmax" and not module.hparams.moe["freeze_task_table"]
    assert all(m.training for m in module.modules())  # `from_pretrained` returns an eval-mode model
    before = table.embedding.weight.detach().clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(max_steps=1).fit(module, datamodule=two_tasks)
    assert not [w for w in caught if "eval mode" in str(w.message)]
    assert not torch.equal(table.embedding.weight, before)  # a route can be learned anew
    with pytest.raises(ValueError, match=r"`num_experts` is 4, but the saved MoE-BART .* has 2: it shapes the weights"):
        make_module(two_tasks, moe={"num_experts": 4}, **options)


def test_step_checkpoints_are_named_by_their_own_step_after_a_validation(two_tasks, tmp_path):
    # evaluation metrics reach the loggers at the optimizer step without logging a "step" metric, which
    # ModelCheckpoint would take for the step in its file names
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(
        tmp_path / "ckpt", filename="{step}", every_n_train_steps=1, save_top_k=-1
    )
    trainer = make_trainer(
        max_steps=4, enable_checkpointing=True, callbacks=[checkpoints], limit_val_batches=1, val_check_interval=2
    )
    trainer.fit(
        make_module(two_tasks, evaluation={"num_beams": 1, "results_dir": str(tmp_path / "results")}),
        datamodule=two_tasks,
    )
    for step in range(1, 5):
        saved = torch.load(tmp_path / "ckpt" / f"step={step}.ckpt", weights_only=True)
        assert saved["global_step"] == step


def test_a_representation_file_gives_each_task_the_row_of_its_name(two_tasks, tmp_path):
    from moe_mtl.representations.files import save_representations

    names = list(two_tasks.task_names)
    vectors = torch.arange(len(names) * 3, dtype=torch.float32).reshape(len(names), 3)
    path = tmp_path / "tasks.pt"
    save_representations(path, names[::-1], vectors.flip(0))  # the file lists the tasks in another order
    module = make_module(two_tasks, moe={"task_embeddings": str(path)})
    assert torch.equal(module.model.task_table.embedding.weight.detach(), vectors)
    # the table is in the weights: the options in effect (and so the checkpoint) no longer name the file
    assert (module.hparams.moe["task_embeddings"], module.hparams.moe["task_dim"]) == (None, 3)
    save_representations(path, names[:1], vectors[:1])
    with pytest.raises(ValueError, match=f"no vector for tasks .*{names[1]}"):
        make_module(two_tasks, moe={"task_embeddings": str(path)})


def test_route_balance_weight_adds_the_balance_term_while_routes_are_learned(two_tasks):
    module = make_module(two_tasks, moe={"selection": "softmax"})  # softmax, no dropout: a deterministic step
    two_tasks.setup("fit")
    batch = next(iter(two_tasks.train_dataloader()))
    base = module.training_step(batch, 0)
    module.loss.route_balance_weight = 2.0
    tasks = torch.tensor(module.seen_tasks)
    probs = module.model.router.logits(module.model.task_table(tasks)).softmax(-1)
    torch.testing.assert_close(module.training_step(batch, 0), base + 2.0 * route_balance(probs))
    module.model.router.freeze(True)  # fixed routes (stage two): nothing to balance
    torch.testing.assert_close(module.training_step(batch, 0), base)


@pytest.mark.parametrize("selection", ["switch", "reinforce"])
def test_sparse_stage_one_trains_the_router_and_tables_its_policy(two_tasks, selection):
    module = make_module(two_tasks, moe={"selection": selection, "temperature": 2.0})
    router_before = [p.detach().clone() for p in module.model.router.parameters()]
    logger = MetricsLogger()
    make_trainer(logger=logger, log_every_n_steps=1).fit(module, datamodule=two_tasks)
    assert not same(router_before, list(module.model.router.parameters()))  # the router learns
    assert ("train/reinforce_surrogate" in logger.metrics) == (selection == "reinforce")
    assert len(logger.metrics["train/loss"]) == 4
    # the route table shows the policy the routes are sampled from: softmax(logits / τ)
    tasks = torch.arange(module.model.task_table.num_tasks)
    logits = module.model.router.logits(module.model.task_table(tasks))
    torch.testing.assert_close(module.route_table(), (logits / 2.0).softmax(-1))


class ParameterRecorder(Callback):
    """Writes its rank's router parameters before and after training."""

    def __init__(self, out: str):
        self.out = out

    def on_train_start(self, trainer, pl_module):
        self.initial = [p.detach().clone() for p in pl_module.model.router.parameters()]

    def on_train_end(self, trainer, pl_module):
        final = [p.detach().clone() for p in pl_module.model.router.parameters()]
        state = {"initial": self.initial, "final": final, "experts": expert_state(pl_module)}
        torch.save(state, f"{self.out}/rank{trainer.global_rank}.pt")


@pytest.mark.distributed
def test_reinforce_stage_one_under_ddp_keeps_the_ranks_equal_and_trains_the_router(tmp_path):
    """Two gloo processes, each drawing its own routes per example: the all-reduced router and experts stay
    equal on both ranks, and the router learns from the score-function term."""
    data = make_data(tmp_path / "data", skills={**SIZES, "train_size": 4}, sync_tasks=False)
    data.prepare_data()
    module = make_module(data, moe={"num_experts": 3, "selection": "reinforce"}, max_target_length=2)
    recorder = ParameterRecorder(str(tmp_path))
    trainer = make_trainer(
        devices=2, strategy="ddp_fork_find_unused_parameters_true", max_steps=3, callbacks=[recorder]
    )
    trainer.fit(module, datamodule=data)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    assert same(ranks[0]["final"], ranks[1]["final"])
    assert not same(ranks[0]["initial"], ranks[0]["final"])
    assert all(same(ranks[0]["experts"][key], ranks[1]["experts"][key]) for key in ranks[0]["experts"])


# --- compile ----------------------------------------------------------------------------------------


@pytest.mark.slow  # compiles the tiny model's layers (about 20 s on 2 CPU cores)
def test_a_compiled_fit_trains_as_eager_validates_and_resumes_exactly(data, tmp_path):
    steps, options = 4, dict(limit_val_batches=2, val_check_interval=4)
    eager = tiny_module(data)
    L.Trainer(**tiny_trainer(tmp_path / "eager", max_steps=steps, **options)).fit(eager, datamodule=data)
    checkpoints = ModelCheckpoint(tmp_path / "ckpt", filename="{step}", every_n_train_steps=1, save_top_k=-1)
    compiled = tiny_module(data, compile=True)
    trainer = L.Trainer(
        **tiny_trainer(tmp_path, max_steps=steps, callbacks=[checkpoints], enable_checkpointing=True, **options)
    )
    trainer.fit(compiled, datamodule=data)
    assert all(unit._compiled_call_impl is not None for unit in compile_units(compiled.model))
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints name the eager parameters
    for name, tensor in eager.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    scores = [float(t.callback_metrics["val/score"]) for t in (eager.trainer, trainer)]
    assert scores[0] == pytest.approx(scores[1], abs=1e-6)  # validation's forward compiled, generation eager
    resumed_data = tiny_data(data.hparams.output_dir)
    resumed = tiny_module(resumed_data, seed=1, compile=True)  # other initial weights and seed
    again = L.Trainer(**tiny_trainer(tmp_path / "resumed", max_steps=steps, **options))
    again.fit(resumed, datamodule=resumed_data, ckpt_path=tmp_path / "ckpt" / "step=2.ckpt")
    for name, tensor in compiled.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
