"""Mean ± std (population, over seeds) of the summarise.py columns per routing, from run folders <name>_s<seed>."""

import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from summarise import skill_sets, summarise

groups = defaultdict(list)
skills = skill_sets()
for run in sys.argv[1:]:
    name = re.sub(r"_s\d+$", "", Path(run).name)
    try:
        groups[name].append(summarise(Path(run), 500, skills))
    except (IndexError, StopIteration):
        print(f"{run}: incomplete", file=sys.stderr)
cols = [
    "score",
    "dev_loss",
    "train_loss",
    "entropy_per_task@switch",
    "entropy_task_avg@switch",
    "distinct_routes",
    "agree_share",
    "agree_none",
]
print("| routing | seeds | per-seed score | " + " | ".join(cols) + " |")
print("|---|---|---|" + "---|" * len(cols))
for name, rows in groups.items():
    cells = []
    for c in cols:
        v = np.array([r.get(c, np.nan) for r in rows], dtype=float)
        cells.append(f"{v.mean():.3f} ± {v.std():.3f}")
    per_seed = ", ".join(f"{r['score']:.3f}" for r in rows)
    print(f"| {name} | {len(rows)} | {per_seed} | " + " | ".join(cells) + " |")
