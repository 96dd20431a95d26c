"""The `moe-mtl` command (also `python -m moe_mtl`).

Subcommands:
    upcycle   turn a dense BART (hub name or local folder) into a saved MoE-BART: every expert a
              copy of the dense weights at its position (Ye et al.), MoE options from `MoEOptions`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from jsonargparse import ArgumentParser, set_parsing_settings

from .models import MoEBartForConditionalGeneration, MoEOptions

set_parsing_settings(docstring_parse_attribute_docstrings=True)  # option help from MoEOptions' docstrings


def upcycle(dense: str, output: str, moe: MoEOptions) -> MoEBartForConditionalGeneration:
    """Upcycle the dense BART `dense` with the options `moe` and save the MoE-BART to `output`."""
    model = MoEBartForConditionalGeneration.from_dense(dense, **vars(moe))
    model.save_pretrained(output)
    return model


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="moe-mtl", description="Multi-task learning with task-level sparse MoE BART.")
    commands = parser.add_subcommands(dest="command")
    upcycle_parser = ArgumentParser(description=upcycle.__doc__)
    upcycle_parser.add_argument("--dense", required=True, help="dense BART: hub name (online) or local folder")
    upcycle_parser.add_argument("--output", required=True, help="folder the MoE-BART is saved to")
    upcycle_parser.add_argument("--config", action="config", help="YAML file with any of these options")
    upcycle_parser.add_class_arguments(MoEOptions, "moe")
    commands.add_subcommand("upcycle", upcycle_parser, help="turn a dense BART into a saved MoE-BART")
    return parser


def main(args: Sequence[str] | None = None) -> None:
    parser = build_parser()
    config = parser.parse_args(sys.argv[1:] if args is None else list(args))
    if config.command == "upcycle":
        try:
            options = parser.instantiate(config).upcycle
            model = upcycle(options.dense, options.output, options.moe)
        except ValueError as err:  # a bad option value: a usage error, not a traceback
            parser.error(str(err))
        layers = ", ".join(model.routed_layer_names)
        print(f"saved MoE-BART ({model.moe_options.num_experts} experts; routed: {layers}) to {options.output}")
