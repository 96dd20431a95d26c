"""`moe-mtl analyze` (`moe_mtl.commands.analyze`) end to end on a tiny skill-suite run made by `moe-mtl fit`, and
its usage errors."""

import csv
import json
from pathlib import Path

import matplotlib.image
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from moe_mtl.analysis.run import RunFolder
from moe_mtl.cli import main
from moe_mtl.data import load_tasks
from moe_mtl.data.tasks import feature_table

from ..conftest import quiet_cpu_trainer
from ..models.conftest import TINY_BART
from ..training.conftest import TINY_SKILLS, _one_thread  # noqa: F401 (one torch thread, as in tests/analysis)


@pytest.fixture(scope="module")
def run(tmp_path_factory, skill_data_dir) -> Path:
    """A 4-step `moe-mtl fit` (soft learned routes, route tables at steps 2 and 4) over the session's tiny data."""
    root = tmp_path_factory.mktemp("analyze")
    config = {
        "seed_everything": 1,
        "trainer": quiet_cpu_trainer(
            (str(root / "runs"), "tiny"),
            max_steps=4,
            val_check_interval=2,
            limit_val_batches=2,
            log_every_n_steps=50,
            callbacks=[
                {
                    "class_path": "moe_mtl.training.RoutingMonitor",
                    "init_args": {"every_n_steps": 2, "heatmap_every_n_steps": 2},
                }
            ],
        ),
        "model": {
            "bart": TINY_BART,
            "moe": {"num_experts": 2, "task_dim": 8, "selection": "softmax"},
            "optim": {"lr": 1e-2, "router_lr": 1e-1},
            "evaluation": {"num_beams": 1},
        },
        "data": {
            "skills": TINY_SKILLS,
            "vocab_size": 300,
            "batch_size": 4,
            "max_target_length": 16,
            "output_dir": str(skill_data_dir),
        },
    }
    (root / "tiny.yaml").write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(root / "tiny.yaml")])
    return root / "runs/tiny/version_0"


def test_analyze_writes_the_figures_statistics_and_disabling_tables_and_prints_a_summary(run, capsys):
    limits = ["--layers", "[encoder.0]", "--max_examples", "1", "--tasks", "[reverse, evens-sum]"]
    main(["analyze", str(run), "--permutations", "200", "--disable", "true", *limits, "--accelerator", "cpu"])
    out = capsys.readouterr().out
    folder = run / "analysis"
    names = ["route_heatmap.png", "route_dynamics.png", "correlation.csv", "correlation.md", "skill_agreement.json"]
    assert f"wrote {', '.join([*names, 'disabling.csv', 'disabling.md'])}" in out
    assert "analysed" in out and "at step 4: 34 seen tasks" in out

    heatmap = matplotlib.image.imread(folder / "route_heatmap.png")
    assert heatmap.shape[0] > 34 * 8 and heatmap[..., :3].std() > 0.05  # a row per seen task, drawn

    with open(folder / "correlation.csv") as file:
        rows = list(csv.DictReader(file))
    markdown = (folder / "correlation.md").read_text()
    assert f"{len(rows)} Pearson tests" in markdown and f"({len(rows)} Pearson tests" not in markdown
    features = {row["feature"] for row in rows}
    assert {"families=aggregate", "output_type=label", "skills=sum"} <= features
    assert {row["usage"] for row in rows} <= {
        f"{layer}/expert{e}" for layer in RunFolder(run, None).route_record()["layers"] for e in (0, 1)
    }
    # every feature column of the 34 seen tasks is tested, or named as not tested
    seen = [task for task in load_tasks("skills", skills=TINY_SKILLS) if task.partition == "train"]
    train = {task.name for task in seen}
    not_tested = "\n".join(line for line in markdown.splitlines() if line.startswith("- not tested"))
    assert all(name in features or name in not_tested for name in feature_table(seen)[0])

    agreement = json.loads((folder / "skill_agreement.json").read_text())
    assert agreement["feature"] == "skills"
    assert agreement["pairs_sharing"] + agreement["pairs_not_sharing"] == 34 * 33 // 2
    assert 0 < agreement["p_permutation"] <= 1 and agreement["permutations"] == 200
    assert agreement["argmax"]["pairs_sharing"] == agreement["pairs_sharing"]
    # of the argmax routes: the fraction of layers where two tasks pick the same expert, over pairs sharing a skill
    record = RunFolder(run, None).route_record()
    skills_of = {task.name: task.features["skills"] for task in load_tasks("skills", skills=TINY_SKILLS)}
    tables = zip(record["tasks"], record["routes"], strict=True)
    chosen = [(skills_of[name], torch.tensor(r).argmax(-1)) for name, r in tables if name in train]
    same = [
        (a == b).float().mean().item()
        for i, (sa, a) in enumerate(chosen)
        for sb, b in chosen[i + 1 :]
        if set(sa) & set(sb)
    ]
    assert agreement["argmax"]["sharing"] == pytest.approx(sum(same) / len(same))
    assert f"{agreement['sharing']:.3f} for pairs sharing a skill" in out

    with open(folder / "disabling.csv") as file:
        disabling = list(csv.DictReader(file))
    assert sorted((row["task"], row["expert"]) for row in disabling) == [
        ("evens-sum", "0"),
        ("evens-sum", "1"),
        ("reverse", "0"),
        ("reverse", "1"),
    ]
    for row in disabling:
        assert float(row["drop"]) == pytest.approx(float(row["intact"]) - float(row["score"]))
    assert "## Mean drop per family group" in (folder / "disabling.md").read_text()
    assert "evaluations; largest drop" in out and "expert disabling (" in out and ": 3 evaluations" in out
    assert not list((run / "evaluation").glob("val-epoch0-step0*"))  # the run's own evaluations are untouched


def test_analyze_a_checkpoint_at_a_chosen_step_grouped_by_output_type(run, tmp_path, capsys):
    (checkpoint,) = (run / "checkpoints").glob("best-*.ckpt")
    main(["analyze", str(checkpoint), "--step", "2", "--group_by", "output_type", "--output_dir", str(tmp_path)])
    assert "at step 2: 34 seen tasks" in capsys.readouterr().out
    assert (tmp_path / "route_heatmap.png").is_file() and not (tmp_path / "disabling.csv").exists()
    assert RunFolder.resolve(checkpoint).path == run
    # without --step: the routes of the checkpoint named, at its step
    step = int(checkpoint.stem.removeprefix("best-step"))
    main(["analyze", str(run), "--ckpt_path", str(checkpoint), "--output_dir", str(tmp_path), "--permutations", "10"])
    assert f"at step {step}: 34 seen tasks" in capsys.readouterr().out


def test_the_tensorboard_route_map_is_the_labelled_figure(run):
    events = EventAccumulator(str(run), size_guidance={"images": 0})
    events.Reload()
    images = events.Images("routing/route_map")
    assert [image.step for image in images] == [2, 4]
    # the numpy fallback is T·8 × (L·E·8 + L − 1) pixels; the figure is larger, with room for labels
    assert images[-1].height > 48 * 8 and images[-1].width > 4 * 2 * 8 + 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--group_by", "colour"], "group_by: no task has the feature 'colour'; available: ['domain', 'families'"),
        (["--step", "3"], "step: no route table at step 3"),
    ],
)
def test_bad_options_are_usage_errors(run, args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as stopped:
        main(["analyze", str(run), "--output_dir", str(tmp_path), *args])
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


def test_a_missing_run_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["analyze", str(tmp_path / "nowhere")])
    assert stopped.value.code == 2
    assert "nowhere does not exist; give a run folder" in capsys.readouterr().err
