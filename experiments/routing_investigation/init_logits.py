"""Router logits of the quick-start MoE-BART as built (transformers' _init_weights: normal std 0.02 on every
Linear and Embedding, router and task table included): spread across tasks, per-task entropy, distinct routes."""

import sys

import torch
from transformers import BartConfig

from moe_mtl.models import MoEBartConfig, MoEBartForConditionalGeneration, MoEOptions
from moe_mtl.models.build import SMALL_BART

sys.path.insert(0, "experiments/routing_investigation")
from prototypes import text_task_embeddings
from summarise import route_agreement, skill_sets

names = list(skill_sets())
sizes = {**SMALL_BART, "vocab_size": 1024}  # the quick start's model
print(
    "| init | logit std over tasks | max logit gap | per-task entropy | distinct argmax routes / 34 "
    "| agreement ≥1 skill / none |"
)
print("|---|---|---|---|---|---|")
for label, text, scale in (
    ("as built (std 0.02)", False, 1),
    ("text task table", True, 1),
    ("text + last layer ×30, bias 0", True, 30),
):
    torch.manual_seed(0)
    options = MoEOptions(num_experts=3, num_tasks=len(names), task_dim=32, router_hidden=64)
    model = MoEBartForConditionalGeneration(MoEBartConfig.from_bart_config(BartConfig(**sizes), options))
    with torch.no_grad():
        if text:
            model.task_table.embedding.weight.copy_(text_task_embeddings(names, 32))
        for mlp in model.router.network.layers:
            mlp[-1].weight.mul_(scale)
            if scale != 1:
                mlp[-1].bias.zero_()
        logits = model.router.logits(model.task_table(torch.arange(34)))  # (34, L, E)
    probs = logits.softmax(-1)
    entropy = float(-(probs * probs.log()).sum(-1).mean())
    gap = float((logits.max(-1).values - logits.min(-1).values).max())
    routes = len({tuple(r) for r in logits.argmax(-1).tolist()})
    agree = route_agreement(probs.numpy(), names[:34], skill_sets())
    print(
        f"| {label} | {float(logits.std(0).mean()):.2e} | {gap:.2e} | {entropy:.4f} | {routes} | "
        f"{agree['agree_share']:.2f} / {agree['agree_none']:.2f} |"
    )
