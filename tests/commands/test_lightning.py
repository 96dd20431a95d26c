"""`moe-mtl fit | validate | test | predict` (`moe_mtl.commands.lightning`): LightningCLI on a tiny run."""

import contextlib
import csv
import io
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from moe_mtl.cli import main
from moe_mtl.ownership import LOCK_NAME
from moe_mtl.runs import best_step

from ..conftest import event_values, tasks_of, write_config

ROUTED_LAYERS = ("encoder.0", "encoder.1", "decoder.0", "decoder.1")


def validation_averages(run_dir: Path, kind: str) -> dict[int, float]:
    """Global step → average val score or loss, from the run's evaluation files."""
    averages = {}
    for path in run_dir.glob("evaluation/val-*.json"):
        evaluation = json.loads(path.read_text())
        averages[evaluation["step"]] = evaluation["average"][kind]
    return averages


def checkpoint_state(path: Path) -> dict:
    """The saved state of the run's best-by-metric ModelCheckpoint callback (`checkpoint.*`)."""
    callbacks = torch.load(path, map_location="cpu", weights_only=False)["callbacks"]
    (state,) = (state for key, state in callbacks.items() if key.startswith("ModelCheckpoint") and state["monitor"])
    return state


# --- fit, test and predict on one tiny run --------------------------------------------------------


PRINTED: dict[str, str] = {}  # verb → what the `run` fixture's command printed (its end-of-run summary)


def printing(args: list[str]) -> str:
    """`moe-mtl <args>` in this process; what it printed to stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(args)
    return out.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """`moe-mtl fit`, then `test` from its best checkpoint (stage one) and `predict` from its last (stage two);
    the folder they ran in (runs/tiny/version_0; test and predict write into version_0/<checkpoint name>)."""
    root = tmp_path_factory.mktemp("cli")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        config = write_config(root / "tiny.yaml")
        PRINTED["fit"] = printing(["fit", "--config", config])
        checkpoints = root / "runs/tiny/version_0/checkpoints"
        (best,) = checkpoints.glob("best-step*.ckpt")
        PRINTED["test"] = printing(["test", "--config", config, "--ckpt_path", str(best)])
        PRINTED["predict"] = printing(["predict", "--config", config, "--ckpt_path", str(checkpoints / "last.ckpt")])
        PRINTED["validate"] = printing(["validate", "--config", config, "--ckpt_path", str(best)])
    return root


def test_fit_logs_training_routing_and_validation_to_tensorboard(run):
    scalars, images = event_values(run / "runs/tiny/version_0")
    assert [step for step, _ in scalars["train/loss"]] == [0, 1, 2, 3]
    temperature = [value for _, value in scalars["train/temperature"]]
    assert temperature[0] == pytest.approx(2.0) and temperature[1] == pytest.approx(2.0 * math.exp(-0.1))
    assert [value for _, value in scalars["train/stage"]] == [1.0, 1.0, 2.0, 2.0]  # TwoStageTraining at step 2
    # the learning rates applied: the router and task table are frozen in stage two, so theirs is 0
    for group in ("router", "task_table"):
        rates = [value for _, value in scalars[f"lr/{group}"]]
        assert rates[0] > 0 and rates[2:] == [0.0, 0.0], group
    assert all(value > 0 for _, value in scalars["lr/backbone"][1:])
    for kind in ("entropy_per_task", "entropy_task_avg"):
        for layer in (*ROUTED_LAYERS, "mean"):
            assert [step for step, _ in scalars[f"routing/{kind}/{layer}"]] == [1, 2, 3, 4]
    assert "routing/route_map" in images
    folder = run / "runs/tiny/version_0/evaluation"
    evaluations = [json.loads((folder / f"val-epoch0-step{step}.json").read_text()) for step in (2, 4)]
    # at the global step of the weights evaluated (Lightning's own step would be its batch counter, one behind)
    for kind in ("score", "loss"):
        assert [step for step, _ in scalars[f"val/{kind}"]] == [2, 4]
        logged = [value for _, value in scalars[f"val/{kind}"]]
        assert logged == pytest.approx([evaluation["average"][kind] for evaluation in evaluations])
    assert len(evaluations[1]["tasks"]) == 3  # limit_val_batches 3, one task per evaluation batch
    for row in evaluations[1]["tasks"]:
        assert scalars[f"val/score/{row['task']}"][-1][1] == pytest.approx(row["score"])


def test_fit_writes_evaluation_files_and_route_tables(run):
    folder = run / "runs/tiny/version_0"
    for step in (2, 4):
        rows = list(csv.DictReader((folder / f"evaluation/val-epoch0-step{step}.csv").open()))
        assert [row["task"] for row in rows][-1] == "average" and len(rows) == 4
        assert json.loads((folder / f"evaluation/val-epoch0-step{step}.json").read_text())["step"] == step
        assert json.loads((folder / f"routes/step{step}.json").read_text())["step"] == step


def test_the_best_checkpoint_is_selected_by_val_score(run):
    folder = run / "runs/tiny/version_0"
    scores = validation_averages(folder, "score")
    best_step = max(scores, key=lambda step: (scores[step], -step))  # higher is better; ties keep the first
    state = checkpoint_state(folder / "checkpoints/last.ckpt")
    assert state["monitor"] == "val/score" and float(state["best_model_score"]) == pytest.approx(scores[best_step])
    assert Path(state["best_model_path"]).name == f"best-step{best_step}.ckpt"
    assert [path.name for path in (folder / "checkpoints").glob("best-step*.ckpt")] == [f"best-step{best_step}.ckpt"]


def test_last_ckpt_is_the_newest_state_whether_or_not_the_score_improved(run):
    folder = run / "runs/tiny/version_0/checkpoints"
    last = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 4  # the last validation, whichever one scored best
    names = sorted(path.name for path in folder.glob("*.ckpt"))
    assert len(names) == 2 and names[0].startswith("best-step") and names[1] == "last.ckpt"


def test_the_saved_config_leaves_out_linked_values_and_runs_again(run, capsys):
    saved = yaml.safe_load((run / "runs/tiny/version_0/config.yaml").read_text())
    # LightningCLI saves the parsed config without link targets: what the data decides is not frozen in it
    assert not {"task_names", "task_metrics", "task_partitions", "tokenizer_path", "max_target_length"} & set(
        saved["model"]
    )
    assert "num_tasks" not in saved["model"]["moe"]
    assert saved["data"]["max_target_length"] == 8 and saved["checkpoint"]["monitor"] == "val/score"
    # the linked values the model was built with are in its hyper-parameters (hparams.yaml and checkpoints)
    hparams = yaml.safe_load((run / "runs/tiny/version_0/hparams.yaml").read_text())
    assert len(hparams["task_names"]) == hparams["moe"]["num_tasks"] == len(hparams["task_partitions"])
    assert hparams["max_target_length"] == 8
    assert Path(hparams["tokenizer_path"]) == run / "runs/data/tokenizer"
    with pytest.raises(SystemExit) as printed:
        main(["fit", "--config", str(run / "runs/tiny/version_0/config.yaml"), "--print_config"])
    assert printed.value.code == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"] == saved["model"]


def best_checkpoint(run: Path) -> Path:
    (best,) = (run / "runs/tiny/version_0/checkpoints").glob("best-step*.ckpt")
    return best


@pytest.mark.compat
def test_test_from_the_best_checkpoint_logs_test_scores(run):
    best = best_checkpoint(run)
    folder = run / "runs/tiny/version_0" / best.stem  # the checkpoint's run, a folder named for it
    assert not (run / "runs/tiny/version_1").exists()
    scalars, _ = event_values(folder)
    (evaluation,) = (folder / "evaluation").glob("test-*.json")
    result = json.loads(evaluation.read_text())
    assert evaluation.name == f"test-{best.stem}.json"
    step = torch.load(best, weights_only=False)["global_step"]
    assert result["step"] == step > 0  # the checkpoint's, not 0
    assert scalars["test/score"] == [(step, pytest.approx(result["average"]["score"]))]  # logged at its step too
    # without data.test_partitions: the tasks the checkpoint trained (their test split), not its untrained unseen ones
    test_tasks = tasks_of(run / "runs/tiny/version_0", "train")
    assert [row["task"] for row in result["tasks"]] == test_tasks
    assert all(f"test/score/{task}" in scalars for task in test_tasks)
    assert evaluation.with_suffix(".csv").is_file()


def test_validate_of_a_checkpoint_writes_beside_it_under_its_step(run):
    best = best_checkpoint(run)
    step = torch.load(best, weights_only=False)["global_step"]
    folder = run / "runs/tiny/version_0" / best.stem
    assert json.loads((folder / f"evaluation/val-{best.stem}.json").read_text())["step"] == step
    assert [path.name for path in (folder / "routes").iterdir()] == [f"step{step}.json"]  # not step0.json
    assert json.loads((folder / f"routes/step{step}.json").read_text())["step"] == step
    assert (folder / "config.yaml").is_file()


@pytest.mark.parametrize("command", ["test", "predict"])
def test_evaluating_untrained_weights_is_refused_unless_asked_for(tmp_path, monkeypatch, capsys, command):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "tiny.yaml")
    with pytest.raises(SystemExit) as refused:
        main([command, "--config", config])
    assert refused.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith(f"moe-mtl {command}: error: {command} has no weights to evaluate: give --ckpt_path")
    assert "--allow_untrained true" in message
    assert not (tmp_path / "runs").exists()  # refused before the data were prepared
    if command == "predict":  # the opt-in runs (predict is the cheaper of the two)
        main([command, "--config", config, "--allow_untrained=true"])
        assert list((tmp_path / "runs/tiny/version_0/predictions").glob("*.jsonl"))


def test_step_checkpoints_follow_their_schedule_before_any_validation(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "tiny.yaml", max_steps=4, val_check_interval=3, limit_val_batches=1)
    main(["fit", "--config", config, "--checkpoint.every_n_train_steps=2", "--step_checkpoint.save_top_k=-1"])
    checkpoints = tmp_path / "runs/tiny/version_0/checkpoints"
    # step 2 comes before the first validation (step 3), which a val/score monitor would have waited for; step 4,
    # after it, is named by its own step, not the step the validation logged
    for step in (2, 4):
        assert torch.load(checkpoints / f"step{step}.ckpt", weights_only=False)["global_step"] == step
    names = {path.name for path in checkpoints.glob("*.ckpt")}
    assert names - {"best-step3.ckpt", "best-step4.ckpt"} == {"step2.ckpt", "step4.ckpt", "last.ckpt"}
    saved = yaml.safe_load((tmp_path / "runs/tiny/version_0/config.yaml").read_text())
    assert saved["step_checkpoint"]["every_n_train_steps"] == 2 and saved["checkpoint"]["every_n_train_steps"] is None


@pytest.mark.compat
def test_predict_writes_predictions_per_task(run):
    test_tasks = tasks_of(run / "runs/tiny/version_0", "train")  # the checkpoint's trained tasks (test split)
    folder = run / "runs/tiny/version_0/last/predictions"
    assert sorted(path.stem for path in folder.glob("*.jsonl")) == sorted(test_tasks)
    for task in test_tasks:
        rows = [json.loads(line) for line in (folder / f"{task}.jsonl").read_text().splitlines()]
        assert [(row["task"], row["example_id"]) for row in rows] == [(task, 0), (task, 1)]  # test_size 2
        assert all(row["input"] and row["references"] and isinstance(row["prediction"], str) for row in rows)


# --- the end of each verb: its summary, checked against the files it names -------------------------

SCORE_LINE = re.compile(r"(dev|test) score ([\d.]+) \(loss ([\d.]+)\) over (\d+) tasks, weights of step (\d+)")


def summary_evaluation(printed: str, run: Path) -> dict:
    """The evaluation file a summary names, after checking its numbers against the summary's line."""
    score, loss, tasks, step = SCORE_LINE.search(printed).groups()[1:]
    (csv_path,) = re.findall(r"per task: (\S+)\.csv", printed)
    evaluation = json.loads((run / f"{csv_path}.json").read_text())
    assert float(score) == pytest.approx(evaluation["average"]["score"], abs=5e-5)
    assert float(loss) == pytest.approx(evaluation["average"]["loss"], abs=5e-5)
    assert (int(tasks), int(step)) == (len(evaluation["tasks"]), evaluation["step"])
    return evaluation


def test_fit_ends_with_a_summary_whose_numbers_are_the_files(run):
    printed = PRINTED["fit"]
    assert printed.splitlines()[-7].startswith("moe-mtl fit: done, 4 steps (stage two from step 2); run folder runs/")
    assert summary_evaluation(printed, run)["step"] == 4
    best = best_checkpoint(run)
    scores = validation_averages(run / "runs/tiny/version_0", "score")
    assert (
        f"best checkpoint (val/score {scores[best_step(best)]:.4f}): runs/tiny/version_0/checkpoints/{best.name}"
        in (printed)
    )
    assert "last checkpoint (resume: --ckpt_path): runs/tiny/version_0/checkpoints/last.ckpt" in printed
    assert "TensorBoard: tensorboard --logdir runs/tiny/version_0" in printed
    next_command = re.search(r"next: (moe-mtl test .+)", printed)[1]
    assert (
        next_command
        == f"moe-mtl test --config {run / 'tiny.yaml'} --ckpt_path runs/tiny/version_0/checkpoints/{best.name}"
    )


@pytest.mark.parametrize("verb", ["test", "validate"])
def test_test_and_validate_end_with_a_summary_whose_numbers_are_the_files(run, verb):
    printed = PRINTED[verb]
    best = best_checkpoint(run)
    assert f"moe-mtl {verb}: done; outputs in {run / 'runs/tiny/version_0' / best.stem}" in printed
    evaluation = summary_evaluation(printed, run)
    assert evaluation["stage"] == ("val" if verb == "validate" else "test")
    assert f"next (each example's output): moe-mtl predict --config {run / 'tiny.yaml'} --ckpt_path {best}" in printed


def test_predict_ends_with_a_summary_of_the_rows_written(run):
    folder = run / "runs/tiny/version_0/last/predictions"
    rows = sum(len(path.read_text().splitlines()) for path in folder.glob("*.jsonl"))
    tasks = len(list(folder.glob("*.jsonl")))
    assert f"moe-mtl predict: done, {rows} outputs of {tasks} tasks" in PRINTED["predict"]
    assert f"files: {folder}/<task>.jsonl" in PRINTED["predict"]


def test_testing_tasks_the_checkpoint_never_trained_warns_and_names_the_route_options(run, monkeypatch):
    monkeypatch.chdir(run)
    best = best_checkpoint(run)
    args = ["test", "--config", str(run / "tiny.yaml"), "--ckpt_path", str(best), "--data.test_partitions", "test"]
    args += ["--model.evaluation.results_dir", str(run / "unseen")]
    with pytest.warns(
        UserWarning, match=r"never trained \(data.test_partitions \['test'\]; it trained \['train'\]\)"
    ) as warned:
        printed = printing(args)
    (message,) = [str(w.message) for w in warned if "never trained" in str(w.message)]
    assert "--model.transfer.init_from <run> --model.transfer.unseen_routes nearest" in message
    tested = [row["task"] for row in summary_evaluation(printed, run)["tasks"]]
    assert tested == tasks_of(run / "runs/tiny/version_0", "test")  # tested as asked, not refused


@contextlib.contextmanager
def read_only(folder: Path):
    """`folder` immutable while the block runs (chattr +i: refused even to root, which ignores permissions)."""
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_a_checkpoint_in_a_read_only_folder_is_evaluated_where_the_user_says(run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(run)
    (tmp_path / "kept/checkpoints").mkdir(parents=True)
    checkpoint = tmp_path / "kept/checkpoints/best.ckpt"
    shutil.copy(best_checkpoint(run), checkpoint)
    config = str(run / "tiny.yaml")
    with read_only(tmp_path / "kept"):
        with pytest.raises(SystemExit) as stopped:
            main(["test", "--config", config, "--ckpt_path", str(checkpoint)])
        assert stopped.value.code == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith(f"moe-mtl test: error: the folder beside --ckpt_path {checkpoint} is ")
        assert error.endswith("give a writable folder, or choose one with --model.evaluation.results_dir")
        for out, extra in (("out", []), ("quiet", ["--trainer.logger", "false"])):
            results = tmp_path / out
            args = ["test", "--config", config, "--ckpt_path", str(checkpoint), "--model.evaluation.results_dir"]
            printed = printing([*args, str(results), *extra])
            assert summary_evaluation(printed, run)["step"] == torch.load(checkpoint, weights_only=False)["global_step"]
            assert (results / "evaluation/test-best.json").is_file()
    assert sorted(p.name for p in (tmp_path / "kept").rglob("*")) == ["best.ckpt", "checkpoints"]


def hold(folder: Path, pid: int) -> Path:
    """The lock a fit running as process `pid` of this host holds on its run folder."""
    folder.mkdir(parents=True)
    (folder / LOCK_NAME).write_text(f"{socket.gethostname()} {pid}\n")
    return folder / LOCK_NAME


def test_a_run_folder_in_use_by_a_live_fit_is_refused_and_an_unversioned_fit_gets_its_own(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "tiny.yaml", max_steps=1, limit_val_batches=0)
    hold(tmp_path / "runs/tiny/shared", os.getpid())  # a live process: this one
    with pytest.raises(SystemExit) as stopped:
        main(["fit", "--config", config, "--trainer.logger.init_args.version", "shared"])
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(
        "moe-mtl fit: error: run folder runs/tiny/shared is in use by a fit that is still running "
        f"(process {os.getpid()}"
    )
    assert sorted(p.name for p in (tmp_path / "runs/tiny/shared").iterdir()) == [LOCK_NAME]  # left as it was

    hold(tmp_path / "runs/tiny/version_0", os.getpid())
    printing(["fit", "--config", config])  # version left to the logger: the next free folder
    assert (tmp_path / "runs/tiny/version_1/checkpoints/last.ckpt").is_file()
    assert not (tmp_path / "runs/tiny/version_1" / LOCK_NAME).exists()  # released at the end

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = hold(tmp_path / "runs/tiny/killed", int(dead.stdout))  # a fit killed with -9 leaves its lock
    printing(["fit", "--config", config, "--trainer.logger.init_args.version", "killed"])
    assert (tmp_path / "runs/tiny/killed/checkpoints/last.ckpt").is_file() and not stale.exists()


def test_a_fit_shorter_than_its_validation_interval_ends_validated_with_last_ckpt(tmp_path, monkeypatch):
    """3 steps with validation every 5 (the quick start with --trainer.max_steps 60): the final step is validated and
    saved; a switch or warmup beyond the run's end is said before training."""
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "tiny.yaml", max_steps=3, val_check_interval=5)
    with pytest.warns(UserWarning) as warned:
        printed = printing(["fit", "--config", config, "--two_stage.switch_step", "5", "--model.optim.warmup", "10"])
    messages = [str(w.message) for w in warned]
    assert any("switch_step is 5, but the run ends at step 3: stage two never starts" in m for m in messages)
    assert any("`optim.warmup` is 10 steps, longer than the run's 3" in m for m in messages)
    folder = tmp_path / "runs/tiny/version_0"
    assert torch.load(folder / "checkpoints/last.ckpt", weights_only=False)["global_step"] == 3
    assert (folder / "checkpoints/best-step3.ckpt").is_file()
    assert validation_averages(folder, "score").keys() == {3}
    assert summary_evaluation(printed, tmp_path)["step"] == 3
    assert "(stage two never started (two_stage.switch_step 5))" in printed
    scalars, _ = event_values(folder)
    assert [step for step, _ in scalars["val/score"]] == [3]


def test_a_fit_without_validation_ends_with_last_ckpt_and_unused_stage_two_options_are_said(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "tiny.yaml", max_steps=2, limit_val_batches=0)
    one_stage = ["--two_stage.switch_step", "null", "--two_stage.routes", "softmax"]  # a stage-two option, unused
    with pytest.warns(UserWarning, match=r"two_stage.routes given, but no two_stage.switch_step or switch_epoch"):
        printed = printing(["fit", "--config", config, *one_stage])
    assert printed.splitlines()[-5].startswith("moe-mtl fit: done, 2 steps (one stage)")
    last = tmp_path / "runs/tiny/version_0/checkpoints/last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 2
    assert "not evaluated: validation is off" in printed
    assert f"next: moe-mtl test --config {config} --ckpt_path runs/tiny/version_0/checkpoints/last.ckpt" in printed


# --- requeued jobs and checkpoint selection --------------------------------------------------------


def test_a_requeued_job_overwrites_its_config_and_resumes_from_last(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    logger = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "tiny", "version": "requeue"},
    }
    config = write_config(tmp_path / "tiny.yaml", max_steps=2, limit_val_batches=0, logger=logger)
    command = ["fit", "--config", config, "--ckpt_path", "last"]  # no last.ckpt yet: starts from scratch
    main(command)
    main([*command, "--trainer.max_steps=3"])  # the same job, requeued (with a later stop)
    folder = tmp_path / "runs/tiny/requeue"
    assert yaml.safe_load((folder / "config.yaml").read_text())["trainer"]["max_steps"] == 3  # overwritten
    assert torch.load(folder / "checkpoints/last.ckpt", weights_only=False)["global_step"] == 3
    scalars, _ = event_values(folder)
    assert [step for step, _ in scalars["train/loss"]] == [0, 1, 2]  # resumed at step 2, nothing repeated


def test_checkpoint_mode_against_the_monitored_metric_is_a_usage_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as error:
        main(["fit", "--config", write_config(tmp_path / "tiny.yaml"), "--checkpoint.monitor=val/loss"])
    assert error.value.code == 2
    message = capsys.readouterr().err.splitlines()[-1]
    assert message == (
        "moe-mtl fit: error: checkpoint.monitor is 'val/loss' with checkpoint.mode 'max'; "
        "use checkpoint.mode 'min' (higher score, lower loss is better)"
    )
    assert not (tmp_path / "runs").exists()  # stopped before anything was built


def test_checkpoints_selected_by_val_loss(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "tiny.yaml", limit_val_batches=1)
    main(["fit", "--config", config, "--checkpoint.monitor=val/loss", "--checkpoint.mode=min"])
    folder = tmp_path / "runs/tiny/version_0"
    losses = validation_averages(folder, "loss")
    best_step = min(losses, key=lambda step: (losses[step], step))
    state = checkpoint_state(folder / "checkpoints/last.ckpt")
    assert state["monitor"] == "val/loss" and float(state["best_model_score"]) == pytest.approx(losses[best_step])
    assert Path(state["best_model_path"]).name == f"best-step{best_step}.ckpt"


# --- help ----------------------------------------------------------------------------------------


def test_fit_help_lists_options_but_not_the_linked_ones(capsys):
    with pytest.raises(SystemExit) as shown:
        main(["fit", "--help"])
    assert shown.value.code == 0
    text = capsys.readouterr().out
    for option in ("--model.optim.lr", "--model.moe.num_experts", "--data.batch_size", "--checkpoint.monitor"):
        assert f"{option} " in text
    for linked in (
        "--model.task_names",
        "--model.moe.num_tasks",
        "--model.tokenizer_path",
        "--model.max_target_length",
    ):
        assert linked not in text
    assert "data.task_names --> model.task_names" in text  # listed as links instead
    # MoEOptions' help comes from its attribute docstrings, read only when help is printed
    assert "Experts per routed layer (E). 1 gives vanilla" in " ".join(text.split())
    # so does the module's option groups' (training.options): one flag per field, its docstring the help
    for option in ("--model.optim.lr", "--model.loss.label_smoothing", "--model.evaluation.num_beams"):
        assert f"{option} " in text
    assert "--model.transfer.init_from " in text and "--model.lr " not in text
    flat = " ".join(text.split())
    assert "Learning rate of the backbone (experts and every other BART weight)." in flat
    assert "Beams of generation in validation, test and predict." in flat


@pytest.mark.parametrize("selection", ["switch", "reinforce"])
def test_fit_runs_a_sparse_stage_one_through_the_two_stage_schedule(tmp_path, monkeypatch, selection):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "tiny.yaml", val_check_interval=4)
    main(["fit", "--config", config, f"--model.moe.selection={selection}"])
    scalars, _ = event_values(tmp_path / "runs/tiny/version_0")
    assert [value for _, value in scalars["train/stage"]] == [1.0, 1.0, 2.0, 2.0]
    assert ("train/reinforce_surrogate" in scalars) == (selection == "reinforce")
    checkpoint = torch.load(tmp_path / "runs/tiny/version_0/checkpoints/last.ckpt", weights_only=False)
    assert checkpoint["callbacks"]["TwoStageTraining"]["switched_at"] == 2
    assert checkpoint["hyper_parameters"]["moe"]["selection"] == "argmax"  # stage two's, after the configured one
    assert checkpoint["state_dict"]["model.model.encoder.router.temperature"] < 2.0  # annealed in stage one
