"""The pretrained sentence encoder all-MiniLM-L6-v2 (`representations.pretrained`): its folder from the pip package,
its sentence embedding as the model card computes it, and as the text representation of `moe-mtl represent` and of
a run's unseen-task routes (`transfer.representation: text:<folder>`)."""

import json
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml
from transformers import AutoModel, AutoTokenizer

from moe_mtl.cli import main
from moe_mtl.data import Example, Task, load_tasks
from moe_mtl.errors import UsageError
from moe_mtl.extras import MissingExtra, require
from moe_mtl.representations.compute import compute_representations, training_examples
from moe_mtl.representations.files import load_representations
from moe_mtl.representations.pretrained import MINILM, SentencePooling, minilm_folder, sentence_pooling

from ..conftest import TINY_SKILLS, tiny_run_config
from ..models.conftest import TINY_BART

TABLE = "model.model.encoder.task_table.embedding.weight"


@torch.no_grad()
def model_card_embeddings(folder, sentences: list[str], max_length: int = 256) -> torch.Tensor:
    """(N, 384) sentence embeddings as the all-MiniLM-L6-v2 model card computes them with plain transformers: the
    mean of the token states weighted by the attention mask, then L2 normalisation."""
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    encoded = tokenizer(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    states = model(**encoded).last_hidden_state
    mask = encoded["attention_mask"].unsqueeze(-1).float()
    return F.normalize((states * mask).sum(1) / mask.sum(1).clamp(min=1e-9), p=2, dim=1)


def test_minilm_folder_is_extracted_whole_once(minilm):
    config = json.loads((minilm / "config.json").read_text())
    assert minilm.name == MINILM and config["model_type"] == "bert" and config["hidden_size"] == 384
    assert (minilm / "model.safetensors").stat().st_size > 80e6 and (minilm / "tokenizer.json").is_file()
    written = (minilm / "model.safetensors").stat().st_mtime_ns
    assert minilm_folder(minilm.parent) == minilm  # found, not extracted again
    assert (minilm / "model.safetensors").stat().st_mtime_ns == written
    assert sorted(path.name for path in minilm.parent.iterdir()) == [MINILM]  # no partial extraction left


def test_without_the_extra_the_error_names_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "all_minilm_l6_v2", None)  # what `import` meets when it is not installed
    with pytest.raises(MissingExtra, match=r"encoder needs all_minilm_l6_v2 .*: pip install moe-mtl\[represent\]"):
        minilm_folder(tmp_path)
    assert not (tmp_path / MINILM).exists()
    with pytest.raises(UsageError, match=r"route analysis needs scipy_that_is_not_installed .*moe-mtl\[analysis\]"):
        require("scipy_that_is_not_installed")


def test_text_of_minilm_is_the_mean_of_its_model_card_sentence_embeddings(minilm):
    assert sentence_pooling(minilm) == SentencePooling(normalize=True, max_length=256)
    inputs = [
        ["reverse: 3 1 4 1 5", "reverse: 9 2 6", "reverse: 5 3 5 8 9 7 9 3"],
        ["upper: apple owl", "upper: a very long sentence " + "egg " * 300],  # truncated at 256 word pieces
    ]
    tasks = [Task(f"task{i}", {"train": [Example(text, ("x",)) for text in texts]}) for i, texts in enumerate(inputs)]
    vectors = compute_representations("text", tasks, encoder=str(minilm), batch_size=2)  # batches padded unlike
    expected = torch.stack([model_card_embeddings(minilm, texts).double().mean(0) for texts in inputs]).float()
    assert vectors.shape == (2, 384)
    torch.testing.assert_close(vectors, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"modules.json": [{"type": "sentence_transformers.models.Dense", "path": "2_Dense"}]}, r"modules \['Dense'\]"),
        (
            {
                "modules.json": [{"type": "sentence_transformers.models.Pooling", "path": "1_Pooling"}],
                "1_Pooling/config.json": {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False},
            },
            r"pools by \['cls_token'\] \(1_Pooling/config.json\); text representations take the mean over tokens",
        ),
    ],
)
def test_a_sentence_embedding_other_than_the_mean_is_a_usage_error(tmp_path, files, message):
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(json.dumps(content))
    with pytest.raises(UsageError, match=message):
        sentence_pooling(tmp_path)


@pytest.mark.slow
def test_represent_text_with_minilm_writes_its_embeddings_of_each_task(minilm, tmp_path, capsys):
    config = tmp_path / "config.yaml"
    data = {"skills": TINY_SKILLS, "vocab_size": 300, "output_dir": str(tmp_path / "data"), "max_input_length": 32}
    config.write_text(yaml.safe_dump({"data": data}))
    output = tmp_path / "minilm.pt"
    main(["represent", "--config", str(config), "--kind", "text", "--encoder", str(minilm), "--output", str(output)])
    tasks = load_tasks("skills", skills=TINY_SKILLS)
    vectors = load_representations(output, [task.name for task in tasks], dim=384)
    assert f"wrote text representations of {len(tasks)} tasks, width 384" in capsys.readouterr().out
    inputs = [example.input for example in training_examples(tasks[0], 64)]
    expected = model_card_embeddings(minilm, inputs, max_length=32).double().mean(0).float()
    torch.testing.assert_close(vectors[0], expected, atol=1e-5, rtol=1e-4)
    assert len(set(map(tuple, vectors.tolist()))) == len(tasks)


def test_represent_with_a_missing_encoder_folder_is_one_usage_line(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"data": {"skills": TINY_SKILLS, "output_dir": str(tmp_path / "data")}}))
    args = ["--kind", "text", "--encoder", "/no/such/dir", "--output", str(tmp_path / "out.pt")]
    with pytest.raises(SystemExit) as stopped:
        main(["represent", "--config", str(config), *args])
    assert stopped.value.code == 2
    assert "--encoder is /no/such/dir: no such folder" in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.slow
def test_unseen_tasks_of_a_fit_take_the_route_of_the_nearest_task_by_minilm(minilm, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tiny_run_config(max_steps=2, callbacks=[])
    config["model"]["bart"] = {**TINY_BART, "encoder_layers": 1, "decoder_layers": 1}
    config["data"]["fewshot_seed"] = 100
    del config["two_stage"]
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    main(["fit", "--config", "run.yaml"])
    upstream = tmp_path / "runs/tiny/version_0"
    represent = ["--kind", "text", "--encoder", str(minilm), "--cache_dir", "elsewhere", "--output", "minilm.pt"]
    main(["represent", "--config", "run.yaml", *represent])
    transfer = ["--model.transfer.init_from", str(upstream), "--model.transfer.unseen_routes", "nearest"]
    transfer += ["--model.transfer.representation", f"text:{minilm}", "--model.optim.task_lr", "0"]  # rows stay
    downstream = ["--trainer.logger.init_args.name", "minilm", "--data.train_partitions", "test"]
    main(["fit", "--config", "run.yaml", *transfer, *downstream, "--data.val_partitions", "test"])

    before = torch.load(upstream / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    after = torch.load(tmp_path / "runs/minilm/version_0/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    names, partitions = before["hyper_parameters"]["task_names"], before["hyper_parameters"]["task_partitions"]
    assert after["hyper_parameters"]["task_names"] == names
    seen = [i for i, part in enumerate(partitions) if part == "train"]
    unseen = [i for i, part in enumerate(partitions) if part != "train"]
    vectors = load_representations(tmp_path / "minilm.pt", names, dim=384).double()
    cosine = F.normalize(vectors[unseen], dim=-1) @ F.normalize(vectors[seen], dim=-1).T
    nearest = [seen[j] for j in cosine.argmax(-1).tolist()]
    assert len(set(nearest)) > 1  # not one task for all: the encoder tells the tasks apart
    (computed,) = (tmp_path / "runs/data/representations").glob("*.pt")  # by the fit, not read from `represent`'s
    torch.testing.assert_close(load_representations(computed, names, dim=384).double(), vectors)
    torch.testing.assert_close(after["state_dict"][TABLE][unseen], before["state_dict"][TABLE][nearest], rtol=0, atol=0)
