"""One row of numbers per run of the routing investigation (moe_mtl issue 9, part 6).

For each run folder (`<save_dir>/<name>/version_0`): the mean seen-task dev score of the last
evaluation, the mean training loss of the last 200 steps, the routing scalars of the RoutingMonitor at
the switch step (per-task entropy, entropy of the task-averaged route, mean over routed layers), and
from the last route table: the number of distinct routes over the seen tasks, the largest share of
seen tasks on one route, and the route–skill agreement (mean fraction of routed layers where two
tasks' argmax experts agree, for pairs sharing >= 1 skill vs pairs sharing none).

    python experiments/routing_investigation/summarise.py runs/learned_s0 runs/random_s0 ... [--switch 500]
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from moe_mtl.data import load_tasks


def skill_sets() -> dict[str, set[str]]:
    tiny = {"train_size": 1, "dev_size": 1, "test_size": 1}  # features do not depend on the sizes
    return {task.name: set(task.features["skills"]) for task in load_tasks("skills", skills=tiny)}


def route_agreement(routes: np.ndarray, names: list[str], skills: dict[str, set[str]]) -> dict[str, float]:
    """Mean per-layer argmax agreement of task pairs sharing >= 1 skill vs none. routes: (T, L, E)."""
    choice = routes.argmax(-1)  # (T, L)
    share, apart = [], []
    for i, j in itertools.combinations(range(len(names)), 2):
        agree = float((choice[i] == choice[j]).mean())
        (share if skills[names[i]] & skills[names[j]] else apart).append(agree)
    return {
        "agree_share": float(np.mean(share)),
        "agree_none": float(np.mean(apart)),
        "pairs": (len(share), len(apart)),
    }


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def at_step(series: list[tuple[int, float]], step: int) -> float:
    """The value logged at the last step <= `step`."""
    before = [v for s, v in series if s <= step]
    return before[-1] if before else float("nan")


def summarise(run: Path, switch: int, skills: dict[str, set[str]]) -> dict:
    run = next(run.glob("version_*")) if not list(run.glob("events.*")) else run
    evaluation = sorted(run.glob("evaluation/val-*.json"), key=lambda p: json.loads(p.read_text())["step"])[-1]
    record = json.loads(evaluation.read_text())
    seen = [r for r in record["tasks"] if r["partition"] == "train"]
    row = {
        "run": str(run),
        "step": record["step"],
        "score": float(np.mean([r["score"] for r in seen])),
        "dev_loss": float(np.mean([r["loss"] for r in seen])),
    }
    tags = scalars(run)
    loss = [v for s, v in tags.get("train/loss", []) if s >= record["step"] - 200]
    row["train_loss"] = float(np.mean(loss)) if loss else float("nan")
    for key in ("entropy_per_task", "entropy_task_avg"):
        series = tags.get(f"routing/{key}/mean")
        row[f"{key}@switch"] = at_step(series, switch) if series else float("nan")
    tables = sorted(run.glob("routes/step*.json"), key=lambda p: int(p.stem[4:]))
    if tables:
        table = json.loads(tables[-1].read_text())
        names = [t for t in table["tasks"] if t in {r["task"] for r in seen}]
        index = [table["tasks"].index(t) for t in names]
        routes = np.array(table["routes"])[index]
        keys = [tuple(r) for r in routes.argmax(-1).tolist()]
        counts = {k: keys.count(k) for k in set(keys)}
        row["distinct_routes"] = len(counts)
        row["top_route_share"] = max(counts.values()) / len(keys)
        # tasks per expert at each routed layer (argmax), e.g. "12/22/0"
        choice = routes.argmax(-1)
        row["tasks_per_expert"] = " ".join(
            "/".join(str(int((choice[:, j] == e).sum())) for e in range(routes.shape[-1]))
            for j in range(choice.shape[1])
        )
        row.update(route_agreement(routes, names, skills))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--switch", type=int, default=500)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    skills = skill_sets()
    rows = []
    for run in args.runs:
        try:
            rows.append(summarise(run, args.switch, skills))
        except (IndexError, StopIteration, KeyError) as err:
            print(f"{run}: incomplete ({err!r})")
    for row in rows:
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
