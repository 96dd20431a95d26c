"""`moe-mtl upcycle`: a dense BART (hub name or local folder) as a saved MoE-BART, every expert a copy of the dense
weights at its position (Ye et al.), MoE options from `MoEOptions`."""

from __future__ import annotations

from collections.abc import Sequence

from jsonargparse import ArgumentParser

from ..models import MoEBartForConditionalGeneration, MoEOptions
from ..pretrained import check_pretrained
from ..representations.files import read_task_embeddings
from . import read_option_docs


def upcycle(dense: str, output: str, moe: MoEOptions) -> MoEBartForConditionalGeneration:
    """Upcycle the dense BART `dense` with the options `moe` and save the MoE-BART to `output`."""
    # models read no files: the task-representation file of `moe.task_embeddings` is read here
    vectors = read_task_embeddings(moe.task_embeddings, moe.num_tasks) if moe.task_embeddings else None
    model = MoEBartForConditionalGeneration.from_dense(dense, vectors, **vars(moe))
    model.save_pretrained(output)
    return model


def build_upcycle_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="moe-mtl upcycle", allow_abbrev=False, description=upcycle.__doc__)
    parser.add_argument("--dense", required=True, help="dense BART: hub name (online) or local folder")
    parser.add_argument("--output", required=True, help="folder the MoE-BART is saved to")
    parser.add_argument("--config", action="config", help="YAML file with any of these options")
    parser.add_class_arguments(MoEOptions, "moe")
    return parser


def main(args: Sequence[str]) -> MoEBartForConditionalGeneration:
    read_option_docs(args)
    parser = build_upcycle_parser()
    config = parser.parse_args(list(args))
    try:
        options = parser.instantiate(config)
        check_pretrained(options.dense, "--dense")
        model = upcycle(options.dense, options.output, options.moe)
    except ValueError as err:  # a bad option value: a usage error, not a traceback
        parser.error(str(err))
    layers = ", ".join(model.routed_layer_names)
    print(f"saved MoE-BART ({model.moe_options.num_experts} experts; routed: {layers}) to {options.output}")
    return model
