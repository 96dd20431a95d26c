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
from pathlib import Path
from typing import Any


def read_option_docs(argv: Sequence[str]) -> None:
    """Read option help from attribute docstrings (MoEOptions' fields) only when the command prints help: reading
    them for every class the parser holds (Trainer, callbacks, …) slows every command's start-up by seconds."""
    from jsonargparse import set_parsing_settings  # here: the argparse verbs (summarize) need no jsonargparse

    set_parsing_settings(docstring_parse_attribute_docstrings=any(arg in ("-h", "--help") for arg in argv))


def read_config_file(path: str | Path, option: str = "--config") -> Any:
    """A YAML config file's contents; a file that is missing or not YAML is a UsageError naming the option, the
    file, and the line and column of the syntax error (the parser's own message names only "<unicode string>")."""
    import yaml

    from ..errors import UsageError

    try:
        text = Path(path).read_text()
    except OSError as err:
        raise UsageError(f"{option} {path}: cannot be read ({err.strerror or err})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = " ".join(str(getattr(err, "problem", None) or err).split())
        raise UsageError(f"{option} {path}: not valid YAML{where}: {problem}") from None


def check_config_files(argv: Sequence[str]) -> None:
    """Each `--config FILE` (`-c`, `--config=FILE`) of a command line that names a file is valid YAML, checked
    before the parser reads it; strings that are not files are left to the parser (it also takes inline YAML)."""
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        else:
            continue
        if Path(value).is_file():
            read_config_file(value)
