"""The paper's comparison (Ye et al. 2022, Table 2's rows) on the built-in skill suite, on the CPU.

For each routing method (vanilla multi-task BART, random task-level routes, average routing, learned routing) and
each seed: a `moe-mtl fit` of the quick-start model with the method's overlay (`configs/baselines/`), a zero-shot
`moe-mtl test` on the unseen tasks (`--model.transfer.init_from` the run, unseen tasks routed by the method's own route
source), and `moe-mtl fewshot` on the unseen tasks (one k-shot seed per upstream seed). Then `moe-mtl analyze` of
the learned runs (route–skill correlation and agreement against the suite's ground-truth skills) and
`moe-mtl summarize` of every run into one table (seen-task dev average, unseen zero-/few-shot averages and ARG
against vanilla, mean ± std over seeds).

    python scripts/skill_suite_table.py --out runs/skill_table --jobs 2 --docs docs/skill_suite

Every step is skipped when its result exists, so an interrupted run resumes. `--preset tiny` shrinks everything
to seconds (the test suite runs it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from moe_mtl.cli import main as moe_mtl

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "configs" / "quickstart.yaml"
METHODS = ("vanilla", "random", "average", "learned")
# how each method routes a task new to its task table (zero-shot and few-shot): by its own kind of route
UNSEEN_ROUTES = {"vanilla": "average", "random": "random", "average": "average", "learned": "nearest"}
# the few-shot cells fine-tune every weight on the same fixed route as zero-shot. For learned routing that is the
# nearest seen task's route: learning the new task's row (`unseen_routes learned`, router frozen) scored lowest of all
# four methods (0.198 vs 0.275-0.291 at 1,000 steps; docs/skill_suite/README.md)
FEWSHOT_ROUTES = UNSEEN_ROUTES
# learned routing's downstream runs keep the upstream run's stage-two routes (argmax, router and table frozen);
# the quick start's own MoE options (gumbel_st, trainable router) would learn every route again
DOWNSTREAM = {
    "learned": ["--model.moe.selection=argmax", "--model.moe.freeze_router=true", "--model.moe.freeze_task_table=true"]
}

# a model of seconds per run: the tiny presets' (also scripts/robust_mtl_studies.py's)
TINY_MODEL = [
    "--data.vocab_size=300",
    "--model.bart.d_model=16",
    "--model.bart.encoder_layers=1",
    "--model.bart.decoder_layers=1",
    "--model.bart.encoder_ffn_dim=32",
    "--model.bart.decoder_ffn_dim=32",
    "--model.bart.encoder_attention_heads=2",
    "--model.bart.decoder_attention_heads=2",
    "--model.moe.task_dim=8",
    "--model.moe.router_hidden=8",
    "--data.max_input_length=32",
    "--data.max_target_length=8",
]
PRESETS = {
    # ~27 min with --jobs 2 on 2 CPU cores (docs/skill_suite/README.md). 2,000 steps: at 1,000 learned routing does
    # not win. Batch 32, not the quick start's 64: a third less time, the same ranking (README: "Time")
    "full": {
        "steps": 2000,
        "fewshot_steps": 40,
        "fewshot_lrs": [5e-4],
        "data": ["--data.batch_size=32"],
        "learned": [],
    },
    # seconds: the test suite's end-to-end run of this script
    "tiny": {
        "steps": 4,
        "fewshot_steps": 2,
        "fewshot_lrs": [5e-4],
        "data": [
            "--data.skills.train_size=8",
            "--data.skills.dev_size=2",
            "--data.skills.test_size=2",
            "--data.skills.shots=2",
            "--data.batch_size=4",
            "--data.eval_batch_size=8",
            *TINY_MODEL,
            "--trainer.log_every_n_steps=1",
        ],
        "learned": ["--two_stage.switch_step=2"],
    },
}


def configs(method: str, preset: dict) -> list[str]:
    """The method's configs, then the preset's sizes (and, for learned routing, its stage-one settings), then the
    user's `--set` overrides. No progress bar: its output goes to the logs, and its refresh thread took ~4% of the
    CPU."""
    files = ["--config", str(BASE_CONFIG), "--config", str(ROOT / "configs" / "baselines" / f"{method}.yaml")]
    files += ["--trainer.enable_progress_bar=false"]
    return files + preset["data"] + (preset["learned"] if method == "learned" else []) + preset["set"]


def cpu_minutes() -> float:
    """CPU minutes (user + system) of this process and its finished workers so far. Over N idle cores, a run's wall
    time is at least its CPU time / N: the measure of its cost that other jobs on the machine do not inflate."""
    used = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(usage.ru_utime + usage.ru_stime for usage in used) / 60


def run(args: Sequence[str]) -> None:
    """One `moe-mtl` command in this process (no interpreter start-up per step); a usage error stops the script."""
    print("moe-mtl " + " ".join(args), flush=True)
    try:
        moe_mtl(list(args))
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise RuntimeError(f"`moe-mtl {args[0]}` exited with {exit_.code}") from None


def fit(method: str, seed: int, out: Path, preset: dict, data_dir: Path) -> Path:
    folder = out / method / f"seed{seed}"
    if list(folder.glob("evaluation/val-*.json")) and (folder / "checkpoints" / "last.ckpt").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)  # a fit cut short starts again
    steps = preset["steps"]
    run(
        [
            "fit",
            *configs(method, preset),
            f"--seed_everything={seed}",
            f"--trainer.max_steps={steps}",
            f"--trainer.val_check_interval={steps}",
            f"--trainer.logger.init_args.save_dir={out}",
            f"--trainer.logger.init_args.name={method}",
            f"--trainer.logger.init_args.version=seed{seed}",
            f"--data.output_dir={data_dir}",
        ]
    )
    return folder


def zeroshot(method: str, folder: Path, preset: dict, data_dir: Path) -> None:
    if list((folder / "zeroshot" / "evaluation").glob("test-*.json")):
        return
    run(
        [
            "test",
            *configs(method, preset),
            *DOWNSTREAM.get(method, []),
            f"--model.transfer.init_from={folder}",
            f"--model.transfer.unseen_routes={UNSEEN_ROUTES[method]}",
            f"--model.evaluation.results_dir={folder / 'zeroshot'}",
            "--data.test_partitions=test",
            f"--data.output_dir={data_dir}",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={folder / 'zeroshot'}",  # its config.yaml goes there, not to the cwd
        ]
    )


def fewshot(
    method: str, folder: Path, kshot_seed: int, preset: dict, data_dir: Path, tasks: Sequence[str] | None
) -> None:
    # always run: the runner itself skips finished cells and retries failed ones
    steps = preset["fewshot_steps"]
    # the runner sets each cell's batch size itself (`--batch_sizes`)
    sizes = [arg.split("=", 1)[1] for arg in preset["data"] if arg.startswith("--data.batch_size=")]
    run(
        [
            "fewshot",
            *(arg for arg in configs(method, preset) if not arg.startswith("--data.batch_size=")),
            *DOWNSTREAM.get(method, []),
            *(["--batch_sizes", *sizes] if sizes else []),
            *(["--tasks", *tasks] if tasks else []),
            "--init_from",
            str(folder),
            "--out",
            str(folder / "fewshot"),
            "--seeds",
            str(kshot_seed),
            "--lrs",
            *map(str, preset["fewshot_lrs"]),
            "--unseen_routes",
            FEWSHOT_ROUTES[method],
            "--max_steps",
            str(steps),
            f"--trainer.val_check_interval={steps}",
            f"--data.output_dir={data_dir}",
            "--two_stage.switch_step=null",
        ]
    )


def route_record(folder: Path, switch_step: int) -> dict:
    """How decided and how skill-aligned a learned run's routes are: the per-task and task-averaged route entropy
    (RoutingMonitor's, over the seen tasks) at the last log before the two-stage switch, the distinct argmax routes
    after it, and `moe-mtl analyze`'s route–skill agreement of the final routes."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()

    def before_switch(tag: str) -> float:  # nan: RoutingMonitor logged nothing before the switch
        logged = events.Tags()["scalars"]
        values = [e.value for e in events.Scalars(tag) if e.step <= switch_step] if tag in logged else []
        return values[-1] if values else math.nan

    tables = sorted(folder.glob("routes/step*.json"), key=lambda path: int(path.stem.removeprefix("step")))
    final = json.loads(tables[-1].read_text())
    seen = json.loads(next((folder / "evaluation").glob("val-*.json")).read_text())["tasks"]
    rows = [final["tasks"].index(row["task"]) for row in seen if row["partition"] == "train"]
    routes = {tuple(max(range(len(layer)), key=layer.__getitem__) for layer in final["routes"][i]) for i in rows}
    agreement = json.loads((folder / "analysis" / "skill_agreement.json").read_text())
    return {
        "entropy_per_task": before_switch("routing/entropy_per_task/mean"),
        "entropy_task_avg": before_switch("routing/entropy_task_avg/mean"),
        "max_entropy": math.log(final["num_experts"]),
        "distinct_routes": len(routes),
        "tasks": len(rows),
        "agreement_sharing": agreement["sharing"],
        "agreement_not_sharing": agreement["not_sharing"],
        "p_permutation": agreement["p_permutation"],
    }


def routes_markdown(records: dict[int, dict]) -> str:
    """The learned runs' route records (`route_record`) as a markdown table, a row per seed."""
    lines = [
        "| seed | per-task entropy before the switch (max ln E) | task-averaged entropy | distinct routes after "
        "| route agreement: tasks sharing a skill / sharing none | permutation p |",
        "|---|---|---|---|---|---|",
    ]
    for seed, r in records.items():
        lines.append(
            f"| {seed} | {r['entropy_per_task']:.3f} (max {r['max_entropy']:.3f}) | {r['entropy_task_avg']:.3f} "
            f"| {r['distinct_routes']} for {r['tasks']} tasks | {r['agreement_sharing']:.3f} / "
            f"{r['agreement_not_sharing']:.3f} | {r['p_permutation']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def pipeline(
    method: str, seed: int, kshot_seed: int, out: Path, preset: dict, data_dir: Path, tasks: Sequence[str] | None
) -> None:
    """One upstream run and everything measured on it: fit, zero-shot test, few-shot cells (and analysis)."""
    folder = fit(method, seed, out, preset, data_dir)
    if not preset["seen_only"]:
        zeroshot(method, folder, preset, data_dir)
        fewshot(method, folder, kshot_seed, preset, data_dir, tasks)
    if method == "learned":
        run(["analyze", str(folder)])


def pipeline_args(options: argparse.Namespace, method: str, seed: int, kshot_seed: int) -> list[str]:
    """This script's arguments for a worker that runs one (method, seed) pipeline and nothing else."""
    args = ["--out", str(options.out.absolute()), "--preset", options.preset, "--pipeline_only"]
    args += ["--methods", method, "--seeds", str(seed), "--kshot_seeds", str(kshot_seed)]
    args += [f"--{key}={getattr(options, key)}" for key in ("steps", "fewshot_steps") if getattr(options, key)]
    args += [f"--set={override}" for override in options.set] + (["--seen_only"] if options.seen_only else [])
    return args + (["--fewshot_tasks", *options.fewshot_tasks] if options.fewshot_tasks else [])


def run_parallel(pairs: Sequence[tuple[str, int, int]], options: argparse.Namespace) -> None:
    """Each (method, seed, k-shot seed) pipeline in a worker process, `options.jobs` at a time, its output in
    `<out>/logs/<method>-seed<seed>.log`. Workers share the data cache (its files are written whole, then renamed).
    One thread per worker (torch would otherwise start a thread per core in every worker and oversubscribe them)."""
    logs = options.out.absolute() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}

    def work(pair: tuple[str, int, int]) -> tuple[str, int]:  # (what it ran, its exit code)
        method, seed, kshot_seed = pair
        log = logs / f"{method}-seed{seed}.log"
        with log.open("w") as stream:
            command = [sys.executable, __file__, *pipeline_args(options, method, seed, kshot_seed)]
            code = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, env=env, check=False).returncode
        return f"{method} seed {seed} (log: {log})", code

    # the costliest pipelines first (average routing runs every expert at every step; learned does in stage one)
    cost = {"average": 0, "learned": 1, "random": 2, "vanilla": 3}
    ordered = sorted(pairs, key=lambda pair: cost.get(pair[0], 0))
    with ThreadPoolExecutor(options.jobs) as pool:
        failed = [name for name, code in pool.map(work, ordered) if code != 0]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(pairs)} pipelines failed: {'; '.join(failed)}")


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/skill_table"), help="folder of every run")
    parser.add_argument("--docs", type=Path, help="also copy the table and the learned routes' heatmap here")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the upstream runs")
    parser.add_argument("--kshot_seeds", type=int, nargs="+", default=[100, 13, 21], help="k-shot seed per seed")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--preset", default="full", choices=sorted(PRESETS))
    parser.add_argument("--fewshot_tasks", nargs="+", help="few-shot on these unseen tasks only (default: all)")
    parser.add_argument("--steps", type=int, help="upstream training steps (default: the preset's)")
    parser.add_argument("--fewshot_steps", type=int, help="few-shot training steps per cell (default: the preset's)")
    parser.add_argument(
        "--jobs", type=int, default=1, help="run this many (method, seed) pipelines at once, each its own process"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="--OPTION=VALUE",
        help="a moe-mtl option for every run, after the configs (repeat it; e.g. --set=--two_stage.switch_step=300)",
    )
    parser.add_argument("--seen_only", action="store_true", help="train and analyse only: no zero-/few-shot")
    parser.add_argument("--pipeline_only", action="store_true", help=argparse.SUPPRESS)  # a --jobs worker
    options = parser.parse_args(argv)
    if options.jobs < 1:
        parser.error(f"--jobs {options.jobs}: give 1 or more")
    if len(options.kshot_seeds) < len(options.seeds):
        parser.error(f"--kshot_seeds gives {len(options.kshot_seeds)} seeds for {len(options.seeds)} upstream seeds")
    preset, out = PRESETS[options.preset], options.out.absolute()
    preset = {**preset, **{key: getattr(options, key) for key in ("steps", "fewshot_steps") if getattr(options, key)}}
    preset = {**preset, "set": options.set, "seen_only": options.seen_only}
    data_dir = out / "data"  # one tokenizer and data cache for every run
    started = time.monotonic()
    cpu_before = cpu_minutes()
    pairs = [(m, s, k) for m in options.methods for s, k in zip(options.seeds, options.kshot_seeds, strict=False)]
    if options.jobs > 1:
        run_parallel(pairs, options)
    else:
        for method, seed, kshot_seed in pairs:
            pipeline(method, seed, kshot_seed, out, preset, data_dir, options.fewshot_tasks)
    if options.pipeline_only:
        return {}
    if "learned" in options.methods:
        switch = int(yaml.safe_load(BASE_CONFIG.read_text())["two_stage"]["switch_step"])
        for arg in preset["learned"] + preset["set"]:  # the preset's or the user's switch step, if they set one
            switch = int(arg.split("=", 1)[1]) if arg.startswith("--two_stage.switch_step=") else switch
        records = {seed: route_record(out / "learned" / f"seed{seed}", switch) for seed in options.seeds}
        (out / "routes.md").write_text(routes_markdown(records))
    table = out / "table"
    baseline = ["--baseline", "vanilla"] if "vanilla" in options.methods else []
    run(["summarize", *(str(out / m) for m in options.methods), *baseline, "--out", str(table)])
    minutes = (time.monotonic() - started) / 60
    record = {"preset": options.preset, "seeds": options.seeds, "methods": options.methods, "minutes": minutes}
    record |= {"cpu_minutes": cpu_minutes() - cpu_before, "steps": preset["steps"], "set": options.set}
    (out / "run.json").write_text(json.dumps(record, indent=1) + "\n")
    if options.docs:
        options.docs.mkdir(parents=True, exist_ok=True)
        for suffix in (".md", ".csv"):
            shutil.copy(table.with_suffix(suffix), options.docs / f"table{suffix}")
        if (out / "routes.md").is_file():
            shutil.copy(out / "routes.md", options.docs / "routes.md")
        learned = out / "learned" / f"seed{options.seeds[0]}" / "analysis"
        for name in ("route_heatmap.png", "correlation.md", "skill_agreement.json"):
            if (learned / name).is_file():
                shutil.copy(learned / name, options.docs / name)
    print(f"done in {minutes:.1f} min: {table}.md")
    return record


if __name__ == "__main__":
    main()
