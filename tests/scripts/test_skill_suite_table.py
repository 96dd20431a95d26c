"""scripts/skill_suite_table.py: the table's whole pipeline on the tiny preset, its resume and its overrides."""

import json

import pytest
import yaml


@pytest.mark.slow
def test_the_skill_suite_table_runs_every_step_end_to_end_and_resumes(load_script, tmp_path):
    table = load_script("skill_suite_table")
    args = ["--preset", "tiny", "--out", str(tmp_path / "runs"), "--docs", str(tmp_path / "docs"), "--seeds", "0"]
    args += ["--kshot_seeds", "100", "--methods", "vanilla", "learned", "--fewshot_tasks", "odds-sum"]
    table.main([*args, "--jobs", "2"])  # each (method, seed) pipeline in a worker process, two at a time
    assert sorted(p.name for p in (tmp_path / "runs" / "logs").iterdir()) == ["learned-seed0.log", "vanilla-seed0.log"]
    assert json.loads((tmp_path / "runs" / "run.json").read_text())["cpu_minutes"] > 0  # the workers' CPU time counts
    rows = (tmp_path / "docs" / "table.md").read_text()
    assert "| vanilla | 1 |" in rows and "| learned | 1 |" in rows
    learned = tmp_path / "runs" / "learned" / "seed0"
    assert list((learned / "zeroshot" / "evaluation").glob("test-*.json"))
    assert (learned / "fewshot" / "fewshot.csv").read_text().count("odds-sum") == 1
    assert (tmp_path / "docs" / "route_heatmap.png").stat().st_size > 0
    assert "| 0 | " in (tmp_path / "docs" / "routes.md").read_text()  # the learned run's entropy and agreement
    stamp = (learned / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    table.main(args)  # everything finished: nothing is trained again (here in this process, one after another)
    assert (learned / "checkpoints" / "last.ckpt").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_the_skill_suite_table_takes_overrides_for_every_run_and_can_train_seen_tasks_only(load_script, tmp_path):
    table = load_script("skill_suite_table")
    out = tmp_path / "runs"
    args = ["--preset", "tiny", "--out", str(out), "--seeds", "0", "--methods", "learned", "--seen_only"]
    table.main([*args, "--steps", "6", "--set=--two_stage.switch_step=3"])
    run = out / "learned" / "seed0"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["two_stage"]["switch_step"] == 3 and config["trainer"]["max_steps"] == 6
    assert not (run / "zeroshot").exists() and not (run / "fewshot").exists()
    assert "| 0 | " in (out / "routes.md").read_text()  # the route record before the overridden switch step
    with pytest.raises(SystemExit):
        table.main([*args, "--jobs", "0"])
