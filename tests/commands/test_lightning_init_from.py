"""`moe-mtl` with `--model.transfer.init_from`: a new run from an upstream run's weights (few-shot fit, zero-shot
test), and the `fit --ckpt_path` misuse it replaces."""

import csv
from pathlib import Path

import pytest
import torch
import yaml

from moe_mtl.cli import main
from moe_mtl.data import train_tokenizer

from ..conftest import event_values, quiet_cpu_trainer
from ..models.conftest import TINY_BART

TINY_SKILLS = {"train_size": 4, "dev_size": 2, "test_size": 2, "shots": 2}


def run_config() -> dict:
    """A toy run over the skill suite: 1 + 1 layers, 2 experts, 2 steps, one validation at the end."""
    return {
        "seed_everything": 1,
        "trainer": quiet_cpu_trainer(("runs", "upstream"), max_steps=2, val_check_interval=2, limit_val_batches=2),
        "model": {
            "bart": {**TINY_BART, "encoder_layers": 1, "decoder_layers": 1},
            "moe": {"num_experts": 2, "task_dim": 8},
            "optim": {"lr": 1e-3},
            "evaluation": {"num_beams": 1},
        },
        "data": {
            "skills": TINY_SKILLS,
            "vocab_size": 300,
            "batch_size": 2,
            "output_dir": "runs/data",
            "max_target_length": 8,
            "fewshot_seed": 100,
        },
    }


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> Path:
    """The folder of a toy `moe-mtl fit` (its run folder: runs/upstream/version_0)."""
    root = tmp_path_factory.mktemp("transfer")
    (root / "run.yaml").write_text(yaml.safe_dump(run_config()))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        main(["fit", "--config", "run.yaml"])
    return root


def downstream(root: Path, name: str, *args: str) -> list[str]:
    return ["--config", str(root / "run.yaml"), "--trainer.logger.init_args.name", name, *args]


def test_fit_from_an_upstream_run_trains_a_new_run_on_its_unseen_tasks(upstream, monkeypatch):
    monkeypatch.chdir(upstream)
    run = upstream / "runs/upstream/version_0"
    main(
        [
            "fit",
            *downstream(
                upstream, "fewshot", "--model.transfer.init_from", str(run), "--model.transfer.unseen_routes", "learned"
            ),
            "--data.train_partitions",
            "test",
            "--data.val_partitions",
            "test",
        ]
    )
    before = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    after = torch.load(upstream / "runs/fewshot/version_0/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert before["global_step"] == 2 and after["global_step"] == 2  # a new run: its own step counter from 0
    scalars, _ = event_values(upstream / "runs/fewshot/version_0")
    assert [step for step, _ in scalars["train/loss"]] == [0, 1]
    lrs = {tag: dict(values) for tag, values in scalars.items() if tag.startswith("lr")}
    # a new lr schedule, not the decayed one; the router keeps the upstream's fixed routes (frozen): it applies 0
    assert set(lrs) == {"lr/backbone", "lr/router", "lr/task_table"}
    assert lrs["lr/backbone"][1] > 0 and lrs["lr/task_table"][1] > 0 and set(lrs["lr/router"].values()) == {0.0}
    hparams = after["hyper_parameters"]
    assert hparams["bart"] == before["hyper_parameters"]["bart"]
    assert after["datamodule_hyper_parameters"]["tokenizer"] == before["hyper_parameters"]["tokenizer_path"]
    changed = [key for key, value in after["state_dict"].items() if not torch.equal(value, before["state_dict"][key])]
    assert any("experts" in key or "layers" in key for key in changed)  # the backbone trained
    assert not any(".router.network." in key for key in changed)  # unseen_routes learned: the router stays frozen
    table = "model.model.encoder.task_table.embedding.weight"
    trained = [i for i, p in enumerate(hparams["task_partitions"]) if p == "test"]
    assert not torch.equal(after["state_dict"][table][trained], before["state_dict"][table][trained])


def test_zero_shot_test_from_an_upstream_run_writes_scores_of_the_unseen_tasks(upstream, monkeypatch):
    monkeypatch.chdir(upstream)
    run = upstream / "runs/upstream/version_0"
    args = downstream(
        upstream, "zeroshot", "--model.transfer.init_from", str(run), "--model.transfer.unseen_routes", "nearest"
    )
    main(["test", *args, "--data.test_partitions", "test", "--trainer.limit_test_batches", "3"])
    (scores,) = (upstream / "runs/zeroshot/version_0/evaluation").glob("test-*.csv")
    rows = [row for row in csv.DictReader(scores.open()) if row["task"] != "average"]
    hparams = yaml.safe_load((run / "hparams.yaml").read_text())
    tests = {n for n, p in zip(hparams["task_names"], hparams["task_partitions"], strict=True) if p == "test"}
    assert len(rows) == 3 and {row["task"] for row in rows} <= tests  # one task per test batch
    assert all(0 <= float(row["score"]) <= 1 for row in rows)


def test_fit_ckpt_path_on_other_tasks_is_a_usage_error_pointing_to_init_from(upstream, monkeypatch, capsys):
    monkeypatch.chdir(upstream)
    last = upstream / "runs/upstream/version_0/checkpoints/last.ckpt"
    args = ["fit", *downstream(upstream, "misuse"), "--ckpt_path", str(last)]
    with pytest.raises(SystemExit) as stopped:
        main([*args, "--data.train_partitions", "test"])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert "data option `train_partitions` is ['test'], but the checkpoint's run has ['train']" in error
    assert f"--model.transfer.init_from {last}" in error  # (a resume at max_steps already: tests/test_runs.py)


def test_init_from_with_a_mismatched_vocabulary_is_a_usage_error(upstream, monkeypatch, capsys):
    monkeypatch.chdir(upstream)
    other = upstream / "other_tokenizer"
    train_tokenizer(["a few words of other text", "and some more"] * 20, vocab_size=280).save_pretrained(other)
    run = upstream / "runs/upstream/version_0"
    args = downstream(upstream, "vocab", "--model.transfer.init_from", str(run), "--data.tokenizer", str(other))
    with pytest.raises(SystemExit) as stopped:
        main(["test", *args, "--data.test_partitions", "test"])
    assert stopped.value.code == 2
    assert "init_from with a mismatched vocabulary" in capsys.readouterr().err
