"""The `moe-mtl` command (also `python -m moe_mtl`).

Subcommands:
    fit, validate, test, predict   LightningCLI over `MoEMultiTaskModule` and `MultiTaskDataModule`
              (`moe-mtl fit --config configs/quickstart.yaml`); what the model needs from the data is
              linked, never repeated in configs; the resolved config is saved with each run.
    upcycle   turn a dense BART (hub name or local folder) into a saved MoE-BART: every expert a
              copy of the dense weights at its position (Ye et al.), MoE options from `MoEOptions`.
    represent task representations (text, Fisher) of a config's tasks, written to a file for
              `--model.moe.task_embeddings` (`moe_mtl.representations`).
    analyze   route analysis of a run or checkpoint (heatmap, dynamics, feature correlation, route–skill
              agreement, expert disabling) into `<run>/analysis/` (`moe_mtl.analysis`).
    export    a run's tasks as plain transformers BART folders, one per task (hard routes only), and with
              `--all` the whole MoE-BART (`moe_mtl.commands.export`, docs/export.md).
    fewshot   the paper's few-shot experiments over a trained run (`moe_mtl.experiments.fewshot`).
    summarize the experiments' tables from their run folders (`moe_mtl.experiments.summary`).

Each subcommand is a module of `moe_mtl.commands` (fit … predict: `commands.lightning`), imported only when it
runs; this module only dispatches. `moe-mtl <subcommand> --help` lists its options. A bad option value or input
file stops the command with one line naming it, what was given and what is allowed (exit code 2; docs/errors.md);
`--debug` shows the traceback.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from .errors import UsageError

# verb → its module in `moe_mtl.commands`, imported only when it runs: `--help` and the light verbs stay light
VERBS = {
    "fit": "lightning",
    "validate": "lightning",
    "test": "lightning",
    "predict": "lightning",
    "upcycle": "upcycle",
    "represent": "represent",
    "analyze": "analyze",
    "fewshot": "fewshot",
    "summarize": "summarize",
    "export": "export",
}


def main(args: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    debug = "--debug" in argv
    argv = [arg for arg in argv if arg != "--debug"]
    if args is None:  # LightningCLI reads sys.argv itself (and warns when also given `args`)
        sys.argv[1:] = argv
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: moe-mtl {{{','.join(VERBS)}}} [--debug] ...\n\n{__doc__.strip()}")
        return
    # an unknown verb goes to LightningCLI too, whose error lists its own verbs
    module = VERBS.get(argv[0], "lightning")
    command = importlib.import_module(f"moe_mtl.commands.{module}")
    try:
        if module == "lightning":  # LightningCLI parses the verb itself
            command.main(None if args is None else argv)
        else:
            command.main(argv[1:])
    except Exception as error:  # a mistake in what the command was given; anything else keeps its traceback
        message = usage_message(error)
        if debug or message is None:
            raise
        sys.stderr.write(f"moe-mtl {argv[0]}: error: {message}\n")
        raise SystemExit(2) from None


def usage_message(error: Exception) -> str | None:
    """The one-line message of a mistake in what the command was given: a UsageError, or Lightning refusing a
    Trainer setting (its MisconfigurationException: `--trainer.accelerator gpu` on a machine without one); None for
    anything else, which keeps its traceback."""
    if isinstance(error, UsageError):
        return " ".join(str(error).split())  # one line, whatever the message's own line breaks
    if type(error).__name__ == "MisconfigurationException":  # not imported here: `moe-mtl --help` stays light
        return (
            f"the Trainer refused its settings: {' '.join(str(error).split())} (the options to change: "
            "--trainer.accelerator, --trainer.devices, --trainer.strategy, --trainer.precision)"
        )
    return None
