"""Every shipped fit config through the real `moe-mtl` command under 2-process DDP (gloo, on the CPU).

`moe-mtl fit` then `moe-mtl test --ckpt_path <best checkpoint>`, each a subprocess that Lightning's DDP launcher
turns into two ranks. The configs are shrunk to toy size (`shrink`, tests/conftest.py) and keep their own
callbacks (two-stage switch, routing monitor), checkpoint selection, evaluation, logger, precision and DDP strategy;
`results_dir` stays unset, so rank-0-only writers (evaluation files, route tables) write into the logger's run
folder. Reading that folder (`Trainer.log_dir`, a broadcast) from rank-0-only code once hung DDP at the first
validation: a hang here fails after `TIMEOUT_S` with the tail of the command's output.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from moe_mtl.data import MultiTaskDataModule
from moe_mtl.runs import checkpoint_fixed_routes

from .conftest import FIT_CONFIGS, shrink, two_stage

MOE_MTL = Path(sys.executable).parent / "moe-mtl"  # the console script installed with the package
TIMEOUT_S = 300  # a command running longer has hung (each takes under a minute on 2 idle cores)
WORLD_SIZE = 2

pytestmark = [pytest.mark.slow, pytest.mark.distributed]  # 2 ranks of the real command


def distributed(shrunk: dict, strategy: str | None) -> dict:
    """A `shrink`-ed config on 2 CPU ranks: the file's own DDP `strategy`, else (a one-device config) one that lets
    stage two's fixed routes leave experts idle; all dev examples validated after each optimizer step (step 1 in
    stage one, step 2 after the switch)."""
    trainer = shrunk["trainer"]
    trainer.update(
        devices=WORLD_SIZE,
        strategy=strategy if str(strategy).startswith("ddp") else "ddp_find_unused_parameters_true",
        val_check_interval=trainer.get("accumulate_grad_batches", 1),
        limit_val_batches=None,
    )
    shrunk["data"]["eval_batch_size"] = 16  # a task's dev rows in one batch a rank: fewer generate calls
    return shrunk


def run(args: list[str], cwd: Path, log: Path) -> str:
    """Run `moe-mtl *args` in its own process group and return its output; fail with the output's tail if it
    exits non-zero or runs past `TIMEOUT_S` (the whole group is killed: the launcher's rank-1 child too)."""
    offline = dict.fromkeys(("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"), "1")
    env = {**os.environ, **offline, "OMP_NUM_THREADS": "1"}  # 2 ranks share the cores
    for name in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE"):
        env.pop(name, None)
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [str(MOE_MTL), *args], cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code, why = process.wait(timeout=TIMEOUT_S), None
        except subprocess.TimeoutExpired:
            code, why = None, f"still running after {TIMEOUT_S} s (a DDP hang?)"
        with contextlib.suppress(ProcessLookupError):  # a rank left behind would wait in a collective forever
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    text = log.read_text(errors="replace")
    if why is None and code != 0:
        why = f"exit code {code}"
    if why is not None:
        tail = "\n".join(text.splitlines()[-60:])
        pytest.fail(f"`moe-mtl {' '.join(args)}` {why}; its output ends:\n{tail}", pytrace=False)
    return text


def examples_per_task(data_options: dict, split: str) -> dict[str, int]:
    """Examples per task of `split` ("dev" or "test") as read from the data, before any sampler or rank sees them."""
    data = MultiTaskDataModule(**data_options)
    partitions = data.partitions["val_partitions" if split == "dev" else "test_partitions"]
    seed = data.hparams.fewshot_seed
    return {task.name: len(task.examples(split, seed)) for task in data.tasks if task.partition in partitions}


def scalars(run_dir: Path) -> dict[str, list[float]]:
    """The values of every scalar in the run's TensorBoard event file, in step order."""
    (events,) = run_dir.glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0}).Reload()
    return {tag: [event.value for event in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


@pytest.mark.parametrize("config", FIT_CONFIGS, ids=lambda path: path.name)
def test_fit_config_fits_and_tests_under_two_process_ddp(config, crossfit, tmp_path):
    original = yaml.safe_load(config.read_text())
    callbacks = {callback["class_path"].rsplit(".", 1)[-1] for callback in original["trainer"].get("callbacks", [])}
    tiny = distributed(shrink(original, tmp_path, crossfit), original["trainer"].get("strategy"))
    (tmp_path / config.name).write_text(yaml.safe_dump(tiny))

    fitted = run(["fit", "--config", config.name], tmp_path, tmp_path / "fit.log")
    assert f"MEMBER: {WORLD_SIZE}/{WORLD_SIZE}" in fitted  # the launcher's second rank joined
    assert "sync_dist=True" not in fitted  # Lightning's warning per evaluation key (~70 of them before)

    (fit_run,) = (tmp_path / "runs").glob("*/version_0")
    saved = yaml.safe_load((fit_run / "config.yaml").read_text())["trainer"]
    assert (saved["devices"], saved["strategy"], saved["precision"]) == (
        WORLD_SIZE,
        tiny["trainer"]["strategy"],
        original["trainer"].get("precision"),
    )
    logged = scalars(fit_run)
    if two_stage(original):
        assert logged["train/stage"] == [1.0, 2.0]  # step 1's batch in stage one, step 2's after the switch
    # a validation after each step (the first hung before the fix), each of every dev example exactly once
    dev_sizes = examples_per_task(tiny["data"], "dev")
    reports = {}
    for step in (1, 2):
        (path,) = fit_run.glob(f"evaluation/val-epoch*-step{step}.json")  # written by rank 0 only
        reports[step] = json.loads(path.read_text())
        assert {row["task"]: row["examples"] for row in reports[step]["tasks"]} == dev_sizes
        if "RoutingMonitor" in callbacks:
            assert (fit_run / "routes" / f"step{step}.json").is_file()  # written by rank 0 only
    assert len(logged["val/score"]) == 2 and "train/loss" in logged
    # the best checkpoint is that of the validation with the best score (ties: the first)
    (best,) = (fit_run / "checkpoints").glob("best-step*.ckpt")
    scores = {step: report["average"]["score"] for step, report in reports.items()}
    assert scores[int(best.stem.removeprefix("best-step"))] == pytest.approx(max(scores.values()), rel=1e-6)

    run(["test", "--config", config.name, "--ckpt_path", str(best)], tmp_path, tmp_path / "test.log")
    test_run = fit_run / best.stem  # the checkpoint's run, a folder named for the checkpoint
    report = json.loads((test_run / "evaluation" / f"test-{best.stem}.json").read_text())
    assert report["step"] == int(best.stem.removeprefix("best-step"))  # the checkpoint's step
    # the tasks the checkpoint trained (data.test_partitions unset), their test split
    trained = {**tiny["data"], "test_partitions": tiny["data"].get("train_partitions", "train")}
    assert {row["task"]: row["examples"] for row in report["tasks"]} == examples_per_task(trained, "test")
    assert scalars(test_run)["test/score"] == [pytest.approx(report["average"]["score"], rel=1e-6)]

    # the last checkpoint is the end of training (resuming goes on from there), in stage two
    last = torch.load(fit_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 2
    if two_stage(original):
        assert checkpoint_fixed_routes(last) == original["two_stage"].get("routes", "argmax")
        assert last["callbacks"]["TwoStageTraining"]["switched_at"] == 1


def test_a_compiled_fit_under_two_process_ddp_and_bf16_mixed_trains_as_eager(crossfit, tmp_path):
    """`--model.compile true` composes with DDP and bf16-mixed: the two ranks' compiled layers train to the weights
    the eager run of the same command reaches (bf16 tolerance)."""
    original = yaml.safe_load((Path(__file__).parents[1] / "configs" / "quickstart.yaml").read_text())
    weights = {}
    for compiled in (False, True):
        folder = tmp_path / ("compiled" if compiled else "eager")
        tiny = distributed(shrink(original, folder, crossfit), None)
        tiny["trainer"].update(precision="bf16-mixed", limit_val_batches=1)
        folder.mkdir()
        (folder / "fit.yaml").write_text(yaml.safe_dump(tiny))
        fitted = run(["fit", "--config", "fit.yaml", "--model.compile", str(compiled).lower()], folder, folder / "log")
        assert f"MEMBER: {WORLD_SIZE}/{WORLD_SIZE}" in fitted
        (last,) = (folder / "runs").glob("*/version_0/checkpoints/last.ckpt")
        checkpoint = torch.load(last, map_location="cpu", weights_only=False)
        assert checkpoint["global_step"] == 2 and checkpoint["hyper_parameters"]["compile"] is compiled
        weights[compiled] = checkpoint["state_dict"]
    assert weights[True].keys() == weights[False].keys()
    for name, tensor in weights[False].items():
        torch.testing.assert_close(weights[True][name], tensor, rtol=2e-2, atol=2e-3, msg=name)
