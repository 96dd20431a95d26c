"""A trained run as `moe-mtl analyze` reads it: its route tables, checkpoint and model, data options and tasks.

The folder layout, the checkpoint of a run and the route-table files are `moe_mtl.runs`'; this adds what needs
the training package (the checkpoint's model) or the data (the run's tasks).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from ..data import MultiTaskDataModule
from ..data.tasks import Task
from ..errors import UsageError
from ..runs import checkpoint_run_folder, read_checkpoint, read_route_tables, route_table_record, run_checkpoint

FEATURE_SIZES = {"train_size": 1, "dev_size": 1, "test_size": 1, "shots": 2}  # skill-suite features ignore sizes


@dataclass
class RunFolder:
    """A run folder and the checkpoint analysed (None when it has none and none was named); `named`: the
    checkpoint was given (as the run or with `ckpt_path`), so its routes are the ones analysed."""

    path: Path
    checkpoint: Path | None
    named: bool = False

    @classmethod
    def resolve(cls, target: str | Path, ckpt_path: str | Path | None = None) -> RunFolder:
        """From a run folder or a checkpoint file; `ckpt_path` names the checkpoint of a run folder (default: the
        run's checkpoint, `runs.run_checkpoint`)."""
        target = Path(target)
        if target.is_file():
            if target.suffix != ".ckpt":
                raise UsageError(f"run: {target} is a file but not a checkpoint (.ckpt); give a run folder or a .ckpt")
            return cls(checkpoint_run_folder(target), Path(ckpt_path) if ckpt_path else target, named=True)
        if not target.is_dir():
            raise UsageError(f"run: {target} does not exist; give a run folder (runs/<name>/version_N) or a .ckpt file")
        if ckpt_path is not None:
            if not Path(ckpt_path).is_file():
                raise UsageError(f"ckpt_path: {ckpt_path} is not a file")
            return cls(target, Path(ckpt_path), named=True)
        return cls(target, run_checkpoint(target))

    # --- route tables ---------------------------------------------------------------------------------------

    def route_records(self) -> list[dict[str, Any]]:
        """The saved route tables (`runs.route_table_record`), by step."""
        return read_route_tables(self.path)

    def route_record(self, step: int | None = None) -> dict[str, Any]:
        """The route table at `step`; None: the named checkpoint's routes, else the last saved table (none saved:
        the checkpoint's routes)."""
        if step is None and self.named:
            return self.checkpoint_record()
        records = self.route_records()
        if step is not None:
            found = [record for record in records if record["step"] == step]
            if not found:
                steps = [record["step"] for record in records]
                raise UsageError(f"step: no route table at step {step} in {self.path / 'routes'}; saved: {steps}")
            return found[0]
        if records:
            return records[-1]
        if self.checkpoint is None:
            raise UsageError(f"run: {self.path} has no route tables (routes/step*.json) and no checkpoint")
        return self.checkpoint_record()

    def checkpoint_record(self) -> dict[str, Any]:
        """The checkpoint's route table (`MoEMultiTaskModule.route_table`) as a route-table record."""
        module = self.load_module()
        step = int(self.checkpoint_contents.get("global_step", 0))
        return route_table_record(module.route_table(), module.task_names, module.model.routed_layer_names, step)

    # --- checkpoint and data --------------------------------------------------------------------------------

    @cached_property
    def checkpoint_contents(self) -> dict[str, Any]:
        if self.checkpoint is None:
            raise UsageError(f"run: {self.path} has no checkpoint (checkpoints/*.ckpt); name one with --ckpt_path")
        return read_checkpoint(self.checkpoint)

    def load_module(self):
        """The model of the checkpoint (`training.loading.load_module`), on the CPU, in eval mode."""
        from ..training.loading import load_module

        if self.checkpoint is None:
            raise UsageError(f"run: {self.path} has no checkpoint (checkpoints/*.ckpt); name one with --ckpt_path")
        return load_module(self.checkpoint).eval()

    def data_options(self) -> dict[str, Any]:
        """The data module's options: `config.yaml`'s `data`, else the checkpoint's data hyper-parameters."""
        config = self.path / "config.yaml"
        if config.is_file():
            data = (yaml.safe_load(config.read_text()) or {}).get("data")
            if data is not None:
                return dict(data)
        if self.checkpoint is not None and "datamodule_hyper_parameters" in self.checkpoint_contents:
            options = dict(self.checkpoint_contents["datamodule_hyper_parameters"])
            options.pop("_instantiator", None)
            return options
        raise UsageError(f"run: no data options: {config} has no `data` and the run has no checkpoint with them")

    def datamodule(self) -> MultiTaskDataModule:
        """The run's data module (paths in it are relative to where the run was started, as in `fit`)."""
        return MultiTaskDataModule(**self.data_options())

    def tasks(self) -> list[Task]:
        """The run's tasks by task id; the skill suite's are generated at the smallest sizes (features only)."""
        options = self.data_options()
        if options.get("source", "skills") == "skills":
            options["skills"] = {**(options.get("skills") or {}), **FEATURE_SIZES}
        return MultiTaskDataModule(**options).tasks


__all__ = ["RunFolder"]
