"""The key/value cache in the model contract of the installed transformers release.

transformers 5.24 renamed `past_key_values` to `cache` wherever a model meets the generation loop:
the keyword `generate` passes to `forward`, the field of the model outputs it reads back, and the
keyword of BART's attention and layers (the old keyword warns until its removal in 5.40). MoE-BART
calls its cache `cache` and speaks the installed release's own names at each boundary, so no call of
ours goes through a deprecation shim and 5.23 and 5.24 both work.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from transformers.cache_utils import Cache
from transformers.modeling_outputs import Seq2SeqLMOutput
from transformers.models.bart.modeling_bart import BartAttention, BartDecoderLayer

from ..errors import UsageError

LEGACY_NAME = "past_key_values"
"""The cache's name up to transformers 5.23."""

GENERATION_NAME = "cache" if "cache" in {f.name for f in dataclasses.fields(Seq2SeqLMOutput)} else LEGACY_NAME
"""The keyword under which `generate` hands the cache to `forward`, and the output field it reads it back from."""


def _takes_cache(forward) -> bool:
    return "cache" in inspect.signature(forward).parameters  # follows the deprecation wrapper to the function


LAYER_NAME = "cache" if _takes_cache(BartAttention.forward) and _takes_cache(BartDecoderLayer.forward) else LEGACY_NAME
"""The keyword of the cache in transformers' `BartAttention` and `BartDecoderLayer`."""


def layer_cache(cache: Cache | None) -> dict[str, Cache | None]:
    """Keyword arguments that hand `cache` to a transformers BART attention or layer."""
    return {LAYER_NAME: cache}


def output_cache(cache: Cache | None) -> dict[str, Cache | None]:
    """Keyword arguments that put `cache` in a transformers model output, where `generate` reads it back."""
    return {GENERATION_NAME: cache}


def take_cache(cache: Cache | None, kwargs: dict[str, Any]) -> Cache | None:
    """The cache given to a forward as `cache`, or under the legacy name (which a 5.23 `generate` passes,
    and older user code); removes the legacy keyword from `kwargs`."""
    legacy = kwargs.pop(LEGACY_NAME, None)
    if legacy is not None and cache is not None:
        raise UsageError(f"pass the key/value cache once, as `cache`; got both `cache` and `{LEGACY_NAME}`")
    return cache if cache is not None else legacy
