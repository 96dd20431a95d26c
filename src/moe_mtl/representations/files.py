"""Files of task representations (Ye et al. 2022): the MoE option `task_embeddings` (the task table's initial
rows), `moe-mtl represent`'s output, the cache and the unseen-route source `representation: <file>`.

Formats: .pt {"task_names", "vectors", meta...} or .json {"task": [floats]}, whose rows are found by task name;
or a plain (tasks, width) matrix (.pt tensor, .npy, .json list of rows), whose rows are in task order.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..atomic_files import atomic_path
from ..data.tasks import shortened
from ..errors import UsageError

if TYPE_CHECKING:
    from ..models import MoEOptions

FILE_SUFFIXES = (".pt", ".json", ".npy")


def save_representations(path: str | Path, task_names: Sequence[str], vectors: torch.Tensor, **meta: Any) -> None:
    """Write representations (T, d) of `task_names`: .pt {"task_names", "vectors", **meta} or .json
    {"task": [floats]} (no meta). Written whole or not at all (`atomic_path`)."""
    path = Path(path)
    names = list(task_names)
    if vectors.dim() != 2 or vectors.shape[0] != len(names):
        raise UsageError(
            f"{path}: vectors of shape {tuple(vectors.shape)} for {len(names)} task names; expected "
            f"({len(names)}, width)"
        )
    if len(set(names)) != len(names):
        duplicates = sorted({name for name in names if names.count(name) > 1})
        raise UsageError(f"{path}: task names {duplicates} appear more than once")
    if path.suffix not in (".pt", ".json"):
        raise UsageError(f"{path}: representation files are written as .pt or .json, not {path.suffix!r}")
    vectors = vectors.detach().to("cpu", torch.float32)
    with atomic_path(path) as temp:
        if path.suffix == ".pt":
            torch.save({**meta, "task_names": names, "vectors": vectors}, temp)
        else:
            temp.write_text(json.dumps(dict(zip(names, vectors.tolist(), strict=True)), indent=1) + "\n")


def check_representation_file(path: str | Path) -> Path:
    """`path`, if it is a file of a readable kind (suffix); a ValueError naming it otherwise."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"representation file {path} does not exist")
    if path.suffix not in FILE_SUFFIXES:
        raise UsageError(f"representation file {path} has suffix {path.suffix!r}; allowed: {', '.join(FILE_SUFFIXES)}")
    return path


def load_representations(path: str | Path, tasks: Sequence[str] | int, dim: int | None = None) -> torch.Tensor:
    """The representations (T, d) float32 of `tasks` (names, or a count of task ids), rows in task order, from a file.

    Files with task names (.pt dict, .json object) must name exactly the tasks of `tasks`; a plain matrix
    (.pt tensor, .npy, .json list of rows) is taken as rows in task order, so it needs one row per task.
    With a count (a model built without task names), only a plain matrix can be read. With `dim`, the
    width must be `dim`.
    """
    path = check_representation_file(path)
    names = [f"task {i}" for i in range(tasks)] if isinstance(tasks, int) else list(tasks)
    named, matrix = _read_vectors(path)
    if named is not None and isinstance(tasks, int):
        raise UsageError(
            f"representation file {path} gives vectors by task name, but the model was built without task names "
            f"({tasks} task ids): build it through MoEMultiTaskModule or `build_model(task_names=...)`, or give a "
            "plain (tasks, width) matrix"
        )
    if named is not None:
        missing = [name for name in names if name not in named]
        unknown = [name for name in named if name not in set(names)]
        if missing:
            raise UsageError(
                f"representation file {path} has no vector for tasks {shortened(missing)}; it has: "
                f"{shortened(list(named))}"
            )
        if unknown:
            raise UsageError(
                f"representation file {path} names tasks the data does not have: {shortened(unknown)}; "
                f"the data's tasks: {shortened(names)}"
            )
        rows = [named[name] for name in names]
        widths = sorted({len(row) for row in rows})
        if len(widths) > 1:
            raise UsageError(f"representation file {path} holds vectors of different widths {widths}")
        matrix = torch.as_tensor(np.asarray(rows, dtype=np.float32)).reshape(len(rows), -1)
    elif matrix.dim() != 2 or matrix.shape[0] != len(names):
        raise UsageError(
            f"representation file {path} holds a matrix of shape {tuple(matrix.shape)} without task "
            f"names; its rows are taken in task order, so it needs one row per task: ({len(names)}, "
            f"width) for {shortened(names)}"
        )
    if dim is not None and matrix.shape[1] != dim:
        raise UsageError(f"representation file {path} holds vectors of width {matrix.shape[1]}; expected width {dim}")
    if not torch.isfinite(matrix).all():
        raise UsageError(f"representation file {path} holds non-finite values (nan or inf)")
    return matrix.float()


def _read_vectors(path: Path) -> tuple[dict[str, Sequence[float]] | None, torch.Tensor | None]:
    """(task name → vector, None) of a file with names, or (None, matrix) of a plain matrix."""
    try:
        if path.suffix == ".npy":
            return None, torch.as_tensor(np.load(path, allow_pickle=False))
        if path.suffix == ".json":
            value = json.loads(path.read_text())
        else:
            value = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise UsageError(f"representation file {path} could not be read: {err}") from None
    if isinstance(value, torch.Tensor):
        return None, value
    if isinstance(value, dict) and "vectors" in value and "task_names" in value:
        vectors = torch.as_tensor(value["vectors"])
        if vectors.dim() != 2 or vectors.shape[0] != len(value["task_names"]):
            raise UsageError(
                f"representation file {path}: vectors of shape {tuple(vectors.shape)} for "
                f"{len(value['task_names'])} task names"
            )
        if len(set(value["task_names"])) != len(value["task_names"]):
            raise UsageError(f"representation file {path} names some task more than once")
        return dict(zip(value["task_names"], vectors.tolist(), strict=True)), None
    if isinstance(value, dict) and all(_is_vector(row) for row in value.values()):
        return value, None
    if isinstance(value, list) and all(_is_vector(row) for row in value):
        return None, torch.as_tensor(np.asarray(value, dtype=np.float32))
    raise UsageError(
        f"representation file {path} holds {type(value).__name__}; expected {{'task_names', 'vectors'}} "
        "(.pt), {task: [numbers]} (.json), or a (tasks, width) matrix"
    )


def _is_vector(row: Any) -> bool:
    return isinstance(row, list) and all(isinstance(x, int | float) and not isinstance(x, bool) for x in row)


def read_task_embeddings(path: str | Path, tasks: Sequence[str] | int | None) -> torch.Tensor | None:
    """`load_representations` of the MoE option `task_embeddings`, whose errors name the option; `tasks` None checks
    only the file (before the data, which name the tasks, are read) and returns None."""
    try:
        if tasks is None:
            check_representation_file(path)
            return None
        return load_representations(path, tasks)
    except ValueError as err:
        raise UsageError(f"MoE option `task_embeddings`: {err}") from None


def configured_representations(moe: MoEOptions, task_names: Sequence[str] | None) -> torch.Tensor | None:
    """The task representations (num_tasks, d) the MoE option `task_embeddings` names, rows of `task_names` (None:
    task ids `task0`, `task1`, …), for `models.build.build_model(task_representations=...)`; None when it is unset."""
    if moe.task_embeddings is None:
        return None
    return read_task_embeddings(moe.task_embeddings, task_names or [f"task{i}" for i in range(moe.num_tasks)])
