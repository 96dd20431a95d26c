"""Prototype routing interventions for the routing investigation, as Lightning callbacks (no core change).

Used from a config as `class_path: prototypes.RouterInit` etc. with `experiments/routing_investigation` on PYTHONPATH.

- `RouterInit`: at fit start, rescale the task table rows and the router's output layer, or zero the output
  layer (every task's logits 0: uniform routes, argmax expert 0), so logits differ across tasks (or not) from
  step 0.
- `TaskRouteBalance`: an auxiliary loss over the whole task table each stage-one step,
  `balance · KL(mean route over seen tasks ‖ uniform) + decisive · mean per-task entropy`, per routed layer,
  on the selection probabilities softmax(logits). Its gradient is added after the main backward pass (before
  clipping), so the main loss is untouched.
- `TextTaskEmbeddings`: write a task table of text representations (a bag of hashed words of each task's
  name, e.g. "evens-sum" → {evens, sum}) to a .pt file for `moe.task_embeddings`.
"""

from __future__ import annotations

import math
import zlib

import torch
from lightning.pytorch import Callback


class RouterInit(Callback):
    """Rescale (or zero) the router's initial output so routes are decided (or uniform) from step 0.

    Args:
        table_scale: Factor on the task table rows.
        logit_scale: Factor on the weights and bias of each routed layer's last router Linear.
        zero: Zero the last Linear instead (all logits 0: uniform stage-one routes, argmax expert 0 after).
        zero_bias: Zero the last Linear's bias (no expert preferred by every task at step 0).
    """

    def __init__(self, table_scale: float = 1.0, logit_scale: float = 1.0, zero: bool = False, zero_bias: bool = False):
        self.table_scale, self.logit_scale, self.zero, self.zero_bias = table_scale, logit_scale, zero, zero_bias

    def on_fit_start(self, trainer, pl_module) -> None:
        model = pl_module.model
        with torch.no_grad():
            if not model.task_table.frozen:
                model.task_table.embedding.weight.mul_(self.table_scale)
            for mlp in model.router.network.layers:
                last = mlp[-1]
                if self.zero:
                    last.weight.zero_()
                    last.bias.zero_()
                else:
                    last.weight.mul_(self.logit_scale)
                    last.bias.mul_(0.0 if self.zero_bias else self.logit_scale)


def balance_terms(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL(mean route ‖ uniform), mean per-task entropy), each averaged over layers; probs (T, L, E)."""
    num_experts = probs.shape[-1]
    mean = probs.mean(0)  # (L, E)
    kl = (mean * (mean.clamp_min(1e-9).log() + math.log(num_experts))).sum(-1).mean()
    entropy = -(probs * probs.clamp_min(1e-9).log()).sum(-1).mean()
    return kl, entropy


class TaskRouteBalance(Callback):
    """Task-level balance (keep tasks spread over experts) and decisiveness (low per-task entropy) in stage one.

    Args:
        balance: Weight of KL(mean route over seen tasks ‖ uniform).
        decisive: Weight of the mean per-task route entropy.
        every: Apply every n-th step.
    """

    def __init__(self, balance: float = 1.0, decisive: float = 0.1, every: int = 1):
        self.balance, self.decisive, self.every = balance, decisive, every

    def on_after_backward(self, trainer, pl_module) -> None:
        router = pl_module.model.router
        if pl_module.stage != 1 or router.frozen or trainer.global_step % self.every:
            return
        seen = torch.tensor(pl_module.seen_tasks, device=pl_module.device)
        logits = router.logits(pl_module.model.task_table(seen))  # (T, L, E)
        kl, entropy = balance_terms(logits.softmax(-1))
        (self.balance * kl + self.decisive * entropy).backward()
        pl_module.log("train/route_kl", kl.detach(), batch_size=1)
        pl_module.log("train/route_entropy", entropy.detach(), batch_size=1)


def word_vector(word: str, dim: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(zlib.crc32(word.encode()))
    return torch.randn(dim, generator=generator)


def text_task_embeddings(names: list[str], dim: int) -> torch.Tensor:
    """Bag of hashed word vectors of each task's name (words split at '-' and '_'), unit norm × sqrt(dim)."""
    rows = []
    for name in names:
        words = [w for w in name.replace("_", "-").split("-") if w]
        vector = torch.stack([word_vector(w, dim) for w in words]).sum(0)
        rows.append(vector / vector.norm() * math.sqrt(dim))
    return torch.stack(rows)


if __name__ == "__main__":
    import argparse

    from moe_mtl.data import load_tasks

    parser = argparse.ArgumentParser(description="write text task embeddings of the skill suite")
    parser.add_argument("out")
    parser.add_argument("--dim", type=int, default=32)
    args = parser.parse_args()
    tiny = {"train_size": 1, "dev_size": 1, "test_size": 1}
    names = [task.name for task in load_tasks("skills", skills=tiny)]
    torch.save(text_task_embeddings(names, args.dim), args.out)
    print(len(names), "tasks:", names[:5], "...")
