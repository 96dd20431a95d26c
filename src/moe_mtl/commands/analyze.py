"""`moe-mtl analyze <run or checkpoint>`: parse the options, run `report.analyze`, print a short summary."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jsonargparse import ArgumentParser

from ..analysis.features import features_by_kind
from ..analysis.report import analyze
from ..analysis.run import RunFolder
from ..data.tasks import shortened
from . import read_option_docs

# options that only the expert-disabling evaluations read, with their defaults: given without --disable, an error
DISABLING_ONLY = {"layers": None, "max_examples": None, "tasks": None, "accelerator": "auto"}


def build_analyze_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="moe-mtl analyze",
        allow_abbrev=False,
        description="Route analysis of a trained run: heatmap, learning dynamics, feature correlation, route–skill "
        "agreement and (with --disable true) expert disabling, written to <run>/analysis/.",
    )
    parser.add_argument("run", help="run folder (runs/<name>/version_N) or a checkpoint (.ckpt) in one")
    parser.add_argument(
        "--ckpt_path",
        default=None,
        help="checkpoint to analyse; null: the run's checkpoint (its single best-step*.ckpt, else its last.ckpt)",
    )
    parser.add_argument("--output_dir", default=None, help="where the files go; null: <run>/analysis")
    parser.add_argument(
        "--group_by",
        type=str | None,
        default=None,
        help="task feature (any) that groups tasks in the heatmap and the disabling table; null: chosen from the "
        "seen tasks' features (a categorical, else list, else boolean feature that makes groups; printed)",
    )
    parser.add_argument(
        "--step",
        type=int | None,
        default=None,
        help="route table of this step; null: the named checkpoint's routes, else the last saved table",
    )
    parser.add_argument("--alpha", type=float, default=0.05, help="false discovery rate of the correlation tests")
    parser.add_argument(
        "--skill_feature",
        type=str | None,
        default=None,
        help="list or categorical task feature whose shared values define tasks that share a skill (route–skill "
        "agreement); null: chosen from the seen tasks' features (a list, else categorical feature; printed)",
    )
    parser.add_argument("--permutations", type=int, default=10_000, help="permutations of the agreement test")
    parser.add_argument("--disable", type=bool, default=False, help="evaluate with each expert disabled (costly)")
    parser.add_argument(
        "--layers",
        type=list[str] | None,
        default=None,
        help="routed layers to disable experts in, e.g. [encoder.0]; null: all",
    )
    parser.add_argument(
        "--max_examples",
        type=int | None,
        default=None,
        help="first dev examples of each task in the disabling evaluations; null: all",
    )
    parser.add_argument(
        "--tasks",
        type=list[str] | None,
        default=None,
        help="tasks (names) the disabling evaluations validate; null: every validated task",
    )
    parser.add_argument("--accelerator", default="auto", help="Trainer accelerator of the disabling evaluations")
    return parser


def print_summary(summary: dict[str, Any]) -> None:
    correlation = summary["correlation"]
    skipped = "; ".join(f"{reason}: {shortened(names)}" for reason, names in correlation["skipped"].items()) or "none"
    print(f"analysed {summary['run']} at step {summary['step']}: {summary['tasks']} seen tasks")
    if summary["left_out_tasks"]:
        left_out = summary["left_out_tasks"]
        print(f"  left out, not seen in training: {len(left_out)} task(s) of the route table ({shortened(left_out)})")
    if not summary["route_tables"]:
        print("learning dynamics: not drawn, the run saved no route tables (RoutingMonitor writes <run>/routes/)")
    print(f"task features: {features_by_kind(summary['features'])}")
    print(f"group_by: {summary['group_by']['feature'] or 'none'} ({summary['group_by']['reason']})")
    print(
        f"feature correlation: {correlation['tests']} tests, {correlation['significant']} significant "
        f"(BH); columns not tested: {skipped}"
    )
    for row in correlation["top"]:
        print(f"  {row['feature']} ~ {row['usage']}: r={row['r']:+.3f}, q={row['q']:.2e}")
    agreement = summary["skill_agreement"]
    if agreement["feature"] is not None:  # else the reason is why it was not measured, printed below
        print(f"skill_feature: {agreement['feature']} ({agreement['reason']})")
    if agreement.get("tasks_without_feature"):
        print(f"  left out of the agreement, without {agreement['feature']!r}: {agreement['tasks_without_feature']}")
    if "skipped" in agreement:
        print(f"route–skill agreement: not measured ({agreement['skipped']})")
    else:
        print(
            f"route–skill agreement ({agreement['feature']}): {agreement['sharing']:.3f} for pairs sharing a skill vs "
            f"{agreement['not_sharing']:.3f} for pairs sharing none (p={agreement['p_permutation']:.4f}, permutation); "
            f"argmax routes: {agreement['argmax']['sharing']:.3f} vs {agreement['argmax']['not_sharing']:.3f} "
            f"(p={agreement['argmax']['p_permutation']:.4f})"
        )
    if "disabling" in summary:
        disabling = summary["disabling"]
        worst = disabling["largest_drop"]
        print(
            f"expert disabling ({disabling['checkpoint']}): {disabling['evaluations']} evaluations; largest drop "
            f"{worst['drop']:+.4f} ({worst['task']}, {worst['layer']} expert {worst['expert']})"
        )
    print(f"wrote {', '.join(summary['files'])}")


def main(args: Sequence[str]) -> dict[str, Any]:
    read_option_docs(args)
    parser = build_analyze_parser()
    options = parser.parse_args(list(args))
    given = [
        f"--{name} {getattr(options, name)}"
        for name, default in DISABLING_ONLY.items()
        if getattr(options, name) != default
    ]
    if given and not options.disable:
        parser.error(f"{', '.join(given)}: only the expert-disabling evaluations read it; add --disable true")
    try:
        run = RunFolder.resolve(options.run, options.ckpt_path)
        summary = analyze(
            run,
            output_dir=options.output_dir,
            group_by=options.group_by,
            step=options.step,
            alpha=options.alpha,
            skill_feature=options.skill_feature,
            permutations=options.permutations,
            disable=options.disable,
            layers=options.layers,
            max_examples=options.max_examples,
            tasks=options.tasks,
            trainer={"accelerator": options.accelerator},
        )
    except ValueError as err:  # a bad option or input: a usage error, not a traceback
        parser.error(str(err))
    except ImportError as err:  # the optional extra is missing
        parser.exit(1, f"moe-mtl analyze: {err}\n")
    print_summary(summary)
    return summary
