"""The analysis of one run, written to `<run>/analysis/`: what `moe-mtl analyze` does.

Files: route_heatmap.png, route_dynamics.png, correlation.csv and .md, skill_agreement.json, and with
expert disabling disabling.csv and .md (plus the evaluation files of every disabled expert under disabling/).
Statistics use the seen (training) tasks: the routes of unseen tasks were never trained.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..data.tasks import Task, feature_table
from ..errors import UsageError
from ..evaluation.routes import route_heatmap_figure
from .agreement import route_skill_agreement
from .correlation import correlation_markdown, expert_usage, feature_usage_correlation
from .features import Choice, choose_group_by, choose_skill_feature, feature_groups, shared_values, task_features
from .plots import route_dynamics_figure
from .run import RunFolder

DPI = 120


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]], fields: Sequence[str]) -> None:
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows(rows)


def disabling_markdown(
    rows: Sequence[Mapping[str, Any]], groups: Sequence[Mapping[str, Any]], group_by: str | None
) -> str:
    """Mean score drop per disabled expert, and per (expert, group) when tasks are grouped (`group_by`)."""
    by_expert: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    for row in rows:
        by_expert.setdefault((row["layer"], row["expert"]), []).append(row)
    lines = [
        "# Expert disabling",
        "",
        "Score drop = intact score − score with the expert disabled (positive: the expert mattered); loss rise =",
        "dev loss with the expert disabled − intact dev loss; tasks routed = tasks with route weight > 0 on it.",
        "",
        "| layer | expert | tasks | tasks routed | mean drop | max drop | mean loss rise |",
        "|---|---|---|---|---|---|---|",
    ]
    for (layer, expert), group in by_expert.items():
        drops = [row["drop"] for row in group]
        rise = sum(row["loss_rise"] for row in group) / len(group)
        routed = sum(row["weight"] > 0 for row in group)
        lines.append(
            f"| {layer} | {expert} | {len(group)} | {routed} | {sum(drops) / len(drops):+.4f} | {max(drops):+.4f} "
            f"| {rise:+.4f} |"
        )
    if group_by is None:
        lines += ["", "Tasks not grouped: no task feature groups them (`moe-mtl analyze` printed why)."]
        return "\n".join(lines) + "\n"
    lines += ["", f"## Mean drop per {group_by} group", "", "| layer | expert | group | tasks | mean drop |"]
    lines.append("|---|---|---|---|---|")
    for row in groups:
        lines.append(
            f"| {row['layer']} | {row['expert']} | {row['group']} | {row['tasks']} | {row['mean_drop']:+.4f} |"
        )
    return "\n".join(lines) + "\n"


def analyze(
    run: RunFolder,
    output_dir: str | Path | None = None,
    group_by: str | None = None,
    step: int | None = None,
    alpha: float = 0.05,
    skill_feature: str | None = None,
    permutations: int = 10_000,
    disable: bool = False,
    layers: Sequence[str] | None = None,
    max_examples: int | None = None,
    tasks: Sequence[str] | None = None,
    trainer: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the analysis of `run` to `output_dir` (default `<run>/analysis`); returns a JSON-ready summary.

    group_by: feature (any) that groups tasks in the heatmap and the disabling table; None: chosen from the seen
        tasks' features (`features.choose_group_by`).
    step: route table to analyse (None: the named checkpoint's routes, else the last saved table).
    alpha: false discovery rate of the correlation tests.
    skill_feature: the list or categorical feature whose shared values define "tasks that share skills"; None:
        chosen from the seen tasks' features (`features.choose_skill_feature`). Tasks without it are left out of
        the agreement (named in skill_agreement.json).
    permutations: permutations of the route–skill agreement test.
    disable: also evaluate every expert disabled (costly: one validation per expert of each of `layers`, on
        each task's first `max_examples` dev examples, of every validated task or only the `tasks` named).
    trainer: Trainer options of those validations.

    The summary says what was read and chosen: `features` (name → kind), `group_by` and the agreement's
    `feature` with `given` and `reason`.
    """
    record = run.route_record(step)
    tasks_by_name = {task.name: task for task in run.tasks()}
    missing = [name for name in record["tasks"] if name not in tasks_by_name]
    if missing:
        raise UsageError(f"the route table names tasks the run's data does not have: {missing}")
    seen = [i for i, name in enumerate(record["tasks"]) if tasks_by_name[name].partition == "train"]
    seen_tasks = [tasks_by_name[record["tasks"][i]] for i in seen]
    # both choices before anything is written: a feature the user named wrongly stops here
    grouping = choose_group_by(seen_tasks, group_by)
    sharing = choose_skill_feature(seen_tasks, skill_feature)
    output = Path(output_dir) if output_dir is not None else run.path / "analysis"
    output.mkdir(parents=True, exist_ok=True)
    routes = torch.tensor(record["routes"], dtype=torch.float64)[seen]  # (T_seen, L, E)
    names = [task.name for task in seen_tasks]
    summary: dict[str, Any] = {
        "run": str(run.path),
        "step": record["step"],
        "tasks": len(seen_tasks),
        # the route table's other tasks (unseen ones, routed by a transfer) are not analysed: said, not dropped
        "left_out_tasks": [name for i, name in enumerate(record["tasks"]) if i not in set(seen)],
        "features": {name: feature.kind for name, feature in task_features(seen_tasks).items()},
        "group_by": asdict(grouping),
        "files": [],
    }

    def written(name: str) -> Path:
        summary["files"].append(name)
        return output / name

    title = f"Routes at step {record['step']} ({len(seen_tasks)} seen tasks)"
    groups = ["+".join(g) for g in feature_groups(seen_tasks, grouping.feature)] if grouping.feature else None
    heatmap = route_heatmap_figure(routes, names, record["layers"], groups, grouping.feature, title)
    heatmap.savefig(written("route_heatmap.png"), dpi=DPI)
    records = run.route_records()
    if records:
        route_dynamics_figure(records).savefig(written("route_dynamics.png"), dpi=DPI)
    summary["route_tables"] = len(records)

    feature_names, features = feature_table(seen_tasks)
    usage_names, usage = expert_usage(routes, record["layers"])
    correlation = feature_usage_correlation(features, feature_names, usage, usage_names, alpha)
    fields = ["feature", "usage", "r", "p", "q", "p_bonferroni", "significant"]
    _write_csv(written("correlation.csv"), correlation.rows, fields)
    written("correlation.md").write_text(correlation_markdown(correlation))
    summary["correlation"] = {
        "tests": len(correlation.rows),
        "significant": len(correlation.significant),
        "skipped": correlation.skipped,
        "top": correlation.significant[:5],
    }

    agreement = _skill_agreement(routes, seen_tasks, sharing, permutations)
    written("skill_agreement.json").write_text(json.dumps(agreement, indent=1) + "\n")
    summary["skill_agreement"] = agreement

    if disable:
        limits = {"layers": layers, "max_examples": max_examples, "tasks": tasks}
        summary["disabling"] = _disable(run, output, written, grouping.feature, limits, dict(trainer or {}))
    return summary


def _skill_agreement(routes: torch.Tensor, tasks: Sequence[Task], sharing: Choice, permutations: int) -> dict[str, Any]:
    """skill_agreement.json: the feature and why, the tasks left out, and the statistics or why there are none."""
    head: dict[str, Any] = {"feature": sharing.feature, "given": sharing.given, "reason": sharing.reason}
    if sharing.feature is None:
        return {**head, "skipped": sharing.reason}
    sets = shared_values(tasks, sharing.feature)
    kept = [i for i, values in enumerate(sets) if values is not None]
    head["tasks"] = len(kept)
    head["tasks_without_feature"] = [task.name for task, values in zip(tasks, sets, strict=True) if values is None]
    if len(kept) < 2:
        return {**head, "skipped": f"{len(kept)} seen task(s) have the feature {sharing.feature!r}; pairs need 2"}
    skills = [sets[i] for i in kept]
    routes = routes[kept]
    # also of the argmax routes: what two-stage training fixes, and what a hard router evaluates
    argmax = F.one_hot(routes.argmax(-1), routes.shape[-1]).double()
    try:
        statistics = route_skill_agreement(routes, skills, permutations=permutations)
        statistics["argmax"] = route_skill_agreement(argmax, skills, permutations=permutations)
    except UsageError as err:  # e.g. every pair of tasks shares a value: nothing to compare, said in the file
        return {**head, "skipped": str(err)}
    return {**head, **statistics}


def _disable(run, output, written, group_by, limits, trainer) -> dict[str, Any]:
    # imported here: disabling needs the training package, which the statistics above do not
    from .disabling import expert_disabling, group_drops, validation_loader

    module = run.load_module()
    datamodule = run.datamodule()
    loader = validation_loader(datamodule, limits["max_examples"], limits["tasks"])
    rows = expert_disabling(module, loader, output / "disabling", layers=limits["layers"], **trainer)
    grouped = []
    if group_by is not None:
        tasks = {task.name: task for task in datamodule.tasks}
        grouped = group_drops(rows, dict(zip(tasks, feature_groups(list(tasks.values()), group_by), strict=True)))
    _write_csv(written("disabling.csv"), rows, list(rows[0]))
    written("disabling.md").write_text(disabling_markdown(rows, grouped, group_by))
    worst = max(rows, key=lambda row: row["drop"])
    evaluations = 1 + len({(r["layer"], r["expert"]) for r in rows})
    return {"checkpoint": str(run.checkpoint), "evaluations": evaluations, "largest_drop": worst}
