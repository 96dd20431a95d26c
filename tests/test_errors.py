"""docs/errors.md, row by row: each bad input stops `moe-mtl` with its documented one-line message, exit code 2, no
traceback, and nothing written."""

import re
import shlex
import tempfile
from pathlib import Path

import lightning.pytorch  # noqa: F401  (its log handler keeps the stderr of its import: not a test's captured one)
import pytest

from moe_mtl.cli import main

ROOT = Path(__file__).resolve().parents[1]
TABLE_ROW = re.compile(r"^\| (?:(\d+) \| )?`` (moe-mtl .+?) `` \| `` (.+?) `` \|$")


def documented(numbered: bool) -> list[tuple[str, str]]:
    """(command, message) of docs/errors.md's rows: the numbered table's, or the parser's own."""
    rows = []
    for line in (ROOT / "docs/errors.md").read_text().splitlines():
        match = TABLE_ROW.match(line)
        if match and bool(match[1]) == numbered:
            rows.append((match[2], match[3]))
    return rows


@pytest.fixture
def folder(tmp_path, monkeypatch) -> Path:
    """The folder the table's commands run in: the shipped configs, a text file and a broken `jsonl` task folder."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    (tmp_path / "broken").mkdir()
    lines = ['{"input": "q1", "target": "a1", "split": "train"}', '{"input": "q2", "target": ']
    (tmp_path / "broken/qa.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "bad.yaml").write_text("trainer:\n  max_steps: 10\n  callbacks: [a, b\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_documented(command: str, capsys) -> list[str]:
    """Run a table row's command in-process; its exit code must be 2. Returns the lines it wrote to stderr."""
    args = shlex.split(command)[1:]
    with pytest.raises(SystemExit) as stopped:
        main(args)
    assert stopped.value.code == 2, command
    return capsys.readouterr().err.strip().splitlines()


def written(folder: Path) -> list[str]:
    fixtures = {"configs", "notes.txt", "broken", "bad.yaml"}
    return sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.relative_to(folder).parts[0] not in fixtures
    )


def test_the_table_has_at_least_25_rows():
    assert len(documented(numbered=True)) >= 25
    numbers = [
        int(TABLE_ROW.match(line)[1])
        for line in (ROOT / "docs/errors.md").read_text().splitlines()
        if TABLE_ROW.match(line) and TABLE_ROW.match(line)[1]
    ]
    assert numbers == list(range(1, len(numbers) + 1))


@pytest.mark.parametrize(("command", "message"), documented(numbered=True), ids=lambda value: value[:60])
def test_each_documented_bad_input_stops_with_its_one_line_message(folder, capsys, command, message):
    lines = run_documented(command, capsys)
    assert not any("Traceback" in line for line in lines), "\n".join(lines)
    expected = message.removesuffix(" …")
    subcommand = shlex.split(command)[1]
    if subcommand in ("fit", "validate", "test", "predict"):
        assert lines[-1].startswith(f"moe-mtl {subcommand}: error: {expected}"), lines[-1]
        if not message.endswith("…"):
            assert lines[-1] == f"moe-mtl {subcommand}: error: {expected}"
    else:  # a parser of its own: its usage, then the message; or the command's own one line
        assert lines[-1].startswith((f"error: {expected}", f"moe-mtl {subcommand}: error: {expected}")), lines[-1]
    assert written(folder) == []  # no run folder, checkpoint, predictions or prepared data


@pytest.mark.parametrize(("command", "message"), documented(numbered=False), ids=lambda value: value[:60])
def test_options_the_parser_refuses_name_the_option(folder, capsys, command, message):
    lines = run_documented(command, capsys)
    assert message in " ".join(" ".join(lines).split()), "\n".join(lines)
    assert written(folder) == []


def test_debug_shows_the_traceback(folder):
    with pytest.raises(ValueError, match=r"model option `optim.lr` is -0.001"):
        main(["fit", "--config", "configs/quickstart.yaml", "--model.optim.lr=-1e-3", "--debug"])


def unwritable_folder() -> Path | None:
    """A folder this process cannot create files in, even as root: a read-only system folder, where there is one."""
    for folder in (Path("/sys"), Path("/proc/sys")):
        try:
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError:
            return folder
    return None


@pytest.mark.skipif(unwritable_folder() is None, reason="no folder here refuses writes to this user")
def test_a_results_folder_that_cannot_be_written_is_refused_before_training(folder, capsys):
    results = unwritable_folder() / "moe_mtl_results"
    command = f"moe-mtl fit --config configs/quickstart.yaml --model.evaluation.results_dir={results}"
    lines = run_documented(command, capsys)
    assert lines[-1].startswith(
        f"moe-mtl fit: error: model.evaluation.results_dir is {results}, which cannot be written ("
    )
    assert lines[-1].endswith("); give a writable folder")
    assert written(folder) == []
