"""The tokenizer: a pretrained one by name or path, or a byte-level BPE trained here on the training text.

The trained tokenizer is BART's kind: byte-level BPE with <s>=0, <pad>=1, </s>=2, <unk>=3, <mask>,
inputs wrapped as `<s> text </s>`. It is saved with the run (`save_pretrained`) and loaded from
there afterwards, so that test and predict runs use exactly the tokenizer training used. What it
was trained with (vocabulary size, a hash of the training text) is saved next to it and checked
when it is reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from .tasks import DataError, read_json

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
TRAINING_FILE = "training.json"  # in the folder of a trained tokenizer: vocab_size and training-text hash
MIN_VOCAB_SIZE = len(pre_tokenizers.ByteLevel.alphabet()) + len(SPECIAL_TOKENS)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with BART's special tokens on `texts` (at most `vocab_size` tokens)."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(f"`vocab_size` is {vocab_size}; a byte-level BPE needs at least {MIN_VOCAB_SIZE}")
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    bpe.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), add_prefix_space=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        cls_token="<s>",
        sep_token="</s>",
    )


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    """A saved or pretrained tokenizer ("facebook/bart-base" needs the hub; a local folder does not)."""
    try:
        return AutoTokenizer.from_pretrained(str(name_or_path))
    except OSError as err:
        raise DataError(
            f"`tokenizer` {str(name_or_path)!r} could not be loaded ({err}); give a hub name (online) or a folder "
            "written by `save_pretrained`, or leave it unset to train one on the training text"
        ) from err


def text_hash(texts: Iterable[str]) -> str:
    """A hash of a sequence of texts (their order included)."""
    digest = hashlib.blake2b(digest_size=16)
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\x00")
    return digest.hexdigest()


def run_tokenizer(
    name_or_path: str | None,
    directory: Path,
    texts: Callable[[], Iterable[str]] | None,
    vocab_size: int,
) -> PreTrainedTokenizerBase:
    """The tokenizer of a run: `name_or_path` if given (used as it is); else the one saved in `directory`;
    else one trained on `texts()` and saved there.

    `texts` is None for a run without training text: it can only reuse a saved tokenizer. A saved
    tokenizer trained with another `vocab_size` is an error; one trained on other text is reused
    with a warning. Saving is atomic (a temporary folder renamed into place), so ranks that train at
    the same time all end up loading the one folder that won.
    """
    if name_or_path is not None:
        return load_tokenizer(name_or_path)
    corpus = None if texts is None else list(texts())  # read once: hashed, and trained on if none is saved
    settings = {"vocab_size": vocab_size, "training_text": None if corpus is None else text_hash(corpus)}
    if (directory / "tokenizer.json").is_file():
        _check_reuse(directory, settings)
        log.info("using the tokenizer saved in %s", directory)
        return load_tokenizer(directory)
    if corpus is None:
        raise DataError(
            f"{directory}: no tokenizer saved there and this run has no training text to train one on; set "
            "`tokenizer` to the tokenizer folder of the training run"
        )
    tokenizer = train_tokenizer(corpus, vocab_size)
    staging = directory.with_name(f".{directory.name}.{os.getpid()}")
    tokenizer.save_pretrained(staging)
    (staging / TRAINING_FILE).write_text(json.dumps(settings, indent=1) + "\n")
    try:
        staging.rename(directory)
        log.info("trained a byte-level BPE tokenizer of %d tokens, saved to %s", len(tokenizer), directory)
    except OSError:  # another rank saved first
        shutil.rmtree(staging)
    return load_tokenizer(directory)


def _check_reuse(directory: Path, settings: dict) -> None:
    """Compare what the tokenizer in `directory` was trained with to what this run would train it with."""
    path = directory / TRAINING_FILE
    if not path.is_file():
        log.warning("%s has no %s: cannot check that its tokenizer suits this run's settings", directory, path.name)
        return
    saved, _ = read_json(path)
    if saved["vocab_size"] != settings["vocab_size"]:
        raise DataError(
            f"{directory}: the tokenizer saved there was trained with vocab_size={saved['vocab_size']}; this run "
            f"asks for vocab_size={settings['vocab_size']}. Use another `output_dir`, delete {directory} to train "
            f"a new one, or set `tokenizer: {directory}` to use the saved one as it is"
        )
    if settings["training_text"] not in (None, saved["training_text"]):
        warnings.warn(
            f"{directory}: the tokenizer saved there was trained on other training text than this run's; it is "
            f"reused. To train one on this run's data, use another `output_dir` or delete {directory}; set "
            f"`tokenizer: {directory}` to reuse it on purpose (e.g. few-shot runs)",
            stacklevel=3,
        )


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of everything that decides how the tokenizer splits text (its full serialisation)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # truncation and padding are call settings the fast tokenizer keeps from its last call, not how it splits
        # text: left in, the same tokenizer hashed differently before and after an encoding (a cache miss)
        serialised = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
        state = json.dumps(serialised, sort_keys=True)
    else:
        state = repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.blake2b(f"{type(tokenizer).__name__}\n{state}".encode(), digest_size=16).hexdigest()
