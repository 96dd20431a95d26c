"""`moe-mtl analyze` (`moe_mtl.commands.analyze`) end to end on tiny runs made by `moe-mtl fit`: of the skill suite,
and of a CrossFit-layout suite whose tasks.json features have names of their own; and its usage errors."""

import csv
import json
import shutil
from pathlib import Path

import matplotlib.image
import pytest
import torch
import yaml
from scipy import stats
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
    assert (agreement["feature"], agreement["given"], agreement["tasks_without_feature"]) == ("skills", False, [])
    # the suite's own features, by the rule for any data: the first categorical (grouping) and list (skills) written
    assert "group_by: output_type (chosen from the data: a categorical feature, 3 groups of the 34 tasks;" in out
    assert "skill_feature: skills (chosen from the data: a list feature, " in out
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
    assert "## Mean drop per output_type group" in (folder / "disabling.md").read_text()  # chosen from the data
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


def test_a_run_without_route_tables_is_analysed_and_says_the_dynamics_are_not_drawn(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("routes"))  # as a fit without RoutingMonitor leaves it
    main(["analyze", str(copy), "--output_dir", str(tmp_path / "out"), "--permutations", "10"])
    printed = capsys.readouterr().out
    assert "learning dynamics: not drawn, the run saved no route tables" in printed
    assert (tmp_path / "out" / "route_heatmap.png").is_file() and not (tmp_path / "out" / "route_dynamics.png").exists()


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
        (["--skill_feature", "num_skills"], "skill_feature: 'num_skills' is a numeric feature; tasks share skills by "),
        # read only by the disabling evaluations: without --disable they would do nothing
        (["--max_examples", "5"], "--max_examples 5: only the expert-disabling evaluations read it; add --disable"),
        (["--accelerator", "cpu"], "--accelerator cpu: only the expert-disabling evaluations read it;"),
    ],
)
def test_bad_options_are_usage_errors(run, args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as stopped:
        main(["analyze", str(run), "--output_dir", str(tmp_path), *args])
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # checked before anything is written


def test_a_missing_run_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["analyze", str(tmp_path / "nowhere")])
    assert stopped.value.code == 2
    assert "nowhere does not exist; give a run folder" in capsys.readouterr().err


# --- a suite that is not the skill suite: CrossFit's layout, the user's own feature names -------------------

# task → (family, operation or None); every feature as a user's tasks.json might write it: booleans only where they
# apply (`binary`), or both ways (`multiple_choice`), one true everywhere (`english`), a number on some (`num_labels`)
CROSSFIT_FEATURES = {
    "glue-sst2": ("classification", "label"),
    "glue-qqp": ("classification", "label"),
    "imdb": ("classification", "label"),
    "emotion": ("classification", None),
    "squad": ("qa", "extract"),
    "quoref": ("qa", "extract"),
    "ai2_arc": ("qa", "choose"),
    "aeslc": ("generation", "rewrite"),
    "gigaword": ("generation", "rewrite"),
}
HELD_OUT = "wiki_qa"


def crossfit_features(name: str) -> dict:
    family, operation = CROSSFIT_FEATURES.get(name, ("classification", "label"))
    features = {"family": family}
    if operation is not None:
        features["operation"] = operation
    if name in ("glue-sst2", "glue-qqp", "imdb"):
        features["binary"] = True
    features["multiple_choice"] = name == "ai2_arc"
    features["english"] = True
    if family == "classification":
        features["num_labels"] = 6 if name == "emotion" else 2
    return features


@pytest.fixture(scope="module")
def crossfit_run(tmp_path_factory) -> Path:
    """A 4-step `moe-mtl fit` over a CrossFit-layout folder whose tasks.json has features of its own (no `skills`,
    no `families`); soft learned routes, route tables at steps 2 and 4."""
    root = tmp_path_factory.mktemp("analyze_crossfit")
    data_dir = root / "data"
    info = {}
    for name in [*CROSSFIT_FEATURES, HELD_OUT]:
        (data_dir / name).mkdir(parents=True)
        for split in ("train", "dev", "test"):
            lines = [f"{name} {split} question {i}\tanswer {i % 3}" for i in range(6)]
            (data_dir / name / f"{name}_16_100_{split}.tsv").write_text("\n".join(lines) + "\n")
        partition = "test" if name == HELD_OUT else "train"
        info[name] = {"metric": "EM", "partition": partition, "features": crossfit_features(name)}
    (data_dir / "tasks.json").write_text(json.dumps(info, indent=1))
    config = {
        "seed_everything": 1,
        "trainer": quiet_cpu_trainer(
            (str(root / "runs"), "tiny"),
            max_steps=4,
            val_check_interval=2,
            limit_val_batches=2,
            log_every_n_steps=50,
            callbacks=[{"class_path": "moe_mtl.training.RoutingMonitor", "init_args": {"every_n_steps": 2}}],
        ),
        "model": {
            "bart": TINY_BART,
            "moe": {"num_experts": 2, "task_dim": 8, "selection": "softmax"},
            "optim": {"lr": 1e-2, "router_lr": 1e-1},
            "evaluation": {"num_beams": 1},
        },
        "data": {
            "source": "crossfit",
            "data_dir": str(data_dir),
            "fewshot_seed": 100,
            "vocab_size": 300,
            "batch_size": 4,
            "max_target_length": 8,
            "output_dir": str(root / "prepared"),
        },
    }
    (root / "tiny.yaml").write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(root / "tiny.yaml")])
    return root / "runs/tiny/version_0"


def seen_routes(run: Path) -> dict[str, torch.Tensor]:
    """The seen tasks' routes (L, E) of the last saved route table, by task name."""
    record = RunFolder(run, None).route_record()
    return {
        name: torch.tensor(r) for name, r in zip(record["tasks"], record["routes"], strict=True) if name != HELD_OUT
    }


def test_analyze_with_its_defaults_reads_a_crossfit_suites_own_features_and_says_what_it_chose(crossfit_run, capsys):
    main(["analyze", str(crossfit_run), "--permutations", "200"])
    out = capsys.readouterr().out
    folder = crossfit_run / "analysis"
    assert "at step 4: 9 seen tasks" in out
    # in the order written: CrossFit's tasks by name, aeslc first (no `binary`)
    kinds = "categorical: family, operation; boolean: multiple_choice, english, binary; numeric: num_labels"
    assert f"task features: {kinds}\n" in out
    assert "group_by: family (chosen from the data: a categorical feature, 3 groups of the 9 tasks; " in out
    # operation: on 8 of the 9 tasks, so family (on all) defines the shared skill; 6 + 3 + 1 pairs share a family
    assert (
        "skill_feature: family (chosen from the data: a categorical feature, 10 of 36 task pairs share a value" in out
    )
    names = ["route_heatmap.png", "route_dynamics.png", "correlation.csv", "correlation.md", "skill_agreement.json"]
    assert f"wrote {', '.join(names)}" in out
    assert matplotlib.image.imread(folder / "route_heatmap.png")[..., :3].std() > 0.05

    # booleans and categories as indicator columns; each r is scipy's of the indicator and the expert's usage
    with open(folder / "correlation.csv") as file:
        rows = list(csv.DictReader(file))
    tested = {row["feature"] for row in rows}
    assert {"binary=true", "multiple_choice=true", "multiple_choice=false", "family=qa", "operation=extract"} <= tested
    assert "english=true" not in tested and "num_labels" not in tested
    assert "constant feature: english=true" in out and "feature with missing values: num_labels" in out
    markdown = (folder / "correlation.md").read_text()
    assert "not tested, constant feature: 1 (english=true)" in markdown
    routes = seen_routes(crossfit_run)
    layers = RunFolder(crossfit_run, None).route_record()["layers"]
    binary = [float("binary" in crossfit_features(name)) for name in routes]
    checked = [row for row in rows if row["feature"] == "binary=true"]
    assert len(checked) == 2 * len(layers)  # every expert's usage is tested
    for row in checked:
        layer, expert = row["usage"].split("/expert")
        usage = [r[layers.index(layer), int(expert)].item() for r in routes.values()]
        assert float(row["r"]) == pytest.approx(stats.pearsonr(binary, usage).statistic)

    # route agreement of pairs in one family vs pairs in two: 1 − the mean total variation over layers
    agreement = json.loads((folder / "skill_agreement.json").read_text())
    assert (agreement["feature"], agreement["given"], agreement["tasks"]) == ("family", False, 9)
    assert (agreement["pairs_sharing"], agreement["pairs_not_sharing"]) == (10, 26)
    family = {name: crossfit_features(name)["family"] for name in routes}
    pairs = [(a, b) for i, a in enumerate(routes) for b in list(routes)[i + 1 :]]
    same = [1 - 0.5 * (routes[a] - routes[b]).abs().sum(-1).mean().item() for a, b in pairs if family[a] == family[b]]
    assert agreement["sharing"] == pytest.approx(sum(same) / len(same))
    assert f"route–skill agreement (family): {agreement['sharing']:.3f} for pairs sharing a skill" in out


def test_analyze_of_a_crossfit_suite_by_features_the_user_names(crossfit_run, tmp_path, capsys):
    limits = ["--layers", "[encoder.0]", "--max_examples", "1", "--tasks", "[imdb, squad]", "--accelerator", "cpu"]
    args = ["--group_by", "operation", "--skill_feature", "operation", "--permutations", "50", "--disable", "true"]
    main(["analyze", str(crossfit_run), "--output_dir", str(tmp_path), *args, *limits])
    out = capsys.readouterr().out
    assert "group_by: operation (given; 1 of the 9 tasks lack it)" in out
    assert "skill_feature: operation (given; 1 of the 9 tasks lack it)" in out
    assert "left out of the agreement, without 'operation': ['emotion']" in out
    agreement = json.loads((tmp_path / "skill_agreement.json").read_text())
    assert (agreement["tasks"], agreement["tasks_without_feature"]) == (8, ["emotion"])
    assert agreement["pairs_sharing"] + agreement["pairs_not_sharing"] == 8 * 7 // 2
    assert agreement["pairs_sharing"] == 3 + 1 + 1  # label ×3, extract ×2, rewrite ×2
    disabling = (tmp_path / "disabling.md").read_text()
    assert "## Mean drop per operation group" in disabling
    assert "| encoder.0 | 0 | label | 1 |" in disabling and "| encoder.0 | 0 | extract | 1 |" in disabling


def test_a_crossfit_suite_without_features_is_analysed_and_the_steps_skipped_say_why(crossfit_run, tmp_path, capsys):
    # the same run, its tasks.json now metrics and partitions only
    run = tmp_path / "run"
    shutil.copytree(crossfit_run, run, ignore=shutil.ignore_patterns("analysis", "checkpoints"))
    config = yaml.safe_load((run / "config.yaml").read_text())
    bare = {name: {"metric": "EM", "partition": "test" if name == HELD_OUT else "train"} for name in routes_of(run)}
    (tmp_path / "bare.json").write_text(json.dumps(bare))
    config["data"]["task_info"] = str(tmp_path / "bare.json")
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    main(["analyze", str(run), "--permutations", "10"])
    out = capsys.readouterr().out
    assert "task features: none" in out
    assert f"  left out, not seen in training: 1 task(s) of the route table ({HELD_OUT})" in out
    assert "group_by: none (no categorical, list, boolean feature puts the 9 tasks in 2 to 8 groups; " in out
    assert "route–skill agreement: not measured (no list or categorical feature by which some task pairs" in out
    agreement = json.loads((run / "analysis/skill_agreement.json").read_text())
    assert agreement["feature"] is None and agreement["skipped"].startswith("no list or categorical feature")
    assert "0 Pearson tests" in (run / "analysis/correlation.md").read_text()
    assert (run / "analysis/route_heatmap.png").is_file()


def routes_of(run: Path) -> list[str]:
    return RunFolder(run, None).route_record()["tasks"]
