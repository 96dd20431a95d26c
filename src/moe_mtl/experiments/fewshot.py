"""Few-shot fine-tuning on unseen tasks, as CrossFit evaluates it: for each unseen task × k-shot seed × learning
rate (× batch size), fine-tune on the task's k-shot train split, keep the checkpoint with the best score on its
k-shot dev split, and test it; per (task, seed), the grid point with the best dev score gives the reported test
score. (The paper's released scripts search lr {1e-5, 2e-5, 5e-5} × batch size {2, 4, 8}, 1000 steps.)

    moe-mtl fewshot --config configs/fewshot.yaml --init_from runs/moe/version_0 --out runs/moe/fewshot \\
        --seeds 100 13 21 --lrs 1e-5 2e-5 5e-5 --unseen_routes learned [fit overrides, e.g. --trainer.max_steps 1000]

Without `--init_from`, the cells fine-tune the config's own model (`model.pretrained`, with its tokenizer as
`data.tokenizer`): CrossFit's direct fine-tuning baseline. Files under `--out`:

    cells/<task>/seed<s>/lr<lr>[-bs<b>]/
                               one `moe-mtl fit` run (config.yaml, partition.json, checkpoints/, evaluation/,
                               TensorBoard events), then the test of its best checkpoint; result.json when
                               finished, error.txt when it failed
    fewshot.csv                one row per (task, seed): selected lr (and batch size), its dev and test score
    fewshot_summary.csv / .md  mean ± std over seeds per task, and the average over tasks

A cell with result.json is skipped (resume); a cell folder without one is deleted and run again from scratch.
A failed cell is recorded and the others still run; its (task, seed) row is then incomplete (nothing is selected
from part of the grid) and is counted in the summary. Cells run in this process, one after another: a cell
costs a fit and a test (8-15 s for the tests' tiny cells on 2 busy CPU cores), and a fresh interpreter per cell
would add the import of torch, transformers and Lightning (17-25 s there) to each; a crash that takes the
process down loses only the running cell (finished cells have their result.json).
"""

from __future__ import annotations

import csv
import gc
import json
import logging
import math
import shutil
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from ..atomic_files import atomic_path
from ..data import MultiTaskDataModule
from ..data.tasks import PARTITIONS, Task
from ..errors import UsageError
from .summary import mean_std

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
ERROR_FILE = "error.txt"
ROW_FIELDS = ("task", "seed", "lr", "batch_size", "dev_score", "test_score", "missing_cells")
SUMMARY_FIELDS = ("task", "seeds", "missing_seeds", "dev_mean", "dev_std", "test_mean", "test_std")
AVERAGE_ROW = "average"
# fit options each cell sets itself: the runner's own flags say them, so a pass-through copy would be ignored or clash
RUNNER_OPTIONS = {
    "--model.optim.lr": "--lrs",
    "--data.batch_size": "--batch_sizes",
    "--model.transfer.init_from": "--init_from",
    "--model.transfer.unseen_routes": "--unseen_routes",
    "--data.fewshot_seed": "--seeds",
    "--data.partition": "--partition and --tasks",
    "--data.train_partitions": "--partition",
    "--data.val_partitions": "--partition",
    "--data.test_partitions": "--partition",
    "--trainer.max_steps": "--max_steps",
    "--trainer.logger": "--out",
    "--trainer.default_root_dir": "--out",
    "--model.evaluation.results_dir": "--out",
    "--checkpoint.dirpath": "--out",
    "--last_checkpoint.dirpath": "--out",
    "--checkpoint.monitor": "(selection is by val/score)",
    "--checkpoint.mode": "(selection is by val/score)",
    "--ckpt_path": "(each cell starts a new fit)",
}


class FitRun(Protocol):
    """What a finished `moe-mtl fit` leaves (a LightningCLI): its trainer, model and data module."""

    trainer: Any
    model: Any
    datamodule: Any


RunFit = Callable[[Sequence[str]], FitRun]  # `moe-mtl fit` arguments → the finished fit


@dataclass(frozen=True)
class Cell:
    """One fine-tuning run: an unseen task, a k-shot seed, a learning rate and a batch size (None: the config's)."""

    task: str
    seed: int
    lr: float
    batch_size: int | None = None

    @property
    def name(self) -> str:
        return f"lr{self.lr:g}" + (f"-bs{self.batch_size}" if self.batch_size is not None else "")

    def folder(self, out: Path) -> Path:
        return out / "cells" / self.task / f"seed{self.seed}" / self.name


# --- the tasks --------------------------------------------------------------------------------------------


def unseen_tasks(tasks: Sequence[Task], partition: str, names: Sequence[str] | None) -> list[Task]:
    """The tasks of `partition` (all, or those `names` lists), each with k-shot splits."""
    check = [task for task in tasks if task.partition == partition]
    if not check:
        counts = {part: sum(task.partition == part for task in tasks) for part in PARTITIONS}
        raise UsageError(f"--partition is {partition!r}, which holds no tasks; tasks per partition: {counts}")
    if names:
        by_name = {task.name: task for task in check}
        unknown = [name for name in names if name not in by_name]
        if unknown:
            raise UsageError(f"--tasks names {unknown}, not tasks of partition {partition!r}: {', '.join(by_name)}")
        check = [by_name[name] for name in dict.fromkeys(names)]
    without = [task.name for task in check if not task.fewshot]
    if without:
        raise UsageError(f"tasks {without} of partition {partition!r} have no k-shot train/dev splits")
    return check


def fewshot_seeds(tasks: Sequence[Task], seeds: Sequence[int] | None) -> list[int]:
    """`seeds` (default: those of the first task), checked against every task's k-shot seeds."""
    chosen = list(dict.fromkeys(seeds)) if seeds else list(tasks[0].fewshot)
    for task in tasks:
        missing = [seed for seed in chosen if seed not in task.fewshot]
        if missing:
            raise UsageError(f"--seeds {missing}: task {task.name!r} has k-shot splits for seeds {list(task.fewshot)}")
    return chosen


def cell_partition(tasks: Sequence[Task], task: Task) -> dict[str, list[str]]:
    """The `data.partition` of a cell: the seen tasks (kept in the task table) and the one unseen task."""
    partition = {part: [] for part in PARTITIONS}
    partition["train"] = [t.name for t in tasks if t.partition == "train"]
    partition[task.partition].append(task.name)
    return partition


# --- one cell ---------------------------------------------------------------------------------------------


def cell_args(
    config_args: Sequence[str],
    cell: Cell,
    folder: Path,
    partition: str,
    init_from: str | None,
    unseen_routes: str | None,
    max_steps: int | None,
) -> list[str]:
    """The `moe-mtl fit` arguments of a cell: the user's config and overrides, then what the cell sets (last wins)."""
    logger = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(folder), "name": "", "version": ""},  # events in the cell folder itself
    }
    args = [
        "fit",
        *config_args,
        f"--data.partition={folder / 'partition.json'}",
        f"--data.fewshot_seed={cell.seed}",
        f"--data.train_partitions={partition}",
        f"--data.val_partitions={partition}",
        f"--data.test_partitions={partition}",
        f"--model.optim.lr={cell.lr!r}",
        *([f"--data.batch_size={cell.batch_size}"] if cell.batch_size is not None else []),
        "--checkpoint.monitor=val/score",  # the dev score that selects the checkpoint and the lr
        "--checkpoint.mode=max",
        f"--model.evaluation.results_dir={folder}",
        f"--trainer.logger={json.dumps(logger)}",
        f"--trainer.default_root_dir={folder}",
        f"--checkpoint.dirpath={folder / 'checkpoints'}",
        f"--last_checkpoint.dirpath={folder / 'checkpoints'}",
    ]
    if init_from is not None:
        args.append(f"--model.transfer.init_from={init_from}")
    if unseen_routes is not None:
        args.append(f"--model.transfer.unseen_routes={unseen_routes}")
    if max_steps is not None:
        args.append(f"--trainer.max_steps={max_steps}")
    return args


def run_cell(
    cell: Cell, folder: Path, args: Sequence[str], partition: dict[str, list[str]], run_fit: RunFit
) -> dict[str, Any]:
    """Fit a cell from scratch in `folder` (`run_fit(args)`), test its best checkpoint, write and return its result."""
    if folder.exists():  # a half-finished cell: its checkpoints and evaluations would mix with the new ones
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / "partition.json").write_text(json.dumps(partition, indent=1) + "\n")
    cli = run_fit(args)
    checkpoint = cli.trainer.checkpoint_callback  # `checkpoint`, selecting by val/score
    if not checkpoint.best_model_path:
        raise RuntimeError(
            f"cell {folder}: the fit saved no best checkpoint (no validation ran); validate at least once, e.g. "
            "--trainer.check_val_every_n_epoch 1 or a --trainer.val_check_interval below --max_steps"
        )
    dev_score = float(checkpoint.best_model_score)
    cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best", verbose=False)
    (evaluation,) = (folder / "evaluation").glob("test-*.json")
    rows = [row for row in json.loads(evaluation.read_text())["tasks"] if row["task"] == cell.task]
    if len(rows) != 1:
        raise RuntimeError(f"{evaluation} has {len(rows)} rows of task {cell.task!r}; expected one")
    result = {
        "task": cell.task,
        "seed": cell.seed,
        "lr": cell.lr,
        "batch_size": cell.batch_size,
        "dev_score": dev_score,
        "test_score": rows[0]["score"],
        "test_examples": rows[0]["examples"],
        "checkpoint": str(Path(checkpoint.best_model_path).relative_to(folder)),
    }
    # written last and whole (rename): its presence means the cell finished
    with atomic_path(folder / RESULT_FILE) as temporary:
        temporary.write_text(json.dumps(result, indent=1) + "\n")
    return result


# --- selection and the tables (pure) ---------------------------------------------------------------------


def select_best(results: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """The result with the best dev score among one (task, seed)'s grid, in grid order; None if any cell is
    missing (no selection from part of the grid). Ties keep the earlier grid point, as CrossFit's grid loop
    keeps the first best (`dev > best` in INK-USC/CrossFit tune_hps_singletask.py)."""
    if not results or any(result is None for result in results):
        return None
    best = results[0]
    for result in results[1:]:
        if result["dev_score"] > best["dev_score"]:
            best = result
    return best


def fewshot_rows(
    results: dict[Cell, dict[str, Any] | None],
    tasks: Sequence[str],
    seeds: Sequence[int],
    grid: Sequence[tuple[float, int | None]],
) -> list[dict[str, Any]]:
    """One row per (task, seed): the selected (lr, batch size) of `grid`, its dev and test score, and the cells
    of the grid that are missing."""
    rows = []
    for task in tasks:
        for seed in seeds:
            cells = [Cell(task, seed, lr, batch_size) for lr, batch_size in grid]
            found = [results.get(cell) for cell in cells]
            best = select_best(found)
            row = {"task": task, "seed": seed}
            row |= {key: best[key] if best else None for key in ("lr", "batch_size", "dev_score", "test_score")}
            row["missing_cells"] = " ".join(cell.name for cell, result in zip(cells, found, strict=True) if not result)
            rows.append(row)
    return rows


def task_summary(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per task: seeds with a selection, missing seeds, mean ± std of dev and test scores; then the "average"
    row: the mean over tasks of their means (None when a task has no complete seed)."""
    summary = []
    for task in dict.fromkeys(row["task"] for row in rows):
        done = [row for row in rows if row["task"] == task and row["test_score"] is not None]
        entry = {"task": task, "seeds": len(done), "missing_seeds": sum(r["task"] == task for r in rows) - len(done)}
        for kind in ("dev", "test"):
            mean, std = mean_std([row[f"{kind}_score"] for row in done]) if done else (None, None)
            entry |= {f"{kind}_mean": mean, f"{kind}_std": std}
        summary.append(entry)
    average = {"task": AVERAGE_ROW, "seeds": None, "missing_seeds": sum(e["missing_seeds"] for e in summary)}
    for kind in ("dev", "test"):
        means = [entry[f"{kind}_mean"] for entry in summary]
        average |= {f"{kind}_mean": None if None in means else sum(means) / len(means), f"{kind}_std": None}
    return [*summary, average]


def _cell_text(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def write_csv(path: Path, rows: Sequence[dict[str, Any]], fields: Sequence[str]) -> None:
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows({key: _cell_text(row[key]) for key in fields} for row in rows)


def render_markdown(summary: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]) -> str:
    def pm(entry: dict[str, Any], kind: str) -> str:
        if entry[f"{kind}_mean"] is None:
            return "—"
        std = entry[f"{kind}_std"] if entry["seeds"] != 1 else None  # no spread from one seed
        return f"{entry[f'{kind}_mean']:.3f}" + (f" ± {std:.3f}" if std is not None else "")

    lines = ["| Task | Seeds | Dev | Test |", "|---|---|---|---|"]
    for entry in summary:
        seeds = "" if entry["seeds"] is None else str(entry["seeds"])
        lines.append(f"| {entry['task']} | {seeds} | {pm(entry, 'dev')} | {pm(entry, 'test')} |")
    text = "\n".join(lines) + "\n\nMean ± std (population std) over k-shot seeds of the test score at the grid point "
    text += "(lr, batch size) with the best dev score; average: the mean over tasks of their means.\n"
    incomplete = [row for row in rows if row["test_score"] is None]
    if incomplete:
        text += f"\n{len(incomplete)} of {len(rows)} (task, seed) rows are incomplete (cells missing or failed):\n\n"
        text += "".join(f"- {row['task']} seed {row['seed']}: {row['missing_cells']}\n" for row in incomplete)
    return text


def fewshot(
    config_args: Sequence[str],
    out: str | Path,
    init_from: str | None = None,
    partition: str = "test",
    tasks: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    lrs: Sequence[float] = (1e-5, 2e-5, 5e-5),
    batch_sizes: Sequence[int] | None = None,
    unseen_routes: str | None = None,
    max_steps: int | None = None,
    *,
    load_datamodule: Callable[[Sequence[str]], MultiTaskDataModule],
    run_fit: RunFit,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[Cell]]:
    """Run (or resume) every cell, write the tables; returns (rows, summary, failed cells).

    `load_datamodule(config_args)` is the data module the fit options configure (for the tasks), `run_fit(args)`
    runs one `moe-mtl fit` (`moe_mtl.commands.lightning.run_lightning`): passed in, because the command sits above.
    """
    if not lrs or any(not (lr > 0 and math.isfinite(lr)) for lr in lrs):
        raise UsageError(f"--lrs is {list(lrs)}; give one or more positive learning rates")
    if batch_sizes is not None and (not batch_sizes or min(batch_sizes) < 1):
        raise UsageError(f"--batch_sizes is {list(batch_sizes)}; give one or more positive batch sizes")
    grid = [(lr, b) for lr in dict.fromkeys(lrs) for b in (dict.fromkeys(batch_sizes) if batch_sizes else [None])]
    if unseen_routes is not None and init_from is None:
        raise UsageError(
            f"--unseen_routes {unseen_routes} needs --init_from (routes of tasks new to an upstream model)"
        )
    # with the cells' model options, so that a bad --init_from or --unseen_routes is a usage error before any cell
    transfer = [f"--model.transfer.init_from={init_from}"] if init_from is not None else []
    transfer += [f"--model.transfer.unseen_routes={unseen_routes}"] if unseen_routes is not None else []
    datamodule = load_datamodule([*config_args, *transfer])
    all_tasks = datamodule.tasks
    chosen = unseen_tasks(all_tasks, partition, tasks)
    seeds = fewshot_seeds(chosen, seeds)
    saved = Path(datamodule.hparams.output_dir) / "tokenizer" / "tokenizer.json"
    if init_from is None and datamodule.hparams.tokenizer is None and not saved.is_file():
        raise UsageError(
            f"without --init_from, give the fit option data.tokenizer (e.g. the pretrained BART's) or have one saved "
            f"in {saved.parent}: else the cells would share a tokenizer trained on the first cell's k-shot examples"
        )
    out = Path(out).absolute()  # the checkpoint paths Lightning reports are absolute
    results: dict[Cell, dict[str, Any] | None] = {}
    failed = []
    cells = [Cell(task.name, seed, lr, b) for task in chosen for seed in seeds for lr, b in grid]
    for number, cell in enumerate(cells, start=1):
        folder = cell.folder(out)
        if (folder / RESULT_FILE).is_file():
            results[cell] = json.loads((folder / RESULT_FILE).read_text())
            log.info("cell %d/%d %s: finished before, skipped", number, len(cells), folder)
            continue
        log.info("cell %d/%d %s", number, len(cells), folder)
        task = next(task for task in chosen if task.name == cell.task)
        args = cell_args(config_args, cell, folder, partition, init_from, unseen_routes, max_steps)
        try:
            results[cell] = run_cell(cell, folder, args, cell_partition(all_tasks, task), run_fit)
        except Exception:  # one failed cell must not lose the others: recorded, counted, and run again next time
            (folder / ERROR_FILE).write_text(traceback.format_exc())
            log.error("cell %s failed; the traceback is in %s", folder, folder / ERROR_FILE)
            results[cell] = None
            failed.append(cell)
        finally:  # the cell's model, trainer and data are unreachable now; free them before the next cell
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    rows = fewshot_rows(results, [task.name for task in chosen], seeds, grid)
    summary = task_summary(rows)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "fewshot.csv", rows, ROW_FIELDS)
    write_csv(out / "fewshot_summary.csv", summary, SUMMARY_FIELDS)
    (out / "fewshot_summary.md").write_text(render_markdown(summary, rows))
    return rows, summary, failed
