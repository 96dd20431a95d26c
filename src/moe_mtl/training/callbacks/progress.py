"""The progress bar of a run that `max_steps` ends: Lightning's rich bar, without its "Epoch 0/-2"."""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    """Lightning's `RichProgressBar`. With `max_steps` and no `max_epochs`, Lightning sets max_epochs to -1 (no
    limit), which its bar shows as "Epoch 0/-2"; this one shows "Epoch 0" then. The CLI adds it when the progress
    bar is on and no other progress bar is configured."""

    def _get_train_description(self, current_epoch: int) -> str:  # the one method that writes the epoch count
        if self.trainer.max_epochs is not None and self.trainer.max_epochs < 0:
            return f"{f'Epoch {current_epoch}':{len(self.validation_description)}}"
        return super()._get_train_description(current_epoch)
