import json
import logging

import pytest

from moe_mtl.data.tasks import DataError
from moe_mtl.data.tokenizer import (
    MIN_VOCAB_SIZE,
    load_tokenizer,
    run_tokenizer,
    text_hash,
    tokenizer_fingerprint,
    train_tokenizer,
)

TEXTS = ["sort | count evens: 3 8 1 4", "upper: apple egg owl", "yes", "no", "3 8 1 4"] * 50


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=300)


def test_barts_special_tokens(tokenizer):
    assert [tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id] == [
        0,
        1,
        2,
        3,
    ]
    assert tokenizer.mask_token_id == 4
    ids = tokenizer("sort | count evens: 3 8")["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2
    assert tokenizer.decode(ids, skip_special_tokens=True) == "sort | count evens: 3 8"


def test_byte_level_handles_unseen_text_without_unk(tokenizer):
    text = "zebra ÜBER 🙂"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_vocab_size_bounds(tokenizer):
    assert MIN_VOCAB_SIZE < len(tokenizer) <= 300
    with pytest.raises(DataError, match=f"needs at least {MIN_VOCAB_SIZE}"):
        train_tokenizer(TEXTS, vocab_size=100)


def test_save_load_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    for text in [*TEXTS[:5], "unseen words 12345"]:
        assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert len(loaded) == len(tokenizer) and loaded.pad_token_id == 1
    assert tokenizer_fingerprint(loaded) == tokenizer_fingerprint(tokenizer)
    assert tokenizer_fingerprint(train_tokenizer(TEXTS, vocab_size=280)) != tokenizer_fingerprint(tokenizer)


def test_the_fingerprint_is_the_same_before_and_after_a_truncating_call():
    tokenizer = train_tokenizer(TEXTS, vocab_size=300)
    before = tokenizer_fingerprint(tokenizer)
    tokenizer(TEXTS[:3], truncation=True, max_length=4, padding="max_length")  # leaves its settings in the backend
    assert tokenizer_fingerprint(tokenizer) == before


def test_run_tokenizer_trains_once_then_reuses(tmp_path):
    folder = tmp_path / "run" / "tokenizer"
    first = run_tokenizer(None, folder, lambda: TEXTS, 300)
    saved = (folder / "tokenizer.json").stat().st_mtime_ns
    second = run_tokenizer(None, folder, lambda: TEXTS, 300)
    assert (folder / "tokenizer.json").stat().st_mtime_ns == saved  # not trained again
    assert second("apple 3 8")["input_ids"] == first("apple 3 8")["input_ids"]
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["tokenizer"]  # no staging folder left
    assert json.loads((folder / "training.json").read_text()) == {"vocab_size": 300, "training_text": text_hash(TEXTS)}


def test_reusing_a_tokenizer_trained_with_another_vocab_size_is_an_error(tmp_path):
    folder = tmp_path / "tokenizer"
    run_tokenizer(None, folder, lambda: TEXTS, 300)
    message = (
        rf"{folder}: the tokenizer saved there was trained with vocab_size=300; this run asks for vocab_size=400\. "
        rf"Use another `output_dir`, delete {folder} to train a new one, or set `tokenizer: {folder}`"
    )
    with pytest.raises(DataError, match=message):
        run_tokenizer(None, folder, lambda: TEXTS, 400)
    assert len(run_tokenizer(str(folder), tmp_path / "unused", lambda: TEXTS, 400)) <= 300  # given: not checked


def test_reusing_a_tokenizer_trained_on_other_text_warns(tmp_path, recwarn):
    folder = tmp_path / "tokenizer"
    first = run_tokenizer(None, folder, lambda: TEXTS, 300)
    with pytest.warns(UserWarning, match=rf"{folder}: the tokenizer saved there was trained on other training text"):
        second = run_tokenizer(None, folder, lambda: ["other text"] * 50, 300)
    assert tokenizer_fingerprint(second) == tokenizer_fingerprint(first)
    recwarn.clear()
    run_tokenizer(None, folder, None, 300)  # a run without training text (test, predict) has nothing to compare
    run_tokenizer(str(folder), tmp_path / "unused", lambda: ["other text"] * 50, 300)  # given: not checked
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


def test_a_run_without_training_text_needs_a_saved_tokenizer(tmp_path, caplog):
    with pytest.raises(DataError, match="no tokenizer saved there and this run has no training text"):
        run_tokenizer(None, tmp_path / "tokenizer", None, 300)
    train_tokenizer(TEXTS, 300).save_pretrained(tmp_path / "tokenizer")  # saved without its training settings
    with caplog.at_level(logging.WARNING):
        run_tokenizer(None, tmp_path / "tokenizer", lambda: TEXTS, 1000)
    assert "has no training.json: cannot check" in caplog.text


def test_run_tokenizer_prefers_a_given_tokenizer(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "given")
    loaded = run_tokenizer(str(tmp_path / "given"), tmp_path / "unused", lambda: [], 300)
    assert tokenizer_fingerprint(loaded) == tokenizer_fingerprint(tokenizer)
    assert not (tmp_path / "unused").exists()


def test_unloadable_tokenizer(tmp_path):
    with pytest.raises(DataError, match="could not be loaded"):
        load_tokenizer(tmp_path / "missing")
