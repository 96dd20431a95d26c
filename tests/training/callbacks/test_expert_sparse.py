"""ExpertSparseUpdates: unrouted experts left exactly as they are, on one device and under DDP."""

import json
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

from moe_mtl.training import ExpertSparseUpdates

from ..conftest import (
    SIZES,
    TASKS,
    expert_names,
    expert_state,
    make_data,
    make_module,
    make_trainer,
    pin_routes,
    same,
)

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
    module = make_module(two_tasks, moe=moe, optim={"router_lr": 0.0, "task_lr": 0.0, "weight_decay": 0.1})
    if routes == "pinned":
        pin_routes(module, [0, 1])
    probe = ExpertProbe()
    callbacks = [ExpertSparseUpdates(enabled=sparse), probe]
    make_trainer(max_steps=4, callbacks=callbacks).fit(module, datamodule=two_tasks)

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
        data,
        moe=moe,
        optim={"router_lr": 0.0, "task_lr": 0.0},
        max_target_length=2,
        evaluation={"results_dir": str(tmp_path / "results")},
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
        callbacks=[ExpertSparseUpdates(), recorder],
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
    module, sparse = make_module(two_tasks), ExpertSparseUpdates()
    for trainer in (make_trainer(), make_trainer(strategy=DDPStrategy())):
        module.trainer = trainer
        sparse.setup(trainer, module, "fit")  # one device and DDP hold complete local grads
        sparse.teardown(trainer, module, "fit")

    # a CPU Trainer refuses FSDP, so the callback gets a stand-in holding the strategy and run folder
    def fsdp_trainer():
        return SimpleNamespace(strategy=FSDPStrategy(), log_dir=None, default_root_dir=".")

    # expert-sparse updates drop grads that FSDP keeps in its own buffers: refused, until turned off
    with pytest.raises(ValueError, match=r"expert_sparse_updates cannot .* under FSDPStrategy"):
        sparse.setup(fsdp_trainer(), module, "fit")
    sparse.setup(fsdp_trainer(), module, "validate")  # no training, nothing dropped
    ExpertSparseUpdates(enabled=False).setup(fsdp_trainer(), module, "fit")


class PinAfterFirstStep(Callback):
    """After step 1 (softmax routes: every expert ran and has AdamW moments), pins task t to expert t with gumbel_st
    routes, which run expert 2 with zero weight; keeps expert 2's weights and AdamW state from then and at the end."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 1 and not hasattr(self, "before"):
            pl_module.model.router.selection = "gumbel_st"
            pin_routes(pl_module, [0, 1])
            self.before = self.snapshot(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self.after = self.snapshot(trainer, pl_module)

    @staticmethod
    def snapshot(trainer, pl_module):
        state = trainer.optimizers[0].state
        params = [
            p for layer in pl_module.model.routed_layer_names for p in pl_module.model.expert_parameters(layer, 2)
        ]
        return [(p.detach().clone(), {k: v.clone() for k, v in state[p].items()}) for p in params]


@pytest.mark.parametrize("sparse", [True, False])
def test_unrouted_experts_keep_their_weights_and_adamw_state_bitwise(two_tasks, sparse):
    module = make_module(
        two_tasks, moe={"num_experts": 3, "selection": "softmax"}, optim={"router_lr": 0.0, "task_lr": 0.0}
    )
    probe = PinAfterFirstStep()
    make_trainer(max_steps=3, callbacks=[ExpertSparseUpdates(enabled=sparse), probe]).fit(module, datamodule=two_tasks)
    assert all(state for _, state in probe.before)  # expert 2 was stepped in step 1
    unchanged = [
        torch.equal(w0, w1)
        and state0.keys() == state1.keys()
        and all(torch.equal(state0[k], state1[k]) for k in state0)
        for (w0, state0), (w1, state1) in zip(probe.before, probe.after, strict=True)
    ]
    assert all(unchanged) if sparse else not any(unchanged)  # without it, plain AdamW moves expert 2 (decay, moments)


def test_expert_sparse_updates_have_no_state_to_save():
    assert ExpertSparseUpdates().state_dict() == {}  # the usage is reset at every optimizer step
