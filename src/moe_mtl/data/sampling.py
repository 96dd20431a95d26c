"""Batch samplers over the rows of several tasks (each task a contiguous row range).

Training samplers plan an epoch as a list of *global chunks*: the rows that all ranks together
consume at one step. Rank r takes the r-th share of every chunk, so ranks see disjoint rows, draw
the same task at the same step and yield the same number of batches (DDP never waits on a rank
that ran out). A chunk that does not split evenly is padded by wrapping around: the only rows
that repeat within an epoch. Plans are pure functions of (seed, epoch) through a numpy Generator.

- `HomogeneousBatchSampler`: one task per batch (Ye et al. 2022), the task of each step drawn
  proportional to size, temperature-scaled (p ∝ n^(1/T)) or uniformly.
- `HeterogeneousBatchSampler`: mixed-task batches, for the ablation.
- `SequentialTaskBatchSampler`: evaluation; per task, in order, every row exactly once across ranks.

Under DDP, Lightning must not inject its DistributedSampler: use `Trainer(use_distributed_sampler=False)`.
Lightning calls `set_epoch` on `batch_sampler.sampler`, not on the batch sampler: the `sampler`
attribute forwards it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from ..errors import UsageError

TASK_SAMPLING = ("proportional", "temperature", "uniform")


def task_probabilities(sizes: Sequence[int], task_sampling: str, temperature: float = 1.0) -> np.ndarray:
    """Probability of drawing each task at a step: p ∝ n ("proportional"), n^(1/T) ("temperature") or 1."""
    sizes = np.asarray(sizes, dtype=np.float64)
    if task_sampling == "proportional":
        weights = sizes
    elif task_sampling == "temperature":
        weights = sizes ** (1.0 / temperature)
    else:
        weights = np.ones_like(sizes)
    return weights / weights.sum()


def shard(chunk: np.ndarray, rank: int, num_replicas: int) -> np.ndarray:
    """Rank `rank`'s ceil(c / W) rows of a global chunk of c rows; the chunk is padded by wrapping around."""
    per_rank = math.ceil(len(chunk) / num_replicas)
    return np.resize(chunk, per_rank * num_replicas)[rank * per_rank : (rank + 1) * per_rank]


def _offsets(sizes: Sequence[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)


def _stream(size: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` rows of one task: successive permutations, so no row repeats before all have been drawn."""
    if count == 0:  # a task that temperature or uniform sampling gave no slot
        return np.empty(0, dtype=np.int64)
    passes = math.ceil(count / size)
    return np.concatenate([rng.permutation(size) for _ in range(passes)])[:count]


def homogeneous_plan(
    sizes: Sequence[int], chunk_size: int, probabilities: np.ndarray | None, rng: np.random.Generator
) -> list[np.ndarray]:
    """One epoch of single-task chunks of global row indices; sum_t ceil(n_t / chunk_size) chunks.

    probabilities None: every row exactly once, chunks in random order (proportional to size).
    Otherwise the task of each chunk is drawn i.i.d. from `probabilities`; a task that runs out
    starts a new permutation, and no chunk spans two permutations.
    """
    per_task = [math.ceil(n / chunk_size) for n in sizes]
    if probabilities is None:
        order = rng.permutation(np.repeat(np.arange(len(sizes)), per_task))
    else:
        order = rng.choice(len(sizes), size=sum(per_task), p=probabilities)
    counts = np.bincount(order, minlength=len(sizes))
    chunks: list[Iterator[np.ndarray]] = []
    for n, count, offset in zip(sizes, counts, _offsets(sizes), strict=True):
        passes = [rng.permutation(n) + offset for _ in range(math.ceil(count / math.ceil(n / chunk_size)))]
        chunks.append(iter([rows[i : i + chunk_size] for rows in passes for i in range(0, n, chunk_size)]))
    return [next(chunks[task]) for task in order]


def heterogeneous_plan(
    sizes: Sequence[int], chunk_size: int, probabilities: np.ndarray | None, rng: np.random.Generator
) -> list[np.ndarray]:
    """One epoch of mixed-task chunks; ceil(N / chunk_size) chunks of global row indices.

    probabilities None: a permutation of all rows. Otherwise the task of every slot is drawn
    i.i.d. from `probabilities` and filled from that task's permutations.
    """
    total = int(sum(sizes))
    if probabilities is None:
        rows = rng.permutation(total)
    else:
        slots = rng.choice(len(sizes), size=total, p=probabilities)
        rows = np.empty(total, dtype=np.int64)
        for task, (n, offset) in enumerate(zip(sizes, _offsets(sizes), strict=True)):
            where = np.flatnonzero(slots == task)
            rows[where] = _stream(n, len(where), rng) + offset
    return [rows[i : i + chunk_size] for i in range(0, total, chunk_size)]


def _replicas(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    """(world size, rank): the given values, else torch.distributed's when initialised, else (1, 0)."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if num_replicas is None:
        num_replicas = torch.distributed.get_world_size() if distributed else 1
    if rank is None:
        rank = torch.distributed.get_rank() if distributed else 0
    if not 0 <= rank < num_replicas:
        raise UsageError(f"rank {rank} is outside [0, {num_replicas}) (num_replicas={num_replicas})")
    return num_replicas, rank


class EpochForwarder:
    """Stands in as `batch_sampler.sampler`, where Lightning looks for `set_epoch`, and forwards the call."""

    def __init__(self, owner: MultiTaskBatchSampler):
        self.owner = owner

    def set_epoch(self, epoch: int) -> None:
        self.owner.set_epoch(epoch)


class MultiTaskBatchSampler(Sampler[list[int]]):
    """Shared machinery of the training samplers: epochs, sharding by rank, resumable position.

    task_sizes: rows per task; task t owns rows [sum(sizes[:t]), sum(sizes[:t+1])).
    batch_size: rows per batch on each rank.
    task_sampling / temperature: how tasks are weighted (see `task_probabilities`).
    num_replicas / rank: default to torch.distributed's (1 and 0 when it is not initialised).
    """

    def __init__(
        self,
        task_sizes: Sequence[int],
        batch_size: int,
        *,
        task_sampling: str = "proportional",
        temperature: float = 2.0,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ):
        if not task_sizes or min(task_sizes) < 1:
            raise UsageError(f"every task needs at least one row; task sizes: {list(task_sizes)}")
        if batch_size < 1:
            raise UsageError(f"batch_size is {batch_size}; it must be a positive integer")
        if task_sampling not in TASK_SAMPLING:
            raise UsageError(f"task_sampling is {task_sampling!r}; allowed: {', '.join(map(repr, TASK_SAMPLING))}")
        if task_sampling == "temperature" and not temperature > 0:
            raise UsageError(f"the sampling temperature is {temperature}; it must be > 0")
        self.task_sizes = [int(n) for n in task_sizes]
        self.batch_size = batch_size
        self.task_sampling = task_sampling
        self.probabilities = (
            None if task_sampling == "proportional" else task_probabilities(self.task_sizes, task_sampling, temperature)
        )
        self.seed = seed
        self.num_replicas, self.rank = _replicas(num_replicas, rank)
        self.epoch = 0
        self.position = 0  # batches of `epoch` this rank has yielded
        self.epoch_offset = 0  # the trainer's epoch number minus the plan's (see `set_epoch`)
        self.selected_epoch: int | None = None  # the plan epoch of the last `set_epoch`: the one the trainer runs
        self.sampler = EpochForwarder(self)

    def set_epoch(self, epoch: int) -> None:
        """Select the plan of the trainer's epoch `epoch`, plan epoch `epoch - epoch_offset`; a new epoch starts
        at its first batch.

        The offset is 0 unless the sampler resumed a checkpoint saved after a fit that stopped mid-epoch:
        Lightning counts that epoch as completed and runs its rest under the next epoch number.
        """
        epoch -= self.epoch_offset
        self.selected_epoch = epoch
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def plan(self, epoch: int) -> list[np.ndarray]:
        """The batches of this rank in `epoch` (row indices)."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[list[int]]:
        """The batches of the current epoch from `position` on.

        Running to the end moves on to the next epoch, so iterating again without `set_epoch` reshuffles.
        """
        batches = self.plan(self.epoch)
        while self.position < len(batches):
            batch = batches[self.position]
            self.position += 1
            yield batch.tolist()
        self.epoch, self.position = self.epoch + 1, 0

    def _generator(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch])

    def _next_batch(self, epoch: int, position: int) -> tuple[int, int]:
        """(epoch, position) of the batch after `position` batches of `epoch`: the end of an epoch is the
        start of the next, where Lightning resumes (it creates the iterator before it calls `set_epoch`)."""
        return (epoch + 1, 0) if position >= len(self) else (epoch, position)

    def state_dict(self) -> dict[str, Any]:
        """Where the next batch comes from (epoch, position in it), for checkpoints."""
        epoch, position = self._next_batch(self.epoch, self.position)
        return {
            "epoch": epoch,
            "position": position,
            "num_batches": len(self),
            "seed": self.seed,
            "epoch_offset": self.epoch_offset,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position. If the epoch length changed (another world size or batch
        size), resume at the same fraction of the epoch and warn."""
        epoch, position = int(state["epoch"]), int(state["position"])
        if state.get("num_batches", len(self)) != len(self) or state.get("seed", self.seed) != self.seed:
            position = position * len(self) // max(int(state["num_batches"]), 1)
            warnings.warn(
                f"resuming a sampler saved with {state.get('num_batches')} batches per epoch and seed "
                f"{state.get('seed')}, now {len(self)} and {self.seed}: the batch sequence differs; resuming at "
                f"batch {position} of epoch {epoch}",
                stacklevel=2,
            )
        self.epoch, self.position = self._next_batch(epoch, position)
        self.epoch_offset = int(state.get("epoch_offset", 0))


class HomogeneousBatchSampler(MultiTaskBatchSampler):
    """Every batch holds rows of one task; examples are drawn without replacement within an epoch.

    An epoch has sum_t ceil(n_t / (batch_size · W)) steps (every row once with proportional sampling).
    sync_tasks (default): all W ranks draw the same task at each step (they route through the same
    experts and log the same keys). sync_tasks=False: each rank's batch has its own task, batches
    of size `batch_size` dealt round-robin to the ranks (the plan is padded with its first batches to
    a multiple of W).
    """

    def __init__(self, task_sizes: Sequence[int], batch_size: int, *, sync_tasks: bool = True, **kwargs):
        self.sync_tasks = sync_tasks
        super().__init__(task_sizes, batch_size, **kwargs)

    @property
    def _chunk_size(self) -> int:
        return self.batch_size * self.num_replicas if self.sync_tasks else self.batch_size

    def __len__(self) -> int:
        steps = sum(math.ceil(n / self._chunk_size) for n in self.task_sizes)
        return steps if self.sync_tasks else math.ceil(steps / self.num_replicas)

    def plan(self, epoch: int) -> list[np.ndarray]:
        chunks = homogeneous_plan(self.task_sizes, self._chunk_size, self.probabilities, self._generator(epoch))
        if self.sync_tasks:
            return [shard(chunk, self.rank, self.num_replicas) for chunk in chunks]
        dealt = [chunks[i % len(chunks)] for i in range(len(self) * self.num_replicas)]
        return dealt[self.rank :: self.num_replicas]


class HeterogeneousBatchSampler(MultiTaskBatchSampler):
    """Batches mix tasks (the ablation of homogeneous batching); ceil(N / (batch_size · W)) steps per epoch."""

    def __len__(self) -> int:
        return math.ceil(sum(self.task_sizes) / (self.batch_size * self.num_replicas))

    def plan(self, epoch: int) -> list[np.ndarray]:
        chunk_size = self.batch_size * self.num_replicas
        chunks = heterogeneous_plan(self.task_sizes, chunk_size, self.probabilities, self._generator(epoch))
        return [shard(chunk, self.rank, self.num_replicas) for chunk in chunks]


class SequentialTaskBatchSampler(Sampler[list[int]]):
    """Evaluation batches: task by task, in row order, each task's rows split into W contiguous slices.

    Every row is yielded exactly once across ranks (no padding, so nothing counts twice). Which rank
    takes a task's first (longest) slice rotates from task to task, so the ranks' row counts differ by
    at most one and every rank gets a batch; fewer rows than ranks is an error. Ranks may still yield
    different numbers of batches and a rank may see no row of a small task, so under DDP the module's
    evaluation must follow one contract:

    - no collectives in `validation_step` / `test_step`: no per-step `self.log(..., sync_dist=True)`,
      and no per-step logging under task-dependent keys (ranks would log different keys and hang);
    - accumulate per-task sums (e.g. correct and total counts) in tensors over ALL task ids, so every
      rank holds the same keys and shapes, tasks it never saw included;
    - reduce once at epoch end (`all_reduce` of the sums, torchmetrics' sync, or `self.log(...,
      sync_dist=True)` of every key in `on_validation_epoch_end`), then log.
    """

    def __init__(
        self, task_sizes: Sequence[int], batch_size: int, num_replicas: int | None = None, rank: int | None = None
    ):
        if batch_size < 1:
            raise UsageError(f"batch_size is {batch_size}; it must be a positive integer")
        self.task_sizes = [int(n) for n in task_sizes]
        self.batch_size = batch_size
        self.num_replicas, self.rank = _replicas(num_replicas, rank)
        total = sum(self.task_sizes)
        if total < self.num_replicas:  # Lightning stops with "DataLoader within local rank has zero length"
            raise UsageError(
                f"the evaluation split has {total} examples for {self.num_replicas} ranks (world size): every rank "
                f"needs at least one; evaluate on at most {total} devices, or give the split more examples"
            )
        self._batches = []
        first = 0  # the rank of the task's first slice
        for n, offset in zip(self.task_sizes, _offsets(self.task_sizes), strict=True):
            slices = np.array_split(np.arange(n) + offset, self.num_replicas)  # the first n % W are one row longer
            mine = slices[(self.rank - first) % self.num_replicas]
            first = (first + n) % self.num_replicas
            self._batches.extend(mine[i : i + batch_size].tolist() for i in range(0, len(mine), batch_size))

    def __len__(self) -> int:
        return len(self._batches)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches)
