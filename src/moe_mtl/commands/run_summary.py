"""The end of `moe-mtl fit | validate | test | predict`: what was done, the headline number, where the outputs are,
and the command a user would run next, in a few printed lines."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from ..training import MoEMultiTaskModule
from ..training.callbacks import TwoStageTraining
from ..training.callbacks.final_evaluation import last_checkpoint_callback


def command(*words: str | Path) -> str:
    """A shell command line of `words`, quoted where needed."""
    return " ".join(shlex.quote(str(word)) for word in words)


def config_words(config_files: Sequence[str | Path]) -> list[str]:
    """`--config FILE` for each config file the command was given, in order."""
    return [word for path in config_files for word in ("--config", str(path))]


def stage_text(trainer: Trainer) -> str:
    """The run's stages: where stage two began, or why it did not."""
    two_stage = next((cb for cb in trainer.callbacks if isinstance(cb, TwoStageTraining)), None)
    if two_stage is None or not two_stage.enabled:
        return "one stage"
    if two_stage.switched_at is not None:
        return f"stage two from step {two_stage.switched_at}"
    planned = f"switch_step {two_stage.switch_step}" if two_stage.switch_step is not None else "switch_epoch"
    return f"stage two never started (two_stage.{planned})"


def tensorboard_line(trainer: Trainer) -> list[str]:
    logger = trainer.logger
    return [f"  TensorBoard: tensorboard --logdir {logger.log_dir}"] if isinstance(logger, TensorBoardLogger) else []


def evaluation_lines(module: MoEMultiTaskModule, name: str) -> list[str]:
    """The newest evaluation's mean score and loss, its step and its files."""
    if module.last_evaluation is None:
        return ["  not evaluated: validation is off (trainer.limit_val_batches 0, or no tasks in data.val_partitions)"]
    result, stem, step = module.last_evaluation
    tasks = len(result.rows)
    return [
        f"  {name} score {result.score:.4f} (loss {result.loss:.4f}) over {tasks} tasks, weights of step {step}",
        f"  per task: {stem}.csv ({stem.name}.json beside it)",
    ]


def fit_summary(trainer: Trainer, module: MoEMultiTaskModule, config_files: Sequence[str | Path]) -> list[str]:
    lines = [f"moe-mtl fit: done, {trainer.global_step} steps ({stage_text(trainer)}); run folder {module.run_dir}"]
    lines += evaluation_lines(module, "dev")
    best = trainer.checkpoint_callback
    best_path = getattr(best, "best_model_path", "") or ""
    if best_path:
        lines.append(f"  best checkpoint ({best.monitor} {float(best.best_model_score):.4f}): {best_path}")
    last = last_checkpoint_callback(trainer, "last")
    last_path = Path(last.dirpath) / f"{last.filename}.ckpt" if last is not None and last.dirpath else None
    if last_path is not None and last_path.is_file():
        lines.append(f"  last checkpoint (resume: --ckpt_path): {last_path}")
    lines += tensorboard_line(trainer)
    chosen = best_path or (last_path if last_path is not None and last_path.is_file() else None)
    if chosen:
        lines.append(f"  next: {command('moe-mtl', 'test', *config_words(config_files), '--ckpt_path', chosen)}")
    return lines


def evaluation_summary(
    verb: str, trainer: Trainer, module: MoEMultiTaskModule, config_files: Sequence[str | Path]
) -> list[str]:
    """validate / test: the mean score, the files, and predict (per example outputs) as the next command."""
    lines = [f"moe-mtl {verb}: done; outputs in {module.run_dir}"]
    lines += evaluation_lines(module, "dev" if verb == "validate" else "test")
    lines += tensorboard_line(trainer)
    if trainer.ckpt_path:
        words = ("moe-mtl", "predict", *config_words(config_files), "--ckpt_path", trainer.ckpt_path)
        lines.append(f"  next (each example's output): {command(*words)}")
    return lines


def predict_summary(module: MoEMultiTaskModule) -> list[str]:
    if module.last_predictions is None:
        return ["moe-mtl predict: done; nothing predicted (no tasks in data.test_partitions)"]
    folder, rows = module.last_predictions
    return [
        f"moe-mtl predict: done, {sum(rows.values())} outputs of {len(rows)} tasks",
        f"  files: {folder}/<task>.jsonl (input, prediction, references per example)",
    ]
