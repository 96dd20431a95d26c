"""Gupta et al. 2022's three claims ("Sparsely Activated Mixture-of-Experts are Robust Multi-Task Learners") on the
built-in skill suite, on the CPU: one command per claim.

    python scripts/robust_mtl_studies.py transfer   --jobs 2 --docs docs/studies   # low-resource transfer
    python scripts/robust_mtl_studies.py unseen     --jobs 2 --docs docs/studies   # few-shot score against k
    python scripts/robust_mtl_studies.py robustness --jobs 2 --docs docs/studies   # unrelated tasks, joint and after

Methods in every table (`METHODS`): dense multi-task BART (`configs/baselines/vanilla.yaml`), task-level learned
routing (the quick start's, Ye et al. 2022), task-aware token-level gating (`configs/baselines/token.yaml`, Gupta et
al.) and random task-level routes (`configs/baselines/random.yaml`, the control for "more parameters"), each over
`configs/quickstart.yaml` at the preset's sizes, seeds 0, 1, 2; mean ± population std over the seeds.

- transfer: `TARGETS` get `low_resource` train examples each, in a mixture with tasks that share their skills
  (`RELATED`) and, as the control, with as many tasks that share none (`UNRELATED_CONTROL`, the same output types);
  plus each target trained alone (dense, single-task). Reported: the targets' dev score.
- both other studies start from base runs of each method on `BASE_TASKS`, 12 seen tasks.
- unseen: the zero-shot and k-shot test score of `FEWSHOT_TASKS` for k in the preset's `ks`, each method routing a
  new task by its own route source (`UNSEEN_ROUTES`); for learned routing also under three task representations
  (`REPRESENTATIONS`: the run's own encoder, MiniLM, Fisher).
- robustness: joint, the base suite alone against base + the unrelated family (skill suite option `unrelated`) at
  the same number of base-task steps; sequential, the base run trained on, on the unrelated family alone: the
  base-task dev score before and after (the forgetting), and the experts the family takes over from base tasks.

Every step is skipped when its result exists, so an interrupted study resumes; `--preset tiny` shrinks everything to
seconds (the test suite runs it). The unseen and robustness studies share their base runs (`<out>/base`).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from skill_suite_table import TINY_MODEL, cpu_minutes, run  # the sibling script's way to run a step

from moe_mtl.experiments.summary import fewshot_scores, format_value, mean_std, zeroshot_scores

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "configs" / "quickstart.yaml"
METHODS = ("dense", "learned", "token", "random")
OVERLAY = {"dense": "vanilla", "learned": "learned", "token": "token", "random": "random"}
# a task new to the task table gets its route from the method's own kind of source
UNSEEN_ROUTES = {"dense": "average", "learned": "nearest", "token": "nearest", "random": "random"}
# downstream runs of learned routing keep the upstream's stage-two routes (argmax, router and table frozen)
DOWNSTREAM = {
    "learned": ["--model.moe.selection=argmax", "--model.moe.freeze_router=true", "--model.moe.freeze_task_table=true"]
}
# training on after the base suite: the new family's routes are learned where the method learns routes (new
# task-table rows; learned routing's router trains too, as in its stage one, so base tasks' routes may move), drawn
# at random for random routes; one stage
SEQUENTIAL_ROUTES = {"dense": "average", "learned": "learned", "token": "learned", "random": "random"}

# transfer: low-resource seen tasks, the seen tasks that share a skill with them, and a control mixture of as many
# seen tasks that share none (4 sequence and 5 number outputs in both)
TARGETS = ("evens-sum", "reverse-increment", "double-last")
RELATED = (
    "reverse", "evens", "increment", "double", "sum", "double-sum", "evens-increment-sum", "reverse-first",
    "increment-max",
)  # fmt: skip
UNRELATED_CONTROL = ("sort", "rotate", "above_4", "upper", "count", "max", "min", "odds-count", "above_4-min")
# the unseen and robustness studies' base mixture: 12 seen tasks (7 number, 3 sequence, 2 label outputs) whose
# skills make up every one of `FEWSHOT_TASKS`. Not all 34: at the steps 30 minutes allow, the whole suite stays near
# chance (mean dev 0.15-0.17 at 1,000 steps of batch 32, every method), and no claim can be told from noise
BASE_TASKS = (
    "odds-count", "evens-sum", "reverse-first", "double-last", "increment-max", "above_4-min", "sort", "rotate",
    "is_sorted", "has_duplicates", "upper", "vowels-count",
)  # fmt: skip
FEWSHOT_TASKS = ("odds-sum", "evens-count", "reverse-last", "double-max", "above_4-reverse")
REPRESENTATIONS = ("text", "minilm", "fisher")
KSHOT_SEED = {0: 100, 1: 13, 2: 21}  # one k-shot split seed per upstream seed (CrossFit's first three)

PRESETS: dict[str, dict[str, Any]] = {
    # sized for at most 30 minutes per study with --jobs 2 on 2 CPU cores (measured: docs/studies/README.md)
    "full": {
        "steps": 1500,
        "switch_step": 375,
        "transfer_steps": 1000,
        "single_steps": 300,
        "sequential_steps": 500,
        "low_resource": 32,
        "fewshot_steps": 40,
        "fewshot_lr": 5e-4,
        "ks": [4, 16, 64],
        "representation_k": 16,
        "fewshot_tasks": FEWSHOT_TASKS,
        "data": ["--data.batch_size=32", "--data.skills.test_size=100"],
    },
    # seconds: the test suite's end-to-end run of each study
    "tiny": {
        "steps": 4,
        "switch_step": 2,
        "transfer_steps": 4,
        "single_steps": 2,
        "sequential_steps": 2,
        "low_resource": 4,
        "fewshot_steps": 2,
        "fewshot_lr": 5e-4,
        "ks": [2, 4],
        "representation_k": 2,
        "fewshot_tasks": FEWSHOT_TASKS[:1],
        "data": [
            "--data.skills.train_size=8",
            "--data.skills.dev_size=2",
            "--data.skills.test_size=2",
            "--data.batch_size=4",
            "--data.eval_batch_size=8",
            *TINY_MODEL,
        ],
    },
}


# --- what each run is -----------------------------------------------------------------------------------------


def configs(method: str, preset: dict) -> list[str]:
    """The quick start, the method's overlay, the preset's sizes (learned routing: its switch step), no progress
    bar (its refresh thread costs CPU), then the user's `--set` overrides."""
    files = ["--config", str(BASE_CONFIG), "--config", str(ROOT / "configs" / "baselines" / f"{OVERLAY[method]}.yaml")]
    switch = [f"--two_stage.switch_step={preset['switch_step']}"] if method == "learned" else []
    return [*files, "--trainer.enable_progress_bar=false", *preset["data"], *switch, *preset["set"]]


def shared_tokenizer(out: Path, preset: dict) -> Path:
    """One tokenizer for every run of every study (in `<out>/data/tokenizer-text`), trained on the train text of
    the whole suite with the unrelated family, at the quick start's (or the preset's) data options: a score
    difference between two mixtures is then never a difference of tokenisation."""
    import yaml

    from moe_mtl.data import MultiTaskDataModule

    data = dict(yaml.safe_load(BASE_CONFIG.read_text())["data"])
    for arg in [*preset["data"], *preset["set"]]:  # `--data.a.b=value` overrides of the preset and the user
        key, _, value = arg.removeprefix("--").partition("=")
        if key.startswith("data."):
            *parents, leaf = key.split(".")[1:]
            node = data
            for parent in parents:
                node = node.setdefault(parent, {})
            node[leaf] = yaml.safe_load(value)
    data["skills"] = {**data.get("skills", {}), "unrelated": True}
    data["output_dir"] = str(out / "data" / "tokenizer-text")
    return Path(MultiTaskDataModule(**data).tokenizer_path)


def fitted(folder: Path) -> bool:
    return bool(list(folder.glob("evaluation/val-*.json"))) and (folder / "checkpoints" / "last.ckpt").is_file()


def fit_step(method: str, folder: Path, steps: int, preset: dict, extra: Sequence[str], seed: int) -> dict:
    """A `moe-mtl fit` into `folder` (`<save_dir>/<name>/<version>`) with one validation, at its end."""
    return {
        "done": str(folder),
        "kind": "fit",
        "args": [
            "fit",
            *configs(method, preset),
            f"--data.tokenizer={preset['tokenizer']}",
            *extra,
            f"--seed_everything={seed}",
            f"--trainer.max_steps={steps}",
            f"--trainer.val_check_interval={steps}",
            f"--trainer.logger.init_args.save_dir={folder.parent.parent}",
            f"--trainer.logger.init_args.name={folder.parent.name}",
            f"--trainer.logger.init_args.version={folder.name}",
        ],
    }


def base_fit(out: Path, method: str, seed: int, preset: dict) -> dict:
    """The method on `BASE_TASKS` (the unseen and robustness studies' upstream runs)."""
    folder = out / "base" / method / f"seed{seed}"
    partition = json.dumps({"train": list(BASE_TASKS), "dev": [], "test": []})
    extra = [f"--data.partition={partition}", "--data.test_partitions=[]", f"--data.output_dir={out / 'data' / 'base'}"]
    return fit_step(method, folder, preset["steps"], preset, extra, seed)


def transfer_pipelines(out: Path, methods: Sequence[str], seeds: Sequence[int], preset: dict) -> dict[str, list]:
    sizes = json.dumps({task: preset["low_resource"] for task in TARGETS})
    # temperature sampling (T = 2): proportional sampling would give a 32-example task 0.3% of the batches
    data = [f"--data.skills.train_sizes={sizes}", "--data.task_sampling=temperature", "--data.test_partitions=[]"]
    pipelines: dict[str, list] = {}
    for seed in seeds:
        for method in methods:
            steps = []
            for mixture, others in (("related", RELATED), ("unrelated", UNRELATED_CONTROL)):
                partition = json.dumps({"train": [*TARGETS, *others], "dev": [], "test": []})
                extra = [*data, f"--data.partition={partition}", f"--data.output_dir={out / 'data' / mixture}"]
                folder = out / "transfer" / mixture / method / f"seed{seed}"
                steps.append(fit_step(method, folder, preset["transfer_steps"], preset, extra, seed))
            pipelines[f"transfer-{method}-seed{seed}"] = steps
        singles = []
        for task in TARGETS:  # each target alone: one task, nothing to route, so the dense model
            partition = json.dumps({"train": [task], "dev": [], "test": []})
            extra = [*data, f"--data.partition={partition}", f"--data.output_dir={out / 'data' / f'single-{task}'}"]
            folder = out / "transfer" / "single" / task / f"seed{seed}"
            singles.append(fit_step("dense", folder, preset["single_steps"], preset, extra, seed))
        pipelines[f"transfer-single-seed{seed}"] = singles
    return pipelines


def zeroshot_step(method: str, upstream: Path, folder: Path, preset: dict, data_dir: Path, extra=()) -> dict:
    return {
        "done": str(folder),
        "kind": "test",
        "args": [
            "test",
            *configs(method, preset),
            *DOWNSTREAM.get(method, []),
            f"--model.transfer.init_from={upstream}",
            f"--model.transfer.unseen_routes={UNSEEN_ROUTES[method]}",
            *extra,
            f"--model.evaluation.results_dir={folder}",
            "--data.test_partitions=test",
            f"--data.output_dir={data_dir}",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={folder}",
        ],
    }


def fewshot_step(method: str, upstream: Path, folder: Path, k: int, seed: int, preset: dict, extra=()) -> dict:
    steps = preset["fewshot_steps"]
    sizes = [arg.split("=", 1)[1] for arg in preset["data"] if arg.startswith("--data.batch_size=")]
    return {
        "done": str(folder),
        "kind": "fewshot",
        "args": [
            "fewshot",
            *(arg for arg in configs(method, preset) if not arg.startswith("--data.batch_size=")),
            *DOWNSTREAM.get(method, []),
            *(["--batch_sizes", *sizes] if sizes else []),
            "--tasks",
            *preset["fewshot_tasks"],
            "--init_from",
            str(upstream),
            "--out",
            str(folder),
            "--seeds",
            str(KSHOT_SEED.get(seed, 100)),
            "--lrs",
            str(preset["fewshot_lr"]),
            "--unseen_routes",
            UNSEEN_ROUTES[method],
            "--max_steps",
            str(steps),
            f"--trainer.val_check_interval={steps}",
            f"--data.skills.shots={k}",
            *extra,
            "--two_stage.switch_step=null",
        ],
    }


def representation_args(kind: str, out: Path) -> list[str]:
    if kind == "minilm":
        return [f"--model.transfer.representation=text:{out / 'models' / 'all-MiniLM-L6-v2'}"]
    return [f"--model.transfer.representation={kind}"]


def unseen_pipelines(out: Path, methods: Sequence[str], seeds: Sequence[int], preset: dict) -> dict[str, list]:
    pipelines: dict[str, list] = {}
    for seed in seeds:
        for method in methods:
            upstream = out / "base" / method / f"seed{seed}"
            steps = [base_fit(out, method, seed, preset)]
            study = out / "unseen" / method / f"seed{seed}"
            steps.append(zeroshot_step(method, upstream, study / "k0", preset, out / "data" / "base"))
            for k in preset["ks"]:
                data = [f"--data.output_dir={out / 'data' / f'k{k}'}"]
                steps.append(fewshot_step(method, upstream, study / f"k{k}", k, seed, preset, data))
            if method == "learned":  # learned routing's unseen routes under three task representations
                k = preset["representation_k"]
                for kind in REPRESENTATIONS:
                    where, extra = study / f"representation-{kind}", representation_args(kind, out)
                    steps.append(zeroshot_step(method, upstream, where / "k0", preset, out / "data" / "base", extra))
                    data = [f"--data.output_dir={out / 'data' / f'k{k}'}", *extra]
                    steps.append(fewshot_step(method, upstream, where / f"k{k}", k, seed, preset, data))
            pipelines[f"unseen-{method}-seed{seed}"] = steps
    return pipelines


def base_task_steps(steps: int) -> int:
    """Steps of the joint run with the unrelated family that give the base tasks `steps` steps' worth of batches:
    proportional sampling over tasks of equal train size, so in proportion to the number of seen tasks."""
    from moe_mtl.data.sources.skills import UNRELATED

    return round(steps * (len(BASE_TASKS) + len(UNRELATED)) / len(BASE_TASKS))


def robustness_pipelines(out: Path, methods: Sequence[str], seeds: Sequence[int], preset: dict) -> dict[str, list]:
    from moe_mtl.data.sources.skills import UNRELATED

    new = [spec.name for spec in UNRELATED]
    pipelines: dict[str, list] = {}
    for seed in seeds:
        for method in methods:
            upstream = out / "base" / method / f"seed{seed}"
            steps = [base_fit(out, method, seed, preset)]
            joint = out / "robustness" / "joint" / method / f"seed{seed}"
            partition = json.dumps({"train": [*BASE_TASKS, *new], "dev": [], "test": []})
            extra = ["--data.skills.unrelated=true", f"--data.partition={partition}", "--data.test_partitions=[]"]
            extra += [f"--data.output_dir={out / 'data' / 'joint'}"]
            steps.append(fit_step(method, joint, base_task_steps(preset["steps"]), preset, extra, seed))
            # sequential: the unrelated family alone, from the base run; the base tasks are validated (partition
            # "dev": in the task table with their trained rows, not trained on)
            partition = json.dumps({"train": new, "dev": list(BASE_TASKS), "test": []})
            after = out / "robustness" / "sequential" / method / f"seed{seed}"
            extra = [
                "--data.skills.unrelated=true",
                f"--data.partition={partition}",
                "--data.val_partitions=[train, dev]",
                "--data.test_partitions=[]",
                f"--data.output_dir={out / 'data' / 'sequential'}",
                f"--model.transfer.init_from={upstream}",
                f"--model.transfer.unseen_routes={SEQUENTIAL_ROUTES[method]}",
                "--two_stage.switch_step=null",
            ]
            steps.append(fit_step(method, after, preset["sequential_steps"], preset, extra, seed))
            pipelines[f"robustness-{method}-seed{seed}"] = steps
    return pipelines


STUDIES = {"transfer": transfer_pipelines, "unseen": unseen_pipelines, "robustness": robustness_pipelines}


# --- running the steps ----------------------------------------------------------------------------------------


def done(step: dict) -> bool:
    folder = Path(step["done"])
    if step["kind"] == "fit":
        return fitted(folder)
    if step["kind"] == "test":
        return bool(list((folder / "evaluation").glob("test-*.json")))
    return (folder / "fewshot_summary.csv").is_file()


def run_pipeline(steps: Sequence[dict]) -> None:
    for step in steps:
        if done(step):
            continue
        if step["kind"] == "fit":
            shutil.rmtree(step["done"], ignore_errors=True)  # a fit cut short starts again
        run(step["args"])


def run_pipelines(pipelines: dict[str, list], jobs: int, logs: Path) -> None:
    """Each pipeline in this process (`jobs` 1) or in a worker process, `jobs` at a time, its output in
    `logs/<name>.log`; one thread per worker (torch would start one per core in each and oversubscribe them)."""
    if jobs == 1:
        for steps in pipelines.values():
            run_pipeline(steps)
        return
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}

    def work(name: str) -> tuple[str, int]:
        spec, log = logs / f"{name}.json", logs / f"{name}.log"
        spec.write_text(json.dumps(pipelines[name]))
        with log.open("w") as stream:
            command = [sys.executable, __file__, "--worker", str(spec)]
            code = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, env=env, check=False).returncode
        return f"{name} (log: {log})", code

    with ThreadPoolExecutor(jobs) as pool:
        failed = [name for name, code in pool.map(work, pipelines) if code != 0]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(pipelines)} pipelines failed: {'; '.join(failed)}")


# --- reading the results (pure, from the files the runs wrote) ------------------------------------------------


def dev_scores(folder: Path) -> dict[str, float]:
    """Task → dev score of the run's last validation."""
    files = list((folder / "evaluation").glob("val-*.json"))
    if not files:
        raise FileNotFoundError(f"no validation in {folder}/evaluation")
    last = max((json.loads(path.read_text()) for path in files), key=lambda evaluation: evaluation["step"])
    return {row["task"]: row["score"] for row in last["tasks"]}


def mean_of(scores: dict[str, float], tasks: Sequence[str]) -> float:
    return sum(scores[task] for task in tasks) / len(tasks)


def final_routes(folder: Path) -> dict[str, list[int]]:
    """Task → the expert of largest weight per routed layer, in the run's last route table (RoutingMonitor's)."""
    tables = sorted(folder.glob("routes/step*.json"), key=lambda path: int(path.stem.removeprefix("step")))
    if not tables:
        return {}
    table = json.loads(tables[-1].read_text())
    return {
        task: [max(range(len(layer)), key=layer.__getitem__) for layer in routes]
        for task, routes in zip(table["tasks"], table["routes"], strict=True)
    }


def experts_taken_over(before: dict[str, list[int]], after: dict[str, list[int]], base, new) -> tuple[int, int]:
    """(experts, of those the base tasks used before, that a new-family task uses after; experts the base tasks used
    before), each expert a (layer, expert) pair and a task's expert the largest weight of its route."""
    used = {(layer, e) for task in base if task in before for layer, e in enumerate(before[task])}
    taken = {(layer, e) for task in new if task in after for layer, e in enumerate(after[task])}
    return len(used & taken), len(used)


def cell(values: Sequence[float]) -> str:
    return format_value(list(values), 3)


def write_table(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """`path`.csv (means and stds as columns) and the markdown of `rows` (cells "mean ± std"); returns the markdown."""
    with open(path.with_suffix(".csv"), "w", newline="") as file:
        writer = csv.writer(file)
        names = [header[0]] + [f"{name} {part}" for name in header[1:] for part in ("mean", "std")]
        writer.writerow([*names, "runs"])
        for row in rows:
            values = [row[0]]
            for column in row[1:]:
                mean, std = mean_std(column) if len(column) else (float("nan"), float("nan"))
                values += [f"{mean:.4f}", f"{std:.4f}"]
            writer.writerow([*values, max((len(column) for column in row[1:]), default=0)])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([str(row[0]), *(cell(column) for column in row[1:])]) + " |" for row in rows]
    markdown = "\n".join(lines) + "\n"
    path.with_suffix(".md").write_text(markdown)
    return markdown


def figure(path: Path, title: str, ylabel: str, series: dict[str, tuple[list, list[list[float]]]], bars: bool) -> None:
    """A bar chart (x: categories) or line chart (x: numbers) of mean ± std per series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    width = 0.8 / max(1, len(series))
    for i, (name, (xs, values)) in enumerate(series.items()):
        means = [mean_std(v)[0] if v else float("nan") for v in values]
        stds = [mean_std(v)[1] if v else 0.0 for v in values]
        if bars:
            ax.bar(np.arange(len(xs)) + i * width, means, width, yerr=stds, label=name, capsize=3)
            ax.set_xticks(np.arange(len(xs)) + width * (len(series) - 1) / 2, xs)
        else:
            ax.errorbar(xs, means, yerr=stds, label=name, marker="o", capsize=3)
    if not bars:
        ax.set_xscale("symlog", linthresh=4)
        ax.set_xlabel("k (shots per task)")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def transfer_report(out: Path, methods: Sequence[str], seeds: Sequence[int]) -> str:
    folder = out / "tables"
    folder.mkdir(parents=True, exist_ok=True)
    header = ["method", "targets, with related tasks", "targets, with unrelated tasks", "gain from related tasks"]
    rows, series = [], {}
    for method in methods:
        related = [mean_of(dev_scores(out / "transfer" / "related" / method / f"seed{s}"), TARGETS) for s in seeds]
        control = [mean_of(dev_scores(out / "transfer" / "unrelated" / method / f"seed{s}"), TARGETS) for s in seeds]
        rows.append([method, related, control, [a - b for a, b in zip(related, control, strict=True)]])
        series[method] = (["with related", "with unrelated"], [related, control])
    single = [
        sum(dev_scores(out / "transfer" / "single" / task / f"seed{s}")[task] for task in TARGETS) / len(TARGETS)
        for s in seeds
    ]
    rows.append(["single-task (dense, each target alone)", single, [], []])
    series["single-task"] = (["with related", "with unrelated"], [single, single])
    markdown = write_table(folder / "transfer", header, rows)
    figure(folder / "transfer.png", "Low-resource targets: mean dev score", "dev score", series, bars=True)
    return markdown


def unseen_report(out: Path, methods: Sequence[str], seeds: Sequence[int], preset: dict) -> str:
    ks, rep_k, tasks = preset["ks"], preset["representation_k"], preset["fewshot_tasks"]
    folder = out / "tables"
    folder.mkdir(parents=True, exist_ok=True)

    def scores(where: Path, k: int) -> float:
        found = zeroshot_scores(where, "test") if k == 0 else fewshot_scores(where)
        if isinstance(found, str):
            raise FileNotFoundError(found)
        return mean_of(found, tasks)

    header = ["method", *(f"k = {k}" if k else "zero-shot" for k in (0, *ks))]
    rows, series = [], {}
    for method in methods:
        columns = [[scores(out / "unseen" / method / f"seed{s}" / f"k{k}", k) for s in seeds] for k in (0, *ks)]
        rows.append([method, *columns])
        series[method] = ([0, *ks], columns)
    markdown = write_table(folder / "unseen", header, rows)
    figure(folder / "unseen.png", "Unseen tasks: test score against k", "test score", series, bars=False)
    if "learned" in methods:
        header = ["representation (learned routing, nearest routes)", "zero-shot", f"k = {rep_k}"]
        rows = []
        for kind in REPRESENTATIONS:
            where = [out / "unseen" / "learned" / f"seed{s}" / f"representation-{kind}" for s in seeds]
            rows.append([kind, [scores(w / "k0", 0) for w in where], [scores(w / f"k{rep_k}", rep_k) for w in where]])
        markdown += "\n" + write_table(folder / "representations", header, rows)
    return markdown


def robustness_report(out: Path, methods: Sequence[str], seeds: Sequence[int]) -> str:
    from moe_mtl.data.sources.skills import UNRELATED

    base, new = list(BASE_TASKS), [spec.name for spec in UNRELATED]
    folder = out / "tables"
    folder.mkdir(parents=True, exist_ok=True)
    header = [
        "method",
        "base alone",
        "base + unrelated (joint)",
        "joint change",
        "after training on unrelated",
        "forgetting (before − after)",
        "unrelated tasks, after",
        "base experts taken over",
    ]
    rows, series = [], {}
    for method in methods:
        runs = [
            (out / "base" / method / f"seed{s}", out / "robustness" / "joint" / method / f"seed{s}",
             out / "robustness" / "sequential" / method / f"seed{s}")
            for s in seeds
        ]  # fmt: skip
        alone = [mean_of(dev_scores(b), base) for b, _, _ in runs]
        joint = [mean_of(dev_scores(j), base) for _, j, _ in runs]
        after = [mean_of(dev_scores(a), base) for _, _, a in runs]
        new_after = [mean_of(dev_scores(a), new) for _, _, a in runs]
        taken = [experts_taken_over(final_routes(b), final_routes(a), base, new) for b, _, a in runs]
        fraction = [t / u for t, u in taken if u] if method != "dense" else []
        rows.append(
            [
                method,
                alone,
                joint,
                [j - a for j, a in zip(joint, alone, strict=True)],
                after,
                [a - f for a, f in zip(alone, after, strict=True)],
                new_after,
                fraction,
            ]
        )
        series[method] = (["joint change", "forgetting"], [rows[-1][3], rows[-1][5]])
    markdown = write_table(folder / "robustness", header, rows)
    figure(folder / "robustness.png", "Base-task dev score: change with unrelated tasks", "score change", series, True)
    return markdown


# --- the command ----------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--worker":  # one pipeline of a --jobs run
        run_pipeline(json.loads(Path(sys.argv[2]).read_text()))
        return {}
    parser.add_argument("study", choices=sorted(STUDIES))
    parser.add_argument("--out", type=Path, default=Path("runs/studies"), help="folder of every run")
    parser.add_argument("--docs", type=Path, help="also copy the tables and figures to <docs>/<study>/")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the runs")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--preset", default="full", choices=sorted(PRESETS))
    parser.add_argument("--jobs", type=int, default=1, help="pipelines at once, each in a process of its own")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="--OPTION=VALUE",
        help="a moe-mtl option for every run, after the configs (repeat it)",
    )
    options = parser.parse_args(argv)
    if options.jobs < 1:
        parser.error(f"--jobs {options.jobs}: give 1 or more")
    preset = {**PRESETS[options.preset], "set": options.set}
    out = options.out.absolute()
    started, cpu_before = time.monotonic(), cpu_minutes()
    if options.study == "unseen" and "learned" in options.methods:
        from moe_mtl.representations.pretrained import minilm_folder  # the extra `represent`

        minilm_folder(out / "models")
    preset["tokenizer"] = shared_tokenizer(out, preset)
    pipelines = STUDIES[options.study](out, options.methods, options.seeds, preset)
    run_pipelines(pipelines, options.jobs, out / "logs" / options.study)
    if options.study == "transfer":
        markdown = transfer_report(out, options.methods, options.seeds)
    elif options.study == "unseen":
        markdown = unseen_report(out, options.methods, options.seeds, preset)
    else:
        markdown = robustness_report(out, options.methods, options.seeds)
    minutes = (time.monotonic() - started) / 60
    record = {"study": options.study, "preset": options.preset, "seeds": options.seeds, "methods": options.methods}
    record |= {"minutes": minutes, "cpu_minutes": cpu_minutes() - cpu_before, "jobs": options.jobs}
    record |= {
        "set": options.set,
        "command": " ".join(["python scripts/robust_mtl_studies.py", *(argv or sys.argv[1:])]),
    }
    (out / "tables" / f"{options.study}.json").write_text(json.dumps(record, indent=1) + "\n")
    print(markdown)
    if options.docs:
        target = options.docs / options.study
        target.mkdir(parents=True, exist_ok=True)
        for path in (out / "tables").glob("*"):
            if path.stem in (options.study, "representations" if options.study == "unseen" else None):
                shutil.copy(path, target / path.name)
    print(f"{options.study}: done in {minutes:.1f} min ({record['cpu_minutes']:.1f} CPU-min)")
    return record


if __name__ == "__main__":
    main()
