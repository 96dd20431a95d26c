"""A test callback that signals its own process: a real SIGTERM, SIGINT or SIGUSR1 at a known step of a real fit."""

import os
import signal

from lightning.pytorch import Callback


class SignalAtStep(Callback):
    """Send `signal_name` to this process at the end of training step `step` (global step, 1-based)."""

    def __init__(self, signal_name: str, step: int):
        self.signum = signal.Signals[signal_name]
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class SignalInValidation(Callback):
    """Send `signal_name` to this process after the first batch of the validation at global step `step`."""

    def __init__(self, signal_name: str, step: int):
        self.signum = signal.Signals[signal_name]
        self.step = step

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.global_step == self.step and batch_idx == 0 and not trainer.sanity_checking:
            os.kill(os.getpid(), self.signum)
