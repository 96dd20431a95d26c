"""Mean dev score per skill family and per output type, from a run's evaluation JSON (skill suite runs).

A task counts in every family its skills come from, so the family rows overlap.

    python scripts/family_scores.py runs/quickstart/version_0/evaluation/val-epoch7-step4500.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from moe_mtl.data import load_tasks


def family_scores(evaluation: dict) -> dict[str, dict[str, tuple[float, int]]]:
    """{"family": {name: (mean score, tasks)}, "output_type": {...}} over the evaluated skill-suite tasks."""
    tiny = {"train_size": 1, "dev_size": 1, "test_size": 1}  # features do not depend on the sizes
    features = {task.name: task.features for task in load_tasks("skills", skills=tiny)}
    groups: dict[str, dict[str, list[float]]] = {"family": defaultdict(list), "output_type": defaultdict(list)}
    for row in evaluation["tasks"]:
        task_features = features[row["task"]]
        for family in task_features["families"]:
            groups["family"][family].append(row["score"])
        groups["output_type"][task_features["output_type"]].append(row["score"])
    return {
        kind: {name: (sum(v) / len(v), len(v)) for name, v in sorted(rows.items())} for kind, rows in groups.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("evaluation", type=Path, help="an evaluation/<stage>-epoch<e>-step<s>.json file of a run")
    evaluation = json.loads(parser.parse_args().evaluation.read_text())
    print(
        f"| group | tasks | mean score |\n|---|---|---|\n| all | {len(evaluation['tasks'])} | "
        f"{evaluation['average']['score']:.2f} |"
    )
    for kind, rows in family_scores(evaluation).items():
        for name, (mean, count) in rows.items():
            print(f"| {kind} {name} | {count} | {mean:.2f} |")


if __name__ == "__main__":
    main()
