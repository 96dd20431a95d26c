"""StepProgressBar: the epoch count of a run that `max_steps` ends, and the CLI putting it in place."""

import torch
from lightning.pytorch import LightningModule, Trainer

from moe_mtl.commands.lightning import run_lightning
from moe_mtl.training.callbacks.progress import StepProgressBar

from ...conftest import write_config


class Line(LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).pow(2).mean()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(8, 2), batch_size=2)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def descriptions(**limits) -> str:
    bar = StepProgressBar()
    Trainer(accelerator="cpu", logger=False, callbacks=[bar], enable_checkpointing=False, **limits).fit(Line())
    return bar._get_train_description(0).strip()


def test_a_run_that_max_steps_ends_shows_its_epoch_without_a_negative_count():
    assert descriptions(max_steps=2) == "Epoch 0"  # Lightning's own bar: "Epoch 0/-2"
    assert descriptions(max_epochs=3) == "Epoch 0/2"  # an epoch limit keeps its count


def test_the_cli_uses_it_when_the_progress_bar_is_on(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "tiny.yaml", max_steps=1, limit_val_batches=0)
    cli = run_lightning(["fit", "--config", config, "--trainer.enable_progress_bar=true"])
    assert isinstance(cli.trainer.progress_bar_callback, StepProgressBar)


def test_a_resumed_run_counts_its_steps_out_of_max_steps_and_shows_no_version(tmp_path):
    """A run resumed at step 3 of 5 shows 5/5 at its end (Lightning's bar counted the batches of its epoch: past its
    total after a resume), and no `v_num` (`eed0` for a logger version `seed0`)."""
    from lightning.pytorch.loggers import CSVLogger

    def trained(max_steps: int, ckpt_path=None) -> tuple[StepProgressBar, Trainer]:
        bar = StepProgressBar()
        logger = CSVLogger(tmp_path, name="", version="seed0")
        trainer = Trainer(accelerator="cpu", logger=logger, callbacks=[bar], max_steps=max_steps, limit_val_batches=0)
        trainer.fit(Line(), ckpt_path=ckpt_path)
        return bar, trainer

    _, first = trained(3)
    path = tmp_path / "three.ckpt"
    first.save_checkpoint(path)
    bar, trainer = trained(5, path)
    task = bar.progress.tasks[bar.train_progress_bar_id]
    assert (task.completed, task.total) == (5, 5)
    assert "v_num" not in bar.get_metrics(trainer, trainer.lightning_module)
