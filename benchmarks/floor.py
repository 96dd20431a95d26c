"""The matmul floor of a mixed-task batch: its projections alone, with each expert multiplying only its own rows.

A mixed-task batch routed by hard routes has the FLOPs of dense, but each layer's projections split into one
matmul per used expert, on fewer rows and with E weight matrices to read instead of one. This module times just
those matmuls, with no gathers, no placement and no Python module calls, against the same projections of dense on
the whole batch. The difference is what no implementation of per-task experts can go below on the device, so it
bounds the mixed-task targets from below: time × dense ≥ 1 + (floor − dense matmuls) × calls / dense step.

Two ways to run the split are timed: a matmul per expert with its bias (`addmm`, as dense's), and one grouped
matmul (`F.grouped_mm`) per projection over stacked weights (E, d_in, d_out) and rows sorted by expert, then each
example's expert's bias added over its tokens in place, as `models/grouped_layer.py` does. Dense adds its bias
inside its matmul, so a split that left the biases out would time less work than the model must do.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moe_mtl.models.moe_bart import MoEBartForConditionalGeneration

from .cases import Bench

CROSS_KEYS_VALUES = ("encoder_attn.k_proj", "encoder_attn.v_proj")


def routed_projections(model: MoEBartForConditionalGeneration, decode: bool) -> list[tuple[int, list[nn.Linear], str]]:
    """(routed layer index, the experts' copies of one projection, what its rows are) for each projection that runs.

    `decode`: one decoding step with a cache, so neither the encoder nor the cross-attention keys and values (both
    computed once) run."""
    out = []
    for k, name in enumerate(model.routed_layer_names):
        side, index = name.split(".")
        if decode and side == "encoder":
            continue
        experts = getattr(model.model, side).layers[int(index)].experts
        for module_name, module in experts[0].named_modules():
            if not isinstance(module, nn.Linear):
                continue
            if decode and module_name in CROSS_KEYS_VALUES:
                continue
            tokens = "source" if side == "encoder" or module_name in CROSS_KEYS_VALUES else "target"
            out.append((k, [dict(expert.named_modules())[module_name] for expert in experts], tokens))
    return out


def floor_steps(bench: Bench, model: MoEBartForConditionalGeneration, num_beams: int | None) -> dict[str, Callable]:
    """Steps "dense", "a matmul per expert" and (where torch has it) "grouped matmul", over the projections of one
    evaluation forward (`num_beams` None) or of one decoding step of `num_beams` beams per row, on the mixed batch.

    Each routed layer splits the rows as the model's stage-two routes send the batch's tasks."""
    shape, device = bench.shape, bench.device
    dtype = torch.bfloat16 if bench.bf16 else torch.float32
    decode = num_beams is not None
    with torch.no_grad():
        routes = model.router(bench.mixed_tasks, model.task_table).argmax(-1)  # (B, L)
    if decode:
        routes = routes.repeat_interleave(num_beams, dim=0)
    tokens = {"source": 1 if decode else shape.source_length, "target": 1 if decode else shape.target_length}

    plans = []
    generator = torch.Generator(device="cpu").manual_seed(0)
    for k, linears, kind in routed_projections(model, decode):
        counts = torch.bincount(routes[:, k], minlength=len(linears)).tolist()
        sizes = [count * tokens[kind] for count in counts]
        x = torch.randn(sum(sizes), linears[0].in_features, generator=generator).to(device, dtype)
        weights = [(linear.weight.detach().to(dtype), linear.bias.detach().to(dtype)) for linear in linears]
        stacked = torch.stack([w.t() for w, _ in weights])  # (E, d_in, d_out), rows of the input times columns
        offsets = torch.tensor(sizes, device=device).cumsum(0).to(torch.int32)
        parts = [(part, w, b) for part, (w, b), size in zip(x.split(sizes), weights, sizes, strict=True) if size]
        # (examples, 1, d_out): each sorted example's expert's bias, to broadcast over its tokens
        expert = torch.repeat_interleave(torch.arange(len(linears)), torch.tensor(counts)).to(device)
        biases = torch.stack([b for _, b in weights]).index_select(0, expert).unsqueeze(1)
        plans.append((x, weights[0], parts, stacked, offsets, biases))

    def dense():
        for x, (w, b), *_ in plans:
            F.linear(x, w, b)

    def per_expert():
        for _, _, parts, *_ in plans:
            for part, w, b in parts:
                F.linear(part, w, b)

    steps = {"dense": dense, "a matmul per expert": per_expert}
    grouped = getattr(F, "grouped_mm", None)
    if grouped is not None:

        def grouped_step():
            for x, _, _, stacked, offsets, biases in plans:
                out = grouped(x, stacked, offs=offsets)
                out.view(biases.shape[0], -1, out.shape[-1]).add_(biases)

        try:  # CUDA's kernel asks for bf16, aligned sizes and a recent GPU
            grouped_step()
            steps["grouped matmul"] = grouped_step
        except RuntimeError:
            pass
    return steps


def implied_floor(floor: dict[str, float], calls: int, dense_step: float) -> float:
    """The lowest time × dense the measured floor leaves for a whole step: its extra matmul time per call, `calls`
    times (1 for a forward, one per generated token for generation), over the dense step's time."""
    best = min(seconds for name, seconds in floor.items() if name != "dense")
    return 1.0 + max(0.0, best - floor["dense"]) * calls / dense_step
