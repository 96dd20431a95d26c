"""Last logged step and train loss of a run (quick progress check)."""

import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

for run in sys.argv[1:]:
    ea = EventAccumulator(run, size_guidance={"scalars": 0})
    ea.Reload()
    s = ea.Scalars("train/loss") if "train/loss" in ea.Tags()["scalars"] else []
    print(
        run,
        s[-1].step if s else None,
        round(s[-1].value, 3) if s else None,
        round(s[-1].wall_time - s[0].wall_time, 1) if s else None,
    )
