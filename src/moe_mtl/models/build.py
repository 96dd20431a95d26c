"""Every way of building the MoE-BART a run trains: a new small BART, a dense BART upcycled, a saved MoE-BART
(`build_model`), or an upstream run's MoE-BART over other tasks (`build_from_upstream`, `--model.transfer.init_from`).

Models read no files of task representations: a caller reads the MoE option `task_embeddings` through
`moe_mtl.representations` and passes the tensor (`task_representations`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import Any

import torch
from transformers import AutoConfig, BartConfig

from ..errors import UsageError
from .config import MoEBartConfig, MoEOptions, adopt_saved_shape
from .conversion import load_upstream_weights, task_row_map
from .moe_bart import MoEBartForConditionalGeneration

# a small from-scratch BART (the quick start's); `bart` overrides any of these
SMALL_BART = dict(
    d_model=128,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=512,
    decoder_ffn_dim=512,
    max_position_embeddings=256,
    dropout=0.1,
)


def build_model(
    pretrained: str | None,
    bart: dict[str, Any] | None,
    moe: MoEOptions,
    vocab_size: int | None,
    special_tokens: dict[str, int],
    task_representations: torch.Tensor | None = None,
) -> MoEBartForConditionalGeneration:
    """The MoE-BART: a saved MoE-BART loaded as it is, a dense BART upcycled (`from_dense`), or (no
    `pretrained`) a new BART of the `bart` sizes over the data's vocabulary and special token ids.

    task_representations: (num_tasks, d) task representations as the table's initial rows, in task-id order (the MoE
    option `task_embeddings`, read by `moe_mtl.representations.configured_representations`); a saved MoE-BART
    keeps its own table."""
    if pretrained is not None and bart:
        raise UsageError("model option `bart` sets the sizes of a new model; leave it unset with `pretrained`")
    config = AutoConfig.from_pretrained(pretrained) if pretrained is not None else None
    saved_moe = config is not None and config.model_type == MoEBartConfig.model_type
    if saved_moe:
        task_representations = None
    elif task_representations is not None:
        moe = replace(moe, task_embeddings=None, task_dim=task_representations.shape[1])
    if config is not None:
        if saved_moe:
            saved = config.moe_options
            if saved.num_tasks != moe.num_tasks:
                raise UsageError(
                    f"the MoE-BART in {pretrained} has a task table of {saved.num_tasks} tasks; "
                    f"the data has {moe.num_tasks}"
                )
            # its shape options, the configured rest (selection, freezing, temperature, …), so that a route
            # can be learned anew
            options = adopt_saved_shape(moe, saved, f"the saved MoE-BART {pretrained}")
            model = MoEBartForConditionalGeneration.from_pretrained(pretrained, moe=asdict(options))
            model.set_temperature(options.temperature)  # the configured one, not the saved buffer's
        else:
            model = MoEBartForConditionalGeneration.from_dense(pretrained, task_representations, **asdict(moe))
        if vocab_size is not None and vocab_size > model.config.vocab_size:
            raise UsageError(
                f"the tokenizer has {vocab_size} tokens but the model {pretrained} only {model.config.vocab_size}; "
                f"use the model's own tokenizer (data option `tokenizer: {pretrained}`)"
            )
        return model.train()  # `from_pretrained` returns a model in eval mode: training would run without dropout
    if vocab_size is None:
        raise UsageError("a new model (no `pretrained`) needs `vocab_size` (linked from the data's tokenizer)")
    sizes = {**SMALL_BART, **(bart or {})}
    config = BartConfig(vocab_size=vocab_size, **special_tokens, **sizes)
    return MoEBartForConditionalGeneration(MoEBartConfig.from_bart_config(config, moe), task_representations)


def upstream_config(
    hparams: dict[str, Any],
    vocab_size: int,
    options: MoEOptions,
    special: dict[str, int],
    upstream: str = "the upstream run",
) -> MoEBartConfig:
    """The MoE-BART config of a run started from an upstream run with hyper-parameters `hparams`: the upstream
    architecture (its `pretrained` model's config, or a new BART of its `bart` sizes over its vocabulary of
    `vocab_size` with the `special` token ids) with `options`."""
    pretrained = hparams.get("pretrained")
    if pretrained is not None:
        try:
            config = AutoConfig.from_pretrained(pretrained)
        except OSError as err:
            raise UsageError(
                f"{upstream} was built from `pretrained` {pretrained!r}, whose config cannot be read "
                f"now ({err}); its architecture is needed to rebuild the model"
            ) from None
        return MoEBartConfig.from_bart_config(config, options)
    sizes = {**SMALL_BART, **(hparams.get("bart") or {})}
    return MoEBartConfig.from_bart_config(BartConfig(vocab_size=vocab_size, **special, **sizes), options)


def build_from_upstream(upstream, options: MoEOptions, task_names: Sequence[str]):
    """An upstream run's MoE-BART over the tasks `task_names`, with `options` (the upstream shape options, the
    configured rest): its architecture and weights, per-task rows mapped by task name (`conversion.task_row_map`).

    `upstream` is an upstream run already read (`moe_mtl.runs.read_upstream`: its `hparams`, `state_dict`,
    `task_names`, `trained_tasks`, `tokenizer_path` and `describe()`). Returns (the model in train mode, with
    the configured temperature; for each task of `task_names` its upstream row, None for an unseen task).
    """
    from ..data import load_tokenizer  # loads a tokenizer: only when a run starts

    tokenizer = load_tokenizer(upstream.tokenizer_path) if upstream.tokenizer_path else None
    special = special_token_ids(tokenizer, upstream.hparams.get("pad_token_id"))
    vocab_size = upstream.state_dict["model.shared.weight"].shape[0]
    config = upstream_config(upstream.hparams, vocab_size, options, special, upstream.describe())
    model = MoEBartForConditionalGeneration(config)
    rows = task_row_map(upstream.task_names, task_names, upstream.trained_tasks)
    load_upstream_weights(model, upstream.state_dict, rows, upstream.describe())
    model.set_temperature(options.temperature)
    return model.train(), rows


def model_positions(pretrained: str | None, bart: dict[str, Any] | None) -> int:
    """The positions (max_position_embeddings) of the model `build_model` builds, read without building it."""
    if pretrained is not None:
        return AutoConfig.from_pretrained(pretrained).max_position_embeddings
    return {**SMALL_BART, **(bart or {})}["max_position_embeddings"]


def check_lengths(positions: int, **lengths: int | None) -> None:
    """Data lengths (`max_input_length`, `max_target_length`) within the model's `positions`."""
    for option, length in lengths.items():
        if length is not None and length > positions:
            raise UsageError(
                f"data option `{option}` is {length}, but the model has {positions} positions "
                f"(max_position_embeddings); use at most {positions}"
            )


def special_token_ids(tokenizer, pad_token_id: int | None) -> dict[str, int]:
    """`BartConfig` ids of the tokenizer's special tokens (BART's convention: decoding starts at eos), so a
    new model trains and generates with the tokenizer's own pad, bos and eos (`tokenizer` None: pad only)."""
    ids = {}
    if tokenizer is not None:
        ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
        ids["decoder_start_token_id"] = ids["forced_eos_token_id"] = tokenizer.eos_token_id
    if pad_token_id is not None:
        ids["pad_token_id"] = pad_token_id
    return {key: value for key, value in ids.items() if value is not None}
