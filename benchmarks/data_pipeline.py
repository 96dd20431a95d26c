"""Data-pipeline throughput: tokenisation, and sampler + collate against a tiny MoE-BART training step.

    .venv/bin/python benchmarks/data_pipeline.py [--tasks 160 --examples 10000 --batch-size 64]

Generates `tasks` × `examples` digit-sequence examples (skill-suite style), tokenises them with
`encode_split` (datasets.map into the cache; a second call reads the cache), then times what a
DataLoader does per training batch in the main process (homogeneous sampler + `__getitems__` +
`collate`) and a training step of a tiny MoE-BART (forward, backward, AdamW) on such batches.
Targets: sampler + collate below 2% of the training step; the default skill suite generated in under 2 s.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import BartConfig

from moe_mtl import MoEBartConfig, MoEBartForConditionalGeneration, MoEOptions
from moe_mtl.data import MODEL_INPUTS, EncodedSplit, Example, HomogeneousBatchSampler, collate, train_tokenizer
from moe_mtl.data.encoding import SplitPart, encode_split
from moe_mtl.data.sources.skills import skill_tasks
from moe_mtl.models.build import SMALL_BART


def generate(num_tasks: int, examples: int, seed: int) -> list[SplitPart]:
    """Per task: inputs `task<t>: d d d` of 3–6 digits, targets the digits reversed."""
    rng = np.random.default_rng(seed)
    parts = []
    for task in range(num_tasks):
        lengths = rng.integers(3, 7, size=examples)
        digits = rng.integers(0, 10, size=(examples, 6)).astype(str)
        rows = [row[:n] for row, n in zip(digits.tolist(), lengths.tolist(), strict=True)]
        parts.append(
            SplitPart(
                task,
                f"task{task}",
                [Example(f"task{task}: {' '.join(row)}", (" ".join(reversed(row)),)) for row in rows],
            )
        )
    return parts


def timed(function):
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=160)
    parser.add_argument("--examples", type=int, default=10_000, help="examples per task")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=2000, help="batches timed for sampler + collate")
    parser.add_argument("--steps", type=int, default=10, help="training steps timed")
    parser.add_argument("--output-dir", help="cache folder (default: a temporary one)")
    args = parser.parse_args()
    datasets.disable_progress_bars()
    output = Path(args.output_dir or tempfile.mkdtemp(prefix="moe_mtl_bench_"))
    total = args.tasks * args.examples
    print(f"{args.tasks} tasks × {args.examples} examples = {total:,} examples; batch {args.batch_size}")

    suite, seconds = timed(skill_tasks)
    print(f"default skill suite      {seconds:8.2f} s  ({len(suite)} tasks; target < 2 s)")
    parts, seconds = timed(lambda: generate(args.tasks, args.examples, seed=0))
    print(f"generate                 {seconds:8.2f} s")
    sample = [text for part in parts[:8] for e in part.examples[:500] for text in (e.input, *e.targets)]
    tokenizer = train_tokenizer(sample, vocab_size=1024)

    def encode():
        return encode_split("train", parts, tokenizer, 64, 16, output / "cache")

    (encoded, cached), seconds = timed(encode)
    assert not cached
    print(f"tokenise (datasets.map)  {seconds:8.2f} s  {total / seconds:12,.0f} examples/s")
    (_, cached), seconds = timed(encode)
    assert cached
    print(f"second run (cache hit)   {seconds:8.2f} s  (fingerprint of the examples + reading the Arrow file)")

    dataset, seconds = timed(lambda: EncodedSplit(encoded, [p.task_name for p in parts]))
    print(f"load encoded split       {seconds:8.2f} s")
    sampler = HomogeneousBatchSampler(dataset.task_sizes, args.batch_size, task_sampling="temperature", rank=0)
    pad = tokenizer.pad_token_id
    batches, seconds = timed(lambda: iter(sampler))
    first, plan_seconds = timed(lambda: next(batches))
    print(f"plan one epoch           {plan_seconds:8.2f} s  ({len(sampler):,} batches; once per epoch)")
    count = min(args.batches, len(sampler) - 1)
    start = time.perf_counter()
    for _ in range(count):
        batch = collate(dataset.__getitems__(next(batches)), pad)
    per_batch = (time.perf_counter() - start) / count
    amortised = per_batch + plan_seconds / len(sampler)
    print(
        f"sampler + collate        {per_batch * 1e3:8.3f} ms/batch  {args.batch_size / per_batch:12,.0f} examples/s "
        f"({amortised * 1e3:.3f} ms/batch with the epoch plan amortised)"
    )

    bart = BartConfig(vocab_size=len(tokenizer), **SMALL_BART)  # the quick start's model sizes
    model = MoEBartForConditionalGeneration(
        MoEBartConfig.from_bart_config(bart, MoEOptions(num_experts=3, num_tasks=args.tasks))
    ).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = collate(dataset.__getitems__(first), pad)

    def step():
        model(**{key: batch[key] for key in MODEL_INPUTS}).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    times = [timed(step)[1] for _ in range(args.steps)]
    train_step = statistics.median(times)
    print(
        f"tiny MoE-BART train step {train_step * 1e3:8.1f} ms  (d_model 128, 2+2 layers, 3 experts, gumbel_st, "
        f"batch {tuple(batch['input_ids'].shape)}, {torch.get_num_threads()} threads)"
    )
    print(f"sampler + collate / step {100 * amortised / train_step:8.2f} %  (target < 2%)")


if __name__ == "__main__":
    main()
