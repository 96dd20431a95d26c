"""`moe-mtl fit | validate | test | predict` (`moe_mtl.commands.lightning`): LightningCLI on a tiny run."""

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from moe_mtl.cli import main

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


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """`moe-mtl fit`, then `test` from its best checkpoint (stage one) and `predict` from its last (stage two);
    the folder they ran in (runs/tiny/version_0; test and predict write into version_0/<checkpoint name>)."""
    root = tmp_path_factory.mktemp("cli")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        config = write_config(root / "tiny.yaml")
        main(["fit", "--config", config])
        checkpoints = root / "runs/tiny/version_0/checkpoints"
        (best,) = checkpoints.glob("best-step*.ckpt")
        main(["test", "--config", config, "--ckpt_path", str(best)])
        main(["predict", "--config", config, "--ckpt_path", str(checkpoints / "last.ckpt")])
        main(["validate", "--config", config, "--ckpt_path", str(best)])
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
    # Lightning logs validation at its batch counter (one behind the global step here), so compare values in order
    for kind in ("score", "loss"):
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
    assert result["step"] == torch.load(best, weights_only=False)["global_step"] > 0  # the checkpoint's, not 0
    assert [value for _, value in scalars["test/score"]] == [pytest.approx(result["average"]["score"])]
    test_tasks = tasks_of(run / "runs/tiny/version_0", "test")
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
    config = write_config(tmp_path / "tiny.yaml", max_steps=3, val_check_interval=3, limit_val_batches=1)
    main(["fit", "--config", config, "--checkpoint.every_n_train_steps=2"])
    checkpoints = tmp_path / "runs/tiny/version_0/checkpoints"
    # step 2 comes before the first validation (step 3), which a val/score monitor would have waited for
    assert torch.load(checkpoints / "step2.ckpt", weights_only=False)["global_step"] == 2
    assert {path.name for path in checkpoints.glob("*.ckpt")} == {"step2.ckpt", "best-step3.ckpt", "last.ckpt"}
    saved = yaml.safe_load((tmp_path / "runs/tiny/version_0/config.yaml").read_text())
    assert saved["step_checkpoint"]["every_n_train_steps"] == 2 and saved["checkpoint"]["every_n_train_steps"] is None


@pytest.mark.compat
def test_predict_writes_predictions_per_task(run):
    test_tasks = tasks_of(run / "runs/tiny/version_0", "test")
    folder = run / "runs/tiny/version_0/last/predictions"
    assert sorted(path.stem for path in folder.glob("*.jsonl")) == sorted(test_tasks)
    for task in test_tasks:
        rows = [json.loads(line) for line in (folder / f"{task}.jsonl").read_text().splitlines()]
        assert [(row["task"], row["example_id"]) for row in rows] == [(task, 0), (task, 1)]  # test_size 2
        assert all(row["input"] and row["references"] and isinstance(row["prediction"], str) for row in rows)


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
