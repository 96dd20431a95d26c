"""The sparse MoE-BART model and its routing parts."""

from transformers import AutoConfig, AutoModelForSeq2SeqLM

from .config import MoEBartConfig, MoEOptions
from .moe_bart import MoEBartForConditionalGeneration, MoESeq2SeqLMOutput

# Lets AutoModelForSeq2SeqLM.from_pretrained load a saved MoE-BART directory.
AutoConfig.register(MoEBartConfig.model_type, MoEBartConfig, exist_ok=True)
AutoModelForSeq2SeqLM.register(MoEBartConfig, MoEBartForConditionalGeneration, exist_ok=True)

__all__ = ["MoEBartConfig", "MoEBartForConditionalGeneration", "MoEOptions", "MoESeq2SeqLMOutput"]
