"""Task representations: text and Fisher embeddings, their cache, representation files and `moe-mtl represent`."""

import json

import lightning
import pytest
import torch
import yaml
from transformers import BartForConditionalGeneration, BartModel

from moe_mtl import MoEBartForConditionalGeneration
from moe_mtl.cli import main
from moe_mtl.data import Example, Task, load_tasks
from moe_mtl.data.tokenizer import train_tokenizer
from moe_mtl.models.conversion import dense_name
from moe_mtl.representations.compute import (
    compute_representations,
    count_sketch,
    diagonal_fisher,
    training_examples,
)
from moe_mtl.representations.files import load_representations
from moe_mtl.training import MoEMultiTaskModule

from ..conftest import TINY_SKILLS
from ..models.conftest import TINY_BART, tiny_bart_config

SPECIAL_IDS = dict(pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Models this small run fastest on one thread, and far slower on two when the cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_tasks() -> list[Task]:
    """Two seen tasks of different kinds and a held-out task with k-shot training examples only."""
    reverse = [Example(f"reverse: {i} {i + 3} {i + 5}", (f"{i + 5} {i + 3} {i}",)) for i in range(4)]
    upper = [Example(f"upper: apple owl {'egg ' * (i + 1)}", (f"APPLE OWL{' EGG' * (i + 1)}",)) for i in range(3)]
    count = [Example(f"count evens: {i} 8 {2 * i}", (str(i % 3),)) for i in range(2)]
    return [
        Task("reverse", {"train": reverse}),
        Task("upper", {"train": upper}),
        Task("count", {"test": count}, partition="test", fewshot={13: {"train": count}, 21: {"train": count[:1]}}),
    ]


@pytest.fixture(scope="module")
def tokenizer():
    texts = [text for task in make_tasks() for e in training_examples(task, 10) for text in (e.input, *e.targets)]
    return train_tokenizer(texts * 5, vocab_size=300)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tokenizer):
    """A local dense BART folder with its tokenizer, as `save_pretrained` writes them."""
    path = tmp_path_factory.mktemp("bart")
    torch.manual_seed(3)
    config = tiny_bart_config(
        vocab_size=len(tokenizer), d_model=16, encoder_ffn_dim=32, decoder_ffn_dim=32, **SPECIAL_IDS
    )
    BartForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def moe(folder, **options) -> MoEBartForConditionalGeneration:
    """A MoE-BART upcycled from the folder's BART (2 experts, 3 tasks); `perturb` makes its experts differ."""
    options = {"num_experts": 2, "num_tasks": 3, "task_dim": 8, **options}
    model = MoEBartForConditionalGeneration.from_dense(BartForConditionalGeneration.from_pretrained(folder), **options)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".experts.1." in name:
                param.add_(0.05 * torch.randn_like(param))
    return model


# --- examples -------------------------------------------------------------------------------------------


def test_training_examples_are_evenly_spaced_and_fall_back_to_k_shot_splits():
    reverse, _, count = make_tasks()
    assert [e.input for e in training_examples(reverse, 2)] == ["reverse: 0 3 5", "reverse: 3 6 8"]
    assert len(training_examples(reverse, 64)) == 4
    assert len(training_examples(count, 64)) == 3  # the k-shot train splits of both seeds, pooled
    assert len(training_examples(count, 64, fewshot_seed=21)) == 1


# --- text -----------------------------------------------------------------------------------------------


def test_text_from_a_folder_is_the_mean_of_mean_pooled_encoder_states(folder, tokenizer):
    tasks = make_tasks()
    vectors = compute_representations("text", tasks, encoder=str(folder), batch_size=2)
    encoder = BartModel.from_pretrained(folder).eval().get_encoder()
    expected = []
    for task in tasks:
        with torch.no_grad():  # one example at a time: no padding at all
            states = [
                encoder(**tokenizer(e.input, return_tensors="pt")).last_hidden_state[0]
                for e in training_examples(task, 64)
            ]
        expected.append(torch.stack([s.mean(0) for s in states]).mean(0))
    torch.testing.assert_close(vectors, torch.stack(expected), rtol=1e-4, atol=1e-5)


def test_text_of_a_moe_bart_routes_uniformly_whatever_the_task_routes(folder, tokenizer):
    tasks = make_tasks()
    model = moe(folder)
    vectors = compute_representations("text", tasks, model=model, tokenizer=tokenizer)
    # uniform routing: what the model's own "average" routes give, for any task id
    average = moe(folder, routes="average")
    average.load_state_dict(model.state_dict(), strict=False)
    inputs = tokenizer([e.input for e in training_examples(tasks[0], 64)], padding=True, return_tensors="pt")
    states = average.eval().model.encoder(**inputs, task_ids=torch.full((4,), 2)).last_hidden_state
    mask = inputs["attention_mask"][..., None]
    torch.testing.assert_close(vectors[0], ((states * mask).sum(1) / mask.sum(1)).mean(0), rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # other task routes: the same representations
        for param in [*model.router.parameters(), *model.task_table.parameters()]:
            param.normal_()
    torch.testing.assert_close(compute_representations("text", tasks, model=model, tokenizer=tokenizer), vectors)


def test_text_of_an_upcycled_moe_bart_equals_its_dense_bart(folder, tokenizer):
    upcycled = MoEBartForConditionalGeneration.from_dense(str(folder), num_experts=3, num_tasks=2)
    dense = compute_representations("text", make_tasks(), encoder=str(folder))
    torch.testing.assert_close(
        compute_representations("text", make_tasks(), model=upcycled, tokenizer=tokenizer), dense
    )


def test_text_of_token_routing_uses_the_mean_task_vector(folder, tokenizer):
    model = moe(folder, expert_unit="ffn", routing="token")
    vectors = compute_representations("text", make_tasks(), model=model, tokenizer=tokenizer)
    with torch.no_grad():  # rows moved apart, their mean kept: the same representations
        shift = torch.randn(8)
        model.task_table.embedding.weight[0] += shift
        model.task_table.embedding.weight[1] -= shift
    torch.testing.assert_close(compute_representations("text", make_tasks(), model=model, tokenizer=tokenizer), vectors)
    with torch.no_grad():
        model.task_table.embedding.weight[2] += 5.0
    assert not torch.allclose(compute_representations("text", make_tasks(), model=model, tokenizer=tokenizer), vectors)


def test_text_dim_is_a_fixed_projection_the_same_for_each_task_alone(folder):
    tasks = make_tasks()
    vectors = compute_representations("text", tasks, encoder=str(folder), dim=5)
    assert vectors.shape == (3, 5) and vectors.dtype == torch.float32
    alone = compute_representations("text", tasks[2:], encoder=str(folder), dim=5)
    torch.testing.assert_close(alone[0], vectors[2])


# --- fisher ---------------------------------------------------------------------------------------------


def test_fisher_is_the_mean_squared_gradient_of_the_target_log_likelihood(folder, tokenizer):
    task = make_tasks()[0]
    dense = BartForConditionalGeneration.from_pretrained(folder).eval()
    fisher = diagonal_fisher(dense, tokenizer, training_examples(task, 64), (64, 64))
    name = "model.decoder.layers.1.fc2.weight"
    squares = []
    for example in training_examples(task, 64):
        labels = tokenizer(example.targets[0], return_tensors="pt")["input_ids"]
        out = dense(**tokenizer(example.input, return_tensors="pt"), labels=labels)
        dense.zero_grad()
        (out.loss * labels.numel()).backward()  # the mean token loss times the tokens: -log p(target)
        squares.append(dense.get_parameter(name).grad ** 2)
    torch.testing.assert_close(fisher[name], torch.stack(squares).mean(0), rtol=1e-4, atol=1e-10)
    assert "model.shared.weight" not in fisher  # layer weight matrices only, as the paper's adapters


def test_fisher_of_upcycled_experts_is_the_dense_fisher_over_e_squared(folder, tokenizer):
    examples = training_examples(make_tasks()[1], 64)
    dense = diagonal_fisher(BartForConditionalGeneration.from_pretrained(folder).eval(), tokenizer, examples, (64, 64))
    upcycled = MoEBartForConditionalGeneration.from_dense(str(folder), num_experts=2, num_tasks=1).eval()
    fisher = diagonal_fisher(upcycled, tokenizer, examples, (64, 64))
    assert any(".experts.1." in name for name in fisher)
    for name, values in fisher.items():  # uniform routing: each of E identical experts gets 1/E of the gradient
        torch.testing.assert_close(values, dense[dense_name(name)] / 4, rtol=1e-4, atol=1e-12)


def test_fisher_vectors_are_deterministic_distinct_and_the_same_for_a_task_alone(folder, tokenizer):
    tasks, model = make_tasks(), moe(folder)
    for param in model.task_table.parameters():
        param.requires_grad_(False)
    vectors = compute_representations("fisher", tasks, model=model, tokenizer=tokenizer, dim=8)
    assert vectors.shape == (3, 8) and torch.isfinite(vectors).all()
    assert torch.cdist(vectors, vectors)[~torch.eye(3, dtype=torch.bool)].min() > 0  # tasks differ
    torch.testing.assert_close(
        compute_representations("fisher", tasks[1:2], model=model, tokenizer=tokenizer, dim=8)[0], vectors[1]
    )
    assert model.training and not model.task_table.embedding.weight.requires_grad  # the model is left as it was


def test_count_sketch_is_linear_and_keeps_inner_products():
    generator = torch.Generator().manual_seed(0)
    a = {name: torch.rand(size, generator=generator, dtype=torch.float64) for name, size in (("w", 20000), ("b", 300))}
    b = {name: value + torch.rand(value.shape, generator=generator) for name, value in a.items()}
    sum_ab = {name: a[name] + b[name] for name in a}
    torch.testing.assert_close(count_sketch(sum_ab, 64), count_sketch(a, 64) + count_sketch(b, 64))
    exact = sum((a[name] * b[name]).sum() for name in a).double()
    torch.testing.assert_close(count_sketch(a, 4096) @ count_sketch(b, 4096), exact, rtol=0.05, atol=0)


# --- cache ----------------------------------------------------------------------------------------------


def test_a_second_call_loads_from_the_cache_and_a_changed_input_recomputes(folder, tokenizer, tmp_path):
    tasks, model = make_tasks(), moe(folder)
    calls = []
    model.model.encoder.register_forward_pre_hook(lambda *_: calls.append(1))
    first = compute_representations("text", tasks, model=model, tokenizer=tokenizer, cache_dir=tmp_path)
    (cached,) = tmp_path.glob("*.pt")
    stamp, encoded = cached.stat().st_mtime_ns, len(calls)
    assert encoded > 0
    again = compute_representations("text", tasks, model=model, tokenizer=tokenizer, cache_dir=tmp_path)
    torch.testing.assert_close(again, first)
    assert len(calls) == encoded and cached.stat().st_mtime_ns == stamp  # nothing encoded, nothing rewritten
    compute_representations("text", tasks, model=model, tokenizer=tokenizer, cache_dir=tmp_path, max_examples=2)
    with torch.no_grad():
        model.model.encoder.layers[0].experts[0].fc1.bias.add_(1.0)
    compute_representations("text", tasks, model=model, tokenizer=tokenizer, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.pt"))) == 3 and len(calls) > encoded


def test_compute_errors_name_the_option(folder, tokenizer, tmp_path):
    tasks = make_tasks()
    with pytest.raises(ValueError, match="representation kind is 'task2vec'; allowed: 'text', 'fisher'"):
        compute_representations("task2vec", tasks, encoder=str(folder))
    with pytest.raises(ValueError, match="exactly one of `model`"):
        compute_representations("text", tasks, model=moe(folder), encoder=str(folder), tokenizer=tokenizer)
    with pytest.raises(ValueError, match="need its `tokenizer`"):
        compute_representations("text", tasks, model=moe(folder))
    with pytest.raises(ValueError, match="`dim` is 0; it must be a positive integer"):
        compute_representations("text", tasks, encoder=str(folder), dim=0)
    with pytest.raises(ValueError, match=r"`encoder` '.*nowhere': no such folder; give a local model folder"):
        compute_representations("text", tasks, encoder=str(folder / "nowhere"))
    with pytest.raises(ValueError, match=r"is not a model folder .no config.json."):
        compute_representations("text", tasks, encoder=str(tmp_path))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    with pytest.raises(ValueError, match=r"`encoder` '.*': its model could not be loaded"):  # no weights
        compute_representations("text", tasks, encoder=str(tmp_path))


# --- moe-mtl represent ----------------------------------------------------------------------------------


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "config.yaml"
    data = {"skills": TINY_SKILLS, "vocab_size": 300, "output_dir": str(tmp_path / "data"), "max_input_length": 32}
    path.write_text(yaml.safe_dump({"model": {"moe": {"task_dim": 6}}, "data": data, "trainer": {"max_steps": 1}}))
    return path


def test_represent_text_writes_a_vector_per_task_of_the_data(config, folder, tmp_path, capsys):
    output = tmp_path / "text.pt"
    args = ["--kind", "text", "--encoder", str(folder), "--max_examples", "2", "--output", str(output)]
    main(["represent", "--config", str(config), *args])
    names = [task.name for task in load_tasks("skills", skills=TINY_SKILLS)]
    vectors = load_representations(output, names, dim=16)
    assert vectors.shape == (len(names), 16) and torch.isfinite(vectors).all()
    assert list((tmp_path / "data" / "representations").glob("*.pt"))  # cached beside the tokenised data
    assert f"wrote text representations of {len(names)} tasks, width 16" in capsys.readouterr().out


def test_represent_fisher_from_a_run_folder_has_the_run_task_width(config, folder, tokenizer, tmp_path):
    names = [task.name for task in load_tasks("skills", skills=TINY_SKILLS)]
    module = MoEMultiTaskModule(
        bart=TINY_BART,
        moe={"num_experts": 2, "task_dim": 4, "num_tasks": 2},
        tokenizer_size=len(tokenizer),
        pad_token_id=1,
        tokenizer_path=str(folder),
    )
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    state = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    torch.save({**state, "pytorch-lightning_version": lightning.__version__}, tmp_path / "run/checkpoints/last.ckpt")
    output = tmp_path / "fisher.json"
    args = ["--kind", "fisher", "--init_from", str(tmp_path / "run"), "--max_examples", "1", "--output", str(output)]
    main(["represent", "--config", str(config), *args])
    assert list(json.loads(output.read_text())) == names
    assert load_representations(output, names, dim=4).abs().sum() > 0  # the checkpoint's task_dim, not the config's


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "give exactly one of `--encoder` (a model folder) or `--init_from`"),
        (["--encoder", "{folder}", "--output", "x.csv"], "`--output` 'x.csv' must end in .pt or .json"),
        (["--init_from", "{folder}"], "no best-step*.ckpt and no last.ckpt in"),
    ],
)
def test_represent_usage_errors(config, folder, capsys, extra, message):
    args = ["represent", "--config", str(config), "--kind", "text", "--output", "out.pt"]
    with pytest.raises(SystemExit) as stopped:
        main(args + [arg.format(folder=folder) for arg in extra])
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_represent_names_an_unknown_data_option(tmp_path, folder, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"data": {"skills": TINY_SKILLS, "batch_sise": 2}}))
    args = ["represent", "--config", str(config), "--kind", "text", "--encoder", str(folder), "--output", "out.pt"]
    with pytest.raises(SystemExit) as stopped:
        main(args)
    assert stopped.value.code == 2
    assert "batch_sise" in capsys.readouterr().err.strip().splitlines()[-1]


def test_represent_merges_repeated_configs_in_order_then_the_overrides(config, folder, tmp_path, capsys):
    """As `moe-mtl fit` takes --config: a second file over the first (the unrelated skill tasks added), then
    `--data.<option> value` over both."""
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({"data": {"skills": {"unrelated": True}}}))
    common = ["--kind", "text", "--encoder", str(folder), "--max_examples", "1"]
    with_overlay = [task.name for task in load_tasks("skills", skills={**TINY_SKILLS, "unrelated": True})]
    main(["represent", "--config", str(config), "--config", str(overlay), *common, "--output", str(tmp_path / "a.pt")])
    assert load_representations(tmp_path / "a.pt", with_overlay, dim=16).shape[0] == len(with_overlay)
    args = ["--config", str(config), "--config", str(overlay), *common, "--data.skills.unrelated", "false"]
    main(["represent", *args, "--output", str(tmp_path / "b.pt")])
    names = [task.name for task in load_tasks("skills", skills=TINY_SKILLS)]
    assert len(names) < len(with_overlay)
    assert load_representations(tmp_path / "b.pt", names, dim=16).shape[0] == len(names)
    assert f"representations of {len(names)} tasks" in capsys.readouterr().out.splitlines()[-1]
