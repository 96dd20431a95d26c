"""moe_mtl: multi-task learning with task-level sparse Mixture-of-Experts BART."""

from .models import MoEBartConfig, MoEBartForConditionalGeneration, MoEOptions

__version__ = "0.1.0"
__all__ = ["MoEBartConfig", "MoEBartForConditionalGeneration", "MoEOptions", "__version__"]
