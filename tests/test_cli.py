"""The `moe-mtl` command itself (`moe_mtl.cli`): it dispatches each verb to its module in `moe_mtl.commands`, and
its help and the light verbs import neither torch, Lightning nor transformers."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = {"torch", "lightning", "transformers"}


def imported_modules(*args: str, cwd: Path | None = None) -> set[str]:
    """The modules `python -X importtime -m moe_mtl *args` imports (it must succeed)."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "moe_mtl", *args], capture_output=True, text=True, cwd=cwd
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("import time:")]
    return {line.rsplit("|", 1)[1].strip() for line in lines[1:]}  # the first line is the header


@pytest.mark.slow
def test_python_dash_m_runs_the_command():
    result = subprocess.run([sys.executable, "-m", "moe_mtl", "--help"], capture_output=True, text=True, check=True)
    assert result.stdout.startswith(
        "usage: moe-mtl {fit,validate,test,predict,upcycle,represent,analyze,fewshot,summarize,export} [--debug]"
    )
    for command in ("upcycle", "represent", "analyze", "fewshot", "summarize", "export"):
        assert f"\n    {command} " in result.stdout, command  # described in the subcommand list


def test_help_imports_neither_torch_lightning_nor_transformers():
    modules = imported_modules("--help")
    assert "moe_mtl.cli" in modules and not modules & HEAVY


def test_summarize_imports_neither_torch_lightning_nor_transformers(tmp_path):
    assert not imported_modules("summarize", "--help") & HEAVY
    evaluation = {"step": 2, "average": {"score": 0.5}, "tasks": [{"task": "a", "partition": "train", "score": 0.5}]}
    (tmp_path / "vanilla/evaluation").mkdir(parents=True)
    (tmp_path / "vanilla/evaluation/val-epoch0-step2.json").write_text(json.dumps(evaluation))
    modules = imported_modules("summarize", "vanilla", "--out", "table", cwd=tmp_path)
    # (`importlib.import_module`, as the dispatch imports a verb, is not itself listed; what the verb imports is)
    assert "moe_mtl.experiments.summary" in modules and not modules & HEAVY
    assert "| vanilla | 1 | 0.500 |" in (tmp_path / "table.md").read_text()


QUICKSTART = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")


@pytest.mark.parametrize(
    ("argv", "prefix"),
    [
        (["fit", "--config", QUICKSTART, "--trainer.max_step", "60"], "--trainer.max_step"),  # of max_steps
        (["test", "--config", QUICKSTART, "--seed", "1"], "--seed"),  # of --seed_everything
        (["fewshot", "--config", QUICKSTART, "--out", "cells", "--seed", "100"], "--seed"),  # a typo of --seeds
        (["upcycle", "--den", "folder", "--out", "moe"], "--den"),  # of --dense
        (["represent", "--config", QUICKSTART, "--kin", "text", "--output", "t.pt"], "--kin"),  # of --kind
        (["analyze", "run", "--group", "family"], "--group"),  # of --group_by
        (["export", "--ckpt_path", "x.ckpt", "--ou", "exported"], "--ou"),  # of --out
        (["summarize", "run", "--out", "table", "--base", "vanilla"], "--base"),  # of --baseline
    ],
)
def test_no_verb_takes_a_prefix_of_an_option_for_the_option(argv, prefix, tmp_path, monkeypatch, capsys):
    from moe_mtl.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert f"unrecognized arguments: {prefix}" in error, error
    assert not list(tmp_path.iterdir())  # refused before anything was written
