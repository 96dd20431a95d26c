"""The analysis of one run, written to `<run>/analysis/`: what `moe-mtl analyze` does.

Files: route_heatmap.png, route_dynamics.png, correlation.csv and .md, skill_agreement.json, and with
expert disabling disabling.csv and .md (plus the evaluation files of every disabled expert under disabling/).
Statistics use the seen (training) tasks: the routes of unseen tasks were never trained.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..data.tasks import Task, feature_table
from ..errors import UsageError
from ..evaluation.routes import route_heatmap_figure
from .agreement import route_skill_agreement
from .correlation import correlation_markdown, expert_usage, feature_usage_correlation
from .plots import route_dynamics_figure
from .run import RunFolder

GROUP_ALIASES = {"family": "families", "skill": "skills"}  # --group_by names → skill-suite feature names
DPI = 120


def feature_groups(tasks: Sequence[Task], group_by: str) -> list[list[str]]:
    """Each task's groups by the feature `group_by` ("family", "output_type", or any feature name): a list
    feature gives one group per element, a missing feature the group "(none)"."""
    feature = GROUP_ALIASES.get(group_by, group_by)
    if not any(feature in task.features for task in tasks):
        names = sorted({name for task in tasks for name in task.features} | set(GROUP_ALIASES))
        raise UsageError(f"group_by: no task has the feature {group_by!r}; available: {names or 'none (no features)'}")
    groups = []
    for task in tasks:
        value = task.features.get(feature, "(none)")
        groups.append([str(v) for v in value] if isinstance(value, list | tuple) else [str(value)])
    return groups


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]], fields: Sequence[str]) -> None:
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows(rows)


def disabling_markdown(rows: Sequence[Mapping[str, Any]], groups: Sequence[Mapping[str, Any]], group_by: str) -> str:
    """Mean score drop per disabled expert, and per (expert, group)."""
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
    group_by: str = "family",
    step: int | None = None,
    alpha: float = 0.05,
    skill_feature: str = "skills",
    permutations: int = 10_000,
    disable: bool = False,
    layers: Sequence[str] | None = None,
    max_examples: int | None = None,
    tasks: Sequence[str] | None = None,
    trainer: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the analysis of `run` to `output_dir` (default `<run>/analysis`); returns a JSON-ready summary.

    group_by: feature that groups tasks in the heatmap and the disabling table.
    step: route table to analyse (None: the named checkpoint's routes, else the last saved table).
    alpha: false discovery rate of the correlation tests.
    skill_feature: the list feature whose shared elements define "tasks that share skills".
    permutations: permutations of the route–skill agreement test.
    disable: also evaluate every expert disabled (costly: one validation per expert of each of `layers`, on
        each task's first `max_examples` dev examples, of every validated task or only the `tasks` named).
    trainer: Trainer options of those validations.
    """
    output = Path(output_dir) if output_dir is not None else run.path / "analysis"
    output.mkdir(parents=True, exist_ok=True)
    record = run.route_record(step)
    tasks_by_name = {task.name: task for task in run.tasks()}
    missing = [name for name in record["tasks"] if name not in tasks_by_name]
    if missing:
        raise UsageError(f"the route table names tasks the run's data does not have: {missing}")
    seen = [i for i, name in enumerate(record["tasks"]) if tasks_by_name[name].partition == "train"]
    seen_tasks = [tasks_by_name[record["tasks"][i]] for i in seen]
    routes = torch.tensor(record["routes"], dtype=torch.float64)[seen]  # (T_seen, L, E)
    names = [task.name for task in seen_tasks]
    groups = feature_groups(seen_tasks, group_by)
    summary: dict[str, Any] = {"run": str(run.path), "step": record["step"], "tasks": len(seen_tasks), "files": []}

    def written(name: str) -> Path:
        summary["files"].append(name)
        return output / name

    title = f"Routes at step {record['step']} ({len(seen_tasks)} seen tasks)"
    heatmap = route_heatmap_figure(routes, names, record["layers"], ["+".join(g) for g in groups], group_by, title)
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
        "skipped": {reason: len(columns) for reason, columns in correlation.skipped.items()},
        "top": correlation.significant[:5],
    }

    skills = [task.features.get(skill_feature) for task in seen_tasks]
    if all(isinstance(s, list | tuple) for s in skills):
        # also of the argmax routes: what two-stage training fixes, and what a hard router evaluates
        argmax = F.one_hot(routes.argmax(-1), routes.shape[-1]).double()
        try:
            agreement = route_skill_agreement(routes, skills, permutations=permutations)
            agreement["argmax"] = route_skill_agreement(argmax, skills, permutations=permutations)
        except ValueError as err:  # e.g. every pair of tasks shares a skill: nothing to compare, said in the file
            agreement = {"skipped": str(err)}
    else:
        lacking = [t.name for t, s in zip(seen_tasks, skills, strict=True) if not isinstance(s, list | tuple)]
        agreement = {"skipped": f"tasks without a list feature {skill_feature!r}: {lacking}"}
    written("skill_agreement.json").write_text(json.dumps({"feature": skill_feature, **agreement}, indent=1) + "\n")
    summary["skill_agreement"] = agreement

    if disable:
        limits = {"layers": layers, "max_examples": max_examples, "tasks": tasks}
        summary["disabling"] = _disable(run, output, written, group_by, limits, dict(trainer or {}))
    return summary


def _disable(run, output, written, group_by, limits, trainer) -> dict[str, Any]:
    # imported here: disabling needs the training package, which the statistics above do not
    from .disabling import expert_disabling, group_drops, validation_loader

    module = run.load_module()
    datamodule = run.datamodule()
    loader = validation_loader(datamodule, limits["max_examples"], limits["tasks"])
    rows = expert_disabling(module, loader, output / "disabling", layers=limits["layers"], **trainer)
    tasks = {task.name: task for task in datamodule.tasks}
    task_groups = dict(zip(tasks, feature_groups(list(tasks.values()), group_by), strict=True))
    grouped = group_drops(rows, task_groups)
    _write_csv(written("disabling.csv"), rows, list(rows[0]))
    written("disabling.md").write_text(disabling_markdown(rows, grouped, group_by))
    worst = max(rows, key=lambda row: row["drop"])
    evaluations = 1 + len({(r["layer"], r["expert"]) for r in rows})
    return {"checkpoint": str(run.checkpoint), "evaluations": evaluations, "largest_drop": worst}
