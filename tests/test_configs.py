"""Every config in configs/ parses and runs; nothing downloads (a local tiny BART stands in for the hub).

Upcycle configs (`upcycle_*.yaml`) run `moe-mtl upcycle` as they are, with a local dense BART. Every other
config is a `moe-mtl fit` config: it prints, and it trains 2 steps on the CPU once shrunk to toy size
(`shrink`): every "facebook/bart-base" becomes a local tiny BART and its tokenizer, CrossFit data becomes a
tiny folder of the same layout, the skill suite and a new model get toy sizes; everything else is the file's
(`shrink` and `crossfit` live in tests/conftest.py, shared with tests/test_ddp_cli.py). Every baseline overlay
(`configs/baselines/*.yaml`) trains 2 steps over every shrunk fit config, and each ablation override and callback
group flag takes effect.
"""

import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from transformers import BartForConditionalGeneration

from moe_mtl import MoEBartForConditionalGeneration, MoEOptions
from moe_mtl.cli import main
from moe_mtl.commands.lightning import run_lightning
from moe_mtl.runs import checkpoint_fixed_routes
from moe_mtl.training import TemperatureAnnealing, TwoStageTraining
from moe_mtl.training.callbacks.clipping import GroupGradientClipping
from moe_mtl.training.schedules import temperature_at

from .conftest import BASELINES, CROSSFIT_TASKS, FIT_CONFIGS, UPCYCLE_CONFIGS, shrink, two_stage
from .models.conftest import tiny_bart_config


def test_there_are_configs():
    assert UPCYCLE_CONFIGS and FIT_CONFIGS


def is_subset(given: Any, printed: Any) -> bool:
    """Whether every value written in `given` is in `printed` (which adds defaults), recursively."""
    if isinstance(given, dict):
        return isinstance(printed, dict) and all(k in printed and is_subset(v, printed[k]) for k, v in given.items())
    if isinstance(given, list):
        return isinstance(printed, list) and len(given) == len(printed) and all(map(is_subset, given, printed))
    return given == printed


# --- upcycle configs -----------------------------------------------------------------------------


@pytest.mark.parametrize("config", UPCYCLE_CONFIGS, ids=lambda path: path.name)
def test_upcycle_config_prints_and_runs(config, tmp_path, capsys):
    with pytest.raises(SystemExit) as printed:
        main(["upcycle", "--config", str(config), "--print_config"])
    assert printed.value.code == 0
    printed_moe, file_moe = yaml.safe_load(capsys.readouterr().out)["moe"], yaml.safe_load(config.read_text())["moe"]
    assert printed_moe.items() >= file_moe.items()  # the file's values, plus defaults for the rest

    BartForConditionalGeneration(tiny_bart_config()).save_pretrained(tmp_path / "dense")
    main(["upcycle", "--config", str(config), f"--dense={tmp_path / 'dense'}", f"--output={tmp_path / 'moe'}"])
    saved = MoEBartForConditionalGeneration.from_pretrained(tmp_path / "moe").moe_options
    assert saved == MoEOptions(**yaml.safe_load(config.read_text())["moe"])


# --- fit configs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("config", FIT_CONFIGS, ids=lambda path: path.name)
def test_fit_config_prints(config, capsys):
    with pytest.raises(SystemExit) as printed:
        main(["fit", "--config", str(config), "--print_config"])
    assert printed.value.code == 0
    assert is_subset(yaml.safe_load(config.read_text()), yaml.safe_load(capsys.readouterr().out))


@pytest.mark.parametrize("config", FIT_CONFIGS, ids=lambda path: path.name)
def test_fit_config_trains_two_steps_into_stage_two(config, crossfit, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    original = yaml.safe_load(config.read_text())
    tiny = tmp_path / config.name
    tiny.write_text(yaml.safe_dump(shrink(original, tmp_path, crossfit)))
    main(["fit", "--config", str(tiny)])

    (run,) = (tmp_path / "runs").glob("*/version_0")
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["precision"] == original["trainer"].get(
        "precision"
    )
    checkpoint = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2
    if two_stage(original):
        assert checkpoint_fixed_routes(checkpoint) == original["two_stage"].get("routes", "argmax")
        assert checkpoint["callbacks"]["TwoStageTraining"]["switched_at"] == 1
    assert list(run.glob("evaluation/val-epoch*-step2.json"))
    if original["data"].get("source") == "crossfit":  # every task of the partition: seen, then dev, then test
        hparams = checkpoint["hyper_parameters"]
        assert hparams["task_names"] == list(CROSSFIT_TASKS)  # in the partition file's order
        assert hparams["task_metrics"] == [CROSSFIT_TASKS[name][1] for name in hparams["task_names"]]


# --- baselines (overlays after a fit config) and ablations (one override each) ----------------------------------


QUICKSTART = next(path for path in FIT_CONFIGS if path.name == "quickstart.yaml")  # the fast one, for ablations


def names(path) -> str:
    return path.stem


def shrunk_config(config, tmp_path, crossfit) -> str:
    """`config` shrunk to toy size (`shrink`), written next to the test's files; its path."""
    tiny = tmp_path / config.name
    tiny.write_text(yaml.safe_dump(shrink(yaml.safe_load(config.read_text()), tmp_path, crossfit)))
    return str(tiny)


def fit(args: list[str], max_steps: int = 2):
    """`moe-mtl fit *args` for `max_steps` steps without validation; the CLI object (config, model, trainer)."""
    return run_lightning(["fit", *args, f"--trainer.max_steps={max_steps}", "--trainer.limit_val_batches=0"])


def printed(args: list[str], capsys) -> dict:
    with pytest.raises(SystemExit) as done:
        main(["fit", *args, "--print_config"])
    assert done.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def only(callbacks: list, kind: type):
    (callback,) = [callback for callback in callbacks if isinstance(callback, kind)]  # exactly one: none runs twice
    return callback


@pytest.mark.parametrize("overlay", BASELINES, ids=names)
@pytest.mark.parametrize("config", FIT_CONFIGS, ids=names)
def test_baseline_overlay_over_a_fit_config_trains_two_steps(config, overlay, crossfit, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny, stated = shrunk_config(config, tmp_path, crossfit), yaml.safe_load(overlay.read_text())
    base = yaml.safe_load(Path(tiny).read_text())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = fit(["--config", tiny, "--config", str(overlay)])
    assert not [str(w.message) for w in caught if "which does nothing" in str(w.message)]  # the overlay resets them
    resolved = cli.config.fit.as_dict()
    assert is_subset(stated, resolved)  # the overlay's values win
    # the rest is the fit config's: `model.moe` and the callback groups merge field by field
    kept = {key: value for key, value in base["model"]["moe"].items() if key not in stated["model"]["moe"]}
    assert kept and is_subset(kept, resolved["model"]["moe"])
    assert is_subset({**base["two_stage"], **stated.get("two_stage", {})}, resolved["two_stage"])
    assert is_subset(base["temperature"], resolved["temperature"]) and is_subset(base["data"], resolved["data"])

    module, trainer = cli.model, cli.trainer
    options = module.model.moe_options
    assert asdict(options).items() >= stated["model"]["moe"].items() and trainer.global_step == 2
    switching = only(trainer.callbacks, TwoStageTraining).enabled
    task_routes = options.routing == "task" and options.routes == "learned"
    assert switching == task_routes  # the learned baseline keeps the fit config's two stages
    assert only(trainer.callbacks, TwoStageTraining).stage == (2 if switching else 1)
    logged = trainer.logged_metrics
    if task_routes:
        assert logged["train/stage"] == 2.0
    elif options.routing == "token":  # task-aware token gates: no task router, so no stage and no τ
        assert "train/stage" not in logged and "train/temperature" not in logged
        assert module.model.router is None and "train/aux_loss" in logged
    else:  # fixed routes: no router network, no stage, no τ, and the annealing left the router's τ alone
        assert "train/stage" not in logged and "train/temperature" not in logged
        assert module.model.router.temperature.item() == options.temperature
        assert not [name for name, _ in module.model.named_parameters() if ".router." in name]


# each ablation is one override; these two runs take several at once, each checked on its own
ABLATIONS = {
    "gumbel, heterogeneous batches, one lr, and the callback groups' flags": [
        "--model.moe.selection=gumbel",
        "--data.batching=heterogeneous",
        "--model.optim.two_speed_lr=false",
        "--two_stage.switch_step=2",
        "--temperature.start=3.0",
        "--temperature.rate=0.5",
        '--clipping.max_norms={"router": 0.5}',
    ],
    "softmax and one stage": ["--model.moe.selection=softmax", "--two_stage.switch_step=null"],
}


@pytest.mark.parametrize("overrides", ABLATIONS.values(), ids=ABLATIONS)
def test_ablation_overrides_take_effect(overrides, crossfit, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = fit(["--config", shrunk_config(QUICKSTART, tmp_path, crossfit), *overrides], max_steps=3)
    module, trainer, flags = cli.model, cli.trainer, dict(flag.split("=") for flag in overrides)
    assert trainer.global_step == 3
    switched = only(trainer.callbacks, TwoStageTraining).switched_at is not None
    # the options in effect: stage one's selection, then stage two's fixed routes
    assert module.hparams.moe["selection"] == ("argmax" if switched else flags["--model.moe.selection"])
    lrs = {group["group"]: group["initial_lr"] for group in trainer.optimizers[0].param_groups}  # before the schedule
    if "--model.optim.two_speed_lr" in flags:  # every group at `optim.lr`
        assert lrs["router"] == lrs["task_table"] == lrs["backbone"] == module.optim.lr
    else:  # the config's router_lr and task_lr, faster than `optim.lr`
        assert (lrs["router"], lrs["task_table"]) == (module.optim.router_lr, module.optim.task_lr)
        assert lrs["router"] > lrs["backbone"]
    if "--data.batching" in flags:  # tasks mixed within a batch, and learned routes train on them
        assert any(len(set(batch["task_ids"].tolist())) > 1 for batch in cli.datamodule.train_dataloader())
    annealing, two_stage_training = (
        only(trainer.callbacks, TemperatureAnnealing),
        only(trainer.callbacks, TwoStageTraining),
    )
    if "--clipping.max_norms" in flags:  # replaces the config's limits (backbone and router at 1.0)
        assert only(trainer.callbacks, GroupGradientClipping).max_norms == {"router": 0.5}
        assert "grad_norm/router" in trainer.logged_metrics and "grad_norm/backbone" not in trainer.logged_metrics
    if flags["--two_stage.switch_step"] == "null":  # one stage: nothing fixed, nothing frozen, and the log says so
        assert two_stage_training.stage == 1 and two_stage_training.switched_at is None
        assert all(param.requires_grad for param in module.parameters())
        assert module.model.router.selection == "softmax" and trainer.logged_metrics["train/stage"] == 1.0
    else:  # stage two from step 2; stage one ran at τ(0) = 3.0 and τ(1), and stage two (argmax) keeps τ(1)
        assert two_stage_training.switched_at == 2 and module.hparams["moe"]["freeze_router"]
        assert annealing.temperature == temperature_at(1, 3.0, 0.1, "exp", 0.5)
        assert module.model.router.temperature.item() == pytest.approx(annealing.temperature)


def test_two_stage_training_with_fixed_routes_names_the_override_that_turns_it_off(crossfit, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    expected = r"routes='random'\. Turn two-stage training off with `--two_stage\.switch_step null`"
    with pytest.raises(ValueError, match=expected):
        fit(["--config", shrunk_config(QUICKSTART, tmp_path, crossfit), "--model.moe.routes=random"])


def test_a_grouped_callback_also_in_trainer_callbacks_is_a_usage_error(crossfit, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = shrink(yaml.safe_load(QUICKSTART.read_text()), tmp_path, crossfit)
    twice = {"class_path": "moe_mtl.training.TwoStageTraining", "init_args": {"switch_step": 1}}
    config["trainer"]["callbacks"].append(twice)
    (tmp_path / "twice.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as error:
        main(["fit", "--config", str(tmp_path / "twice.yaml")])
    assert error.value.code == 2
    message = " ".join(capsys.readouterr().err.split())
    assert (
        "trainer.callbacks lists moe_mtl.training.TwoStageTraining, which the `two_stage` group already adds" in message
    )


def test_a_printed_config_round_trips(tmp_path, capsys):
    """What `--print_config` writes (and each run saves as config.yaml) parses back to itself, groups included."""
    overlay = next(path for path in BASELINES if path.stem == "random")
    flags = ["--two_stage.switch_epoch=3", "--temperature.rate=0.5"]
    first = printed(["--config", str(QUICKSTART), "--config", str(overlay), *flags], capsys)
    assert first["two_stage"]["switch_epoch"] == 3 and first["temperature"]["rate"] == 0.5
    assert first["model"]["moe"]["routes"] == "random"
    (tmp_path / "printed.yaml").write_text(yaml.safe_dump(first))
    assert printed(["--config", str(tmp_path / "printed.yaml")], capsys) == first
