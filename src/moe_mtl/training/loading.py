"""A trained `MoEMultiTaskModule` from its Lightning checkpoint, as `moe-mtl analyze`, `export` and `represent`
load it."""

from __future__ import annotations

from pathlib import Path

from ..runs import read_checkpoint
from .module import MoEMultiTaskModule
from .options import grouped_hyperparameters


def load_module(path: str | Path, map_location: str = "cpu", option: str = "ckpt_path") -> MoEMultiTaskModule:
    """`MoEMultiTaskModule.load_from_checkpoint(path)`, with the checkpoint's option groups given explicitly: a
    checkpoint of an earlier moe-mtl (flat `lr`, `num_beams`, …) keeps its values (`grouped_hyperparameters`).
    A missing or unreadable file is a usage error naming `option`."""
    hparams = read_checkpoint(path, option).get(
        "hyper_parameters", {}
    )  # memory-mapped: the weights are read once, below
    groups = grouped_hyperparameters(hparams)
    return MoEMultiTaskModule.load_from_checkpoint(path, map_location=map_location, **groups)
