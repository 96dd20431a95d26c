"""`moe-mtl fewshot`: the few-shot experiments over a trained run (`moe_mtl.experiments.fewshot` runs them).

Its own options name the grid; every other argument is a `moe-mtl fit` option, passed to every cell.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from ..data import MultiTaskDataModule
from ..experiments import fewshot as runner
from ..experiments.fewshot import RUNNER_OPTIONS, Cell, fewshot
from ..training import MoEMultiTaskModule
from . import check_config_files, read_option_docs
from .lightning import MoEMTLCLI, run_lightning


def load_datamodule(config_args: Sequence[str]) -> MultiTaskDataModule:
    """The data module that `config_args` (`--config ...` and fit overrides) configure, for its tasks.

    Parsed by the `moe-mtl fit` parser itself, so a bad override is a usage error now, before any cell runs.
    """

    class DataOnly(MoEMTLCLI):
        def instantiate_classes(self) -> None:  # the tasks need the data module only, not a model or trainer
            self.datamodule = MultiTaskDataModule(**self.config.data.as_dict())

    cli = DataOnly(
        MoEMultiTaskModule,
        MultiTaskDataModule,
        auto_configure_optimizers=False,  # as `run_lightning`: the same options parse
        parser_kwargs={"prog": "moe-mtl fewshot (fit options)"},
        args=list(config_args),
        run=False,
    )
    return cli.datamodule


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-mtl fewshot",
        description=runner.__doc__.split("\n\n")[0],
        epilog="Other arguments are `moe-mtl fit` options, passed to every cell.",
        allow_abbrev=False,  # a prefix of a runner flag must not swallow a pass-through fit option
    )
    parser.add_argument("--config", action="append", required=True, help="fit config (YAML); may be repeated")
    parser.add_argument("--init_from", help="upstream run folder or checkpoint (None: the config's model)")
    parser.add_argument("--out", required=True, help="folder of the cells and the tables")
    parser.add_argument("--partition", default="test", choices=("dev", "test"), help="partition of unseen tasks")
    parser.add_argument("--tasks", nargs="+", help="only these tasks of the partition (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, help="k-shot seeds (default: all the tasks have)")
    parser.add_argument(
        "--lrs", nargs="+", type=float, default=[1e-5, 2e-5, 5e-5], help="learning rates (default: the paper's)"
    )
    parser.add_argument(
        "--batch_sizes", nargs="+", type=int, help="training batch sizes (default: the config's; the paper's: 2 4 8)"
    )
    parser.add_argument("--unseen_routes", help="`--model.transfer.unseen_routes` of the cells (with --init_from)")
    parser.add_argument("--max_steps", type=int, help="training steps per cell (default: the config's)")
    return parser


def main(args: Sequence[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[Cell]]:
    read_option_docs(args)  # for the fit options of the cells, as `run_lightning` sets it
    check_config_files(args)
    parser = build_parser()
    options, fit_args = parser.parse_known_args(list(args))
    for arg in fit_args:
        name = arg.split("=", 1)[0]
        if name in RUNNER_OPTIONS:
            parser.error(f"{name} is set by the runner for each cell; use {RUNNER_OPTIONS[name]}")
    config_args = [arg for config in options.config for arg in ("--config", config)] + fit_args
    try:
        rows, summary, failed = fewshot(
            config_args,
            options.out,
            options.init_from,
            options.partition,
            options.tasks,
            options.seeds,
            options.lrs,
            options.batch_sizes,
            options.unseen_routes,
            options.max_steps,
            load_datamodule=load_datamodule,
            run_fit=run_lightning,
        )
    except ValueError as err:  # a bad option: a usage error, not a traceback
        parser.error(str(err))
    average = summary[-1]["test_mean"]
    print(
        f"few-shot: {len(rows)} (task, seed) rows, average test score "
        f"{'—' if average is None else f'{average:.4f}'}; tables in {options.out}"
    )
    if failed:
        print(f"{len(failed)} cell(s) failed (see error.txt in each): run the same command again to retry them")
        sys.exit(1)
    return rows, summary, failed
