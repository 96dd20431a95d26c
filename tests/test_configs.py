"""Every config in configs/ parses and runs; nothing downloads (a local tiny BART stands in for the hub).

Upcycle configs (`upcycle_*.yaml`) run `moe-mtl upcycle` as they are, with a local dense BART. Every other
config is a `moe-mtl fit` config: it prints, and it trains 2 steps on the CPU once shrunk to toy size
(`shrink`): every "facebook/bart-base" becomes a local tiny BART and its tokenizer, CrossFit data becomes a
tiny folder of the same layout, the skill suite and a new model get toy sizes; everything else is the file's
(`shrink` and `crossfit` live in tests/conftest.py, shared with tests/test_ddp_cli.py).
"""

from typing import Any

import pytest
import torch
import yaml
from transformers import BartForConditionalGeneration

from moe_mtl import MoEBartForConditionalGeneration, MoEOptions
from moe_mtl.cli import main

from .conftest import CROSSFIT_TASKS, FIT_CONFIGS, UPCYCLE_CONFIGS, shrink
from .models.conftest import tiny_bart_config


def test_there_are_configs():
    assert UPCYCLE_CONFIGS and FIT_CONFIGS


def is_subset(given: Any, printed: Any) -> bool:
    """Whether every value written in `given` is in `printed` (which adds defaults), recursively."""
    if isinstance(given, dict):
        return isinstance(printed, dict) and all(k in printed and is_subset(v, printed[k]) for k, v in given.items())
    if isinstance(given, list):
        return isinstance(printed, list) and len(given) == len(printed) and all(map(is_subset, given, printed))
    return given == printed


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
