"""`moe_mtl.runs`: the checkpoint of a run, the upstream run of the model option `transfer.init_from` (its weights
mapped by task name, the options that apply, the errors of a run that cannot start from it), route-table files."""

import csv
import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer

from moe_mtl import MoEOptions
from moe_mtl.evaluation.task_evaluation import TaskEvaluation
from moe_mtl.models.conversion import TASK_TABLE_KEY
from moe_mtl.representations.files import load_representations
from moe_mtl.runs import (
    evaluation_stem,
    read_upstream,
    resolve_checkpoint,
    resume_mismatch,
    route_table_record,
    write_evaluation,
    write_predictions,
    write_route_table,
)
from moe_mtl.training import MoEMultiTaskModule

from .training.conftest import tiny_data, tiny_module, tiny_trainer

PER_TASK = ("task_table.", "override_", "fixed_routes", "router.temperature")


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> Path:
    """The checkpoint of a 2-step fit over the skill suite's training tasks (2 experts, task_dim 8)."""
    root = tmp_path_factory.mktemp("upstream")
    data = tiny_data(root / "data")
    module = tiny_module(data, bart={"encoder_layers": 1, "decoder_layers": 1})
    trainer = Trainer(**tiny_trainer(root, max_steps=2))
    trainer.fit(module, datamodule=data)
    trainer.save_checkpoint(root / "upstream.ckpt")
    return root / "upstream.ckpt"


def downstream(
    upstream: Path, names: list[str], moe: dict | None = None, bart: dict | None = None, **transfer
) -> MoEMultiTaskModule:
    """A module over the tasks `names` started from `upstream` (the options the CLI would link, set by hand);
    `transfer`: `TransferOptions` fields besides init_from."""
    hparams = read_upstream(upstream).hparams
    return MoEMultiTaskModule(
        bart=bart,
        moe=MoEOptions(**{**(moe or {}), "num_tasks": len(names)}),
        transfer={"init_from": str(upstream), **transfer},
        task_names=names,
        task_partitions=["test"] * len(names),
        task_metrics=["EM"] * len(names),
        tokenizer_size=hparams["tokenizer_size"],
        pad_token_id=hparams["pad_token_id"],
        tokenizer_path=hparams["tokenizer_path"],
    )


def upstream_split(upstream: Path) -> tuple[list[str], list[str]]:
    """(trained, untrained) task names of the upstream run."""
    run = read_upstream(upstream)
    trained = run.trained_tasks
    return trained, [name for name in run.task_names if name not in trained]


def test_a_run_folder_resolves_to_its_single_best_checkpoint_else_last(tmp_path):
    checkpoints = tmp_path / "run/checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "last.ckpt").touch()
    assert resolve_checkpoint(tmp_path / "run") == checkpoints / "last.ckpt"
    (checkpoints / "best-step4.ckpt").touch()
    assert resolve_checkpoint(tmp_path / "run") == checkpoints / "best-step4.ckpt"
    assert resolve_checkpoint(checkpoints / "last.ckpt") == checkpoints / "last.ckpt"
    (checkpoints / "best-step8.ckpt").touch()
    with pytest.raises(
        ValueError, match=r"2 best checkpoints .* \['best-step4.ckpt', 'best-step8.ckpt', 'last.ckpt'\]"
    ):
        resolve_checkpoint(tmp_path / "run")
    with pytest.raises(ValueError, match=r"no best-step\*.ckpt and no last.ckpt .*found: no .ckpt file"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        resolve_checkpoint(tmp_path / "missing")


def test_trained_rows_are_mapped_by_task_name_and_every_other_weight_is_copied(upstream):
    trained, untrained = upstream_split(upstream)
    names = [*reversed(trained[:5]), untrained[0], "a-task-new-to-the-table"]
    module = downstream(upstream, names, unseen_routes="average")
    run = read_upstream(upstream)
    table = module.model.task_table.embedding.weight
    for i, name in enumerate(names[:5]):  # seen rows: bitwise the upstream ones, whatever their new ids
        assert torch.equal(table[i], run.state_dict[TASK_TABLE_KEY][run.task_names.index(name)])
    state = module.model.state_dict()
    for key, value in run.state_dict.items():
        if not any(part in key for part in PER_TASK):
            assert torch.equal(state[key], value), key
    router = module.model.router
    assert router.override_mask.tolist() == [False] * 5 + [True, True]  # the untrained row and the new task
    routes = module.route_table()
    torch.testing.assert_close(routes[5:], torch.full_like(routes[5:], 0.5))
    assert all(m.training for m in module.model.modules())
    assert module.hparams.bart == run.hparams["bart"]


@pytest.mark.parametrize("seed", [0, 1])
def test_random_routes_of_unseen_tasks_are_seeded_one_hot(upstream, seed):
    trained, untrained = upstream_split(upstream)
    names = [trained[0], *untrained[:6]]
    routes = [downstream(upstream, names, unseen_routes="random", moe={"route_seed": seed}).route_table() for _ in "ab"]
    assert torch.equal(routes[0], routes[1])
    assert torch.equal(routes[0][1:].max(-1).values, torch.ones(6, routes[0].shape[1]))
    other = downstream(upstream, names, unseen_routes="random", moe={"route_seed": seed + 10}).route_table()
    assert not torch.equal(other[1:], routes[0][1:])


def test_learned_rows_start_at_the_mean_of_the_trained_rows_and_alone_get_gradient(upstream):
    trained, untrained = upstream_split(upstream)
    names = [trained[0], untrained[0]]
    module = downstream(upstream, names, unseen_routes="learned", moe={"selection": "gumbel_st"})
    run = read_upstream(upstream)
    rows = run.state_dict[TASK_TABLE_KEY][[run.task_names.index(n) for n in trained]]
    table = module.model.task_table.embedding.weight
    torch.testing.assert_close(table[1], rows.mean(0))
    batch = torch.randint(3, 50, (2, 6))
    out = module.model(input_ids=batch, decoder_input_ids=batch, task_ids=torch.tensor([1, 1]))
    out.logits.logsumexp(-1).mean().backward()
    assert table.grad[1].abs().sum() > 0 and not table.grad[0].any()
    assert all(p.grad is None and not p.requires_grad for p in module.model.router.parameters())
    with pytest.raises(ValueError, match="'argmax' passes no gradient"):
        downstream(upstream, names, unseen_routes="learned", moe={"selection": "argmax"})


def test_finetune_task_table_trains_the_task_table_only(upstream):
    trained, untrained = upstream_split(upstream)
    module = downstream(upstream, [trained[0], untrained[0]], unseen_routes="learned", finetune="task_table")
    trainable = [name for name, p in module.model.named_parameters() if p.requires_grad]
    assert trainable == [TASK_TABLE_KEY]


def test_representation_files_give_unseen_rows_directly_or_the_nearest_seen_row(upstream, tmp_path):
    trained, untrained = upstream_split(upstream)
    names = [trained[0], trained[1], untrained[0]]
    vectors = torch.tensor([[1.0, 0, 0, 0, 0, 0, 0, 0], [0, 1.0, 0, 0, 0, 0, 0, 0], [0.1, 3.0, 0, 0, 0, 0, 0, 1]])
    path = tmp_path / "vectors.pt"
    torch.save({"task_names": names, "vectors": vectors}, path)
    nearest = downstream(upstream, names, unseen_routes="nearest", representation=str(path))
    table = nearest.model.task_table.embedding.weight
    assert torch.equal(table[2], table[1])  # cosine: the second seen task, whatever the scale
    direct = downstream(upstream, names, unseen_routes="representation", representation=str(path))
    assert torch.equal(direct.model.task_table.embedding.weight[2], vectors[2])
    torch.save({"task_names": names, "vectors": vectors[:, :5]}, path)
    with pytest.raises(ValueError, match="width 5, the task table task_dim=8"):
        downstream(upstream, names, unseen_routes="representation", representation=str(path))
    torch.save({"task_names": names[:2], "vectors": vectors[:2]}, path)
    with pytest.raises(ValueError, match=f"no vector for tasks {untrained[0]}"):
        downstream(upstream, names, unseen_routes="nearest", representation=str(path))


@pytest.mark.parametrize("source", ["representation", "nearest"])
def test_computed_text_representations_route_the_unseen_tasks_when_the_data_is_set_up(upstream, tmp_path, source):
    hparams = read_upstream(upstream).hparams
    data = tiny_data(tmp_path / "data", tokenizer=hparams["tokenizer_path"])
    data.prepare_data()
    module = downstream(upstream, list(data.task_names), unseen_routes=source, representation="text")
    module.task_partitions = list(data.task_partitions)
    before = module.model.task_table.embedding.weight.detach().clone()
    Trainer(**tiny_trainer(tmp_path)).validate(module, datamodule=data, verbose=False)  # setup assigns the routes
    table = module.model.task_table.embedding.weight
    unseen = [i for i, name in enumerate(data.task_names) if name not in read_upstream(upstream).trained_tasks]
    seen = [i for i in range(len(data.task_names)) if i not in unseen]
    assert unseen and torch.equal(table[seen], before[seen])  # trained rows are kept
    (cached,) = (tmp_path / "data" / "representations").glob("*.pt")  # computed once, with the model's encoder
    vectors = load_representations(cached, list(data.task_names))
    if source == "representation":  # the row is the task's text representation, projected to task_dim
        assert vectors.shape[1] == table.shape[1]
        torch.testing.assert_close(table[unseen], vectors[unseen])
    else:  # the row of the seen task whose representation is nearest by cosine
        similarity = F.normalize(vectors[unseen], dim=1) @ F.normalize(vectors[seen], dim=1).T
        nearest = torch.tensor(seen)[similarity.argmax(1)]
        assert torch.equal(table[unseen], before[nearest])
    assert module._unseen is None  # assigned once: a second setup keeps them
    Trainer(**tiny_trainer(tmp_path)).validate(module, datamodule=data, verbose=False)
    assert torch.equal(module.model.task_table.embedding.weight, table)


@pytest.mark.parametrize("kept_by", ["options", "earlier-checkpoint"])
def test_a_fit_that_would_learn_an_upstream_runs_fixed_routes_again_is_warned(upstream, tmp_path, kept_by):
    checkpoint = torch.load(upstream, map_location="cpu", weights_only=True)
    if kept_by == "options":  # as TwoStageTraining leaves them at the switch
        moe = checkpoint["hyper_parameters"]["moe"]
        moe.update(selection="argmax", freeze_router=True, freeze_task_table=True)
    else:  # an earlier moe-mtl kept stage two apart from the options
        checkpoint["moe_mtl"] = {**checkpoint.get("moe_mtl", {}), "stage": 2, "stage_info": {"routes": "argmax"}}
    fixed = tmp_path / "stage_two.ckpt"
    torch.save(checkpoint, fixed)
    assert read_upstream(fixed).stage_routes == "argmax" and read_upstream(upstream).stage_routes is None
    data = tiny_data(tmp_path / "data", tokenizer=read_upstream(upstream).hparams["tokenizer_path"])
    names = list(data.task_names)
    trainer = dict(tiny_trainer(tmp_path, max_steps=1), limit_train_batches=1)
    relearning = downstream(fixed, names, moe={"selection": "gumbel_st"}, unseen_routes="average")
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        Trainer(**trainer).validate(relearning, datamodule=data, verbose=False)
    assert not [w for w in said if "ended in stage two" in str(w.message)]  # evaluation does not change routes
    with pytest.warns(UserWarning, match=r"ended in stage two.* set moe.selection 'argmax', moe.freeze_router true"):
        Trainer(**trainer).fit(relearning, datamodule=data)
    kept = {"selection": "argmax", "freeze_router": True, "freeze_task_table": True}
    assert downstream(fixed, names, moe=kept, unseen_routes="average")._relearned_routes is None
    learned = downstream(fixed, names, moe={"selection": "gumbel_st"}, unseen_routes="learned")  # the router stays
    assert learned._relearned_routes is None


def test_runs_that_cannot_start_from_the_upstream_one_are_errors(upstream):
    trained, _ = upstream_split(upstream)
    with pytest.raises(ValueError, match=r"`num_experts` is 4, but the upstream run .* has 2: it shapes the weights"):
        downstream(upstream, trained[:2], moe={"num_experts": 4})
    with pytest.raises(ValueError, match="init_from with a mismatched vocabulary: the data's tokenizer has 301"):
        MoEMultiTaskModule(
            moe=MoEOptions(num_tasks=1),
            transfer={"init_from": str(upstream)},
            task_names=trained[:1],
            tokenizer_size=301,
        )
    with pytest.raises(
        ValueError, match=r"`bart` is .*with `transfer.init_from` the architecture is the upstream run's"
    ):
        downstream(upstream, trained[:2], bart={"d_model": 32})
    with pytest.raises(
        ValueError, match=r"`task_embeddings` is 'vectors.pt', but with `transfer.init_from` the task table"
    ):
        downstream(upstream, trained[:2], moe={"task_embeddings": "vectors.pt"})


def test_a_fit_resume_on_other_tasks_or_with_no_steps_left_is_named(upstream):
    checkpoint = torch.load(upstream, map_location="cpu", weights_only=True)
    data = dict(checkpoint["datamodule_hyper_parameters"])
    assert resume_mismatch(checkpoint, data, max_steps=10) is None
    assert "`train_partitions` is ['test'], but the checkpoint's run has ['train']" in resume_mismatch(
        checkpoint, {**data, "train_partitions": "test"}, max_steps=10
    )
    assert "`source` is 'jsonl'" in resume_mismatch(checkpoint, {**data, "source": "jsonl"}, max_steps=10)
    assert "at step 2, and trainer.max_steps is 2" in resume_mismatch(checkpoint, data, max_steps=2)


# --- route-table files ---


def test_record_holds_names_shape_and_rounded_routes():
    routes = torch.tensor([[[1 / 3, 2 / 3], [1.0, 0.0]]])  # (T=1, L=2, E=2)
    record = route_table_record(routes, ["qa"], ["encoder.0", "decoder.0"], step=120)
    assert record == {
        "step": 120,
        "tasks": ["qa"],
        "layers": ["encoder.0", "decoder.0"],
        "num_experts": 2,
        "routes": [[[0.333333, 0.666667], [1.0, 0.0]]],
    }
    assert all(isinstance(p, float) for layer in record["routes"][0] for p in layer)


@pytest.mark.parametrize(
    ("tasks", "layers", "message"),
    [
        (["a"], ["l0", "l1", "l2"], r"task_names: got 1 names, expected 2 .*\(2, 3, 4\)"),
        (["a", "b"], ["l0"], r"layer_names: got 1 names, expected 3 .*\(2, 3, 4\)"),
    ],
)
def test_record_rejects_name_counts_that_do_not_match(tasks, layers, message):
    with pytest.raises(ValueError, match=message):
        route_table_record(torch.full((2, 3, 4), 0.25), tasks, layers, step=0)


def test_written_record_loads_back_and_leaves_no_temporary_file(tmp_path):
    routes = torch.randn(3, 2, 4).softmax(-1)
    record = route_table_record(routes, ["a", "b", "c"], ["enc", "dec"], step=7)
    path = tmp_path / "runs" / "routes" / "step_7.json"  # parent folders do not exist yet
    write_route_table(path, record)
    with path.open() as handle:
        loaded = json.load(handle)
    assert loaded == record
    torch.testing.assert_close(torch.tensor(loaded["routes"]), routes, atol=1e-6, rtol=0)
    assert [p.name for p in path.parent.iterdir()] == ["step_7.json"]

    write_route_table(path, {**record, "step": 8})  # overwrites in place
    assert json.loads(path.read_text())["step"] == 8
    assert [p.name for p in path.parent.iterdir()] == ["step_7.json"]


def test_failed_write_keeps_the_old_file_and_cleans_up(tmp_path):
    path = tmp_path / "routes.json"
    write_route_table(path, {"step": 1})
    with pytest.raises(TypeError):
        write_route_table(path, {"step": 2, "routes": object()})  # not JSON-serialisable, fails mid-write
    assert json.loads(path.read_text()) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["routes.json"]


# --- the checkpoint of a run: one rule for init_from, analyze, export and summarize -----------------------


def test_the_checkpoint_of_a_run_is_its_single_best_else_last_else_none(tmp_path):
    from moe_mtl.analysis.run import RunFolder
    from moe_mtl.runs import best_step, run_checkpoint

    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    assert run_checkpoint(tmp_path) is None
    (checkpoints / "last.ckpt").touch()
    assert run_checkpoint(tmp_path) == checkpoints / "last.ckpt"
    (checkpoints / "best-step4.ckpt").touch()
    assert run_checkpoint(tmp_path) == run_checkpoint(checkpoints) == checkpoints / "best-step4.ckpt"
    assert RunFolder.resolve(tmp_path).checkpoint == checkpoints / "best-step4.ckpt"
    assert best_step(checkpoints / "best-step4.ckpt") == 4
    (checkpoints / "best-step8.ckpt").touch()
    assert run_checkpoint(tmp_path) is None  # ambiguous: no checkpoint is taken


# --- evaluation and prediction files ---------------------------------------------------------------------


def test_evaluation_stem_names_a_checkpoint_evaluated_on_its_own(tmp_path):
    assert evaluation_stem(tmp_path, "val", 3, 120) == tmp_path / "val-epoch3-step120"
    assert (
        evaluation_stem(tmp_path, "test", 0, 0, "runs/x/checkpoints/best-step60.ckpt") == tmp_path / "test-best-step60"
    )


def test_write_evaluation_writes_a_row_per_task_and_the_average(tmp_path):
    evaluation = TaskEvaluation(num_tasks=2)
    evaluation.add(
        torch.tensor([0, 1]), torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0]), [0, 0], ["a", "b"], [["a"], ["c"]]
    )
    result = evaluation.finish("val", lambda s: s, ["t0", "t1"], ["EM", "EM"], ["train", "train"])
    stem = tmp_path / "evaluation" / "val-epoch1-step7"
    write_evaluation(stem, result, epoch=1, step=7)
    with open(stem.with_suffix(".csv")) as file:
        rows = list(csv.DictReader(file))
    assert [(r["task"], float(r["score"])) for r in rows] == [("t0", 1.0), ("t1", 0.0), ("average", 0.5)]
    summary = json.loads(stem.with_suffix(".json").read_text())
    assert (summary["stage"], summary["epoch"], summary["step"]) == ("val", 1, 7)
    assert summary["average"] == {"loss": result.loss, "score": 0.5}
    assert summary["tasks"] == result.rows


def test_write_predictions_writes_one_jsonl_per_task(tmp_path):
    write_predictions(
        tmp_path / "predictions", {"t": [{"example_id": 0, "prediction": "x"}, {"example_id": 1, "prediction": "y"}]}
    )
    lines = (tmp_path / "predictions" / "t.jsonl").read_text().splitlines()
    assert [json.loads(line)["prediction"] for line in lines] == ["x", "y"]
