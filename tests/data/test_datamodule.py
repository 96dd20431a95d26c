import logging
import re
from collections import Counter

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import BartConfig

from moe_mtl import MoEBartConfig, MoEBartForConditionalGeneration, MoEOptions
from moe_mtl.data import MODEL_INPUTS, CrossFitOptions, DataError, MultiTaskDataModule
from moe_mtl.data.sources.skills import SUITE


@pytest.fixture
def module(tmp_path, small_skills):
    """A data module on the small skill suite, prepared and set up for fitting."""
    data = MultiTaskDataModule(skills=small_skills, output_dir=str(tmp_path / "run"), batch_size=8)
    data.prepare_data()
    data.setup("fit")
    return data


def test_exposes_what_the_model_needs(module):
    seen = [t.name for t in SUITE if t.partition == "train"]
    assert module.num_tasks == len(SUITE) == len(module.task_names)
    assert module.task_names[: len(seen)] == seen  # seen tasks first: ids 0 … 33, then held-out tasks
    assert module.task_partitions == sorted(module.task_partitions, key=("train", "dev", "test").index)
    assert module.task_metrics[module.task_names.index("evens-sum")] == "ACC"
    assert module.task_features[module.task_names.index("evens-sum")]["skills"] == ["evens", "sum"]
    assert module.vocab_size == len(module.tokenizer) and module.pad_token_id == 1


def test_training_batches(module):
    loader = module.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) == 34 * 2  # 16 examples per seen task, 8 per batch
    for batch in batches:
        assert set(batch) == {*MODEL_INPUTS, "example_ids", "task_names", "references", "options"}
        assert batch["task_ids"].unique().numel() == 1 and batch["task_ids"][0] < 34
        assert batch["input_ids"].shape == batch["attention_mask"].shape
        assert ((batch["labels"] == -100) | (batch["labels"] >= 0)).all()
        assert len(batch["references"]) == len(batch["task_names"]) == batch["task_ids"].numel()
    seen = Counter((int(t), int(e)) for b in batches for t, e in zip(b["task_ids"], b["example_ids"], strict=True))
    assert len(seen) == 34 * 16 and set(seen.values()) == {1}  # every example once per epoch


def test_model_accepts_a_batch(module):
    bart = BartConfig(
        vocab_size=module.vocab_size,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=64,
    )
    model = MoEBartForConditionalGeneration(
        MoEBartConfig.from_bart_config(bart, MoEOptions(num_experts=2, num_tasks=module.num_tasks))
    )
    batch = next(iter(module.train_dataloader()))
    output = model(**{key: batch[key] for key in MODEL_INPUTS})
    assert output.loss.isfinite() and output.logits.shape[:2] == batch["labels"].shape


def test_evaluation_batches_cover_every_example_once(module):
    val = list(module.val_dataloader())
    pairs = [(int(t), int(e)) for b in val for t, e in zip(b["task_ids"], b["example_ids"], strict=True)]
    assert sorted(pairs) == [(t, e) for t in range(34) for e in range(4)]
    assert all(b["task_ids"].unique().numel() == 1 for b in val)
    module.setup("test")
    test = list(module.test_dataloader())
    test_ids = {i for i, part in enumerate(module.task_partitions) if part == "test"}
    assert {int(b["task_ids"][0]) for b in test} == test_ids and min(test_ids) > 34  # held-out tasks
    assert sum(len(b["task_ids"]) for b in test) == len(test_ids) * 6


def test_second_run_does_no_tokenisation_and_every_rank_reads_the_cache(module, tmp_path, small_skills, caplog):
    run = tmp_path / "run"
    files = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    again = MultiTaskDataModule(skills=small_skills, output_dir=str(run), batch_size=8)
    with caplog.at_level(logging.INFO, logger="moe_mtl.data"):
        again.prepare_data()
    assert caplog.text.count("loaded from the cache") == 3 and "tokenised" not in caplog.text
    assert "using the tokenizer saved in" in caplog.text
    other_rank = MultiTaskDataModule(skills=small_skills, output_dir=str(run), batch_size=8)
    other_rank.setup("fit")  # no prepare_data on this rank
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == files
    first, second = next(iter(module.train_dataloader())), next(iter(other_rank.train_dataloader()))
    assert torch.equal(first["input_ids"], second["input_ids"])


def test_a_given_tokenizer_is_used(module, tmp_path, small_skills):
    given = MultiTaskDataModule(
        skills=small_skills, tokenizer=str(tmp_path / "run" / "tokenizer"), output_dir=str(tmp_path / "other")
    )
    assert given.tokenizer("sort: 3 8")["input_ids"] == module.tokenizer("sort: 3 8")["input_ids"]
    assert not (tmp_path / "other" / "tokenizer").exists()


def test_a_saved_tokenizer_is_not_reused_for_another_vocab_size(module, tmp_path, small_skills):
    options = dict(skills=small_skills, output_dir=str(tmp_path / "run"), batch_size=8)
    with pytest.raises(DataError, match=r"trained with vocab_size=1024; this run asks for vocab_size=2000"):
        MultiTaskDataModule(**options, vocab_size=2000).prepare_data()
    test_only = MultiTaskDataModule(**options, train_partitions=[], val_partitions=[])  # no training text
    test_only.setup("test")
    assert test_only.tokenizer.get_vocab() == module.tokenizer.get_vocab()


def test_maximum_lengths_too_short_for_the_special_tokens(tmp_path, small_skills):
    data = MultiTaskDataModule(skills=small_skills, output_dir=str(tmp_path), max_input_length=2)
    with pytest.raises(DataError, match="option `max_input_length` is 2; it must be at least 3"):
        data.prepare_data()


def test_an_empty_reference_names_its_file_and_line(tmp_path, write_jsonl):
    rows = [{"input": "x", "target": ["a"], "split": "train"}, {"input": "y", "target": ["b", " "], "split": "train"}]
    write_jsonl(tmp_path / "data" / "t.jsonl", rows)
    data = MultiTaskDataModule(source="jsonl", data_dir=str(tmp_path / "data"), output_dir=str(tmp_path / "run"))
    with pytest.raises(DataError, match=r"t\.jsonl:2: target 2 of 2 is ' '; every target \(reference\) must hold text"):
        data.prepare_data()


def test_cut_examples_are_warned_per_task(tmp_path, write_jsonl):
    write_jsonl(tmp_path / "data" / "long.jsonl", [{"input": "a " * 40, "target": "b", "split": "train"}] * 3)
    write_jsonl(tmp_path / "data" / "short.jsonl", [{"input": "a", "target": "b " * 20, "split": "train"}] * 2)
    data = MultiTaskDataModule(
        source="jsonl",
        data_dir=str(tmp_path / "data"),
        output_dir=str(tmp_path / "run"),
        max_input_length=16,
        max_target_length=8,
        val_partitions=[],
        test_partitions=[],
    )
    with pytest.warns(UserWarning) as record:
        data.setup("fit")
    messages = sorted(str(w.message) for w in record if "cut to" in str(w.message))
    assert messages == [
        "task 'long' (train data): 3 of 3 inputs cut to max_input_length=16, 0 targets cut to max_target_length=8",
        "task 'short' (train data): 0 of 2 inputs cut to max_input_length=16, 2 targets cut to max_target_length=8",
    ]
    assert len(data.datasets["train"]) == 5  # cut, not dropped
    with pytest.raises(DataError, match="no val data: data module option `val_partitions` is empty"):
        data.val_dataloader()


def test_fewshot_training_on_held_out_tasks(tmp_path, small_skills):
    options = dict(skills=small_skills, output_dir=str(tmp_path), train_partitions="test", val_partitions="test")
    with pytest.raises(DataError, match="set `fewshot_seed`"):
        MultiTaskDataModule(**options).prepare_data()
    data = MultiTaskDataModule(**options, fewshot_seed=42)
    data.setup("fit")
    held_out = data.task_partitions.count("test")
    assert data.datasets["train"].task_sizes == [4] * held_out == data.datasets["val"].task_sizes


def test_crossfit_source_with_a_fewshot_seed(tmp_path):
    for task in ("a", "b"):
        (tmp_path / task).mkdir()
        for split in ("train", "dev", "test"):
            (tmp_path / task / f"{task}_16_100_{split}.tsv").write_text(f"{task} x\ty\n{task} z\tw [SEP] v\tu\n")
    data = MultiTaskDataModule(
        source="crossfit", data_dir=str(tmp_path), output_dir=str(tmp_path / "run"), fewshot_seed=100
    )
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    assert batch["references"] == [["y"], ["w [SEP] v", "u"]] and batch["task_names"] == ["a", "a"]
    assert data.tasks[0].fewshot[100]["dev"][0].input == " [a] a x"  # the task prefix, on by default


def write_crossfit(root, files):
    """A CrossFit folder: {(task, seed, split): lines}."""
    for (task, seed, split), lines in files.items():
        (root / task).mkdir(parents=True, exist_ok=True)
        (root / task / f"{task}_16_{seed}_{split}.tsv").write_text("".join(line + "\n" for line in lines))


def test_all_seeds_trains_and_validates_on_every_seed_and_counts_repeats(tmp_path):
    # seeds sample one pool: seed 13 repeats "p" in train, and its dev "q" and "r" are train examples of seed 100
    write_crossfit(
        tmp_path / "data",
        {
            ("t", 100, "train"): ["p\t1", "q\t2"],
            ("t", 100, "dev"): ["s\t4"],
            ("t", 100, "test"): ["z\t0"],
            ("t", 13, "train"): ["p\t1", "r\t3"],
            ("t", 13, "dev"): ["q\t2", "r\t3", "q\t2"],
            ("u", 100, "train"): ["a\tb"],
            ("u", 100, "dev"): ["c\td"],
        },
    )
    data = MultiTaskDataModule(
        source="crossfit",
        data_dir=str(tmp_path / "data"),
        output_dir=str(tmp_path / "run"),
        fewshot_seed="all",
        test_partitions=[],
    )
    with pytest.warns(UserWarning) as record:
        data.setup("fit")
    assert data.datasets["train"].task_sizes == [4, 1] and data.datasets["val"].task_sizes == [4, 1]
    assert [str(w.message) for w in record if "all seeds" in str(w.message)] == [
        "train data, k-shot train splits of all seeds (`fewshot_seed: all`): of 5 examples, 1 repeat an earlier "
        "example of their task (t: 1); all are kept, as CrossFit's loaders keep them",
        "val data, k-shot dev splits of all seeds (`fewshot_seed: all`): of 5 examples, 1 repeat an earlier example "
        "of their task (t: 1) and 3 are also in their task's train data (t: 3); all are kept, as CrossFit's "
        "loaders keep them",
    ]
    inputs = [data.tasks[0].examples("train", "all")[i].input for i in range(4)]
    assert inputs == [" [t] p", " [t] q", " [t] p", " [t] r"]  # seed 100's file first, as CrossFit reads them


def test_crossfit_and_fewshot_seed_errors(tmp_path):
    for options, message in (
        ({"crossfit": {"task_prefix": False}}, "`crossfit` is {'task_prefix': False}, but `source` is 'skills'"),
        ({"source": "crossfit", "crossfit": {"prefix": False}}, "unknown `crossfit` options ['prefix']; allowed: "),
        ({"fewshot_seed": "every"}, "`fewshot_seed` is 'every'; it must be a seed (an integer), 'all' or None"),
        ({"fewshot_seed": True}, "`fewshot_seed` is True; it must be a seed"),
    ):
        with pytest.raises(DataError, match=re.escape(message)):
            MultiTaskDataModule(**options)
    data = MultiTaskDataModule(source="crossfit", crossfit=CrossFitOptions(task_prefix=False), data_dir=str(tmp_path))
    assert data.hparams.crossfit == {"task_prefix": False}  # plain types in checkpoints


def test_heterogeneous_batching_mixes_tasks(tmp_path, small_skills):
    data = MultiTaskDataModule(skills=small_skills, output_dir=str(tmp_path), batch_size=16, batching="heterogeneous")
    data.setup("fit")
    assert any(batch["task_ids"].unique().numel() > 1 for batch in data.train_dataloader())


def test_state_dict_resumes_the_sampler(module, tmp_path, small_skills):
    iterator = iter(module.train_dataloader())
    head = [next(iterator)["example_ids"] for _ in range(3)]
    state = module.state_dict()
    assert state["train_sampler"]["epoch"] == 0 and state["train_sampler"]["position"] >= 3
    fresh = MultiTaskDataModule(skills=small_skills, output_dir=str(tmp_path / "run"), batch_size=8)
    fresh.setup("fit")
    fresh.load_state_dict(state)
    position = state["train_sampler"]["position"]
    resumed = next(iter(fresh.train_dataloader()))
    full = list(module.train_dataloader())  # a new loader of the same epoch, from the start
    assert torch.equal(resumed["example_ids"], full[position]["example_ids"])
    assert all(torch.equal(a, b["example_ids"]) for a, b in zip(head, full, strict=False))


def test_invalid_options():
    with pytest.raises(DataError, match="`batching` is 'mixed'"):
        MultiTaskDataModule(batching="mixed")
    with pytest.raises(DataError, match="a partition in `train_partitions` is 'seen'"):
        MultiTaskDataModule(train_partitions=["seen"])
    with pytest.raises(DataError, match="`batch_size` is 0"):
        MultiTaskDataModule(batch_size=0)


class Recorder(L.LightningModule):
    """Records (epoch, task, example ids) of every training batch; trains nothing."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, int(batch["task_ids"][0]), tuple(batch["example_ids"].tolist())))
        return self.weight.sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def fit(data, max_steps=-1, ckpt_path=None, callbacks=(), limit_train_batches=None, max_epochs=None, save_to=None):
    """Fit a `Recorder` (`save_to`: then save a checkpoint there); returns its record of training batches."""
    recorder = Recorder()
    trainer = L.Trainer(
        max_steps=max_steps,
        max_epochs=max_epochs,
        limit_train_batches=limit_train_batches,
        accelerator="cpu",
        logger=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(callbacks),
        callbacks=list(callbacks),
    )
    trainer.fit(recorder, datamodule=data, ckpt_path=ckpt_path)
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    return recorder.seen


def resume_data(tmp_path, skills, num_workers=0):
    """A data module factory: 8 seen tasks × 16 training examples, 8 per batch: 16 batches per epoch."""
    seen_tasks = [t.name for t in SUITE if t.partition == "train"][:8]
    return lambda: MultiTaskDataModule(
        skills=skills,
        partition={"train": seen_tasks},
        output_dir=str(tmp_path),
        batch_size=8,
        test_partitions=[],
        num_workers=num_workers,
    )


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(
    ("stop", "num_workers", "limit"), [(7, 0, None), (16, 0, None), (16, 2, None), (21, 2, None), (10, 2, 10)]
)
def test_lightning_resume_continues_the_batch_sequence(tmp_path, small_skills, stop, num_workers, limit):
    """16 batches per epoch (or `limit`); the DataLoader and Lightning fetch ahead, which the saved position must
    not count."""
    data = resume_data(tmp_path, small_skills, num_workers)
    full = fit(data(), 40, limit_train_batches=limit)
    epochs = [[s for s in full if s[0] == epoch] for epoch in (0, 1)]
    assert len(epochs[0]) == len(epochs[1]) == (limit or 16) and epochs[0] != epochs[1]  # set_epoch reached it
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=stop, save_top_k=-1)
    head = fit(data(), stop, callbacks=[checkpoint], limit_train_batches=limit)
    (path,) = (tmp_path / "ckpt").glob(f"*step={stop}.ckpt")
    assert head + fit(data(), 40, ckpt_path=path, limit_train_batches=limit) == full


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(
    ("first", "then", "resumed"),
    [
        ({"max_steps": 20}, {"max_steps": 60}, 40),  # stopped in epoch 1: its last 12 batches come next
        ({"max_steps": 20}, {"max_epochs": 3}, 12),  # Lightning runs them as epoch 2, the last of 3
        ({"max_epochs": 2}, {"max_epochs": 4}, 32),  # stopped at an epoch end
    ],
)
def test_a_checkpoint_saved_after_fit_resumes_the_batch_sequence(tmp_path, small_skills, first, then, resumed):
    """Lightning counts the epoch that `max_steps` cut short as completed, and calls `set_epoch` with the next
    number when it resumes; the rest of the cut epoch must still come next, then the following ones."""
    data = resume_data(tmp_path, small_skills)
    full = fit(data(), 64)
    head = fit(data(), **first, save_to=tmp_path / "after.ckpt")
    tail = fit(data(), **then, ckpt_path=tmp_path / "after.ckpt")
    assert len(tail) == resumed
    assert [s[1:] for s in head + tail] == [s[1:] for s in full[: len(head) + len(tail)]]  # (task, examples)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_resuming_twice_after_fits_cut_mid_epoch_and_from_epoch_end_checkpoints(tmp_path, small_skills):
    data = resume_data(tmp_path, small_skills)
    full = fit(data(), 60)
    first = fit(data(), 20, save_to=tmp_path / "first.ckpt")
    second = fit(data(), 37, ckpt_path=tmp_path / "first.ckpt", save_to=tmp_path / "second.ckpt")
    assert [s[1:] for s in first + second + fit(data(), 60, ckpt_path=tmp_path / "second.ckpt")] == [
        s[1:] for s in full
    ]
    # saved in `on_train_epoch_end` of the epoch `max_steps` cut short, which Lightning has counted as processed
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_on_train_epoch_end=True, save_top_k=-1)
    assert fit(data(), 20, callbacks=[checkpoint]) == first
    (path,) = (tmp_path / "ckpt").glob("*step=20.ckpt")
    assert [s[1:] for s in first + fit(data(), 60, ckpt_path=path)] == [s[1:] for s in full]


class RankRecorder(Recorder):
    """Records training and validation batches of its rank into `<out>/rank<r>.pt`."""

    def __init__(self, out: str):
        super().__init__()
        self.out = out
        self.validated = []

    def validation_step(self, batch, batch_idx):
        self.validated += [(int(t), int(e)) for t, e in zip(batch["task_ids"], batch["example_ids"], strict=True)]

    def on_fit_end(self):
        torch.save({"train": self.seen, "val": self.validated}, f"{self.out}/rank{self.global_rank}.pt")


@pytest.mark.distributed
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_ddp_ranks_get_disjoint_examples_of_the_same_task(tmp_path, small_skills):
    """Two gloo processes under Lightning's DDP with use_distributed_sampler=False."""
    seen_tasks = [t.name for t in SUITE if t.partition == "train"][:8]
    options = dict(skills=small_skills, partition={"train": seen_tasks}, output_dir=str(tmp_path), batch_size=4)
    MultiTaskDataModule(**options, test_partitions=[]).prepare_data()
    L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_fork",
        use_distributed_sampler=False,
        max_epochs=1,
        logger=False,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    ).fit(RankRecorder(str(tmp_path)), datamodule=MultiTaskDataModule(**options, test_partitions=[]))
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    train = [rank["train"] for rank in ranks]
    assert len(train[0]) == len(train[1]) == 8 * 16 // 8  # 8 tasks × 16 examples, 4 per rank and step
    assert all(a[1] == b[1] for a, b in zip(*train, strict=True))  # the same task at every step
    examples = [{(task, e) for _, task, ids in rank for e in ids} for rank in train]
    assert not examples[0] & examples[1] and len(examples[0] | examples[1]) == 8 * 16
    validated = ranks[0]["val"] + ranks[1]["val"]
    assert sorted(validated) == [(t, e) for t in range(8) for e in range(4)]  # each dev example exactly once
