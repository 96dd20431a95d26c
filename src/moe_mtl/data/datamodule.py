"""MultiTaskDataModule: tasks → tokenizer → cached token ids → batches with task ids, as one LightningDataModule."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any, Literal

from datasets import Dataset
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from .encoding import EncodedSplit, SplitPart, collate, encode_split, truncation_counts
from .sampling import (
    TASK_SAMPLING,
    HeterogeneousBatchSampler,
    HomogeneousBatchSampler,
    MultiTaskBatchSampler,
    SequentialTaskBatchSampler,
)
from .sources import CrossFitOptions, load_tasks
from .tasks import ALL_SEEDS, PARTITIONS, DataError, Task, check_choice, partition_list
from .tokenizer import run_tokenizer

log = logging.getLogger(__name__)

# dataset name → (split of the tasks, option that picks the partitions)
DATASETS = {
    "train": ("train", "train_partitions"),
    "val": ("dev", "val_partitions"),
    "test": ("test", "test_partitions"),
}
STAGE_DATASETS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}


def _by_task(counts: Counter) -> str:
    """The three largest non-zero counts of a task → count table, e.g. "a: 3, b: 1, c: 1, …"."""
    shown = [f"{task}: {n}" for task, n in counts.most_common() if n]
    return ", ".join(shown[:3]) + (", …" if len(shown) > 3 else "")


class MultiTaskDataModule(LightningDataModule):
    """Multi-task text-to-text data: tasks from a source, a tokenizer, homogeneous (one task per batch) training
    batches and per-task evaluation batches.

    Every task the partition names gets an id (its index in `task_names`): seen tasks first, then
    dev, then test tasks, so the model's task table also covers unseen tasks. Training uses the
    "train" split of the tasks in `train_partitions`, validation the "dev" split of
    `val_partitions`, test and predict the "test" split of `test_partitions`; with `fewshot_seed`,
    tasks that have k-shot splits use that seed's train/dev, or those of all seeds.

    Batches are dicts: task_ids (B,), input_ids and attention_mask (B, L_in), labels (B, L_out;
    padding -100), example_ids (B,), and the lists task_names, references and options (see `collate`).

    Args:
        source: Where tasks come from: "skills" (the built-in generated suite), "jsonl", "crossfit" or "hf".
        data_dir: Directory of the tasks (sources "jsonl" and "crossfit").
        partition: Task partition: a JSON file or mapping with "train", "dev", "test" lists of task names.
            None: the source's own (the skill suite's; "train" for tasks without task information).
        task_info: JSON file with metric, features and partition per task ("jsonl", "crossfit");
            default `<data_dir>/tasks.json`. A mapping task → metric (CrossFit's task_metrics.json) also works.
        skills: Options of the skill suite: seed, train_size, dev_size, test_size, shots, fewshot_seeds,
            min_items, max_items (see `SkillSuiteOptions`).
        hf: Tasks of source "hf", one mapping each: name, path, config, data_files, splits, input, target,
            options, metric, features, partition (see `HFTaskSpec`).
        crossfit: Options of source "crossfit" (`CrossFitOptions`), e.g. whether inputs start with " [<task>] ".
        tokenizer: Pretrained tokenizer name or folder (e.g. "facebook/bart-base"), used as it is. None: train a
            byte-level BPE on the training text, saved to `<output_dir>/tokenizer` and reused from there (an error
            if it was trained with another `vocab_size`, a warning if on other training text).
        vocab_size: Vocabulary size of a trained tokenizer (the `vocab_size` property gives the actual size).
        output_dir: Where the trained tokenizer and the tokenised-data cache go.
        max_input_length: Maximum input tokens, at least the tokenizer's special tokens + 1 (3 for BART's);
            longer inputs are cut (counted and warned per task).
        max_target_length: Maximum target tokens, at least the tokenizer's special tokens + 1; longer targets
            are cut (counted and warned per task).
        batch_size: Training examples per batch on each device.
        eval_batch_size: Evaluation examples per batch; None: `batch_size`.
        batching: "homogeneous" (one task per batch) or "heterogeneous" (mixed tasks, the ablation).
        task_sampling: Task of each batch drawn "proportional" to size (every example once per epoch),
            "temperature"-scaled (p ∝ n^(1/T)) or "uniform".
        sampling_temperature: T of temperature sampling.
        sync_tasks: All devices draw the same task at each step (homogeneous batching).
        train_partitions: Partition(s) whose tasks are trained on ("train" split).
        val_partitions: Partition(s) whose tasks are validated ("dev" split).
        test_partitions: Partition(s) whose tasks are tested and predicted ("test" split). None: "test"; but
            `moe-mtl test` and `predict` of a checkpoint (`--ckpt_path`) test the partitions it trained on, unless
            given this option.
        fewshot_seed: Which k-shot train/dev splits tasks that have them use (CrossFit's tasks, held-out skill
            tasks): one seed's, or "all": those of every seed concatenated, as the multi-task loaders of CrossFit
            and of the task-level MoE paper train (examples that repeat one of their task, or a dev example that
            is also in its task's train data, are kept and counted in a warning). None: the tasks' own splits.
        seed: Seed of the batch order (with the epoch number).
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        source: Literal["skills", "jsonl", "crossfit", "hf"] = "skills",
        data_dir: str | None = None,
        partition: str | dict[str, list[str]] | None = None,
        task_info: str | None = None,
        skills: dict[str, Any] | None = None,
        hf: list[dict[str, Any]] | None = None,
        crossfit: CrossFitOptions = CrossFitOptions(),  # noqa: B008 (a frozen-by-convention default, copied by asdict)
        tokenizer: str | None = None,
        vocab_size: int = 1024,
        output_dir: str = "runs/data",
        max_input_length: int = 128,
        max_target_length: int = 32,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        batching: Literal["homogeneous", "heterogeneous"] = "homogeneous",
        task_sampling: Literal["proportional", "temperature", "uniform"] = "proportional",
        sampling_temperature: float = 2.0,
        sync_tasks: bool = True,
        train_partitions: str | list[str] = "train",
        val_partitions: str | list[str] = "train",
        test_partitions: str | list[str] | None = None,
        fewshot_seed: int | Literal["all"] | None = None,
        seed: int = 0,
        num_workers: int = 0,
    ):
        super().__init__()
        options = crossfit if isinstance(crossfit, CrossFitOptions) else CrossFitOptions.from_dict(crossfit)
        if source != "crossfit" and options != CrossFitOptions():
            raise DataError(
                f"data module option `crossfit` is {asdict(options)}, but `source` is {source!r}; "
                "`crossfit` options apply to source 'crossfit' only"
            )
        crossfit = asdict(options)  # plain types in the hyper-parameters: checkpoints load with weights_only
        if not (fewshot_seed in (None, ALL_SEEDS) or type(fewshot_seed) is int):
            raise DataError(
                f"data module option `fewshot_seed` is {fewshot_seed!r}; it must be a seed (an integer), "
                f"{ALL_SEEDS!r} or None"
            )
        self.save_hyperparameters()
        check_choice("`batching`", batching, ("homogeneous", "heterogeneous"), "data module option")
        check_choice("`task_sampling`", task_sampling, TASK_SAMPLING, "data module option")
        for name in ("max_input_length", "max_target_length", "batch_size"):
            if self.hparams[name] < 1:
                raise DataError(f"data module option `{name}` is {self.hparams[name]}; it must be a positive integer")
        self.partitions = {
            option: partition_list(parts)
            for option, parts in (
                ("train_partitions", train_partitions),
                ("val_partitions", val_partitions),
                ("test_partitions", "test" if test_partitions is None else test_partitions),
            )
        }
        for option, parts in self.partitions.items():
            for part in parts:
                check_choice(f"a partition in `{option}`", part, PARTITIONS, "data module option")
        self._tasks: list[Task] | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._encoded: dict[str, Dataset] = {}
        self.datasets: dict[str, EncodedSplit] = {}
        self.train_sampler: MultiTaskBatchSampler | None = None
        self._sampler_state: dict[str, Any] | None = None

    # --- what the model needs -------------------------------------------------------------------------

    @property
    def tasks(self) -> list[Task]:
        """All tasks, index = task id (read or generated on first use)."""
        if self._tasks is None:
            hp = self.hparams
            self._tasks = load_tasks(
                hp.source,
                data_dir=hp.data_dir,
                partition=hp.partition,
                task_info=hp.task_info,
                skills=hp.skills,
                hf=hp.hf,
                crossfit=hp.crossfit,
            )
        return self._tasks

    @property
    def task_names(self) -> list[str]:
        return [task.name for task in self.tasks]

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def task_metrics(self) -> list[str]:
        """CrossFit metric name per task id."""
        return [task.metric for task in self.tasks]

    @property
    def task_features(self) -> list[dict[str, Any]]:
        """Features per task id (see `feature_table` for the numeric form)."""
        return [task.features for task in self.tasks]

    @property
    def task_partitions(self) -> list[str]:
        """Partition ("train", "dev", "test") per task id."""
        return [task.partition for task in self.tasks]

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The run's tokenizer (loaded, or trained and saved, on first use)."""
        if self._tokenizer is None:
            directory = Path(self.hparams.output_dir) / "tokenizer"
            texts = self._training_texts if self.partitions["train_partitions"] else None
            self._tokenizer = run_tokenizer(self.hparams.tokenizer, directory, texts, self.hparams.vocab_size)
        return self._tokenizer

    @property
    def tokenizer_path(self) -> str:
        """Where the run's tokenizer loads from: its name, or the folder of the one trained here."""
        if self.hparams.tokenizer is not None:
            return self.hparams.tokenizer
        _ = self.tokenizer  # trains and saves it on first use
        return str((Path(self.hparams.output_dir) / "tokenizer").resolve())

    @property
    def vocab_size(self) -> int:
        """Tokens of the tokenizer, special tokens included: the model's vocabulary size."""
        return len(self.tokenizer)

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    # --- data -----------------------------------------------------------------------------------------

    def _parts(self, name: str) -> list[SplitPart]:
        split, option = DATASETS[name]
        parts = self.partitions[option]
        fewshot_seed = self.hparams.fewshot_seed
        chosen = [
            SplitPart(task_id, task.name, task.examples(split, fewshot_seed))
            for task_id, task in enumerate(self.tasks)
            if task.partition in parts
        ]
        if not chosen:
            counts = {part: self.task_partitions.count(part) for part in PARTITIONS}
            raise DataError(
                f"data module option `{option}` is {parts}, which hold no tasks; tasks per partition: {counts}"
            )
        return chosen

    def _training_texts(self) -> Iterable[str]:
        for part in self._parts("train"):
            for example in part.examples:
                yield example.input
                yield from example.targets

    def _encode(self, name: str) -> Dataset:
        if name not in self._encoded:
            hp = self.hparams
            cache = Path(hp.output_dir) / "cache"
            encoded, cached = encode_split(
                name, self._parts(name), self.tokenizer, hp.max_input_length, hp.max_target_length, cache
            )
            log.info("%s data: %d examples, %s", name, len(encoded), "loaded from the cache" if cached else "tokenised")
            self._encoded[name] = encoded
        return self._encoded[name]

    def _needed(self, names: Iterable[str]) -> list[str]:
        return [name for name in names if self.partitions[DATASETS[name][1]]]

    def prepare_data(self) -> None:
        """Load the tasks, train or load the tokenizer, tokenise every split into the cache (once per node)."""
        for name in self._needed(DATASETS):
            self._encode(name)

    def setup(self, stage: str | None = None) -> None:
        """Load the tokenised splits a stage needs from the cache (every rank); warn about cut examples."""
        names = STAGE_DATASETS[stage] if stage is not None else tuple(DATASETS)
        for name in self._needed(names):
            if name in self.datasets:
                continue
            encoded = self._encode(name)
            self.datasets[name] = EncodedSplit(encoded, self.task_names)
            self._warn_truncated(name, encoded)
            self._warn_pooled(name)

    def _warn_truncated(self, name: str, encoded: Dataset) -> None:
        hp = self.hparams
        for task_id, (inputs, targets, total) in truncation_counts(encoded).items():
            if inputs or targets:
                rank_zero_warn(
                    f"task {self.task_names[task_id]!r} ({name} data): {inputs} of {total} inputs cut to "
                    f"max_input_length={hp.max_input_length}, {targets} targets cut to "
                    f"max_target_length={hp.max_target_length}"
                )

    def _warn_pooled(self, name: str) -> None:
        """With `fewshot_seed` "all": count the pooled k-shot examples that repeat an earlier one of their task and, in
        dev data, those also in their task's pooled train split (the seeds sample one pool); all are kept."""
        split = DATASETS[name][0]
        if self.hparams.fewshot_seed != ALL_SEEDS or split == "test":
            return
        repeats, in_train, pooled = Counter(), Counter(), 0
        for part in self._parts(name):
            task = self.tasks[part.task_id]
            if not task.fewshot:
                continue
            pooled += len(part.examples)
            keys = [(example.input, example.targets) for example in part.examples]
            repeats[task.name] = len(keys) - len(set(keys))
            if split == "dev":
                train = {(example.input, example.targets) for example in task.examples("train", ALL_SEEDS)}
                in_train[task.name] = sum(key in train for key in keys)
        found = [
            f"{counts.total()} {what} ({_by_task(counts)})"
            for counts, what in (
                (repeats, "repeat an earlier example of their task"),
                (in_train, "are also in their task's train data"),
            )
            if counts.total()
        ]
        if found:
            rank_zero_warn(
                f"{name} data, k-shot {split} splits of all seeds (`fewshot_seed: {ALL_SEEDS}`): of {pooled} examples, "
                f"{' and '.join(found)}; all are kept, as CrossFit's loaders keep them"
            )

    def _dataset(self, name: str) -> EncodedSplit:
        if name not in self.datasets:
            option = DATASETS[name][1]
            if not self.partitions[option]:
                raise DataError(f"no {name} data: data module option `{option}` is empty")
            self.setup({"train": "fit", "val": "validate", "test": "test"}[name])
        return self.datasets[name]

    def _replicas(self) -> dict[str, int | None]:
        """World size and rank from the trainer when attached; else the samplers ask torch.distributed."""
        if self.trainer is None:
            return {"num_replicas": None, "rank": None}
        return {"num_replicas": self.trainer.world_size, "rank": self.trainer.global_rank}

    def _loader(self, dataset: EncodedSplit, batch_sampler) -> DataLoader:
        return DataLoader(
            dataset,
            batch_sampler=batch_sampler,
            collate_fn=partial(collate, pad_token_id=self.pad_token_id),
            num_workers=self.hparams.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        dataset = self._dataset("train")
        options = {
            "task_sampling": hp.task_sampling,
            "temperature": hp.sampling_temperature,
            "seed": hp.seed,
            **self._replicas(),
        }
        if hp.batching == "homogeneous":
            sampler = HomogeneousBatchSampler(dataset.task_sizes, hp.batch_size, sync_tasks=hp.sync_tasks, **options)
        else:
            sampler = HeterogeneousBatchSampler(dataset.task_sizes, hp.batch_size, **options)
        if self._sampler_state is not None:
            sampler.load_state_dict(self._sampler_state)
            self._sampler_state = None
        elif self.train_sampler is not None:  # reloaded (`reload_dataloaders_every_n_epochs`): same epoch numbering
            sampler.epoch_offset = self.train_sampler.epoch_offset
        self.train_sampler = sampler
        return self._loader(dataset, sampler)

    def _eval_loader(self, name: str) -> DataLoader:
        dataset = self._dataset(name)
        batch_size = self.hparams.eval_batch_size or self.hparams.batch_size
        return self._loader(dataset, SequentialTaskBatchSampler(dataset.task_sizes, batch_size, **self._replicas()))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    # --- resume ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The training sampler's position, saved in checkpoints.

        While fitting, the position is the number of batches the trainer has processed in the current
        epoch, not what the sampler has handed out (the DataLoader fetches ahead of training). A
        checkpoint saved after `fit` (or in `on_train_epoch_end`) of an epoch that `max_steps` or early
        stopping cut short resumes with the rest of that epoch.
        """
        if self.train_sampler is None:
            return {}
        state = self.train_sampler.state_dict()
        trainer = self.trainer
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING:
            state.update(self._fit_position(trainer, self.train_sampler))
        return {"train_sampler": state}

    @staticmethod
    def _fit_position(trainer: Trainer, sampler: MultiTaskBatchSampler) -> dict[str, int]:
        """Epoch, position and epoch offset of the next training batch, from the trainer's batch counter."""
        epoch = sampler.selected_epoch
        if epoch is None:  # no epoch started since the sampler was restored: it is where it was restored
            return {}
        position = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if position >= trainer.num_training_batches:  # the epoch is over (`limit_train_batches` included)
            return {"epoch": epoch + 1, "position": 0}
        offset = sampler.epoch_offset
        epochs = trainer.fit_loop.epoch_progress.current
        if epochs.processed == epochs.started:
            # The epoch stopped early (`max_steps`, early stopping) and Lightning has counted it as processed
            # (after `fit`, or in `on_train_epoch_end`): a resumed fit runs its rest under the next epoch number.
            offset += 1
        return {"epoch": epoch, "position": position, "epoch_offset": offset}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the sampler position; the next training dataloader continues the saved batch sequence."""
        self._sampler_state = state_dict.get("train_sampler")
        if self.train_sampler is not None and self._sampler_state is not None:
            self.train_sampler.load_state_dict(self._sampler_state)
            self._sampler_state = None
