"""Preemption: a signal to stop becomes a resumable checkpoint at a step boundary and an exit code that says so."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def exit_code(signum: int) -> int:
    """The shell's code for a process ended by `signum`: 128 + its number (SIGTERM 143, SIGINT 130, SIGUSR1 138)."""
    return 128 + int(signum)


def slurm_requeues(trainer: Trainer) -> bool:
    """Whether Lightning handles SIGUSR1 itself: under SLURM with auto-requeue it saves hpc_ckpt_<n>.ckpt and
    requeues the job (`scontrol requeue`), and the requeued job resumes from it."""
    environment = trainer._accelerator_connector.cluster_environment  # Trainer has no public accessor for it
    return isinstance(environment, SLURMEnvironment) and environment.auto_requeue


def checkpoint_folder(trainer: Trainer, callback: Any = None) -> Path:
    """Where the run's checkpoints go: `callback`'s folder, else the first ModelCheckpoint's, else
    `<log_dir>/checkpoints`."""
    folder = getattr(callback or trainer.checkpoint_callback, "dirpath", None)
    return Path(folder) if folder is not None else Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"


class PreemptionCheckpoint(Callback):
    """SIGTERM or SIGINT during `fit` (and SIGUSR1, outside SLURM's auto-requeue): the step under way finishes,
    `<checkpoint folder>/preempted-step<N>.ckpt` is saved, and the process exits with 128 + the signal's number
    (143, 130, 138). Resume with `fit --ckpt_path <that file>`; the run continues exactly.

    Lightning already turns SIGTERM into a stop at the next step boundary (its `SIGTERMException`, which on its own
    exits 0 and saves nothing) and, under DDP, stops every rank together. SIGINT and SIGUSR1 are handed to that
    same SIGTERM handler, so all three stop the same way. A signal during a validation lets it finish first, so
    that the checkpoint holds its scores and best-checkpoint choice. A second SIGINT interrupts at once. Under SLURM
    with auto-requeue, SIGUSR1 is left to Lightning (save and requeue; the job keeps running until SLURM stops it).

    Args:
        enabled: False leaves signals as Lightning handles them.
        filename: checkpoint name, without ".ckpt"; `{step}` is the global step.
    """

    def __init__(self, enabled: bool = True, filename: str = "preempted-step{step}"):
        self.enabled = enabled
        self.filename = filename
        self.received: int | None = None  # the first stop signal of this fit
        self.saved: Path | None = None
        self._previous: dict[int, Any] = {}
        self._active = False
        self._held = False  # a stop signal held back until the running validation ends

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or not self.enabled or threading.current_thread() is not threading.main_thread():
            return
        self.received, self.saved, self._active = None, None, True
        # SIGTERM itself stays Lightning's: it registers its handler after this hook, calling earlier ones too
        forwarded = [signal.SIGINT] + ([] if slurm_requeues(trainer) else [signal.SIGUSR1])
        for signum in forwarded:
            self._previous[signum] = signal.signal(signum, self._forward)

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        previous = self._previous.get(signum)
        if not self._active:  # still installed after a fit that ended in an exception (Lightning restores it)
            if callable(previous):
                previous(signum, frame)
            return
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        if self.received is None:
            self.received = signum
            rank_zero_info(
                f"Received {signal.Signals(signum).name}: stopping after the current step, with a checkpoint"
                + (" (Ctrl-C again stops at once)" if signum == signal.SIGINT else "")
            )
        handler = signal.getsignal(signal.SIGTERM)  # Lightning's, from the start of training on
        if callable(handler):
            handler(signum, frame)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.received is not None:  # arrived before Lightning's handler was in place: hand it on now
            self._forward(self.received, None)

    # A signal during a fit's validation: Lightning would stop mid-validation, and the resumed run never scores that
    # step (nor keeps it as the best checkpoint). The validation finishes first (it is bounded: limit_val_batches),
    # then the stop comes at the training loop's next check, with that validation saved in the checkpoint.

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        connector = trainer._signal_connector  # the flag Lightning's evaluation loop checks after each batch
        if self._active and trainer.state.fn == "fit" and connector.received_sigterm:
            connector.received_sigterm, self._held = False, True

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._held:
            trainer._signal_connector.received_sigterm, self._held = True, False

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._active = False
        if not self.enabled or not isinstance(exception, SIGTERMException):
            return
        signum = self.received or signal.SIGTERM
        self.saved = self.checkpoint_path(trainer)
        trainer.save_checkpoint(self.saved)  # every rank: the strategy decides who writes
        exception.code = exit_code(signum)  # SIGTERMException is a SystemExit: its code is the process's
        rank_zero_info(
            f"Preempted by {signal.Signals(signum).name} at step {trainer.global_step}: saved {self.saved}. "
            f"Resume with `moe-mtl fit ... --ckpt_path {self.saved}`; exiting with {exception.code}"
        )

    def checkpoint_path(self, trainer: Trainer) -> Path:
        return checkpoint_folder(trainer) / f"{self.filename.format(step=trainer.global_step)}.ckpt"

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._active = False
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
