"""`moe-mtl summarize`: the experiments' table from their run folders (`moe_mtl.experiments.summary` builds it).

It reads result files only, and imports neither torch nor Lightning (tests/test_cli.py checks).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ..experiments import summary as table
from ..experiments.summary import SummaryRow, summarize


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-mtl summarize", description=table.__doc__.split("\n\n")[0], allow_abbrev=False
    )
    parser.add_argument("runs", nargs="+", help="run folders, or method folders of seed<k>/ run folders")
    parser.add_argument("--baseline", help="method whose per-task scores ARG is relative to (e.g. vanilla)")
    parser.add_argument("--names", nargs="+", help="method name of each run folder (default: from folder names)")
    parser.add_argument("--out", required=True, help="path stem of the tables: <out>.md and <out>.csv")
    parser.add_argument("--partition", default="test", choices=("dev", "test"), help="partition of unseen tasks")
    parser.add_argument("--zeroshot", default="zeroshot", help="zero-shot folder inside each run folder")
    parser.add_argument("--fewshot", default="fewshot", help="few-shot folder inside each run folder")
    return parser


def main(args: Sequence[str]) -> tuple[list[SummaryRow], list[str]]:
    parser = build_parser()
    options = parser.parse_args(list(args))
    try:
        rows, notes = summarize(
            options.runs,
            options.out,
            options.baseline,
            options.names,
            options.partition,
            options.zeroshot,
            options.fewshot,
        )
    except ValueError as err:  # a bad folder or option: a usage error, not a traceback
        parser.error(str(err))
    print(f"wrote {options.out}.md and .csv: {len(rows)} methods, {len(notes)} note(s) on missing values")
    return rows, notes
