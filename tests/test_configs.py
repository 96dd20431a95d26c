"""Every config in configs/ parses and runs; nothing downloads (a local tiny BART stands in for the hub).

Upcycle configs (`upcycle_*.yaml`) run `moe-mtl upcycle` as they are, with a local dense BART. Every other
config is a `moe-mtl fit` config: it prints, and it trains 2 steps on the CPU once shrunk to toy size
(`shrink`): every "facebook/bart-base" becomes a local tiny BART and its tokenizer, CrossFit data becomes a
tiny folder of the same layout, the skill suite and a new model get toy sizes; everything else is the file's.
"""

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from transformers import BartConfig, BartForConditionalGeneration

from moe_mtl import MoEBartForConditionalGeneration, MoEOptions
from moe_mtl.cli import main
from moe_mtl.data.tokenizer import train_tokenizer

from .models.conftest import TINY_BART, tiny_bart_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
UPCYCLE_CONFIGS = [path for path in CONFIGS if path.name.startswith("upcycle_")]
FIT_CONFIGS = [path for path in CONFIGS if path not in UPCYCLE_CONFIGS]
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


def test_there_are_configs():
    assert UPCYCLE_CONFIGS and FIT_CONFIGS


def is_subset(given: Any, printed: Any) -> bool:
    """Whether every value written in `given` is in `printed` (which adds defaults), recursively."""
    if isinstance(given, dict):
        return isinstance(printed, dict) and all(k in printed and is_subset(v, printed[k]) for k, v in given.items())
    if isinstance(given, list):
        return isinstance(printed, list) and len(given) == len(printed) and all(map(is_subset, given, printed))
    return given == printed


def replace_value(tree: Any, old: str, new: str) -> Any:
    """`tree` with every string equal to `old` replaced by `new`."""
    if isinstance(tree, dict):
        return {key: replace_value(value, old, new) for key, value in tree.items()}
    if isinstance(tree, list):
        return [replace_value(value, old, new) for value in tree]
    return new if tree == old else tree


# --- upcycle configs -----------------------------------------------------------------------------


@pytest.mark.parametrize("config", UPCYCLE_CONFIGS, ids=lambda path: path.name)
def test_upcycle_config_prints_and_runs(config, tmp_path, capsys):
    with pytest.raises(SystemExit) as printed:
        main(["upcycle", "--config", str(config), "--print_config"])
    assert printed.value.code == 0
    printed_moe, file_moe = yaml.safe_load(capsys.readouterr().out)["moe"], yaml.safe_load(config.read_text())["moe"]
    assert printed_moe.items() >= file_moe.items()  # the file's values, plus defaults for the rest

    BartForConditionalGeneration(tiny_bart_config()).save_pretrained(tmp_path / "dense")
    main(["upcycle", "--config", str(config), f"--dense={tmp_path / 'dense'}", f"--output={tmp_path / 'moe'}"])
    saved = MoEBartForConditionalGeneration.from_pretrained(tmp_path / "moe").moe_options
    assert saved == MoEOptions(**yaml.safe_load(config.read_text())["moe"])


# --- fit configs ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
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
    for callback in trainer.get("callbacks", []):
        name, options = callback["class_path"].rsplit(".", 1)[-1], callback.setdefault("init_args", {})
        if name == "TwoStageTraining":
            options.update(switch_step=1, switch_epoch=None)
        elif name == "RoutingMonitor":
            options.update(every_n_steps=1)
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


@pytest.mark.parametrize("config", FIT_CONFIGS, ids=lambda path: path.name)
def test_fit_config_prints(config, capsys):
    with pytest.raises(SystemExit) as printed:
        main(["fit", "--config", str(config), "--print_config"])
    assert printed.value.code == 0
    assert is_subset(yaml.safe_load(config.read_text()), yaml.safe_load(capsys.readouterr().out))


@pytest.mark.parametrize("config", FIT_CONFIGS, ids=lambda path: path.name)
def test_fit_config_trains_two_steps_into_stage_two(config, crossfit, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    original = yaml.safe_load(config.read_text())
    tiny = tmp_path / config.name
    tiny.write_text(yaml.safe_dump(shrink(original, tmp_path, crossfit)))
    main(["fit", "--config", str(tiny)])

    (run,) = (tmp_path / "runs").glob("*/version_0")
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["precision"] == original["trainer"].get(
        "precision"
    )
    checkpoint = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2
    callbacks = [callback["class_path"].rsplit(".", 1)[-1] for callback in original["trainer"].get("callbacks", [])]
    if "TwoStageTraining" in callbacks:
        assert checkpoint["moe_mtl"]["stage"] == 2 and checkpoint["moe_mtl"]["stage_info"]["switch_step"] == 1
        assert checkpoint["callbacks"]["TwoStageTraining"]["switched_at"] == 1
    assert list(run.glob("evaluation/val-epoch*-step2.json"))
    if original["data"].get("source") == "crossfit":  # every task of the partition: seen, then dev, then test
        hparams = checkpoint["hyper_parameters"]
        assert hparams["task_names"] == list(CROSSFIT_TASKS)  # in the partition file's order
        assert hparams["task_metrics"] == [CROSSFIT_TASKS[name][1] for name in hparams["task_names"]]
