"""The sparse MoE-BART model and its routing parts."""

from .config import MoEBartConfig, MoEOptions
from .moe_bart import MoEBartForConditionalGeneration, MoESeq2SeqLMOutput

__all__ = ["MoEBartConfig", "MoEBartForConditionalGeneration", "MoEOptions", "MoESeq2SeqLMOutput"]
