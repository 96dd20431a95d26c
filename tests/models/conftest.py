"""Tiny dense BART models shared by the model tests."""

import pytest
import torch
from transformers import BartConfig, BartForConditionalGeneration

from moe_mtl import MoEBartConfig, MoEBartForConditionalGeneration, MoEOptions

# sizes of a tiny BART for training tests (`bart` option of MoEMultiTaskModule); no dropout, so training
# forward passes can be reproduced by hand
TINY_BART = dict(
    d_model=16,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=32,
    decoder_ffn_dim=32,
    max_position_embeddings=128,
    dropout=0.0,
)


def tiny_bart_config(**overrides) -> BartConfig:
    values = dict(
        vocab_size=64,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
    )
    values.update(overrides)
    return BartConfig(**values)


def tiny_moe(bart_config: BartConfig | None = None, **options) -> MoEBartForConditionalGeneration:
    config = MoEBartConfig.from_bart_config(bart_config or tiny_bart_config(), MoEOptions(**options))
    return MoEBartForConditionalGeneration(config)


def generating_model(**options) -> MoEBartForConditionalGeneration:
    """A tiny MoE-BART for generation tests: a large init so that experts differ clearly, EOS suppressed so that
    every step decodes."""
    config = tiny_bart_config(init_std=0.5, forced_eos_token_id=None)
    model = tiny_moe(config, num_experts=3, num_tasks=4, **options).eval()
    with torch.no_grad():
        model.final_logits_bias[0, config.eos_token_id] = -1e4
    return model


@pytest.fixture
def dense() -> BartForConditionalGeneration:
    return BartForConditionalGeneration(tiny_bart_config()).eval()


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    """Three examples, one padded, and decoder inputs."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 64, (3, 7), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    input_ids[1, 5:], attention_mask[1, 5:] = 1, 0
    decoder_input_ids = torch.randint(3, 64, (3, 5), generator=generator)
    return dict(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids)
