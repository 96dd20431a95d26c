"""The summary table of a set of runs: seen-task dev average, unseen zero-shot and few-shot averages, and the
average relative gain (ARG) of each method over a baseline row, as mean ± std over upstream seeds.

    moe-mtl summarize runs/vanilla runs/moe_learned --baseline vanilla --out results/table

Where each number comes from, in a run folder (the `moe-mtl fit` run's log folder, `<method>/seed<k>/` for
several seeds of one method):

    seen dev   evaluation/val-*.json at the best checkpoint's step (checkpoints/best-step<N>.ckpt, selected by
               val/score), averaged over the tasks of partition "train"; without a best checkpoint, the
               validation with the highest average score (earliest on ties), and a note says so.
    zero-shot  <zeroshot>/evaluation/test-*.json (exactly one; default folder "zeroshot": the run of `moe-mtl test
               --model.transfer.init_from RUN --model.evaluation.results_dir RUN/zeroshot ...`), tasks of
               `--partition`.
    few-shot   <fewshot>/fewshot_summary.csv (default folder "fewshot": `moe-mtl fewshot --init_from RUN
               --out RUN/fewshot`), each task's mean test score over its k-shot seeds.

A missing piece is "—" in the table and is counted, with the reason, in the notes under it; a run whose
zero-shot or few-shot results lack a task that other runs have counts as missing for that column (an average
over other tasks would not be comparable).
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..evaluation.metrics import average_relative_gain
from ..runs import best_checkpoints, best_step

MISSING = "—"
SEED_FOLDER = re.compile(r"seed\d+")
FEWSHOT_SUMMARY = "fewshot_summary.csv"
AVERAGE_ROW = "average"


# --- statistics (pure) --------------------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard deviation of `values`.

    The population standard deviation (ddof 0), as CrossFit reports its few-shot seeds (`np.std` in
    INK-USC/CrossFit example_scripts/collect_results.py). One value: std 0.
    """
    if not len(values):
        raise UsageError("mean_std of no values")
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std())


# --- one run folder -----------------------------------------------------------------------------------


@dataclass
class RunResults:
    """What one run folder (one upstream seed of a method) holds; None where a piece is missing (see `notes`)."""

    method: str
    folder: Path
    seen_dev: float | None = None
    zeroshot: dict[str, float] | None = None  # unseen task → test score
    fewshot: dict[str, float] | None = None  # unseen task → mean test score over its k-shot seeds
    notes: list[str] = field(default_factory=list)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UsageError(f"{path}: not an evaluation file (invalid JSON: {err})") from None


def seen_dev_average(folder: Path) -> tuple[float | None, str | None]:
    """(average dev score over the seen tasks at the best checkpoint's validation, note or None)."""
    files = sorted((folder / "evaluation").glob("val-*.json"))
    if not files:
        return None, f"no validation files {folder}/evaluation/val-*.json"
    evaluations = [_read_json(path) for path in files]
    best = best_checkpoints(folder)
    note = None
    if len(best) == 1:
        step = best_step(best[0])
        chosen = [evaluation for evaluation in evaluations if evaluation["step"] == step]
        if not chosen:
            return None, f"no validation at step {step} of {best[0]}"
        evaluation = chosen[-1]
    else:
        evaluation = max(evaluations, key=lambda e: (e["average"]["score"], -e["step"]))
        note = (
            f"{folder}: {len(best)} best-step*.ckpt files, so the seen dev average is the validation with the highest "
            f"average score (step {evaluation['step']})"
        )
    seen = [row["score"] for row in evaluation["tasks"] if row["partition"] == "train"]
    if not seen:
        return None, f"the validation at step {evaluation['step']} in {folder} has no seen (partition 'train') tasks"
    return sum(seen) / len(seen), note


def zeroshot_scores(folder: Path, partition: str) -> dict[str, float] | str:
    """Unseen task → score from the single `folder`/evaluation/test-*.json, or why there are none."""
    files = sorted((folder / "evaluation").glob("test-*.json"))
    if len(files) > 1:
        raise UsageError(
            f"{folder}/evaluation has {len(files)} test evaluations ({', '.join(p.name for p in files)}); "
            "the zero-shot folder must hold exactly one"
        )
    if not files:
        return f"no zero-shot evaluation {folder}/evaluation/test-*.json"
    rows = _read_json(files[0])["tasks"]
    scores = {row["task"]: row["score"] for row in rows if row["partition"] == partition}
    return scores or f"{files[0]} has no tasks of partition {partition!r}"


def fewshot_scores(folder: Path) -> dict[str, float] | str:
    """Unseen task → mean few-shot test score from `folder`/fewshot_summary.csv, or why there are none."""
    path = folder / FEWSHOT_SUMMARY
    if not path.is_file():
        return f"no few-shot summary {path}"
    with open(path, newline="") as file:
        rows = [row for row in csv.DictReader(file) if row["task"] != AVERAGE_ROW]
    scores = {row["task"]: float(row["test_mean"]) for row in rows if row["test_mean"] != ""}
    return scores or f"{path} has no task with a test score"


def read_run(
    folder: Path, method: str, partition: str = "test", zeroshot: str = "zeroshot", fewshot: str = "fewshot"
) -> RunResults:
    """The results of one run folder; what is missing is None, with the reason in `notes`."""
    run = RunResults(method, folder)
    run.seen_dev, note = seen_dev_average(folder)
    if note:
        run.notes.append(note if run.seen_dev is not None else f"seen dev: {note}")
    for name, found in (
        ("zero-shot", zeroshot_scores(folder / zeroshot, partition)),
        ("few-shot", fewshot_scores(folder / fewshot)),
    ):
        if isinstance(found, str):
            run.notes.append(f"{name}: {found}")
        else:
            setattr(run, name.replace("-", ""), found)
    return run


def find_runs(paths: Sequence[str | Path], names: Sequence[str] | None = None) -> list[tuple[str, Path]]:
    """(method, run folder) of each path: a run folder, or a method folder of `seed<k>/` run folders.

    The method is `names[i]` for the i-th path if given, else the folder's name, or its parent's for a
    folder named `seed<k>`.
    """
    if names is not None and len(names) != len(paths):
        raise UsageError(f"--names gives {len(names)} names for {len(paths)} run folders; give one per folder")
    runs = []
    for index, path in enumerate(map(Path, paths)):
        if not path.is_dir():
            raise UsageError(f"run folder {path} does not exist")
        seeds = sorted(p for p in path.iterdir() if p.is_dir() and SEED_FOLDER.fullmatch(p.name))
        is_run = any((path / sub).exists() for sub in ("evaluation", "checkpoints", "zeroshot", "fewshot"))
        if seeds and not is_run:
            method = names[index] if names else path.name
            runs += [(method, seed) for seed in seeds]
        elif is_run:
            method = names[index] if names else (path.parent.name if SEED_FOLDER.fullmatch(path.name) else path.name)
            runs.append((method, path))
        else:
            raise UsageError(
                f"{path} is neither a run folder (with evaluation/, checkpoints/, zeroshot/ or fewshot/) nor a "
                "method folder of seed<k>/ run folders"
            )
    return runs


# --- the table (pure) ---------------------------------------------------------------------------------

COLUMNS = (
    "seen_dev",
    "zeroshot",
    "fewshot",
    "arg_zeroshot",
    "arg_fewshot",
    "arg_zeroshot_scored",
    "arg_fewshot_scored",
)
HEADERS = {
    "seen_dev": "Seen dev avg",
    "zeroshot": "Unseen zero-shot avg",
    "fewshot": "Unseen few-shot avg",
    "arg_zeroshot": "Zero-shot ARG (%)",
    "arg_fewshot": "Few-shot ARG (%)",
    # the released ARG is ±inf or NaN once the baseline scores 0 on one task: these leave such tasks out (and say so)
    "arg_zeroshot_scored": "Zero-shot ARG, tasks the baseline scores (%)",
    "arg_fewshot_scored": "Few-shot ARG, tasks the baseline scores (%)",
}


@dataclass
class SummaryRow:
    """One method: its run count and, per column, the values over its runs (upstream seeds) that have it."""

    method: str
    runs: int
    values: dict[str, list[float]]


def _complete(runs: Sequence[RunResults], kind: str, notes: list[str]) -> dict[int, dict[str, float]]:
    """Run index → its `kind` scores, for the runs that have every task any run has; notes name the others."""
    expected = set().union(*(getattr(run, kind) or {} for run in runs))
    complete = {}
    for index, run in enumerate(runs):
        scores = getattr(run, kind)
        if scores is None:
            continue
        if set(scores) != expected:
            notes.append(f"{run.method} ({run.folder}): {kind} lacks tasks {sorted(expected - set(scores))}")
            continue
        complete[index] = scores
    return complete


def build_table(runs: Sequence[RunResults], baseline: str | None) -> tuple[list[SummaryRow], list[str]]:
    """Rows per method (in order of first appearance) and notes on everything missing.

    Averages are per run (upstream seed), then mean ± std over runs. ARG of a run: against the baseline
    method's per-task scores averaged over its runs.
    """
    notes = [f"{run.method} ({run.folder}): {note}" for run in runs for note in run.notes]
    methods = list(dict.fromkeys(run.method for run in runs))
    if baseline is not None and baseline not in methods:
        raise UsageError(f"--baseline is {baseline!r}, which is not a method here; methods: {', '.join(methods)}")
    complete = {kind: _complete(runs, kind, notes) for kind in ("zeroshot", "fewshot")}
    reference = {}
    for kind, scores in complete.items():
        base_runs = [scores[i] for i, run in enumerate(runs) if run.method == baseline and i in scores]
        if baseline is None:
            notes.append(f"no --baseline: no {kind} ARG")
        elif not base_runs:
            notes.append(f"baseline {baseline!r} has no complete {kind} results: no {kind} ARG")
        else:
            reference[kind] = {task: float(np.mean([r[task] for r in base_runs])) for task in base_runs[0]}
            zero = sorted(task for task, value in reference[kind].items() if value == 0)
            if zero:
                notes.append(
                    f"baseline {baseline!r} scores 0 on {kind} tasks {zero}: their relative gain, and so the {kind} "
                    "ARG, is ±inf or NaN (as the released ARG code gives); the 'tasks the baseline scores' column "
                    f"averages the other {len(reference[kind]) - len(zero)} of {len(reference[kind])} tasks"
                )
    rows = []
    for method in methods:
        indices = [i for i, run in enumerate(runs) if run.method == method]
        values: dict[str, list[float]] = {column: [] for column in COLUMNS}
        for i in indices:
            if runs[i].seen_dev is not None:
                values["seen_dev"].append(runs[i].seen_dev)
            for kind in ("zeroshot", "fewshot"):
                scores = complete[kind].get(i)
                if scores is None:
                    continue
                values[kind].append(sum(scores.values()) / len(scores))
                if kind in reference:
                    base = reference[kind]
                    values[f"arg_{kind}"].append(100 * average_relative_gain(scores, base, zero_baseline=True))
                    scored = [task for task in base if base[task] != 0]
                    if scored:
                        gain = average_relative_gain(
                            {t: scores[t] for t in scored}, {t: base[t] for t in scored}, zero_baseline=True
                        )
                        values[f"arg_{kind}_scored"].append(100 * gain)
        rows.append(SummaryRow(method, len(indices), values))
        for column, found in values.items():
            if len(found) < len(indices):
                notes.append(f"{method}: {HEADERS[column]} from {len(found)} of {len(indices)} runs")
    return rows, notes


def format_value(values: Sequence[float], digits: int) -> str:
    """`values` as "mean ± std" (std over runs), "mean" for one run, "—" for none."""
    if not values:
        return MISSING
    mean, std = mean_std(values)
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if len(values) > 1 else "")


def render_markdown(rows: Sequence[SummaryRow], notes: Sequence[str], baseline: str | None) -> str:
    header = ["Method", "Runs", *(HEADERS[column] for column in COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [format_value(row.values[c], 1 if c.startswith("arg") else 3) for c in COLUMNS]
        lines.append("| " + " | ".join([row.method, str(row.runs), *cells]) + " |")
    text = "\n".join(lines) + "\n\n"
    text += "Mean ± std (population std) over runs (upstream seeds) of each run's average over tasks"
    text += f"; ARG of each run against {baseline!r}'s per-task scores averaged over its runs.\n" if baseline else ".\n"
    if notes:
        text += f"\n{len(notes)} note(s) on missing, substituted or undefined values:\n\n"
        text += "".join(f"- {note}\n" for note in notes)
    else:
        text += "\nNothing missing.\n"
    return text


def write_csv(path: Path, rows: Sequence[SummaryRow]) -> None:
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["method", "runs", *(f"{c}_{s}" for c in COLUMNS for s in ("mean", "std", "n"))])
        for row in rows:
            cells = []
            for column in COLUMNS:
                found = row.values[column]
                mean, std = mean_std(found) if found else (math.nan, math.nan)
                cells += ["" if not found else f"{mean:.6g}", "" if not found else f"{std:.6g}", len(found)]
            writer.writerow([row.method, row.runs, *cells])


def summarize(
    paths: Sequence[str | Path],
    out: str | Path,
    baseline: str | None = None,
    names: Sequence[str] | None = None,
    partition: str = "test",
    zeroshot: str = "zeroshot",
    fewshot: str = "fewshot",
) -> tuple[list[SummaryRow], list[str]]:
    """Read the runs, write `<out>.md` and `<out>.csv`; returns the rows and notes."""
    runs = [read_run(folder, method, partition, zeroshot, fewshot) for method, folder in find_runs(paths, names)]
    rows, notes = build_table(runs, baseline)
    stem = Path(out)
    stem = stem.with_suffix("") if stem.suffix in (".md", ".csv") else stem
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_name(stem.name + ".md").write_text(render_markdown(rows, notes, baseline))
    write_csv(stem.with_name(stem.name + ".csv"), rows)
    return rows, notes
