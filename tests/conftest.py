"""Shared test set-up: nothing may reach a hub, and every test starts from a fixed seed.

Also the shipped configs at toy size, for the tests that run them (tests/test_configs.py in process,
tests/test_ddp_cli.py through the `moe-mtl` command under DDP): `shrink` makes a fit config toy-size and offline
over the `crossfit` fixture's tiny CrossFit folder and local stand-in for facebook/bart-base. And a tiny
`moe-mtl fit` run's config (`tiny_run_config`, `write_config`) with readers of what it leaves (`event_values`,
`tasks_of`).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# one torch thread per process, here and in the subprocesses tests start: toy models gain nothing from more, and
# two-process DDP tests (or other jobs) beside them on 2 cores made every step many times slower when oversubscribed
os.environ.setdefault("OMP_NUM_THREADS", "1")

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import BartConfig, BartForConditionalGeneration

from moe_mtl.data.tokenizer import train_tokenizer

from .models.conftest import TINY_BART

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
UPCYCLE_CONFIGS = [path for path in CONFIGS if path.name.startswith("upcycle_")]
FIT_CONFIGS = [path for path in CONFIGS if path not in UPCYCLE_CONFIGS]
# overlays composed after a fit config (`--config <fit config> --config <baseline>`): the paper's baselines
BASELINES = sorted((Path(__file__).resolve().parents[1] / "configs" / "baselines").glob("*.yaml"))
HUB_BART = "facebook/bart-base"
TINY_SKILLS = {"train_size": 4, "dev_size": 2, "test_size": 2, "shots": 2}
# a CrossFit-layout folder: task → (partition, metric); 2 seeds of k-shot train/dev and a test file each
CROSSFIT_TASKS = {
    "glue-sst2": ("train", "Classification-F1"),
    "squad-no_context": ("train", "QA-F1"),
    "aeslc": ("train", "Rouge-L"),
    "ai2_arc": ("dev", "ACC"),
    "quoref": ("test", "QA-F1"),
}


def quiet_cpu_trainer(tensorboard: tuple[str, str] | None = None, **options: Any) -> dict[str, Any]:
    """The `trainer` section of a toy `moe-mtl` run: one CPU device, no sanity check, progress bar or model summary,
    every step logged; `tensorboard` (save_dir, name) adds a TensorBoardLogger; `options` override or add."""
    trainer: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "num_sanity_val_steps": 0,
        "log_every_n_steps": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    if tensorboard is not None:
        save_dir, name = tensorboard
        trainer["logger"] = {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": save_dir, "name": name},
        }
    return {**trainer, **options}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_ddp_environment(monkeypatch):
    """Lightning's spawn launcher leaves MASTER_PORT set in this process: every DDP test picks its own free port
    instead of reusing the first one. Spawned ranks run one thread each, as the test process's ranks share 2 cores."""
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


# --- the shipped configs at toy size -------------------------------------------------------------


def replace_value(tree: Any, old: str, new: str) -> Any:
    """`tree` with every string equal to `old` replaced by `new`."""
    if isinstance(tree, dict):
        return {key: replace_value(value, old, new) for key, value in tree.items()}
    if isinstance(tree, list):
        return [replace_value(value, old, new) for value in tree]
    return new if tree == old else tree


@pytest.fixture(scope="session")
def crossfit(tmp_path_factory) -> dict[str, Path]:
    """A tiny CrossFit data folder, its partition and task-metrics files, and a local stand-in for facebook/bart-base
    (a tiny dense BART and a BART-style tokenizer trained on the folder's text, saved in one folder as on the hub)."""
    root = tmp_path_factory.mktemp("crossfit")
    texts = []
    for name in CROSSFIT_TASKS:
        (root / "data" / name).mkdir(parents=True)
        for seed in (100, 13):
            for split in ("train", "dev", "test"):
                lines = [f"{name} {split} question {i} seed {seed}\tanswer {i % 3}" for i in range(6)]
                (root / "data" / name / f"{name}_16_{seed}_{split}.tsv").write_text("\n".join(lines) + "\n")
                texts += lines
    partition = {part: [n for n, (p, _) in CROSSFIT_TASKS.items() if p == part] for part in ("train", "dev", "test")}
    (root / "random_partition.json").write_text(json.dumps({**partition, "all": sorted(CROSSFIT_TASKS)}))
    (root / "task_metrics.json").write_text(json.dumps({name: metric for name, (_, metric) in CROSSFIT_TASKS.items()}))
    tokenizer = train_tokenizer(texts, vocab_size=300)
    tokenizer.save_pretrained(root / "bart")
    dense = BartConfig(
        vocab_size=len(tokenizer), pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, **TINY_BART
    )
    BartForConditionalGeneration(dense).save_pretrained(root / "bart")
    return {
        "data_dir": root / "data",
        "partition": root / "random_partition.json",
        "task_info": root / "task_metrics.json",
        "bart": root / "bart",
    }


def two_stage(config: dict) -> bool:
    """Whether the fit `config` trains in two stages (its `two_stage` group schedules a switch)."""
    group = config.get("two_stage") or {}
    return group.get("switch_step") is not None or group.get("switch_epoch") is not None


def shrink(config: dict, root: Path, crossfit: dict[str, Path]) -> dict:
    """`config` at toy size on the CPU: 2 optimizer steps, stage two from step 1, one validation batch at step 2."""
    config = replace_value(config, HUB_BART, str(crossfit["bart"]))
    trainer = config.setdefault("trainer", {})
    trainer.update(
        accelerator="cpu",
        devices=1,
        num_nodes=1,
        strategy="auto",
        max_steps=2,
        val_check_interval=2 * trainer.get("accumulate_grad_batches", 1),  # counts batches, not optimizer steps
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        enable_progress_bar=False,
    )
    trainer["default_root_dir"] = str(root / "runs")
    if isinstance(trainer.get("logger"), dict):
        trainer["logger"].setdefault("init_args", {})["save_dir"] = str(root / "runs")
    if two_stage(config):
        config["two_stage"].update(switch_step=1, switch_epoch=None)
    for callback in trainer.get("callbacks", []):
        if callback["class_path"].rsplit(".", 1)[-1] == "RoutingMonitor":
            callback.setdefault("init_args", {}).update(every_n_steps=1)
    model = config.setdefault("model", {})
    if model.get("pretrained") is None:
        model["bart"] = {**model.get("bart", {}), **TINY_BART}
    data = config.setdefault("data", {})
    data.update(output_dir=str(root / "data"), num_workers=0, batch_size=2, eval_batch_size=2)
    positions = TINY_BART["max_position_embeddings"]  # the tiny model's; the config's lengths may be longer
    for option in ("max_input_length", "max_target_length"):
        data[option] = min(data.get(option, positions), positions)
    if data.get("source", "skills") == "skills":
        data["skills"] = {**data.get("skills", {}), **TINY_SKILLS}
        data["vocab_size"] = 300
    elif data["source"] == "crossfit":
        data.update({key: str(crossfit[key]) for key in ("data_dir", "partition", "task_info")})
    return config


# --- a tiny `moe-mtl fit` run, and what it leaves (tests/commands/, tests/training/) -----------------


def tiny_run_config(**trainer) -> dict:
    """The quick start's shape at toy size: skill suite, two-stage training, routing logs, val every 2 steps."""
    return {
        "seed_everything": 1,
        "trainer": quiet_cpu_trainer(
            ("runs", "tiny"),
            **{
                "max_steps": 4,
                "val_check_interval": 2,
                "limit_val_batches": 3,
                "callbacks": [
                    {
                        "class_path": "moe_mtl.training.RoutingMonitor",
                        "init_args": {"every_n_steps": 1, "heatmap_every_n_steps": 2},
                    }
                ],
                **trainer,
            },
        ),
        "temperature": {"rate": 0.1},
        "two_stage": {"switch_step": 2},
        "model": {
            "bart": TINY_BART,
            "moe": {"num_experts": 2, "task_dim": 8},
            "optim": {"lr": 1e-3},
            "evaluation": {"num_beams": 1},
        },
        "data": {
            "skills": {"train_size": 4, "dev_size": 2, "test_size": 2, "shots": 2},
            "vocab_size": 300,
            "batch_size": 2,
            "output_dir": "runs/data",
            "max_target_length": 8,
        },
    }


def write_config(path: Path, **trainer) -> str:
    path.write_text(yaml.safe_dump(tiny_run_config(**trainer)))
    return str(path)


def event_values(run_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], set[str]]:
    """(scalar tag → [(step, value)], image tags) of every TensorBoard event file in `run_dir`."""
    scalars, images = {}, set()

    # in the order written: the name's time and writer counter compared as numbers (as text, writer 10 sorts before 9)
    def written(path: Path) -> tuple:
        return tuple(int(part) if part.isdigit() else part for part in path.name.split("."))

    for events in sorted(run_dir.glob("events.out.tfevents.*"), key=written):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0, "images": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
        images.update(accumulator.Tags()["images"])
    return scalars, images


def tasks_of(run_dir: Path, partition: str) -> list[str]:
    """Names of the run's tasks in `partition`, in task-id order (from the model's hyper-parameters)."""
    hparams = yaml.safe_load((run_dir / "hparams.yaml").read_text())
    return [
        name for name, part in zip(hparams["task_names"], hparams["task_partitions"], strict=True) if part == partition
    ]
