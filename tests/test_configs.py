"""Every config in configs/ parses and runs; nothing downloads (a local tiny BART stands in for the hub)."""

from pathlib import Path

import pytest
import yaml
from transformers import BartForConditionalGeneration

from moe_mtl import MoEBartForConditionalGeneration, MoEOptions
from moe_mtl.cli import main

from .models.conftest import tiny_bart_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("upcycle_*.yaml"))


def test_there_are_configs():
    assert CONFIGS


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: path.name)
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
