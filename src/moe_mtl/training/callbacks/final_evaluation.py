"""FinalEvaluation: a fit of any length ends with its final state evaluated once and saved, resumable, as last.ckpt."""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from .preemption import checkpoint_folder


def last_checkpoint_callback(trainer: Trainer, filename: str) -> ModelCheckpoint | None:
    """The trainer's ModelCheckpoint that writes `<filename>.ckpt` (the `moe-mtl` command's `last_checkpoint`)."""
    return next((cb for cb in trainer.checkpoint_callbacks if getattr(cb, "filename", None) == filename), None)


class FinalEvaluation(Callback):
    """The final step of a fit is validated and saved, whatever `val_check_interval` is: a run shorter than its
    validation interval (`--trainer.max_steps 60` with validation every 1,500 steps), or whose last step falls
    between two validations, would otherwise end with no checkpoint and no score of its final weights.

    At the last optimizer step (`trainer.max_steps`) it asks the trainer to stop there, which Lightning answers
    with a validation of that step (its ModelCheckpoints then save best and last as at any validation). After
    training, `<checkpoint folder>/<filename>.ckpt` is written if the last validation did not write it at the final
    step (validation off: `limit_val_batches 0`). A stop signal's checkpoint is `PreemptionCheckpoint`'s.

    Args:
        enabled: False: the run ends where its schedule ends, validated or not.
        filename: The resumable checkpoint's name, without ".ckpt" (the command's `last_checkpoint.filename`).
    """

    def __init__(self, enabled: bool = True, filename: str = "last"):
        self.enabled = enabled
        self.filename = filename

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        every = trainer.check_val_every_n_epoch
        by_epochs = trainer.max_steps in (None, -1) and trainer.max_epochs not in (None, -1)
        if self.enabled and by_epochs and every and trainer.max_epochs % every:
            rank_zero_warn(
                f"trainer.max_epochs is {trainer.max_epochs} and check_val_every_n_epoch {every}: the final epochs "
                "are not validated (last.ckpt is still written); give a max_epochs that is a multiple of it"
            )

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        if self.enabled and trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True  # a requested stop is validated first (Lightning's training epoch loop)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.enabled:
            return
        last = last_checkpoint_callback(trainer, self.filename)
        if last is not None and last._last_global_step_saved == trainer.global_step:
            return  # written by the final validation
        path = checkpoint_folder(trainer, last) / f"{self.filename}.ckpt"
        trainer.save_checkpoint(path)  # every rank: the strategy decides who writes
        if last is not None:
            last._last_global_step_saved = trainer.global_step
        rank_zero_info(f"FinalEvaluation: saved the final state (step {trainer.global_step}) as {path}")
