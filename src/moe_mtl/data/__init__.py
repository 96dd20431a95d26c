"""Multi-task data: task sources, the built-in skill suite, the tokenizer, and per-task batching.

The names below load on first use: `moe_mtl.data.tasks` (the task model, metric names) is read by light commands
(`moe-mtl summarize`), which must not pay for importing torch and Lightning through the data module.
"""

from importlib import import_module

# public name → the module of this package that defines it
_EXPORTS = {
    "MultiTaskDataModule": "datamodule",
    "MODEL_INPUTS": "encoding",
    "EncodedSplit": "encoding",
    "collate": "encoding",
    "HeterogeneousBatchSampler": "sampling",
    "HomogeneousBatchSampler": "sampling",
    "SequentialTaskBatchSampler": "sampling",
    "task_probabilities": "sampling",
    "SOURCES": "sources",
    "CrossFitOptions": "sources",
    "HFTaskSpec": "sources",
    "SkillSuiteOptions": "sources",
    "load_tasks": "sources",
    "METRICS": "tasks",
    "PARTITIONS": "tasks",
    "DataError": "tasks",
    "Example": "tasks",
    "Partition": "tasks",
    "Task": "tasks",
    "feature_table": "tasks",
    "load_tokenizer": "tokenizer",
    "train_tokenizer": "tokenizer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
