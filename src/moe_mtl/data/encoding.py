"""Tokenised splits and the batches the model reads.

`encode_split` tokenises the examples of one split with `datasets.map(batched=True)` into an Arrow
file named by a fingerprint of everything that decides the result (examples, tokenizer, maximum
lengths), so a second run finds the file and does no tokenisation. `EncodedSplit` serves the
file's rows to a DataLoader (tasks stay contiguous, so samplers address a task by its row range)
and `collate` pads them into a batch.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset, Features, Value
from datasets import Sequence as ListOf
from torch.utils.data import Dataset as TorchDataset
from transformers import PreTrainedTokenizerBase

from ..ownership import process_alive
from .tasks import DataError, Example
from .tokenizer import tokenizer_fingerprint

log = logging.getLogger(__name__)

ENCODING_VERSION = "2"  # bump when the encoded columns or the checks of `_encode_batch` change
WORK_PREFIX = ".encoding-"  # a preparation's own folder in the cache: .encoding-<pid>@<host>@<random>
LABEL_PAD = -100  # ignored by the cross-entropy loss
MODEL_INPUTS = ("task_ids", "input_ids", "attention_mask", "labels")  # the batch keys the model's forward takes
RAW_FEATURES = Features(
    {
        "task_id": Value("int32"),
        "example_id": Value("int32"),
        "input": Value("string"),
        "references": ListOf(Value("string")),
        "options": ListOf(Value("string")),
        "origin": Value("string"),
    }
)
ENCODED_FEATURES = Features(
    {
        "task_id": Value("int32"),
        "example_id": Value("int32"),
        "references": ListOf(Value("string")),
        "options": ListOf(Value("string")),
        "input_ids": ListOf(Value("int32")),
        "labels": ListOf(Value("int32")),
        "input_truncated": Value("bool"),
        "target_truncated": Value("bool"),
    }
)


@dataclass(frozen=True)
class SplitPart:
    """The examples one task contributes to a split."""

    task_id: int
    task_name: str
    examples: Sequence[Example]


def split_fingerprint(parts: Sequence[SplitPart], tokenizer: PreTrainedTokenizerBase, lengths: tuple[int, int]) -> str:
    """Hash of the examples (task by task), the tokenizer and the maximum (input, target) lengths."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{ENCODING_VERSION}|{tokenizer_fingerprint(tokenizer)}|{lengths}".encode())
    for part in parts:
        digest.update(f"\x1d{part.task_id}\x1f{part.task_name}".encode())
        for example in part.examples:
            digest.update("\x1e".join((example.input, *example.targets, "\x1f", *example.options)).encode())
            digest.update(b"\x00")
    return digest.hexdigest()


def check_max_lengths(tokenizer: PreTrainedTokenizerBase, **lengths: int) -> None:
    """Each maximum length (a data module option) must leave room for one token besides the special ones:
    the tokenizer does not cut below that, and a cut target would hold nothing."""
    minimum = tokenizer.num_special_tokens_to_add(pair=False) + 1
    for option, length in lengths.items():
        if length < minimum:
            raise DataError(
                f"data module option `{option}` is {length}; it must be at least {minimum} (the tokenizer's "
                f"{minimum - 1} special tokens and one token of text)"
            )


def _encode_batch(
    batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, max_input_length: int, max_target_length: int
) -> dict[str, list]:
    """Token ids of inputs and first references, cut to the maximum lengths; cut examples are flagged."""
    for references, origin in zip(batch["references"], batch["origin"], strict=True):
        for number, reference in enumerate(references, start=1):
            if not reference.strip():
                raise DataError(
                    f"{origin}: target {number} of {len(references)} is {reference!r}; every target (reference) "
                    "must hold text"
                )
    specials = tokenizer.num_special_tokens_to_add(pair=False)
    encoded = {}
    for column, flag, texts, limit in (
        ("input_ids", "input_truncated", batch["input"], max_input_length),
        ("labels", "target_truncated", [references[0] for references in batch["references"]], max_target_length),
    ):
        ids = tokenizer(texts, return_attention_mask=False)["input_ids"]
        cut = [len(row) > limit for row in ids]
        if any(cut):  # the tokenizer's own truncation keeps its special tokens
            cut_texts = [t for t, c in zip(texts, cut, strict=True) if c]
            short = tokenizer(cut_texts, truncation=True, max_length=limit, return_attention_mask=False)
            replacements = iter(short["input_ids"])
            ids = [next(replacements) if c else row for row, c in zip(ids, cut, strict=True)]
        encoded[column], encoded[flag] = ids, cut
    for row, target, origin in zip(encoded["labels"], batch["references"], batch["origin"], strict=True):
        if len(row) <= specials:  # text the tokenizer drops, e.g. characters a pretrained one does not know
            raise DataError(f"{origin}: the target {target[0]!r} tokenises to nothing; every example needs a target")
    return encoded


def encode_split(
    name: str,
    parts: Sequence[SplitPart],
    tokenizer: PreTrainedTokenizerBase,
    max_input_length: int,
    max_target_length: int,
    cache_dir: Path,
) -> tuple[Dataset, bool]:
    """Tokenise one split into `<cache_dir>/<name>-<fingerprint>.arrow`, or load that file if it exists.

    Returns (dataset, whether it came from the cache). Rows follow `parts` (tasks contiguous).
    """
    check_max_lengths(tokenizer, max_input_length=max_input_length, max_target_length=max_target_length)
    fingerprint = split_fingerprint(parts, tokenizer, (max_input_length, max_target_length))
    path = cache_dir / f"{name}-{fingerprint}.arrow"
    if path.is_file():
        return Dataset.from_file(str(path)), True
    cache_dir.mkdir(parents=True, exist_ok=True)
    remove_abandoned_work(cache_dir)
    work = cache_dir / f"{WORK_PREFIX}{os.getpid()}@{socket.gethostname()}@{uuid.uuid4().hex[:8]}"
    work.mkdir()
    try:
        encoded = _encode(name, parts, tokenizer, max_input_length, max_target_length, work / path.name, fingerprint)
        del encoded  # its file is moved into place whole, so that a killed run never leaves half a cache file
        os.replace(work / path.name, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Dataset.from_file(str(path)), False


def remove_abandoned_work(cache_dir: Path) -> list[Path]:
    """Remove what killed preparations left in `cache_dir`: work folders of processes that are gone, and `tmp*`
    files of the datasets library (earlier versions tokenised in the cache folder itself). Returns them."""
    removed = []
    for entry in cache_dir.iterdir():
        if entry.name.startswith(WORK_PREFIX):
            pid, host, _ = [*entry.name.removeprefix(WORK_PREFIX).split("@"), "", ""][:3]
            # a cache shared by several hosts: only this host can tell whether the process is gone
            if host != socket.gethostname() or (pid.isdigit() and process_alive(int(pid))):
                continue  # a preparation still running beside this one, or on another host
        elif not entry.name.startswith("tmp"):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    if removed:
        log.warning("removed %d leftovers of an interrupted data preparation from %s", len(removed), cache_dir)
    return removed


def _encode(
    name: str,
    parts: Sequence[SplitPart],
    tokenizer: PreTrainedTokenizerBase,
    max_input_length: int,
    max_target_length: int,
    path: Path,
    fingerprint: str,
) -> Dataset:
    """The tokenised split, written to `path`."""
    columns: dict[str, list] = {key: [] for key in RAW_FEATURES}
    for part in parts:
        for index, example in enumerate(part.examples):
            columns["task_id"].append(part.task_id)
            columns["example_id"].append(index)
            columns["input"].append(example.input)
            columns["references"].append(list(example.targets))
            columns["options"].append(list(example.options))
            columns["origin"].append(example.origin or f"task {part.task_name!r} {name} example {index}")
    raw = Dataset(pa.table(columns, schema=RAW_FEATURES.arrow_schema))  # skips from_dict's per-value encoding
    encoded = raw.map(
        _encode_batch,
        batched=True,
        fn_kwargs={
            "tokenizer": tokenizer,
            "max_input_length": max_input_length,
            "max_target_length": max_target_length,
        },
        remove_columns=["input", "origin"],
        features=ENCODED_FEATURES,
        cache_file_name=str(path),
        new_fingerprint=fingerprint,
        desc=f"tokenising {name}",
    )
    return encoded


def truncation_counts(dataset: Dataset) -> dict[int, tuple[int, int, int]]:
    """task id → (inputs cut, targets cut, examples) of an encoded split."""
    table = dataset.with_format("arrow")[:]
    task_ids = table["task_id"].to_numpy()
    inputs_cut = table["input_truncated"].to_numpy(zero_copy_only=False)
    targets_cut = table["target_truncated"].to_numpy(zero_copy_only=False)
    return {
        int(task_id): (int(inputs_cut[rows].sum()), int(targets_cut[rows].sum()), int(rows.sum()))
        for task_id in np.unique(task_ids)
        for rows in [task_ids == task_id]
    }


class EncodedSplit(TorchDataset):
    """The rows of an encoded split as a map-style dataset; `__getitems__` serves a whole batch at once.

    task_ranges: (task id, first row, end row) per task, in row order.
    """

    def __init__(self, dataset: Dataset, task_names: Sequence[str]):
        table = dataset.with_format("arrow")[:]
        self.task_names = list(task_names)
        self.task_ids = table["task_id"].to_numpy()
        self.example_ids = table["example_id"].to_numpy()
        self._inputs = self._ragged(table["input_ids"])
        self._labels = self._ragged(table["labels"])
        self._references = table["references"].combine_chunks()
        self._options = table["options"].combine_chunks()
        starts = np.flatnonzero(np.diff(self.task_ids, prepend=-1)) if len(self.task_ids) else np.array([], int)
        ends = np.append(starts[1:], len(self.task_ids))
        self.task_ranges = [(int(self.task_ids[s]), int(s), int(e)) for s, e in zip(starts, ends, strict=True)]

    @staticmethod
    def _ragged(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
        lists = column.combine_chunks()
        return lists.values.to_numpy(), lists.offsets.to_numpy()

    @property
    def task_sizes(self) -> list[int]:
        return [end - start for _, start, end in self.task_ranges]

    def __len__(self) -> int:
        return len(self.task_ids)

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        take = pa.array(indices, type=pa.int64())
        references = self._references.take(take).to_pylist()
        options = self._options.take(take).to_pylist()
        (inputs, input_offsets), (labels, label_offsets) = self._inputs, self._labels
        return [
            {
                "task_id": int(self.task_ids[i]),
                "task_name": self.task_names[self.task_ids[i]],
                "example_id": int(self.example_ids[i]),
                "input_ids": inputs[input_offsets[i] : input_offsets[i + 1]],
                "labels": labels[label_offsets[i] : label_offsets[i + 1]],
                "references": refs,
                "options": opts,
            }
            for i, refs, opts in zip(indices, references, options, strict=True)
        ]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]


def _pad(rows: Sequence[np.ndarray], value: int) -> torch.Tensor:
    padded = np.full((len(rows), max(len(row) for row in rows)), value, dtype=np.int64)
    for i, row in enumerate(rows):
        padded[i, : len(row)] = row
    return torch.from_numpy(padded)


def collate(examples: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Pad a list of rows to the longest in the batch.

    Returns task_ids (B,), input_ids and attention_mask (B, L_in), labels (B, L_out) padded with -100,
    example_ids (B,) (row of the example in its task's split), and the lists task_names (B),
    references (B × refs) and options (B × options) for metrics.
    """
    input_ids = _pad([e["input_ids"] for e in examples], pad_token_id)
    lengths = torch.tensor([len(e["input_ids"]) for e in examples])
    return {
        "task_ids": torch.tensor([e["task_id"] for e in examples], dtype=torch.long),
        "input_ids": input_ids,
        "attention_mask": (torch.arange(input_ids.shape[1]) < lengths[:, None]).long(),
        "labels": _pad([e["labels"] for e in examples], LABEL_PAD),
        "example_ids": torch.tensor([e["example_id"] for e in examples], dtype=torch.long),
        "task_names": [e["task_name"] for e in examples],
        "references": [e["references"] for e in examples],
        "options": [e["options"] for e in examples],
    }
