"""A tiny upstream `moe-mtl fit` run on the skill suite, with its zero-shot test, for the few-shot runner and the
summary table."""

from pathlib import Path

import pytest
import yaml

from moe_mtl.cli import main

from ..conftest import quiet_cpu_trainer
from ..models.conftest import TINY_BART

SMALL = {**TINY_BART, "encoder_layers": 1, "decoder_layers": 1}
SKILLS = {"train_size": 4, "dev_size": 2, "test_size": 2, "shots": 2, "fewshot_seeds": [100, 13]}


def tiny_config(root: Path, **trainer) -> dict:
    """Skill suite, a 1+1-layer MoE-BART, batches of 2, greedy decoding; no progress bars or summaries."""
    return {
        "seed_everything": 1,
        "trainer": quiet_cpu_trainer(**trainer),
        "model": {"bart": SMALL, "moe": {"num_experts": 2, "task_dim": 8}, "evaluation": {"num_beams": 1}},
        "data": {
            "skills": SKILLS,
            "vocab_size": 300,
            "batch_size": 2,
            "output_dir": str(root / "data"),
            "max_target_length": 8,
        },
    }


def write_yaml(path: Path, config: dict) -> str:
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture(scope="session")
def upstream(tmp_path_factory) -> Path:
    """The run folder of a 2-step upstream fit (validated on 3 seen tasks at step 2) with `zeroshot/`: its test on
    3 unseen tasks through `--model.transfer.init_from` (nearest routes)."""
    root = tmp_path_factory.mktemp("upstream")
    logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": str(root)}}
    trainer = {"max_steps": 2, "val_check_interval": 2, "check_val_every_n_epoch": None, "limit_val_batches": 3}
    config = write_yaml(root / "upstream.yaml", tiny_config(root, logger=logger, **trainer))
    main(["fit", "--config", config])
    run = root / "lightning_logs" / "version_0"
    main(
        [
            "test",
            "--config",
            config,
            f"--model.transfer.init_from={run}",
            "--model.transfer.unseen_routes=nearest",
            "--data.test_partitions=test",
            f"--model.evaluation.results_dir={run / 'zeroshot'}",
            "--trainer.limit_test_batches=3",
        ]
    )
    return run


@pytest.fixture(scope="session")
def fewshot_config(tmp_path_factory) -> str:
    """A few-shot cell config: 2 steps on a 2-shot train split (one batch an epoch), validated once, at the end."""
    root = tmp_path_factory.mktemp("fewshot_config")
    return write_yaml(root / "fewshot.yaml", tiny_config(root, max_steps=2, check_val_every_n_epoch=2))
