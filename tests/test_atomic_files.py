"""Writes that fail midway leave the previous file whole: checkpoints (Lightning's writer) and moe_mtl's own files
(`atomic_path`), each made to fail by a real file-size limit (RLIMIT_FSIZE) in a subprocess."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from moe_mtl.atomic_files import atomic_path

# Writes a file once, then again under a file-size limit below the new contents' size: the second write fails
# with EFBIG partway through. Prints the error it got.
FAILING_WRITE = textwrap.dedent(
    """
    import resource, signal, sys
    from pathlib import Path

    import torch
    from lightning.pytorch import LightningModule, Trainer

    from moe_mtl.runs import write_predictions, write_route_table

    folder = Path(sys.argv[1])

    class Small(LightningModule):
        def __init__(self, width):
            super().__init__()
            self.layer = torch.nn.Linear(width, width)

    def writes(width, rows):
        trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.strategy.connect(Small(width))
        trainer.save_checkpoint(folder / "model.ckpt")  # what ModelCheckpoint and the preemption callback call
        write_route_table(folder / "routes/step1.json", {"step": 1, "routes": list(range(rows))})
        write_predictions(folder / "predictions", {"qa": [{"prediction": "x" * 100}] * rows})

    writes(4, 1)  # small and whole
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit raises OSError (EFBIG) instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, resource.RLIM_INFINITY))
    for step in ("checkpoint", "tables"):
        try:
            writes(400, 1) if step == "checkpoint" else writes(4, 100_000)
        except OSError as error:
            print(step, "failed:", error.strerror)
    """
)


@pytest.mark.slow
def test_a_write_that_fails_midway_leaves_the_previous_file_whole(tmp_path):
    done = subprocess.run([sys.executable, "-c", FAILING_WRITE, str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[:2] == ["checkpoint failed: File too large", "tables failed: File too large"]
    checkpoint = torch.load(tmp_path / "model.ckpt", weights_only=False)
    assert checkpoint["state_dict"]["layer.weight"].shape == (4, 4)  # the first, small model's
    assert json.loads((tmp_path / "routes/step1.json").read_text())["routes"] == [0]
    assert (tmp_path / "predictions/qa.jsonl").read_text().count("\n") == 1
    leftovers = [path.name for path in tmp_path.rglob("*") if path.name.startswith(".") or path.suffix == ".tmp"]
    assert leftovers == []  # no temporary file left behind


def test_atomic_path_replaces_only_on_success(tmp_path):
    target = tmp_path / "sub/file.txt"
    with atomic_path(target) as temp:
        temp.write_text("first")
    assert target.read_text() == "first"
    with pytest.raises(RuntimeError, match="mid-write"), atomic_path(target) as temp:
        temp.write_text("half")
        raise RuntimeError("mid-write")
    assert target.read_text() == "first" and sorted(p.name for p in target.parent.iterdir()) == ["file.txt"]
