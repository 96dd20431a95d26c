"""NanGuard: the NaN policy (stop or skip) on non-finite losses and gradients, and its skipped count on resume."""

import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from moe_mtl.training import NanGuard

from ..conftest import (
    SIZES,
    MetricsLogger,
    PoisonGrad,
    make_data,
    make_module,
    make_trainer,
)

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
        make_trainer(callbacks=[poison, NanGuard("stop")]).fit(make_module(two_tasks), datamodule=two_tasks)
    assert f"non-finite training loss at step 2 (epoch 0), task {poison.task}" in str(error.value)
    assert "--nan_guard.policy skip" in str(error.value)


def test_nan_policy_skip_skips_exactly_the_bad_batch(two_tasks):
    module, guard = make_module(two_tasks), NanGuard("skip")
    poison, logger = PoisonBatch(1), MetricsLogger()
    trainer = make_trainer(max_steps=4, callbacks=[poison, guard], logger=logger, log_every_n_steps=1)
    trainer.fit(module, datamodule=two_tasks)

    assert guard.skipped_batches == 1 and trainer.global_step == 4
    assert logger.metrics["train/skipped_batches"] == [1.0] * 3  # from the skipped step on
    losses = logger.metrics["train/loss"]  # the skipped step shows its own loss, not the step before's
    assert math.isnan(losses[1]) and all(math.isfinite(losses[i]) for i in (0, 2, 3))
    assert all(torch.equal(poison.before[n], poison.after[n]) for n in poison.before)  # the skipped step moved nothing
    optimizer = trainer.optimizers[0]
    shared = module.model.model.shared.weight
    assert optimizer.state[shared]["step"].item() == 3  # AdamW stepped on the 3 good batches only
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_non_finite_gradients_follow_the_nan_policy(two_tasks):
    with pytest.raises(FloatingPointError, match=r"non-finite gradients at step 1 .*finite loss"):
        make_trainer(callbacks=[PoisonGrad(1), NanGuard()]).fit(make_module(two_tasks), datamodule=two_tasks)
    module, poison, guard = make_module(two_tasks), PoisonGrad(1), NanGuard("skip")
    make_trainer(max_steps=3, callbacks=[poison, guard]).fit(module, datamodule=two_tasks)
    assert guard.skipped_batches == 1
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
        guard = next(callback for callback in trainer.callbacks if isinstance(callback, NanGuard))
        result = {"before": self.before, "after": self.after, "final": final, "skipped": guard.skipped_batches}
        torch.save(result, Path(self.out_dir) / f"rank{trainer.global_rank}.pt")


@pytest.mark.distributed
def test_nan_policy_skip_under_ddp_skips_the_step_on_every_rank(tmp_path):
    """Two gloo processes; only rank 1's batch 1 is non-finite: both ranks skip that optimizer step."""
    data = make_data(tmp_path / "data", skills={**SIZES, "train_size": 4}, sync_tasks=False)
    data.prepare_data()
    module = make_module(data, max_target_length=2)
    callbacks = [RankPoison(1, 1, str(tmp_path)), NanGuard("skip")]
    trainer = make_trainer(devices=2, strategy="ddp_fork", max_steps=3, callbacks=callbacks)
    trainer.fit(module, datamodule=data)

    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    for rank in ranks:
        assert rank["skipped"] == 1
        assert all(torch.equal(rank["before"][n], rank["after"][n]) for n in rank["before"])  # nothing moved
    assert all(torch.equal(ranks[0]["final"][n], ranks[1]["final"][n]) for n in ranks[0]["final"])
    assert not all(torch.equal(ranks[0]["final"][n], ranks[0]["before"][n]) for n in ranks[0]["final"])


def test_nan_guard_state_round_trips():
    saved = NanGuard("skip")
    saved.skipped_batches = 3
    restored = NanGuard("skip")
    restored.load_state_dict(saved.state_dict())
    assert saved.state_dict() == {"skipped_batches": 3} and restored.skipped_batches == 3


def test_a_resumed_run_restores_the_skipped_count_and_goes_on_counting(two_tasks, tmp_path):
    module, guard = make_module(two_tasks), NanGuard("skip")
    trainer = make_trainer(max_steps=2, callbacks=[PoisonBatch(1), guard])
    trainer.fit(module, datamodule=two_tasks)
    assert guard.skipped_batches == 1
    trainer.save_checkpoint(tmp_path / "skipped.ckpt")

    resumed, guard = make_module(two_tasks), NanGuard("skip")
    trainer = make_trainer(max_steps=4, callbacks=[PoisonBatch(3), guard])  # batch 3 of the resumed epoch: step 3
    trainer.fit(resumed, datamodule=two_tasks, ckpt_path=tmp_path / "skipped.ckpt")
    assert trainer.global_step == 4 and guard.skipped_batches == 2
