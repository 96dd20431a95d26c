"""Preemption through the real `moe-mtl fit` command: a signal at a known step, the checkpoint it leaves, the exit
code, and a resumed run that ends bitwise equal to an uninterrupted one."""

import json
import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from moe_mtl.training.callbacks.preemption import exit_code

from ...conftest import event_values, tiny_run_config

pytestmark = pytest.mark.slow  # each test runs the real `moe-mtl fit` in subprocesses

ROOT = Path(__file__).resolve().parents[3]
MOE_MTL = Path(sys.executable).parent / "moe-mtl"
MAX_STEPS, SIGNAL_STEP = 4, 3  # stage two from step 2 on, one validation at the end


def fit(
    folder: Path,
    version: str | None,
    *extra: str,
    signal_name: str | None = None,
    env=None,
    trainer: dict | None = None,
    in_validation: bool = False,
):
    """`moe-mtl fit` of the tiny run in `folder` (logger version `version`; None: the logger's next), optionally
    signalling itself at step `SIGNAL_STEP` (`in_validation`: during the validation at step 2)."""
    folder.mkdir(exist_ok=True)
    trainer = trainer or {"max_steps": MAX_STEPS, "val_check_interval": MAX_STEPS, "limit_val_batches": 1}
    config = tiny_run_config(**trainer)
    config["trainer"]["logger"]["init_args"]["version"] = version
    if signal_name is not None:
        name, step = ("SignalInValidation", 2) if in_validation else ("SignalAtStep", SIGNAL_STEP)
        test_callback = {"class_path": f"tests.signals.{name}", "init_args": {"signal_name": signal_name}}
        test_callback["init_args"]["step"] = step
        config["trainer"]["callbacks"].append(test_callback)
    path = folder / f"{version or 'run'}.yaml"
    path.write_text(yaml.safe_dump(config))
    outside = {name: value for name, value in os.environ.items() if not name.startswith("SLURM_")}
    environment = {
        **outside,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    command = [str(MOE_MTL), "fit", "--config", str(path), *extra]
    return subprocess.run(command, cwd=folder, env=environment, capture_output=True, text=True, timeout=300)


def final_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The weights and the optimizer's moments of a checkpoint, flattened to name → tensor."""
    saved = torch.load(checkpoint, weights_only=False, map_location="cpu")
    state = dict(saved["state_dict"])
    for group in saved["optimizer_states"]:
        for index, moments in group["state"].items():
            state.update({f"optimizer.{index}.{name}": value for name, value in moments.items()})
    return state


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, torch.Tensor]:
    folder = tmp_path_factory.mktemp("uninterrupted")
    done = fit(folder, "whole")
    assert done.returncode == 0, done.stderr[-3000:]
    return final_state(folder / "runs/tiny/whole/checkpoints/last.ckpt")


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT", "SIGUSR1"])
def test_a_stop_signal_saves_a_resumable_checkpoint_and_exits_with_the_signal_code(
    tmp_path, uninterrupted, signal_name
):
    stopped = fit(tmp_path, "run", signal_name=signal_name)
    assert stopped.returncode == exit_code(signal.Signals[signal_name]) == 128 + signal.Signals[signal_name]
    checkpoints = tmp_path / "runs/tiny/run/checkpoints"
    saved = checkpoints / f"preempted-step{SIGNAL_STEP}.ckpt"
    assert saved.is_file(), sorted(p.name for p in checkpoints.iterdir())
    assert torch.load(saved, weights_only=False)["global_step"] == SIGNAL_STEP
    assert f"Received {signal_name}" in stopped.stderr and f"saved {saved.relative_to(tmp_path)}" in stopped.stderr

    resumed = fit(tmp_path, "run", "--ckpt_path", str(saved))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    state = final_state(checkpoints / "last.ckpt")
    assert state.keys() == uninterrupted.keys()
    different = [name for name, value in state.items() if not torch.equal(value, uninterrupted[name])]
    assert not different, different[:5]


def test_under_slurm_sigusr1_stays_lightnings_requeue(tmp_path):
    """SLURM's warning signal saves Lightning's hpc checkpoint and requeues the job through `scontrol` (stubbed); the
    job trains on to its end, as SLURM stops it later with SIGTERM."""
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    scontrol = bin_folder / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "moe-mtl", "SLURM_NODEID": "0"}
    slurm |= {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "PATH": f"{bin_folder}:{os.environ['PATH']}"}
    done = fit(tmp_path, "run", signal_name="SIGUSR1", env=slurm)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    hpc = list(tmp_path.rglob("hpc_ckpt_*.ckpt"))
    assert len(hpc) == 1 and torch.load(hpc[0], weights_only=False)["global_step"] == SIGNAL_STEP
    assert not list(tmp_path.rglob("preempted-*.ckpt"))


def test_a_signal_during_validation_keeps_that_validation_and_the_resume_continues_in_its_run(tmp_path):
    """SIGTERM after the first batch of step 2's validation: the validation finishes, the checkpoint holds it, and
    the resume command the message prints continues in the same run folder (no version_1) to the same end state as an
    uninterrupted run, with step 2's dev score written, logged at step 2 and weighed for the best checkpoint."""
    trainer = {"max_steps": MAX_STEPS, "val_check_interval": 2, "limit_val_batches": 2}
    whole = fit(tmp_path / "whole", None, trainer=trainer)
    assert whole.returncode == 0, whole.stderr[-3000:]
    stopped = fit(tmp_path / "run", None, trainer=trainer, signal_name="SIGTERM", in_validation=True)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    resume = re.search(r"Resume with `moe-mtl fit \.\.\. (--ckpt_path \S+)`", stopped.stderr)
    assert resume is not None, stopped.stderr[-3000:]
    resumed = fit(tmp_path / "run", None, *resume[1].split(), trainer=trainer)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    runs = tmp_path / "run/runs/tiny"
    assert sorted(path.name for path in runs.iterdir()) == ["version_0"]
    run, reference = runs / "version_0", tmp_path / "whole/runs/tiny/version_0"
    for step in (2, 4):
        name = f"evaluation/val-epoch0-step{step}.json"
        assert json.loads((run / name).read_text()) == json.loads((reference / name).read_text())
    scalars, _ = event_values(run)
    assert [step for step, _ in scalars["val/score"]] == [2, 4]
    state = final_state(run / "checkpoints/last.ckpt")
    expected = final_state(reference / "checkpoints/last.ckpt")
    assert [name for name, value in state.items() if not torch.equal(value, expected[name])] == []
    saved = torch.load(run / "checkpoints/last.ckpt", weights_only=False)["callbacks"]
    (best,) = (s for key, s in saved.items() if key.startswith("ModelCheckpoint") and s["monitor"] == "val/score")
    scores = {
        step: json.loads((run / f"evaluation/val-epoch0-step{step}.json").read_text())["average"]["score"]
        for step in (2, 4)
    }
    assert float(best["best_model_score"]) == pytest.approx(max(scores.values()))
