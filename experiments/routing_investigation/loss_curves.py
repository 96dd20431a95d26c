"""Mean training loss (label-smoothed, all logged steps) per 250-step window, one row per run."""

import sys

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

print("| run | " + " | ".join(f"{a}-{a + 249}" for a in range(0, 2000, 250)) + " |")
print("|---|" + "---|" * 8)
for run in sys.argv[1:]:
    events = EventAccumulator(f"{run}/version_0", size_guidance={"scalars": 0})
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    cells = [np.mean([v for s, v in loss if a <= s < a + 250]) for a in range(0, 2000, 250)]
    print(f"| {run.split('/')[-1]} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
