"""MoEMultiTaskModule in real Lightning Trainer runs on the CPU (one process, and 2-process DDP over gloo).

Tiny models (d_model 16, 2+2 layers) on two skill-suite tasks: "is_sorted" (labels yes/no,
Classification-F1) and "count" (numbers, ACC).
"""

import csv
import json
import math
import warnings
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from transformers import BartConfig, BartForConditionalGeneration

from moe_mtl.data import MultiTaskDataModule
from moe_mtl.evaluation.metrics import score
from moe_mtl.models import MoEOptions
from moe_mtl.training import MoEMultiTaskModule, TemperatureAnnealing, TwoStageTraining
from moe_mtl.training.losses import label_smoothed_nll, route_balance
from moe_mtl.training.schedules import temperature_at

from ..models.conftest import TINY_BART
from .conftest import linked_options, tiny_trainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

TASKS = ["is_sorted", "count"]
SIZES = {"train_size": 8, "dev_size": 4, "test_size": 4}


def make_data(output_dir, **overrides) -> MultiTaskDataModule:
    options = dict(
        skills=SIZES,
        partition={"train": TASKS},
        output_dir=str(output_dir),
        batch_size=4,
        vocab_size=300,
        max_target_length=16,
        test_partitions="train",
    )
    return MultiTaskDataModule(**{**options, **overrides})


def make_module(data: MultiTaskDataModule, moe: dict | None = None, **overrides) -> MoEMultiTaskModule:
    """A tiny module over `data`, its data facts linked by hand as the CLI would."""
    options = {"num_experts": 2, "task_dim": 8, "router_hidden": 8, "num_tasks": data.num_tasks, **(moe or {})}
    hparams = dict(
        bart=TINY_BART,
        moe=MoEOptions(**options),
        **linked_options(data),
        num_beams=1,
        lr=1e-2,
        weight_decay=0.1,
        warmup=0,
    )
    return MoEMultiTaskModule(**{**hparams, **overrides})


def make_trainer(**overrides) -> L.Trainer:
    return L.Trainer(**tiny_trainer(**{"max_steps": 4, **overrides}))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Tokenizer and tokenised splits, made once for the module's tests."""
    path = tmp_path_factory.mktemp("data")
    make_data(path).prepare_data()
    return path


@pytest.fixture
def two_tasks(data_dir) -> MultiTaskDataModule:
    """A fresh data module of the two tasks (conftest's `data` has all the seen tasks)."""
    return make_data(data_dir)


class MetricsLogger(Logger):
    """Keeps every logged value: metrics[name] is the list of values, in logging order."""

    def __init__(self):
        super().__init__()
        self.metrics: dict[str, list[float]] = defaultdict(list)

    @property
    def name(self) -> str:
        return "metrics"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        for key, value in metrics.items():
            self.metrics[key].append(value)


def f32(value: float) -> float:
    """`value` as Lightning logs it: through a float32 tensor."""
    return torch.tensor(value, dtype=torch.float32).item()


def expert_names(module: MoEMultiTaskModule) -> list[tuple[str, int]]:
    return [
        (layer, e) for layer in module.model.routed_layer_names for e in range(module.model.moe_options.num_experts)
    ]


def expert_state(module: MoEMultiTaskModule) -> dict[tuple[str, int], list[torch.Tensor]]:
    return {
        (layer, e): [p.detach().clone() for p in module.model.expert_parameters(layer, e)]
        for layer, e in expert_names(module)
    }


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def pin_routes(module: MoEMultiTaskModule, expert_of_task: list[int]) -> None:
    """Make the learned MLP router pick `expert_of_task[t]` in every layer for task t, by a logit margin
    (~170) that no Gumbel sample can overturn; gumbel_st then gives exactly 0 weight to the others."""
    router = module.model.router
    with torch.no_grad():
        table = module.model.task_table.embedding.weight
        table.zero_()
        for task in range(len(expert_of_task)):
            table[task, task] = 1.0
        for mlp in router.network.layers:
            first, last = mlp[0], mlp[2]
            for param in (*first.parameters(), *last.parameters()):
                param.zero_()
            for task, expert in enumerate(expert_of_task):
                first.weight[task, task] = 1.0  # hidden unit t = GELU(1) for task t, GELU(0) = 0 otherwise
                last.weight[expert, task] = 200.0


# --- 1. training step: loss and logged values ----------------------------------------------------------


class LossProbe(Callback):
    """Before each training step, the loss of its batch computed outside Lightning on the same weights."""

    def __init__(self):
        self.expected: list[float] = []
        self.unsmoothed: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        with torch.no_grad():
            logits = pl_module(batch).logits
        self.expected.append(label_smoothed_nll(logits, batch["labels"], pl_module.hparams.label_smoothing).item())
        self.unsmoothed.append(F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten()).item())


def test_training_step_logs_the_label_smoothed_loss_learning_rates_and_temperature(two_tasks):
    # softmax selection and no dropout: the training forward pass is deterministic
    module = make_module(two_tasks, moe={"selection": "softmax"}, label_smoothing=0.2, warmup=0.5, router_lr=3e-3)
    logger, probe = MetricsLogger(), LossProbe()
    annealing = TemperatureAnnealing(start=2.0, end=0.5, rate=0.5)
    make_trainer(logger=logger, log_every_n_steps=1, callbacks=[annealing, probe]).fit(module, datamodule=two_tasks)

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


# --- 2. expert-sparse updates --------------------------------------------------------------------------


class ExpertProbe(Callback):
    """Per training step: the batch's task and which experts the step changed."""

    def __init__(self):
        self.steps: list[tuple[int, set]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._before = expert_state(pl_module)
        self._task = int(batch["task_ids"][0])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        after = expert_state(pl_module)
        self.steps.append((self._task, {key for key, params in after.items() if not same(params, self._before[key])}))


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("routes", ["pinned", "given"])
def test_expert_sparse_updates_leave_unrouted_experts_bitwise_unchanged(two_tasks, routes, sparse):
    """Task 0 routes to expert 0 and task 1 to expert 1 in every layer; expert 2 to no task.

    Pinned gumbel_st routes run every expert and give the unselected ones exactly 0 weight, so their grads
    are zero-filled, not None: without the feature AdamW moves them by weight decay and stale momentum.
    Given hard routes never run the unselected experts: their grads stay None and AdamW skips them anyway.
    """
    moe = {"num_experts": 3}
    if routes == "given":
        moe |= {"routes": "given", "given_routes": [[0] * 4, [1] * 4]}
    module = make_module(two_tasks, moe=moe, router_lr=0.0, task_lr=0.0, weight_decay=0.1, expert_sparse_updates=sparse)
    if routes == "pinned":
        pin_routes(module, [0, 1])
    probe = ExpertProbe()
    make_trainer(max_steps=4, callbacks=[probe]).fit(module, datamodule=two_tasks)

    assert sorted(task for task, _ in probe.steps) == [0, 0, 1, 1]
    layers = module.model.routed_layer_names
    for task, changed in probe.steps:
        if sparse or routes == "given":  # only the batch's expert moves; the other task's keeps its old state
            assert changed == {(layer, task) for layer in layers}
        else:
            assert changed == set(expert_names(module))


class DDPExpertRecorder(Callback):
    """Writes the tasks of its rank's batches and the expert weights before and after training."""

    def __init__(self, out: str):
        self.out = out
        self.tasks: list[int] = []

    def on_train_start(self, trainer, pl_module):
        self.initial = expert_state(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.tasks.append(int(batch["task_ids"][0]))

    def on_train_end(self, trainer, pl_module):
        state = {"tasks": self.tasks, "initial": self.initial, "final": expert_state(pl_module)}
        torch.save(state, f"{self.out}/rank{trainer.global_rank}.pt")


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("routes", "strategy"),
    [("learned", "ddp_fork"), ("given", "ddp_fork_find_unused_parameters_true")],
    ids=["pinned-gumbel_st", "given"],
)
def test_expert_sparse_updates_under_ddp_keep_experts_used_on_any_rank(tmp_path, routes, strategy):
    """Two gloo processes. At every step one rank has task 0 (expert 0) and the other task 1 (expert 1);
    no task routes to expert 2. Pinned gumbel_st routes give expert 2 zero-filled grads, which the feature
    must drop on both ranks; given hard routes never run it (DDP leaves its grads None)."""
    # 4 examples per task and batch 4: each epoch is one batch of each task, dealt one to each rank
    data = make_data(tmp_path / "data", skills={**SIZES, "train_size": 4}, sync_tasks=False)
    data.prepare_data()
    moe = {"num_experts": 3}
    if routes == "given":
        moe |= {"routes": "given", "given_routes": [[0] * 4, [1] * 4]}
    module = make_module(
        data, moe=moe, router_lr=0.0, task_lr=0.0, max_target_length=2, results_dir=str(tmp_path / "results")
    )
    if routes == "learned":
        pin_routes(module, [0, 1])
    recorder = DDPExpertRecorder(str(tmp_path))
    trainer = make_trainer(
        devices=2,
        strategy=strategy,
        max_steps=3,
        limit_val_batches=None,
        check_val_every_n_epoch=3,
        callbacks=[recorder],
    )
    trainer.fit(module, datamodule=data)

    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    assert len(ranks[0]["tasks"]) == 3
    assert all({a, b} == {0, 1} for a, b in zip(ranks[0]["tasks"], ranks[1]["tasks"], strict=True))
    for key, initial in ranks[0]["initial"].items():
        assert same(initial, ranks[1]["initial"][key])
        assert same(ranks[0]["final"][key], ranks[1]["final"][key]), key  # the ranks never diverge
        _, expert = key
        # experts 0 and 1 are each used on one rank per step: updated; expert 2 on none: untouched
        assert same(initial, ranks[0]["final"][key]) == (expert == 2), key
    # the validation at the end (ranks hold different dev rows) evaluated every dev example once
    report = json.loads((tmp_path / "results" / "evaluation" / "val-epoch2-step3.json").read_text())
    assert {t["task"]: t["examples"] for t in report["tasks"]} == dict.fromkeys(TASKS, SIZES["dev_size"])


# --- 3. strategies (per-group gradient clipping, a callback: test_clipping.py) -------------------------


def test_setup_rejects_expert_sparse_updates_where_grads_are_sharded(two_tasks):
    module = make_module(two_tasks)
    for trainer in (make_trainer(), make_trainer(strategy=DDPStrategy())):
        module.trainer = trainer
        module.setup("fit")  # one device and DDP hold complete local grads

    # a CPU Trainer refuses FSDP, so the module is attached to a stand-in holding the strategy and run folder
    def fsdp_trainer():
        return SimpleNamespace(strategy=FSDPStrategy(), log_dir=None, default_root_dir=".")

    # expert-sparse updates drop grads that FSDP keeps in its own buffers: refused, until turned off
    module.trainer = fsdp_trainer()
    with pytest.raises(ValueError, match=r"expert_sparse_updates cannot .* under FSDPStrategy"):
        module.setup("fit")
    module.setup("validate")  # no training, nothing dropped
    kept = make_module(two_tasks, expert_sparse_updates=False)
    kept.trainer = fsdp_trainer()
    kept.setup("fit")


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


def test_a_run_resumed_in_stage_two_asks_ddp_for_unused_parameter_detection(two_tasks):
    # the checkpoint's stage-two routes are restored after `setup`, so the check must see them
    module = make_module(two_tasks)
    module.trainer = make_trainer(strategy=DDPStrategy())
    module.on_load_checkpoint({"moe_mtl": {"stage": 2, "stage_info": {"routes": "argmax", "switch_step": 3}}})
    with pytest.raises(ValueError, match="argmax selection"):
        module.on_fit_start()


# --- 4. NaN policy -------------------------------------------------------------------------------------


class PoisonBatch(Callback):
    """Makes training batch `index` give a NaN loss (NaN final_logits_bias), then restores the bias;
    records that batch's task and the parameters before and after its step."""

    def __init__(self, index: int):
        self.index = index

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.index:
            self.task = batch["task_names"][0]
            self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
            self.bias = pl_module.model.final_logits_bias.clone()
            pl_module.model.final_logits_bias.fill_(math.nan)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.index:
            pl_module.model.final_logits_bias.copy_(self.bias)
            self.after = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


def test_nan_policy_stop_names_the_step_and_the_task(two_tasks):
    poison = PoisonBatch(2)
    with pytest.raises(FloatingPointError) as error:
        make_trainer(callbacks=[poison]).fit(make_module(two_tasks, nan_policy="stop"), datamodule=two_tasks)
    assert f"non-finite training loss at step 2 (epoch 0), task {poison.task}" in str(error.value)
    assert "nan_policy: skip" in str(error.value)


def test_nan_policy_skip_skips_exactly_the_bad_batch(two_tasks):
    module = make_module(two_tasks, nan_policy="skip")
    poison, logger = PoisonBatch(1), MetricsLogger()
    trainer = make_trainer(max_steps=4, callbacks=[poison], logger=logger, log_every_n_steps=1)
    trainer.fit(module, datamodule=two_tasks)

    assert module.skipped_batches == 1 and trainer.global_step == 4
    assert logger.metrics["train/skipped_batches"] == [1.0] * 3  # from the skipped step on
    losses = logger.metrics["train/loss"]  # the skipped step shows its own loss, not the step before's
    assert math.isnan(losses[1]) and all(math.isfinite(losses[i]) for i in (0, 2, 3))
    assert all(torch.equal(poison.before[n], poison.after[n]) for n in poison.before)  # the skipped step moved nothing
    optimizer = trainer.optimizers[0]
    shared = module.model.model.shared.weight
    assert optimizer.state[shared]["step"].item() == 3  # AdamW stepped on the 3 good batches only
    assert all(torch.isfinite(p).all() for p in module.parameters())


class PoisonGrad(Callback):
    """After the backward pass of optimizer step `index`, one gradient entry becomes NaN (the loss stays finite)."""

    def __init__(self, index: int):
        self.index = index

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step == self.index:
            pl_module.model.model.shared.weight.grad[5, 0] = math.nan
            self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.index + 1:
            self.after = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


def test_non_finite_gradients_follow_the_nan_policy(two_tasks):
    with pytest.raises(FloatingPointError, match=r"non-finite gradients at step 1 .*finite loss"):
        make_trainer(callbacks=[PoisonGrad(1)]).fit(make_module(two_tasks, nan_policy="stop"), datamodule=two_tasks)
    module, poison = make_module(two_tasks, nan_policy="skip"), PoisonGrad(1)
    make_trainer(max_steps=3, callbacks=[poison]).fit(module, datamodule=two_tasks)
    assert module.skipped_batches == 1
    assert all(torch.equal(poison.before[n], poison.after[n]) for n in poison.before)  # the step moved nothing
    assert all(torch.isfinite(p).all() for p in module.parameters())


class RankPoison(Callback):
    """A NaN weight at optimizer step `index` on one rank only (each rank sees one batch per epoch here);
    every rank saves that step's before/after weights, its final weights and its skip count."""

    def __init__(self, index: int, rank: int, out_dir: str):
        self.index, self.rank, self.out_dir = index, rank, out_dir

    @staticmethod
    def poisoned(pl_module) -> torch.Tensor:
        # a parameter, not final_logits_bias: DDP broadcasts rank 0's buffers at every forward
        return pl_module.model.model.decoder.layernorm_embedding.weight

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.index:
            self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
            if trainer.global_rank == self.rank:
                with torch.no_grad():
                    self.poisoned(pl_module).fill_(math.nan)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.index + 1:
            if trainer.global_rank == self.rank:
                with torch.no_grad():
                    self.poisoned(pl_module).copy_(self.before["model.model.decoder.layernorm_embedding.weight"])
            self.after = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_train_end(self, trainer, pl_module):
        final = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        result = {"before": self.before, "after": self.after, "final": final, "skipped": pl_module.skipped_batches}
        torch.save(result, Path(self.out_dir) / f"rank{trainer.global_rank}.pt")


@pytest.mark.distributed
def test_nan_policy_skip_under_ddp_skips_the_step_on_every_rank(tmp_path):
    """Two gloo processes; only rank 1's batch 1 is non-finite: both ranks skip that optimizer step."""
    data = make_data(tmp_path / "data", skills={**SIZES, "train_size": 4}, sync_tasks=False)
    data.prepare_data()
    module = make_module(data, nan_policy="skip", max_target_length=2)
    trainer = make_trainer(devices=2, strategy="ddp_fork", max_steps=3, callbacks=[RankPoison(1, 1, str(tmp_path))])
    trainer.fit(module, datamodule=data)

    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    for rank in ranks:
        assert rank["skipped"] == 1
        assert all(torch.equal(rank["before"][n], rank["after"][n]) for n in rank["before"])  # nothing moved
    assert all(torch.equal(ranks[0]["final"][n], ranks[1]["final"][n]) for n in ranks[0]["final"])
    assert not all(torch.equal(ranks[0]["final"][n], ranks[0]["before"][n]) for n in ranks[0]["final"])


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
    module = make_module(two_tasks, results_dir=str(tmp_path / "results"), max_target_length=2)
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
    module = make_module(data, results_dir=str(tmp_path), max_target_length=2)
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
    switch = TwoStageTraining(switch_step=1, routes=routes, temperature=temperature)
    trainer = make_trainer(max_steps=2, callbacks=[switch])
    trainer.fit(module, datamodule=two_tasks)
    assert module.stage == 2
    module.skipped_batches = 2  # kept with the stage
    trainer.save_checkpoint(tmp_path / "stage2.ckpt")

    loaded = MoEMultiTaskModule.load_from_checkpoint(tmp_path / "stage2.ckpt")
    assert loaded.stage == 2 and loaded.stage_info == {"routes": routes, "switch_step": 1} == module.stage_info
    assert loaded.skipped_batches == 2
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
    switch = TwoStageTraining(switch_step=1, routes=routes, temperature=temperature)
    trainer = make_trainer(max_steps=3, callbacks=[switch])
    trainer.fit(resumed, datamodule=two_tasks, ckpt_path=tmp_path / "stage2.ckpt")
    assert trainer.global_step == 3 and resumed.stage == 2 and resumed.stage_info == module.stage_info
    assert resumed.skipped_batches == 2 and resumed.model.router.selection == routes
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
    with pytest.raises(ValueError, match=r"nan_policy.*'stop', 'skip'"):
        make_module(two_tasks, nan_policy="ignore")
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
    trainer.fit(make_module(two_tasks, num_beams=1, results_dir=str(tmp_path / "results")), datamodule=two_tasks)
    for step in range(1, 5):
        saved = torch.load(tmp_path / "ckpt" / f"step={step}.ckpt", weights_only=True)
        assert saved["global_step"] == step


def test_a_representation_file_gives_each_task_the_row_of_its_name(two_tasks, tmp_path):
    from moe_mtl.models.task_vectors import save_task_vectors

    names = list(two_tasks.task_names)
    vectors = torch.arange(len(names) * 3, dtype=torch.float32).reshape(len(names), 3)
    path = tmp_path / "tasks.pt"
    save_task_vectors(path, names[::-1], vectors.flip(0))  # the file lists the tasks in another order
    module = make_module(two_tasks, moe={"task_embeddings": str(path)})
    assert torch.equal(module.model.task_table.embedding.weight.detach(), vectors)
    # the table is in the weights: the options in effect (and so the checkpoint) no longer name the file
    assert (module.hparams.moe["task_embeddings"], module.hparams.moe["task_dim"]) == (None, 3)
    save_task_vectors(path, names[:1], vectors[:1])
    with pytest.raises(ValueError, match=f"no vector for tasks .*{names[1]}"):
        make_module(two_tasks, moe={"task_embeddings": str(path)})


def test_route_balance_weight_adds_the_balance_term_while_routes_are_learned(two_tasks):
    module = make_module(two_tasks, moe={"selection": "softmax"})  # softmax, no dropout: a deterministic step
    two_tasks.setup("fit")
    batch = next(iter(two_tasks.train_dataloader()))
    base = module.training_step(batch, 0)
    module.hparams.route_balance_weight = 2.0
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
