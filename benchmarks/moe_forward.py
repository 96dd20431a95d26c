"""Throughput of MoE-BART against dense BART of the same shape (tokens/s), forward and train step.

    .venv/bin/python benchmarks/moe_forward.py [--d-model 256 --layers 4 --batch 16 --length 64]

Expected: hard routes (eval) within a few % of dense; learned routes in training about E times the
routed layers' cost, because the straight-through gradient needs every expert's output.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import BartConfig, BartForConditionalGeneration

from moe_mtl import MoEBartForConditionalGeneration


def tokens_per_second(step, tokens: int, repeats: int) -> float:
    step()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return repeats * tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    config = BartConfig(
        vocab_size=8000,
        d_model=args.d_model,
        encoder_layers=args.layers,
        decoder_layers=args.layers,
        encoder_attention_heads=max(1, args.d_model // 64),
        decoder_attention_heads=max(1, args.d_model // 64),
        encoder_ffn_dim=4 * args.d_model,
        decoder_ffn_dim=4 * args.d_model,
        max_position_embeddings=max(512, args.length),
    )
    dense = BartForConditionalGeneration(config)
    moe = MoEBartForConditionalGeneration.from_dense(dense, num_experts=args.experts, num_tasks=8)
    ids = torch.randint(4, config.vocab_size, (args.batch, args.length))
    task_ids = torch.full((args.batch,), 3)
    tokens = 2 * ids.numel()

    def forward(model, **extra):
        def step():
            with torch.no_grad():
                model(input_ids=ids, decoder_input_ids=ids, use_cache=False, **extra)

        return step

    def train(model, **extra):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            model(input_ids=ids, labels=ids, **extra).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    rows = [
        ("dense eval forward", forward(dense.eval())),
        ("moe eval forward (hard top-1)", forward(moe.eval(), task_ids=task_ids)),
        ("dense train step", train(dense.train())),
        ("moe train step (gumbel_st, all experts)", train(moe.train(), task_ids=task_ids)),
    ]
    print(
        f"d_model={args.d_model} layers={args.layers}+{args.layers} E={args.experts} batch={args.batch}x{args.length}"
    )
    for name, step in rows:
        print(f"{name:42s} {tokens_per_second(step, tokens, args.repeats):12,.0f} tokens/s")


if __name__ == "__main__":
    main()
