"""`moe-mtl export` (`moe_mtl.commands.export`) end to end: a tiny run trained, predicted and exported through the
real command; the exported folders reproduce `moe-mtl predict` in a process where moe_mtl cannot be imported.

transformers 5 removed the "text2text-generation" pipeline (`pipeline()` raises a KeyError that says so), so the
exported folders are checked the way that pipeline ran them: tokenizer, `generate` with the folder's generation
config, `batch_decode(skip_special_tokens=True)`.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import BartForConditionalGeneration

from moe_mtl import MoEBartForConditionalGeneration
from moe_mtl.cli import main
from moe_mtl.training import MoEMultiTaskModule

from ..conftest import tasks_of, tiny_run_config
from ..models.conftest import TINY_BART

NUM_BEAMS = 2  # beam search in predict, so that the exported generation config must carry it
MAX_TARGET_LENGTH = 8  # tiny_run_config's data.max_target_length: predict's max_new_tokens
# runs in a fresh interpreter: loads each exported folder with transformers alone and generates from the inputs that
# `moe-mtl predict` wrote; prints {task: [prediction text, ...]}
PLAIN_TRANSFORMERS = """
import json, sys
sys.modules["moe_mtl"] = None  # the exported folders must load without it
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
out = {}
for folder, inputs in json.loads(sys.argv[1]).items():
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSeq2SeqLM.from_pretrained(folder)
    batch = tokenizer(inputs, return_tensors="pt", padding=True, truncation=True)
    ids = model.generate(**batch)
    out[folder] = [text.strip() for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    out[folder + ":class"] = type(model).__name__
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    """A tiny two-stage run (stage two, argmax routes, from step 1), `predict` from its last checkpoint, and
    `export` of two of its tasks with `--all`: the run folder, checkpoint, predictions and export folder."""
    root = tmp_path_factory.mktemp("export")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        config = tiny_run_config(max_steps=2, val_check_interval=2, limit_val_batches=1, callbacks=[])
        # a large init: after 2 steps, predictions still differ by input, task and expert
        config["model"]["bart"] = {**TINY_BART, "init_std": 0.5}
        (root / "tiny.yaml").write_text(yaml.safe_dump(config))
        common = ["--config", str(root / "tiny.yaml"), f"--model.evaluation.num_beams={NUM_BEAMS}"]
        main(["fit", *common, "--two_stage.switch_step=1"])
        ckpt = root / "runs/tiny/version_0/checkpoints/last.ckpt"
        main(["predict", *common, "--ckpt_path", str(ckpt)])
        (predictions,) = (root / "runs").rglob("predictions")  # wherever predict puts its run folder
        tasks = tasks_of(root / "runs/tiny/version_0", "train")[:2]  # predict's: the tasks the checkpoint trained
        main(["export", "--ckpt_path", str(ckpt), *(f"--task={task}" for task in tasks), "--out=exported", "--all"])
    return {
        "root": root,
        "ckpt": ckpt,
        "predictions": predictions,
        "out": root / "exported",
        "tasks": tasks,
    }


@pytest.mark.slow
def test_exported_folders_reproduce_predict_with_plain_transformers(run):
    rows = {
        str(run["out"] / task): [json.loads(line) for line in (run["predictions"] / f"{task}.jsonl").open()]
        for task in run["tasks"]
    }
    inputs = {folder: [row["input"] for row in task_rows] for folder, task_rows in rows.items()}
    result = subprocess.run(
        [sys.executable, "-c", PLAIN_TRANSFORMERS, json.dumps(inputs)], capture_output=True, text=True, check=True
    )
    generated = json.loads(result.stdout.splitlines()[-1])
    for folder, task_rows in rows.items():
        assert generated[folder + ":class"] == "BartForConditionalGeneration"
        assert generated[folder] == [row["prediction"] for row in task_rows], folder
    assert len({row["prediction"] for task_rows in rows.values() for row in task_rows}) > 1  # not one constant text


@pytest.fixture(scope="module")
def module(run) -> MoEMultiTaskModule:
    """The run's module from its last checkpoint, as `moe-mtl predict` loads it (stage two, eval mode)."""
    return MoEMultiTaskModule.load_from_checkpoint(run["ckpt"], map_location="cpu").eval()


def one_task_inputs(task_id: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(4, 200, (3, 9))
    return dict(input_ids=ids, decoder_input_ids=ids[:, :5], task_ids=torch.full((3,), task_id))


def test_exported_folders_are_plain_bart_with_the_runs_logits_and_predicts_settings(run, module):
    for task in run["tasks"]:
        folder = run["out"] / task
        inputs = one_task_inputs(module.task_names.index(task))
        with torch.no_grad():
            expected = module.model(**inputs).logits
            inputs.pop("task_ids")
            exported = BartForConditionalGeneration.from_pretrained(folder)(**inputs).logits
        torch.testing.assert_close(exported, expected, atol=1e-5, rtol=0)
        config = json.loads((folder / "config.json").read_text())
        assert config["model_type"] == "bart" and "moe" not in config
        generation = json.loads((folder / "generation_config.json").read_text())
        assert (generation["num_beams"], generation["max_new_tokens"]) == (NUM_BEAMS, MAX_TARGET_LENGTH)
        tokenizer = json.loads((folder / "tokenizer_config.json").read_text())
        assert tokenizer["model_max_length"] == 128  # the data's max_input_length (its default)


def test_all_saves_the_whole_moe_bart_with_the_runs_logits(run, module):
    folder = run["out"] / "moe_bart"
    saved = MoEBartForConditionalGeneration.from_pretrained(folder).eval()
    assert json.loads((folder / "task_names.json").read_text()) == module.task_names
    assert (saved.generation_config.num_beams, saved.generation_config.max_new_tokens) == (NUM_BEAMS, MAX_TARGET_LENGTH)
    num_tasks = len(module.task_names)
    ids = torch.randint(4, 200, (num_tasks, 9))
    inputs = dict(input_ids=ids, decoder_input_ids=ids[:, :5], task_ids=torch.arange(num_tasks))
    with torch.no_grad():
        torch.testing.assert_close(saved(**inputs).logits, module.model(**inputs).logits, atol=1e-5, rtol=0)


def export_error(capsys, *args: str) -> str:
    """The one-line error of a `moe-mtl export` that must stop with exit code 2 and no traceback."""
    with pytest.raises(SystemExit) as stopped:
        main(["export", *args])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_an_unknown_task_is_a_usage_error_listing_the_runs_tasks(run, capsys, tmp_path):
    message = export_error(capsys, f"--ckpt_path={run['ckpt']}", "--task=no_such_task", f"--out={tmp_path / 'x'}")
    assert message.startswith("error: --task no_such_task: not a task of this run; its tasks: ")
    assert all(task in message for task in run["tasks"])
    assert not (tmp_path / "x").exists()


def test_a_missing_or_unreadable_checkpoint_is_a_usage_error(capsys, tmp_path):
    missing = export_error(capsys, f"--ckpt_path={tmp_path / 'none.ckpt'}", "--task=t", f"--out={tmp_path}")
    assert missing == (
        f"error: --ckpt_path {tmp_path / 'none.ckpt'} is not a file; give a checkpoint of a `moe-mtl fit` run (.ckpt)"
    )
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    unreadable = export_error(capsys, f"--ckpt_path={tmp_path / 'bad.ckpt'}", "--task=t", f"--out={tmp_path}")
    assert unreadable.startswith(f"error: --ckpt_path {tmp_path / 'bad.ckpt'} could not be loaded as a `moe-mtl fit`")


def test_nothing_to_export_is_a_usage_error(capsys, tmp_path):
    message = export_error(capsys, f"--ckpt_path={tmp_path / 'x.ckpt'}", f"--out={tmp_path}")
    assert message == "error: nothing to export: name tasks with --task NAME (repeatable), or give --all"


def test_stage_two_softmax_routes_are_refused_but_all_still_exports(run, capsys, tmp_path):
    checkpoint = torch.load(run["ckpt"], map_location="cpu", weights_only=False)
    checkpoint["hyper_parameters"]["moe"]["selection"] = "softmax"  # as if TwoStageTraining(routes="softmax") ran
    soft = tmp_path / "softmax.ckpt"
    torch.save(checkpoint, soft)
    task = run["tasks"][0]
    message = export_error(capsys, f"--ckpt_path={soft}", f"--task={task}", f"--out={tmp_path / 'x'}")
    assert message.startswith(f"error: task '{task}': routed layer encoder.0 weights expert 0 at ")
    assert "a frozen router with selection 'softmax'" in message and message.endswith(
        "--all exports the whole MoE-BART instead"
    )
    assert not (tmp_path / "x").exists()
    main(["export", f"--ckpt_path={soft}", f"--out={tmp_path / 'x'}", "--all"])
    saved = MoEBartForConditionalGeneration.from_pretrained(tmp_path / "x/moe_bart")
    assert saved.moe_options.selection == "softmax" and saved.moe_options.freeze_router
