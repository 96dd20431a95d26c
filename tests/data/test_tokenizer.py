import pytest

from moe_mtl.data.tasks import DataError
from moe_mtl.data.tokenizer import (
    MIN_VOCAB_SIZE,
    load_tokenizer,
    run_tokenizer,
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


def test_run_tokenizer_trains_once_then_reuses(tmp_path):
    calls = []

    def texts():
        calls.append(1)
        return TEXTS

    first = run_tokenizer(None, tmp_path / "run" / "tokenizer", texts, 300)
    saved = (tmp_path / "run" / "tokenizer" / "tokenizer.json").stat().st_mtime_ns
    second = run_tokenizer(None, tmp_path / "run" / "tokenizer", texts, 300)
    assert len(calls) == 1
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").stat().st_mtime_ns == saved
    assert second("apple 3 8")["input_ids"] == first("apple 3 8")["input_ids"]
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["tokenizer"]  # no staging folder left


def test_run_tokenizer_prefers_a_given_tokenizer(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "given")
    loaded = run_tokenizer(str(tmp_path / "given"), tmp_path / "unused", lambda: [], 300)
    assert tokenizer_fingerprint(loaded) == tokenizer_fingerprint(tokenizer)
    assert not (tmp_path / "unused").exists()


def test_unloadable_tokenizer(tmp_path):
    with pytest.raises(DataError, match="could not be loaded"):
        load_tokenizer(tmp_path / "missing")
