"""The progress bar of a run that `max_steps` ends: Lightning's rich bar, counting the run's steps."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    """Lightning's `RichProgressBar`, for a run that `max_steps` ends (Lightning then sets max_epochs to -1):

    - "Epoch 0", not "Epoch 0/-2";
    - the bar counts optimizer steps out of `max_steps` (`120/4500`), also after a resume: Lightning's counts batches
      of the epoch, which a resumed run showed past its total (`120/39`);
    - no `v_num`: the logger's version shown as a number (`0.000`) or its last four characters (`eed0` for `seed0`);
      the run folder names it.

    The CLI adds it when the progress bar is on and no other progress bar is configured."""

    def _by_steps(self) -> bool:
        return self.trainer.max_epochs is not None and self.trainer.max_epochs < 0 and self.trainer.max_steps > 0

    def _get_train_description(self, current_epoch: int) -> str:  # the one method that writes the epoch count
        if self.trainer.max_epochs is not None and self.trainer.max_epochs < 0:
            return f"{f'Epoch {current_epoch}':{len(self.validation_description)}}"
        return super()._get_train_description(current_epoch)

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if self._by_steps() else super().total_train_batches

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        position = trainer.global_step - 1 if self._by_steps() else batch_idx  # the parent shows position + 1
        super().on_train_batch_end(trainer, pl_module, outputs, batch, position)

    def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items
