"""Routes at initialisation of the MLP router for random vs text task vectors and several output scales:
per-task entropy (nats), distinct argmax routes over the 34 seen tasks, route–skill agreement."""

import sys

import numpy as np
import torch

sys.path.insert(0, "experiments/routing_investigation")
from prototypes import text_task_embeddings
from summarise import route_agreement, skill_sets

from moe_mtl.models.routing import MLPRouter

skills = skill_sets()
names = list(skills)[:34]
print(
    "| task vectors | logit scale | per-task entropy | distinct routes / 34 "
    "| agree (share ≥1 skill) | agree (share none) |"
)
print("|---|---|---|---|---|---|")
for kind in ("random", "text"):
    for scale, bias in ((1, 1), (10, 1), (10, 0), (30, 0)):
        ent, dist, a1, a0 = [], [], [], []
        for seed in range(3):
            torch.manual_seed(seed)
            router = MLPRouter(32, 64, 4, 3)
            vectors = torch.randn(34, 32) if kind == "random" else text_task_embeddings(names, 32)
            with torch.no_grad():
                for mlp in router.layers:
                    mlp[-1].weight.mul_(scale)
                    mlp[-1].bias.mul_(scale * bias)
                probs = router(vectors).softmax(-1)
            ent.append(float(-(probs * probs.log()).sum(-1).mean()))
            dist.append(len({tuple(r) for r in probs.argmax(-1).tolist()}))
            agree = route_agreement(probs.numpy(), names, skills)
            a1.append(agree["agree_share"])
            a0.append(agree["agree_none"])

        def f(x):
            return f"{np.mean(x):.2f} ± {np.std(x):.2f}"

        print(f"| {kind} | {scale}{'' if bias else ', bias 0'} | {f(ent)} | {f(dist)} | {f(a1)} | {f(a0)} |")
