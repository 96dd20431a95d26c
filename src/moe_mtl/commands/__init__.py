"""The verbs of `moe-mtl`, one module each: it parses its arguments, calls the library and prints.

    lightning   fit, validate, test, predict (LightningCLI over `MoEMultiTaskModule` and `MultiTaskDataModule`)
    upcycle     a dense BART as a saved MoE-BART
    represent   task representations of a config's tasks, written to a file
    analyze     route analysis of a run or checkpoint
    export      a run's tasks as plain transformers BART folders
    fewshot     the few-shot experiments over a trained run
    summarize   the experiments' table from their run folders

Each module's `main(args)` runs its verb; `moe_mtl.cli` imports only the one it runs, so that `moe-mtl --help`
and the light verbs (`summarize`) do not import torch. Nothing below this layer imports it.
"""

from __future__ import annotations

from collections.abc import Sequence


def read_option_docs(argv: Sequence[str]) -> None:
    """Read option help from attribute docstrings (MoEOptions' fields) only when the command prints help: reading
    them for every class the parser holds (Trainer, callbacks, …) slows every command's start-up by seconds."""
    from jsonargparse import set_parsing_settings  # here: the argparse verbs (summarize) need no jsonargparse

    set_parsing_settings(docstring_parse_attribute_docstrings=any(arg in ("-h", "--help") for arg in argv))
