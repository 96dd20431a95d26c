"""The benchmark's models and steps: dense BART and MoE-BART of one shape, in training, evaluation and generation."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from transformers import BartConfig, BartForConditionalGeneration

from moe_mtl import MoEBartForConditionalGeneration
from moe_mtl.models.layers import LayerExperts
from moe_mtl.training.losses import label_smoothed_nll, reinforce_surrogate

from .measure import Step

# MoE options of each routed variant; every layer of encoder and decoder is routed, whole-layer experts
STAGE_TWO = dict(routes="learned", selection="argmax", freeze_router=True)
TRAIN_VARIANTS = {
    "stage two (argmax routes)": STAGE_TWO,
    "stage one, gumbel_st (paper)": dict(routes="learned", selection="gumbel_st"),
    "stage one, switch": dict(routes="learned", selection="switch"),
    "stage one, reinforce": dict(routes="learned", selection="reinforce"),
    "token top-1 (FFN experts)": dict(routing="token", expert_unit="ffn", top_k=1),
    "token top-2 (FFN experts)": dict(routing="token", expert_unit="ffn", top_k=2),
}
SPARSE_STAGE_ONE = ("stage one, switch", "stage one, reinforce")


@dataclass
class Shape:
    d_model: int = 256
    layers: int = 4
    experts: int = 3
    tasks: int = 16
    batch: int = 16
    source_length: int = 64
    target_length: int = 32
    vocab: int = 8000

    def describe(self) -> str:
        return (
            f"d_model {self.d_model}, {self.layers}+{self.layers} layers, E={self.experts} whole-layer experts in "
            f"every layer, {self.tasks} tasks, batch {self.batch} × {self.source_length}/{self.target_length} "
            f"tokens, vocabulary {self.vocab}"
        )


class Bench:
    """Dense BART of `shape` and the steps that run it or an MoE-BART upcycled from it, on `device`."""

    def __init__(self, shape: Shape, device: torch.device, bf16: bool, seed: int = 0):
        torch.manual_seed(seed)
        self.shape, self.device, self.bf16 = shape, device, bf16
        heads = max(1, shape.d_model // 64)
        config = BartConfig(
            vocab_size=shape.vocab,
            d_model=shape.d_model,
            encoder_layers=shape.layers,
            decoder_layers=shape.layers,
            encoder_attention_heads=heads,
            decoder_attention_heads=heads,
            encoder_ffn_dim=4 * shape.d_model,
            decoder_ffn_dim=4 * shape.d_model,
            max_position_embeddings=max(128, shape.source_length, shape.target_length + 1),
            dropout=0.0,
            forced_eos_token_id=None,
        )
        self.dense = BartForConditionalGeneration(config).to(device)
        self.input_ids = torch.randint(4, shape.vocab, (shape.batch, shape.source_length), device=device)
        self.labels = torch.randint(4, shape.vocab, (shape.batch, shape.target_length), device=device)
        self.one_task = torch.full((shape.batch,), 3 % shape.tasks, device=device)
        # one row per task while there are tasks enough, spread evenly over them otherwise
        self.mixed_tasks = (torch.arange(shape.batch, device=device) * max(1, shape.tasks // shape.batch)) % shape.tasks

    def moe(self, **options) -> MoEBartForConditionalGeneration:
        torch.manual_seed(1)  # the same router and task table for every variant
        model = MoEBartForConditionalGeneration.from_dense(
            self.dense, num_experts=self.shape.experts, num_tasks=self.shape.tasks, **options
        )
        return model.to(self.device)

    def autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def train_step(self, model, task_ids: torch.Tensor | None = None) -> Step:
        """Forward, backward and a fused AdamW step on the one-task batch (training batches are homogeneous)."""
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)
        extra = {} if task_ids is None else {"task_ids": task_ids}

        def step():
            with self.autocast():
                out = model(input_ids=self.input_ids, labels=self.labels, **extra)
                loss = label_smoothed_nll(out.logits, self.labels, 0.1)
                if getattr(out, "route_log_prob", None) is not None:  # as the LightningModule adds it
                    loss = loss + reinforce_surrogate(out.route_log_prob, out.logits, self.labels, task_ids)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    def forward_step(self, model, task_ids: torch.Tensor | None = None) -> Step:
        """An evaluation forward (teacher forcing, no cache, no grad): what validation loss and scoring run."""
        model.eval()

        def step(rows=None):
            with torch.no_grad(), self.autocast():
                model(input_ids=pick(self.input_ids, rows), labels=pick(self.labels, rows), **tasks(task_ids, rows))

        return step

    def generate_step(self, model, num_beams: int, task_ids: torch.Tensor | None = None) -> Step:
        """`generate` of exactly target_length new tokens (EOS held off), greedy or beam search."""
        model.eval()
        length = self.shape.target_length

        def step(rows=None):
            with self.autocast():
                model.generate(
                    pick(self.input_ids, rows),
                    max_new_tokens=length,
                    min_new_tokens=length,
                    num_beams=num_beams,
                    do_sample=False,
                    **tasks(task_ids, rows),
                )

        return step


def layer_calls_per_expert(model: MoEBartForConditionalGeneration) -> MoEBartForConditionalGeneration:
    """`model` with its whole-layer banks running a mixed batch as one layer call per expert, not grouped."""
    for module in model.modules():
        if isinstance(module, LayerExperts):
            module.grouped = False
    return model


def one_task_batches(step, task_ids: torch.Tensor) -> Step:
    """`step`'s rows as one-task batches, one after another: what a mixed-task batch should cost at most."""
    groups = [(task_ids == task).nonzero().squeeze(1) for task in task_ids.unique()]

    def run():
        for rows in groups:
            step(rows)

    return run


def pick(tensor: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return tensor if rows is None else tensor[rows]


def tasks(task_ids: torch.Tensor | None, rows: torch.Tensor | None) -> dict:
    return {} if task_ids is None else {"task_ids": pick(task_ids, rows)}
