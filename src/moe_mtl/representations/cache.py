"""The cache of computed task representations: `<cache_dir>/<fingerprint>.pt`, a representations file
(`representations.files`) whose name is a hash of everything that decides its contents, like tokenised data.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from ..data.tasks import Example
from ..data.tokenizer import text_hash, tokenizer_fingerprint
from ..models import MoEBartForConditionalGeneration
from ..models.conversion import ROUTING_PARAMETERS

# bump when the computation changes, so old cache files are not reused (2: encoder-only folders encode with the whole
# model, sentence-transformers folders pool as they declare)
CACHE_VERSION = 2

Model = nn.Module  # a MoE-BART, or a Hugging Face model loaded from a folder


def model_fingerprint(model: Model) -> str:
    """A hash of the model's class, configuration and every weight that can change a representation.

    A task-routed MoE-BART's task table, router and route overrides are left out (uniform routing never reads
    them), so adding task rows or training the router keeps the cached representations of the backbone.
    """
    digest = hashlib.blake2b(digest_size=16)
    config = model.config.to_dict()
    for key in ("transformers_version", "_name_or_path", "architectures"):
        config.pop(key, None)
    skip_routing = isinstance(model, MoEBartForConditionalGeneration) and model.router is not None
    if skip_routing:
        config.pop("moe", None)  # what shapes the experts is in the weights' names and shapes
    digest.update(f"{type(model).__name__}\n{json.dumps(config, sort_keys=True, default=str)}".encode())
    for name, tensor in model.state_dict().items():
        if skip_routing and ROUTING_PARAMETERS.search(name):
            continue
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tuple(data.shape)}|{data.dtype}".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def folder_fingerprint(path: str | Path) -> str:
    """A hash of every file in a model folder (relative names and bytes)."""
    root = Path(path)
    digest = hashlib.blake2b(digest_size=16)
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(root).as_posix()}\n".encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def representation_fingerprint(
    kind: str, source: str, tokenizer, examples: Mapping[str, Sequence[Example]], **settings
):
    """A hash of everything that decides a set of representations: kind, model or folder, tokenizer, each
    task's name and chosen examples (inputs, and targets for "fisher"), and the settings (projection seed, dim,
    lengths, …)."""
    tasks = [
        (name, text_hash(e.input for e in chosen), text_hash(e.targets[0] for e in chosen) if kind == "fisher" else "")
        for name, chosen in examples.items()
    ]
    state = {
        "version": CACHE_VERSION,
        "kind": kind,
        "source": source,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "tasks": tasks,
        **settings,
    }
    return hashlib.blake2b(json.dumps(state, sort_keys=True).encode(), digest_size=16).hexdigest()
