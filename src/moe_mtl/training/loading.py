"""A trained `MoEMultiTaskModule` from its Lightning checkpoint, as `moe-mtl analyze`, `export` and `represent`
load it."""

from __future__ import annotations

from pathlib import Path

from ..models.config import fixed_route_options
from ..runs import checkpoint_fixed_routes, read_checkpoint
from .module import MoEMultiTaskModule
from .options import grouped_hyperparameters


def load_module(path: str | Path, map_location: str = "cpu", option: str = "ckpt_path") -> MoEMultiTaskModule:
    """`MoEMultiTaskModule.load_from_checkpoint(path)`, with the checkpoint's option groups given explicitly: a
    checkpoint of an earlier moe-mtl (flat `lr`, `num_beams`, …, or stage two kept apart) keeps its values
    (`grouped_hyperparameters`, `checkpoint_fixed_routes`).
    A missing or unreadable file is a usage error naming `option`."""
    checkpoint = read_checkpoint(path, option)  # memory-mapped: the weights are read once, below
    hparams = checkpoint.get("hyper_parameters", {})
    groups: dict = grouped_hyperparameters(hparams)
    routes = checkpoint_fixed_routes(checkpoint)
    if routes is not None:  # (an earlier moe-mtl kept stage two apart from the `moe` options)
        groups["moe"] = {**(hparams.get("moe") or {}), **fixed_route_options(routes)}
    return MoEMultiTaskModule.load_from_checkpoint(path, map_location=map_location, **groups)
