import itertools
from collections import Counter

import numpy as np
import pytest

from moe_mtl.data.sampling import (
    HeterogeneousBatchSampler,
    HomogeneousBatchSampler,
    SequentialTaskBatchSampler,
    shard,
    task_probabilities,
)

SIZES = [40, 24, 8, 16]  # multiples of 8 = batch_size 2 × up to 4 ranks
OFFSETS = np.cumsum([0, *SIZES])


def task_of(row):
    return int(np.searchsorted(OFFSETS, row, side="right") - 1)


def ranks(world, cls=HomogeneousBatchSampler, sizes=SIZES, **kwargs):
    """One epoch of every simulated rank: rank → list of batches."""
    kwargs.setdefault("seed", 7)
    return [list(cls(sizes, 2, num_replicas=world, rank=rank, **kwargs)) for rank in range(world)]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("task_sampling", ["proportional", "temperature", "uniform"])
def test_homogeneous_batches_same_task_across_ranks_equal_counts(world, task_sampling):
    epochs = ranks(world, task_sampling=task_sampling)
    assert len({len(batches) for batches in epochs}) == 1
    assert len(epochs[0]) == len(HomogeneousBatchSampler(SIZES, 2, num_replicas=world, rank=0))
    for step in zip(*epochs, strict=True):
        tasks = {task_of(row) for batch in step for row in batch}
        assert len(tasks) == 1  # every batch homogeneous, and the same task on every rank


@pytest.mark.parametrize("world", [1, 2, 4])
def test_proportional_epoch_gives_every_row_once_disjoint_across_ranks(world):
    epochs = ranks(world)
    rows = [row for batches in epochs for batch in batches for row in batch]
    assert sorted(rows) == list(range(sum(SIZES)))
    per_rank = [{row for batch in batches for row in batch} for batches in epochs]
    assert all(not a & b for a, b in itertools.combinations(per_rank, 2))


def test_uneven_chunks_pad_by_wrapping_and_every_row_appears():
    sizes = [5, 7, 3]
    epochs = ranks(3, sizes=sizes)
    counts = Counter(row for batches in epochs for batch in batches for row in batch)
    assert set(counts) == set(range(sum(sizes)))
    assert sum(counts.values()) - sum(sizes) < 3 * len(sizes)  # < W repeats per task (its last chunk only)
    assert all(len(batch) > 0 for batches in epochs for batch in batches)


def test_shard_splits_a_chunk_into_equal_shares():
    chunk = np.arange(5)
    shares = [shard(chunk, rank, 3).tolist() for rank in range(3)]
    assert shares == [[0, 1], [2, 3], [4, 0]]


def test_independent_tasks_per_rank():
    epochs = ranks(3, sync_tasks=False)
    assert len({len(b) for b in epochs}) == 1
    assert all(len({task_of(row) for row in batch}) == 1 for batches in epochs for batch in batches)
    rows = Counter(row for batches in epochs for batch in batches for row in batch)
    assert set(rows) == set(range(sum(SIZES)))
    steps = list(zip(*epochs, strict=True))
    assert any(len({task_of(batch[0]) for batch in step}) > 1 for step in steps)


def test_deterministic_from_seed_and_epoch():
    def epoch(seed, number):
        sampler = HomogeneousBatchSampler(SIZES, 2, seed=seed, num_replicas=1, rank=0)
        sampler.sampler.set_epoch(number)  # where Lightning calls it
        return list(sampler)

    assert epoch(0, 3) == epoch(0, 3)
    assert epoch(0, 3) != epoch(0, 4)
    assert epoch(0, 3) != epoch(1, 3)


def test_iterating_again_without_set_epoch_moves_on():
    sampler = HomogeneousBatchSampler(SIZES, 2, num_replicas=1, rank=0)
    first, second = list(sampler), list(sampler)
    assert sampler.epoch == 2 and first != second


@pytest.mark.parametrize("cls", [HomogeneousBatchSampler, HeterogeneousBatchSampler])
@pytest.mark.parametrize("stop", [0, 5, 22, 27, 40])
def test_resume_continues_the_same_sequence(cls, stop):
    def sampler():
        return cls(SIZES, 2, task_sampling="temperature", seed=3, num_replicas=2, rank=1)

    def run(sampler, epochs, limit=None):
        """Iterate epochs as Lightning does (set_epoch, then iterate), stopping after `limit` batches."""
        batches = []
        for epoch in epochs:
            sampler.sampler.set_epoch(epoch)
            iterator = iter(sampler)
            while len(batches) != limit and (batch := next(iterator, None)) is not None:
                batches.append(batch)
            if len(batches) == limit:
                break
        return batches

    expected = run(sampler(), [0, 1])
    first = sampler()
    drawn = run(first, [0, 1], limit=stop)
    state = first.state_dict()
    resumed = sampler()
    resumed.load_state_dict(state)
    rest = run(resumed, range(state["epoch"], 2))  # Lightning sets the restored epoch again
    assert drawn + rest == expected


def test_epoch_offset_maps_the_trainers_epoch_numbers_and_is_saved():
    def sampler():
        return HomogeneousBatchSampler(SIZES, 2, num_replicas=1, rank=0)

    expected = sampler()
    expected.set_epoch(3)
    shifted = sampler()
    shifted.load_state_dict({**expected.state_dict(), "epoch_offset": 1})
    shifted.sampler.set_epoch(4)  # the trainer's epoch 4 is plan epoch 3
    assert list(shifted) == list(expected) and shifted.state_dict()["epoch_offset"] == 1


def test_resume_with_another_layout_warns_and_keeps_the_fraction():
    state = HomogeneousBatchSampler(SIZES, 2, num_replicas=1, rank=0).state_dict()
    state["position"] = 22  # half of the 44 batches
    other = HomogeneousBatchSampler(SIZES, 2, num_replicas=2, rank=0)
    with pytest.warns(UserWarning, match="resuming at batch 11 of epoch 0"):
        other.load_state_dict(state)
    assert len(list(other)) == 11


def test_task_probabilities():
    np.testing.assert_allclose(task_probabilities([100, 25], "proportional"), [0.8, 0.2])
    np.testing.assert_allclose(task_probabilities([100, 25], "temperature", 2.0), [2 / 3, 1 / 3])
    np.testing.assert_allclose(task_probabilities([100, 25], "uniform"), [0.5, 0.5])


@pytest.mark.parametrize(("task_sampling", "temperature"), [("temperature", 2.0), ("temperature", 4.0), ("uniform", 1)])
def test_temperature_sampling_frequencies(task_sampling, temperature):
    sizes = [4000, 1000, 250]
    sampler = HomogeneousBatchSampler(sizes, 5, task_sampling=task_sampling, temperature=temperature, rank=0)
    offsets = np.cumsum([0, *sizes])
    firsts = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        firsts += [batch[0] for batch in sampler]
    frequencies = np.bincount(np.searchsorted(offsets, firsts, side="right") - 1, minlength=3) / len(firsts)
    np.testing.assert_allclose(frequencies, task_probabilities(sizes, task_sampling, temperature), atol=0.02)


def test_temperature_sampling_draws_without_replacement_within_a_pass():
    sizes = [300, 30]  # T = 100: both tasks about equally often, the small one runs through several passes
    sampler = HomogeneousBatchSampler(sizes, 10, task_sampling="temperature", temperature=100.0, rank=0)
    small = [row for batch in sampler for row in batch if row >= 300]
    big = [row for batch in sampler for row in batch if row < 300]
    assert len(small) > 30
    for start in range(0, len(small) - 30 + 1, 30):
        assert sorted(small[start : start + 30]) == list(range(300, 330))
    assert len(set(big)) == len(big)


def test_heterogeneous_batches_mix_tasks_and_cover_every_row_once():
    epochs = ranks(2, cls=HeterogeneousBatchSampler, sizes=[40, 40, 40])
    batches = [batch for batches in epochs for batch in batches]
    assert sorted(row for batch in batches for row in batch) == list(range(120))
    assert any(len({row // 40 for row in batch}) > 1 for batch in batches)
    assert len(epochs[0]) == len(epochs[1]) == 30


def test_heterogeneous_temperature_frequencies():
    sizes = [9000, 1000]
    sampler = HeterogeneousBatchSampler(sizes, 50, task_sampling="temperature", temperature=2.0, rank=0)
    rows = np.array([row for batch in sampler for row in batch])
    np.testing.assert_allclose((rows >= 9000).mean(), 0.25, atol=0.02)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sequential_eval_batches_every_row_once_in_order(world):
    sizes = [7, 1, 12]
    per_rank = [list(SequentialTaskBatchSampler(sizes, 3, num_replicas=world, rank=r)) for r in range(world)]
    rows = [row for batches in per_rank for batch in batches for row in batch]
    assert sorted(rows) == list(range(20))
    offsets = np.cumsum([0, *sizes])
    for batches in per_rank:
        assert all(len(set(np.searchsorted(offsets, b, side="right"))) == 1 for b in batches)
        flat = [row for batch in batches for row in batch]
        assert flat == sorted(flat) and all(len(b) <= 3 for b in batches)
    assert max(map(len, per_rank)) - min(map(len, per_rank)) <= len(sizes)


@pytest.mark.parametrize(
    ("sizes", "world"), [([2, 2], 4), ([5, 1], 4), ([1, 1, 1, 1, 1], 3), ([7, 1, 12], 8), ([4], 4)]
)
def test_sequential_eval_gives_every_rank_rows_when_the_split_has_enough(sizes, world):
    per_rank = [list(SequentialTaskBatchSampler(sizes, 2, num_replicas=world, rank=r)) for r in range(world)]
    rows = [[row for batch in batches for row in batch] for batches in per_rank]
    assert sorted(row for mine in rows for row in mine) == list(range(sum(sizes)))
    assert min(map(len, rows)) >= 1 and max(map(len, rows)) - min(map(len, rows)) <= 1


def test_sequential_eval_with_fewer_rows_than_ranks_is_an_error():
    with pytest.raises(ValueError, match=r"has 3 examples for 4 ranks \(world size\).*at most 3 devices"):
        SequentialTaskBatchSampler([1, 2], 8, num_replicas=4, rank=0)


@pytest.mark.parametrize("cls", [HomogeneousBatchSampler, HeterogeneousBatchSampler])
@pytest.mark.parametrize(("task_sampling", "temperature"), [("temperature", 1.0), ("temperature", 0.5), ("uniform", 1)])
def test_a_task_drawn_for_no_slot_is_fine(cls, task_sampling, temperature):
    """With sizes [1000, 2] the small task often gets no slot in an epoch."""
    epochs = []
    for seed in range(40):
        sampler = cls([1000, 2], 16, task_sampling=task_sampling, temperature=temperature, seed=seed, rank=0)
        batches = list(sampler)
        assert len(batches) == len(sampler) and all(0 < len(batch) <= 16 for batch in batches)
        epochs.append([row for batch in batches for row in batch])
        assert set(epochs[-1]) <= set(range(1002))
    if task_sampling == "temperature":
        assert any(all(row < 1000 for row in rows) for rows in epochs)  # the case that crashed


def test_invalid_arguments():
    with pytest.raises(ValueError, match="rank 2 is outside"):
        HomogeneousBatchSampler(SIZES, 2, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="every task needs at least one row"):
        HomogeneousBatchSampler([3, 0], 2)
    with pytest.raises(ValueError, match="task_sampling is 'random'"):
        HomogeneousBatchSampler(SIZES, 2, task_sampling="random")


def test_defaults_to_a_single_process():
    sampler = HomogeneousBatchSampler(SIZES, 2)
    assert (sampler.num_replicas, sampler.rank) == (1, 0)
