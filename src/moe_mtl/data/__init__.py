"""Multi-task data: task sources, the built-in skill suite, the tokenizer, and per-task batching."""

from .datamodule import MultiTaskDataModule
from .encoding import MODEL_INPUTS, EncodedSplit, collate
from .sampling import (
    HeterogeneousBatchSampler,
    HomogeneousBatchSampler,
    SequentialTaskBatchSampler,
    task_probabilities,
)
from .sources import SOURCES, CrossFitOptions, HFTaskSpec, SkillSuiteOptions, load_tasks
from .tasks import METRICS, PARTITIONS, DataError, Example, Partition, Task, feature_table
from .tokenizer import load_tokenizer, train_tokenizer

__all__ = [
    "METRICS",
    "MODEL_INPUTS",
    "PARTITIONS",
    "SOURCES",
    "CrossFitOptions",
    "DataError",
    "EncodedSplit",
    "Example",
    "HFTaskSpec",
    "HeterogeneousBatchSampler",
    "HomogeneousBatchSampler",
    "MultiTaskDataModule",
    "Partition",
    "SequentialTaskBatchSampler",
    "SkillSuiteOptions",
    "Task",
    "collate",
    "feature_table",
    "load_tasks",
    "load_tokenizer",
    "task_probabilities",
    "train_tokenizer",
]
